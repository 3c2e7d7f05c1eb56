"""The applier: drains the inbox at an adaptive pace (resolver.events.pace), in batches, one write transaction
per batch.

Each event runs in a nested transaction: applied, or aborted and dead-lettered with its reason. Its removal
from the inbox, the record write, the change log and the counters commit together with the batch, so a
kill -9 mid-drain loses or repeats nothing. One applier runs per data directory (under `resolver serve`, in
the events process: resolver.events.process), so events are applied in inbox order.

An UPDATE or DELETE for a record no customer holds (UNKNOWN_RECORD) may have overtaken its CREATE: a CRM's
webhooks are not delivered in order, and in a cluster a record's CREATE and UPDATE may reach different nodes, whose
appliers publish them in either order. Such an event goes back to the inbox's tail and is tried again after a
back-off (RETRY_FIRST_S, doubling up to RETRY_MAX_S) until `[events] unknown_record_wait_s` after it was first
refused; only then is it dead-lettered. It stays accepted and in the inbox meanwhile (counted `requeued` each time).
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
from resolver.errors import ClusterError, DeadlineExceeded, EventRejected, StorageFull, Unavailable
from resolver.events import command, counters, dlq, envelope, inbox
from resolver.events.apply import Applied
from resolver.events.inbox import dedupe_key, remember, sweep_ids
from resolver.events.pace import SAMPLE_S, CpuSource, Pacer, ProcessButThread
from resolver.redact import redact
from resolver.store import Store, Txn
from resolver.writer import Writer, apply_nested

log = logging.getLogger("resolver.events")
EMPTY_POLL_S = 0.05  # an empty inbox is looked at this often
REPORT_S = 10.0  # while events flow, the applier logs its pace this often
QUIET_S = 1.0  # ... and once more when the inbox has stayed empty this long
FULL_PAUSE_S = 5.0  # with the map or disk full, the applier tries again this often (its events wait in the inbox)
RETRY_FIRST_S = 0.25  # an event waiting for its record's CREATE is tried again after this, doubling ...
RETRY_MAX_S = 5.0  # ... up to this
HEAD_SCAN = 4  # an inbox pass looks at no more than this many times its batch of entries (some wait their retry)
_WAITING = ("waiting_since_us", "retries", "retry_at_us")  # what a waiting event's metadata adds


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """An inbox entry, decoded: its key (sequence), its metadata and its original body."""

    key: bytes
    meta: dict[str, Any]
    body: bytes


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
    cmd = command.command_for(meta, body, now_us)  # the new uuid fixed before the apply step (contract §10)
    return apply_nested(store, Txn(store, parent), lambda view, c: command.apply(view, c, settings, schema), cmd)


def _inbox_head(txn: Any, store: Store, limit: int, now_us: int) -> list[InboxEntry]:
    """The first `limit` inbox entries due at `now_us`, in inbox order (one waiting for its retry is passed over;
    no more than HEAD_SCAN * `limit` entries are looked at)."""
    batch: list[InboxEntry] = []
    ring = store.sealer.ring
    with txn.cursor(db=store.db["ev_inbox"]) as cur:
        if cur.first():
            for seen, (k, v) in enumerate(cur, 1):
                meta, body = envelope.decode(v, ring)
                if meta.get("retry_at_us", 0) <= now_us:
                    batch.append(InboxEntry(bytes(k), meta, body))
                if len(batch) >= limit or seen >= HEAD_SCAN * limit:
                    break
    return batch


def _waits_for_create(meta: dict[str, Any], outcome: Applied | Exception, now_us: int, wait_s: float) -> bool:
    """Whether a refused event goes back to the inbox (module docstring): refused UNKNOWN_RECORD, within `wait_s`
    of its first refusal."""
    if not isinstance(outcome, EventRejected) or outcome.reason != "UNKNOWN_RECORD":
        return False
    return now_us - int(meta.get("waiting_since_us", now_us)) < wait_s * 1_000_000


def _requeue(txn: Any, store: Store, entry: InboxEntry, now_us: int) -> None:
    """Put a waiting event back at the inbox's tail, due again after its back-off."""
    retries = int(entry.meta.get("retries", 0)) + 1
    backoff_s = min(RETRY_FIRST_S * 2 ** (retries - 1), RETRY_MAX_S)
    meta = {**entry.meta, "waiting_since_us": int(entry.meta.get("waiting_since_us", now_us)), "retries": retries,
            "retry_at_us": now_us + int(backoff_s * 1_000_000)}
    inbox.append(txn, store.db["ev_inbox"], envelope.encode(meta, entry.body, store.sealer.ring))
    txn.delete(entry.key, db=store.db["ev_inbox"])


