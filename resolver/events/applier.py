"""The applier: drains the inbox at an adaptive pace (resolver.events.pace), in batches, one write transaction
per batch.

Each event runs in a nested transaction: applied, or aborted and dead-lettered with its reason. Its removal
from the inbox, the record write, the change log and the counters commit together with the batch, so a
kill -9 mid-drain loses or repeats nothing. One applier runs per data directory (under `resolver serve`, in
the events process: resolver.events.process), so events are applied in inbox order.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.errors import EventRejected, StorageFull
from resolver.events import counters, dlq, envelope
from resolver.events.apply import Applied, apply_event
from resolver.events.format import interpret
from resolver.events.inbox import dedupe_key, remember, sweep_ids
from resolver.events.pace import SAMPLE_S, CpuSource, Pacer, ProcessButThread
from resolver.redact import redact
from resolver.store import Store, Txn
from resolver.uuids import new_customer_uuid
from resolver.writer import apply_nested

log = logging.getLogger("resolver.events")
EMPTY_POLL_S = 0.05  # an empty inbox is looked at this often
REPORT_S = 10.0  # while events flow, the applier logs its pace this often
QUIET_S = 1.0  # ... and once more when the inbox has stayed empty this long
FULL_PAUSE_S = 5.0  # with the map or disk full, the applier tries again this often (its events wait in the inbox)


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
    new_uuid = new_customer_uuid()  # fixed before the apply step (contract §10)
    limits, matching = settings.limits, settings.matching
    return apply_nested(store, Txn(store, parent), lambda view, e: apply_event(
        view, e, schema, now_us=now_us, new_uuid=new_uuid, identifiers_per_customer=limits.identifiers_per_customer,
        max_fanout=matching.max_fanout), ev)


def drain_once(store: Store, settings: Settings, schema: AttributeSchema, limit: int) -> int:
    """Apply up to `limit` inbox events in one write transaction; how many left the inbox."""
    db = store.db
    ring = store.sealer.ring
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
            meta, body = envelope.decode(raw, ring)
            try:
                result = run_one(store, txn, meta, body, settings, schema, now_us)
                deltas["applied"] += 1
                deltas["conflicts"] += len(result.conflicts)
                deltas["stale_fields"] += len(result.stale)
            except EventRejected as exc:
                exc.dlq_id = dlq.put(txn, db["ev_dlq"], meta, body, exc, origin="apply", now_us=now_us, ring=ring,
                                     counters_db=db["ev_counters"])
                deltas["dead_lettered"] += 1
                log.info("event %s from %s dead-lettered (%s) as #%d", meta["webhook_id"][:64], meta["source"],
                         exc.reason, exc.dlq_id)
            except StorageFull:
                raise  # not the event's fault: the batch is not stored, its events stay in the inbox
            except Exception as exc:  # a bug must not wedge the inbox: the event waits in the DLQ instead
                log.exception("event from %s failed to apply", meta["source"])
                rej = EventRejected(f"internal error while applying: {type(exc).__name__}", reason="APPLY_FAILED")
                rej.dlq_id = dlq.put(txn, db["ev_dlq"], meta, body, rej, origin="apply", now_us=now_us, ring=ring,
                                     counters_db=db["ev_counters"])
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
        meta, body = dlq.get(txn, db["ev_dlq"], dlq_id, ring=store.sealer.ring)
        try:
            result = run_one(store, txn, meta, body, settings, schema, now_us)
        except EventRejected as exc:
            dlq.update(txn, db["ev_dlq"], dlq_id, meta, body, exc, now_us, ring=store.sealer.ring)
            return ReplayResult(False, exc.reason, redact(exc.message))  # shown to operators: the choke point
        txn.delete(dlq.key(dlq_id), db=db["ev_dlq"])
        remember(txn, db, dedupe_key(meta["source"], meta["webhook_id"]),
                 {"status": 202, "at_us": now_us, "replayed_from": dlq_id})
        counters.add(txn, db["ev_counters"], {"applied": 1, "dead_lettered": -1, "conflicts": len(result.conflicts),
                                              "stale_fields": len(result.stale)})
        return ReplayResult(True, customer_uuid=result.customer_uuid)


class _Stretch:
    """What the applier did from `started` to `ended`, for its log: events out of the inbox, the slowest and
    fastest pace it kept, and the least and most of the CPU it saw the serving processes use."""

    def __init__(self, now: float) -> None:
        self.started = self.ended = now
        self.events = 0
        self.backlog = False  # a full batch was taken: worth a line in the log (a trickle of events is not)
        self.rates = (math.inf, 0.0)
        self.shares = (math.inf, -1.0)

    def see(self, rate: float, share: float | None) -> None:
        self.rates = (min(self.rates[0], rate), max(self.rates[1], rate))
        if share is not None:
            self.shares = (min(self.shares[0], share), max(self.shares[1], share))

    def line(self) -> str:
        took = max(self.ended - self.started, 1e-9)
        low, high = self.rates
        pace = f"pace {low:.0f}-{high:.0f}/s" if high else "pace -"
        shares = (f"serving processes at {100 * self.shares[0]:.0f}-{100 * self.shares[1]:.0f}% of the CPU"
                  if self.shares[1] >= 0 else "serving CPU not read")
        return f"{self.events} events in {took:.1f} s ({self.events / took:.0f}/s); {pace}; {shares}"


class Applier:
    """A daemon thread draining the inbox, `events.batch` events per write transaction, at the pace of
    resolver.events.pace: up to `rate_per_s` while the serving processes are idle, down to `min_rate_per_s` while
    they are busy. By default it watches the CPU of its own process but its own thread (the applier as a thread of
    a serving process); the events process points it at the serving processes with `watch()`. While it drains a
    backlog (it took a full batch) it logs its pace every REPORT_S, and once the inbox has stayed empty for QUIET_S."""

    def __init__(self, store: Store, settings: Settings, schema: AttributeSchema,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.schema = schema
        self.on_idle = on_idle
        self.pacer = Pacer(settings.events)
        self._watching = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-applier", daemon=True)
        self._thread.start()

    def watch(self, source: CpuSource) -> None:
        """Pace by the CPU of `source` from now on (resolver.events.pace.serving_processes in the events process)."""
        with self._lock:
            self._watching = True
            self.pacer.use(source)

    def _sweep(self) -> None:
        """Forget webhook-ids older than the idempotency retention (at least twice the timestamp tolerance)."""
        keep_s = max(self.settings.reliability.idempotency_retention_s, 2 * self.settings.events.timestamp_tolerance_s)
        before = _now_us() - int(keep_s * 1_000_000)
        while sweep_ids(self.store, before) == 1000 and not self._stop.is_set():
            pass

    def _run(self) -> None:
        with self._lock:
            if not self._watching:
                self.pacer.use(ProcessButThread(threading.get_native_id()))
        ev = self.settings.events
        next_sweep = 0.0
        drain: _Stretch | None = None  # since the inbox was last empty for QUIET_S
        period: _Stretch | None = None  # since the last report
        while not self._stop.is_set():
            started = time.monotonic()
            if started >= next_sweep:
                next_sweep = started + self.settings.storage.sweep_interval_s
                try:
                    self._sweep()
                except Exception:
                    log.exception("event dedupe sweep failed")
            self.pacer.rate()  # read the serving CPU even while the inbox is empty: a burst starts from a fresh figure
            try:
                n = drain_once(self.store, self.settings, self.schema, ev.batch)
                if self.on_idle is not None and n < ev.batch:
                    self.on_idle()
            except StorageFull as exc:
                log.warning("event applier paused for %gs: %s", FULL_PAUSE_S, exc.message)
                n = 0
                self._stop.wait(FULL_PAUSE_S)
            except Exception:  # never take the server down; retry after a pause
                log.exception("event applier failed; retrying")
                n = 0
                self._stop.wait(1.0)
            if n:
                drain = drain or _Stretch(started)
                period = period or _Stretch(started)
                self._pace(n, started, (drain, period))
                for stretch in (drain, period):
                    stretch.events += n
                    stretch.ended = time.monotonic()
                    stretch.backlog |= n == ev.batch
                if period.ended - period.started >= REPORT_S:
                    if period.backlog:
                        log.info("applier: %s", period.line())
                    period = None
                continue
            if drain is not None and started - drain.ended >= QUIET_S:
                if drain.backlog:
                    log.info("applier: inbox empty: %s", drain.line())
                drain = period = None
            self._stop.wait(EMPTY_POLL_S)

    def _pace(self, n: int, started: float, stretches: tuple[_Stretch, ...]) -> None:
        """Wait until `n` events started at `started` have taken n / rate seconds, the rate read again every
        SAMPLE_S meanwhile: the serving processes getting busy stretch the wait, their going idle shortens it."""
        while not self._stop.is_set():
            rate = self.pacer.rate()
            for s in stretches:
                s.see(rate, self.pacer.share)
            left = started + n / rate - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, SAMPLE_S))

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
