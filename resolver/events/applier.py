"""The applier: drains the inbox at the configured rate, in batches, one write transaction per batch.

Each event runs in a nested transaction: applied, or aborted and dead-lettered with its reason. Its removal
from the inbox, the record write, the change log and the counters commit together with the batch, so a
kill -9 mid-drain loses or repeats nothing. One applier runs per data directory (under `resolver serve`, in
the events process: resolver.events.process), so events are applied in inbox order.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.errors import EventRejected
from resolver.events import counters, dlq, envelope
from resolver.events.apply import Applied, apply_event
from resolver.events.format import interpret
from resolver.events.inbox import dedupe_key, remember, sweep_ids
from resolver.store import Store, Txn
from resolver.writer import apply_nested

log = logging.getLogger("resolver.events")


@dataclass(frozen=True, slots=True)
class ReplayResult:
    applied: bool
    reason: str = ""
    detail: str = ""
    customer_uuid: str = ""


def _now_us() -> int:
    return time.time_ns() // 1000


def run_one(store: Store, parent: Any, meta: dict[str, Any], body: bytes, settings: Settings,
            schema: AttributeSchema, now_us: int) -> Applied:
    """Interpret and apply one stored event in a transaction nested in `parent`; EventRejected if it cannot be."""
    ev = interpret(meta["source"], meta["webhook_id"], body, settings, schema)
    new_uuid = str(uuidlib.uuid4())
    return apply_nested(store, Txn(store, parent), lambda view, e: apply_event(view, e, schema, now_us=now_us,
                                                                                 new_uuid=new_uuid), ev)


def drain_once(store: Store, settings: Settings, schema: AttributeSchema, limit: int) -> int:
    """Apply up to `limit` inbox events in one write transaction; how many left the inbox."""
    db = store.db
    now_us = _now_us()
    with store.write() as view:
        txn = view.txn
        with txn.cursor(db=db["ev_inbox"]) as cur:
            batch: list[tuple[bytes, bytes]] = []
            if cur.first():
                for k, v in cur:
                    batch.append((bytes(k), bytes(v)))
                    if len(batch) >= limit:
                        break
        deltas: Counter[str] = Counter()
        for key, raw in batch:
            meta, body = envelope.decode(raw)
            try:
                result = run_one(store, txn, meta, body, settings, schema, now_us)
                deltas["applied"] += 1
                deltas["conflicts"] += len(result.conflicts)
                deltas["stale_fields"] += len(result.stale)
            except EventRejected as exc:
                exc.dlq_id = dlq.put(txn, db["ev_dlq"], meta, body, exc, origin="apply", now_us=now_us)
                deltas["dead_lettered"] += 1
                log.info("event %s from %s dead-lettered (%s) as #%d", meta["webhook_id"][:64], meta["source"],
                         exc.reason, exc.dlq_id)
            except Exception as exc:  # a bug must not wedge the inbox: the event waits in the DLQ instead
                log.exception("event from %s failed to apply", meta["source"])
                rej = EventRejected(f"internal error while applying: {type(exc).__name__}", reason="APPLY_FAILED")
                rej.dlq_id = dlq.put(txn, db["ev_dlq"], meta, body, rej, origin="apply", now_us=now_us)
                deltas["dead_lettered"] += 1
            txn.delete(key, db=db["ev_inbox"])
            time.sleep(0)  # yield the GIL between events: Resolve threads wait at most one event, not a batch
        counters.add(txn, db["ev_counters"], deltas)
    return len(batch)


def replay(store: Store, settings: Settings, schema: AttributeSchema, dlq_id: int) -> ReplayResult:
    """Re-run validation, mapping and apply of a dead letter with the current configuration.

    Applied: the entry leaves the DLQ (dead_lettered -1, applied +1). Failed again: it stays with the new
    reason. Idempotent: a second replay of an applied entry finds nothing (DeadLetterNotFound), and
    re-applying the same event is a no-op anyway (per-field event times).
    """
    db = store.db
    now_us = _now_us()
    with store.write() as view:
        txn = view.txn
        meta, body = dlq.get(txn, db["ev_dlq"], dlq_id)
        try:
            result = run_one(store, txn, meta, body, settings, schema, now_us)
        except EventRejected as exc:
            dlq.update(txn, db["ev_dlq"], dlq_id, meta, body, exc, now_us)
            return ReplayResult(False, exc.reason, exc.message)
        txn.delete(dlq.key(dlq_id), db=db["ev_dlq"])
        remember(txn, db, dedupe_key(meta["source"], meta["webhook_id"]),
                 {"status": 202, "at_us": now_us, "replayed_from": dlq_id})
        counters.add(txn, db["ev_counters"], {"applied": 1, "dead_lettered": -1, "conflicts": len(result.conflicts),
                                              "stale_fields": len(result.stale)})
        return ReplayResult(True, customer_uuid=result.customer_uuid)


class Applier:
    """A daemon thread draining the inbox at `events.rate_per_s`, `events.batch` events per transaction."""

    def __init__(self, store: Store, settings: Settings, schema: AttributeSchema,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.schema = schema
        self.on_idle = on_idle
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-applier", daemon=True)
        self._thread.start()

    def _sweep(self) -> None:
        """Forget webhook-ids older than the idempotency retention (at least twice the timestamp tolerance)."""
        keep_s = max(self.settings.reliability.idempotency_retention_s, 2 * self.settings.events.timestamp_tolerance_s)
        before = _now_us() - int(keep_s * 1_000_000)
        while sweep_ids(self.store, before) == 1000 and not self._stop.is_set():
            pass

    def _run(self) -> None:
        ev = self.settings.events
        next_sweep = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            if started >= next_sweep:
                next_sweep = started + self.settings.storage.sweep_interval_s
                try:
                    self._sweep()
                except Exception:
                    log.exception("event dedupe sweep failed")
            try:
                n = drain_once(self.store, self.settings, self.schema, ev.batch)
                if self.on_idle is not None and n < ev.batch:
                    self.on_idle()
            except Exception:  # never take the server down; retry after a pause
                log.exception("event applier failed; retrying")
                n = 0
                self._stop.wait(1.0)
            # pace: n events may take n / rate seconds; an empty inbox is polled every 50 ms
            budget = n / ev.rate_per_s if n else 0.05
            self._stop.wait(max(0.0, budget - (time.monotonic() - started)))

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