def _settle(txn: Any, store: Store, entry: InboxEntry, outcome: Applied | Exception, deltas: Counter[str],
            now_us: int, settings: Settings) -> None:
    """An event's application is over (`outcome`: what it returned, or what it raised): counted, put back to wait
    for its record's CREATE, or dead-lettered if it was refused or failed, and removed from the inbox, in the
    caller's write transaction."""
    db, ring = store.db, store.sealer.ring
    if _waits_for_create(entry.meta, outcome, now_us, settings.events.unknown_record_wait_s):
        _requeue(txn, store, entry, now_us)
        deltas["requeued"] += 1
        return
    key, body = entry.key, entry.body
    meta = {k: v for k, v in entry.meta.items() if k not in _WAITING}
    if isinstance(outcome, Applied):
        deltas["applied"] += 1
        deltas["conflicts"] += len(outcome.conflicts)
        deltas["stale_fields"] += len(outcome.stale)
    else:
        rejection = outcome if isinstance(outcome, EventRejected) else None
        if rejection is None:  # a bug must not wedge the inbox: the event waits in the DLQ instead
            log.error("event from %s failed to apply", meta["source"], exc_info=outcome)
            rejection = EventRejected(f"internal error while applying: {type(outcome).__name__}", reason="APPLY_FAILED")
        rejection.dlq_id = dlq.put(txn, db["ev_dlq"], meta, body, rejection, origin="apply", now_us=now_us, ring=ring,
                                   counters_db=db["ev_counters"])
        deltas["dead_lettered"] += 1
        if rejection is outcome:
            log.info("event %s from %s dead-lettered (%s) as #%d", meta["webhook_id"][:64], meta["source"],
                     rejection.reason, rejection.dlq_id)
    txn.delete(key, db=db["ev_inbox"])


def drain_once(store: Store, settings: Settings, schema: AttributeSchema, limit: int) -> int:
    """Apply up to `limit` inbox events in one write transaction; how many left the inbox."""
    now_us = _now_us()
    with store.write() as view:
        txn = view.txn
        deltas: Counter[str] = Counter()
        batch = _inbox_head(txn, store, limit, now_us)
        for entry in batch:
            outcome: Applied | Exception
            try:
                outcome = run_one(store, txn, entry.meta, entry.body, settings, schema, now_us)
            except StorageFull:
                raise  # not the event's fault: the batch is not stored, its events stay in the inbox
            except Exception as exc:
                outcome = exc
            _settle(txn, store, entry, outcome, deltas, now_us, settings)
            time.sleep(0)  # yield the GIL between events: Resolve threads wait at most one event, not a batch
        counters.add(txn, store.db["ev_counters"], deltas)
    return len(batch)


def _through(writer: Writer, settings: Settings, schema: AttributeSchema, cmd: command.EventCommand
             ) -> Applied | Exception:
    """Apply `cmd` through `writer`: what it returned, or the error it was refused with (the same on every node);
    ClusterError, Unavailable or DeadlineExceeded (this node could not get it applied now) propagate."""
    try:
        return writer.submit(lambda view, c: command.apply(view, c, settings, schema), cmd)
    except (ClusterError, Unavailable, DeadlineExceeded, StorageFull):
        raise
    except Exception as exc:
        return exc


def drain_through_log(store: Store, settings: Settings, schema: AttributeSchema, writer: Writer, limit: int) -> int:
    """A cluster node (contract §10): apply up to `limit` inbox events through the replicated log, in inbox order;
    how many left the inbox.

    Each event's application is published as a command and waited for until this node applied it; only then is
    the event removed from this node's inbox (dead-lettered here if it was refused), in a local transaction. A
    crash in between leaves it in the inbox, and it is published again: under the same message id the stream
    drops it within its de-duplication window, and past it the second application changes nothing (newer-wins
    per field and slot, resolver.events.command). The inbox, the DLQ and the event counters are this node's own.
    A node that cannot get an event applied now (NATS away, past `apply_timeout_s`) stops the batch there: that
    event and those after it wait in the inbox, in order.
    """
    with store.read() as view:
        batch = _inbox_head(view.txn, store, limit, _now_us())
    done = 0
    for entry in batch:
        now_us = _now_us()
        # a retry is an application of its own: under the first one's message id the stream would drop it
        replay = f"retry {entry.meta['retries']}" if entry.meta.get("retries") else ""
        try:
            outcome = _through(writer, settings, schema, command.command_for(entry.meta, entry.body, now_us, replay))
        except (ClusterError, Unavailable, DeadlineExceeded) as exc:
            log.warning("event applier: %s; the event waits in the inbox", exc)
            break
        with store.write() as view:
            deltas: Counter[str] = Counter()
            if view.txn.get(entry.key, db=store.db["ev_inbox"]) is not None:  # else: forgotten meanwhile (erasure)
                _settle(view.txn, store, entry, outcome, deltas, now_us, settings)
            counters.add(view.txn, store.db["ev_counters"], deltas)
        done += 1
    return done


def replay(store: Store, settings: Settings, schema: AttributeSchema, dlq_id: int,
           writer: Writer | None = None) -> ReplayResult:
    """Re-run validation, mapping and apply of a dead letter with the current configuration (`writer`: a cluster
    node's, the apply goes through the replicated log; the DLQ stays this node's).

    Applied: the entry leaves the DLQ (dead_lettered -1, applied +1). Failed again: it stays with the new
    reason. Idempotent: a second replay of an applied entry finds nothing (DeadLetterNotFound), and
    re-applying the same event is a no-op anyway (per-field event times).
    """
    db = store.db
    now_us = _now_us()
    ring = store.sealer.ring
    if writer is not None:  # a cluster node: applied through the log first, then the dead letter settled here
        with store.read() as view:
            meta, body = dlq.get(view.txn, db["ev_dlq"], dlq_id, ring=ring)
        replay_of = f"dead letter {dlq_id} at {now_us}"  # an application of its own, not a retry of the first
        outcome = _through(writer, settings, schema, command.command_for(meta, body, now_us, replay_of))
        if isinstance(outcome, Exception) and not isinstance(outcome, EventRejected):
            raise outcome
        with store.write() as view:
            dlq.get(view.txn, db["ev_dlq"], dlq_id, ring=ring)  # DeadLetterNotFound: replayed meanwhile
            return _replayed(view.txn, store, dlq_id, meta, body, outcome, now_us)
    with store.write() as view:
        meta, body = dlq.get(view.txn, db["ev_dlq"], dlq_id, ring=ring)
        try:
            outcome = run_one(store, view.txn, meta, body, settings, schema, now_us)
        except EventRejected as exc:
            outcome = exc
        return _replayed(view.txn, store, dlq_id, meta, body, outcome, now_us)


def _replayed(txn: Any, store: Store, dlq_id: int, meta: dict[str, Any], body: bytes,
              outcome: Applied | EventRejected, now_us: int) -> ReplayResult:
    """A dead letter's replay is over: it leaves the DLQ (applied), or stays with its new reason."""
    db = store.db
    if isinstance(outcome, EventRejected):
        dlq.update(txn, db["ev_dlq"], dlq_id, meta, body, outcome, now_us, ring=store.sealer.ring)
        return ReplayResult(False, outcome.reason, redact(outcome.message))  # shown to operators: the choke point
    txn.delete(dlq.key(dlq_id), db=db["ev_dlq"])
    remember(txn, db, dedupe_key(meta["source"], meta["webhook_id"]),
             {"status": 202, "at_us": now_us, "replayed_from": dlq_id})
    counters.add(txn, db["ev_counters"], {"applied": 1, "dead_lettered": -1, "conflicts": len(outcome.conflicts),
                                          "stale_fields": len(outcome.stale)})
    return ReplayResult(True, customer_uuid=outcome.customer_uuid)


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
    """A daemon thread draining the inbox, `events.batch` events per write transaction (with a cluster node's
    `writer`: per event, through the replicated log), at the pace of
    resolver.events.pace: up to `rate_per_s` while the serving processes are idle, down to `min_rate_per_s` while
    they are busy. By default it watches the CPU of its own process but its own thread (the applier as a thread of
    a serving process); the events process points it at the serving processes with `watch()`. While it drains a
    backlog (it took a full batch) it logs its pace every REPORT_S, and once the inbox has stayed empty for QUIET_S."""

    def __init__(self, store: Store, settings: Settings, schema: AttributeSchema,
                 on_idle: Callable[[], None] | None = None, writer: Writer | None = None) -> None:
        self.store = store
        self.settings = settings
        self.schema = schema
        self.on_idle = on_idle
        self.writer = writer  # a cluster node's: events are applied through the replicated log (drain_through_log)
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
                n = (drain_once(self.store, self.settings, self.schema, ev.batch) if self.writer is None
                     else drain_through_log(self.store, self.settings, self.schema, self.writer, ev.batch))
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
