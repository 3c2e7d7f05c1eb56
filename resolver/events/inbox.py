"""Admission (contract §5): authenticate, validate, dedupe, and write the event to the durable inbox.

One code path for HTTP and gRPC. The event is acknowledged only after the write transaction that stores it
(with its dedupe entry and the counters) has committed. Admissions waiting at the same time, or arriving within
`[events] commit_window_ms` of the first, share one synced transaction (group commit: one committer thread), so
intake is not bound by one fsync per event and a burst of webhooks flushes the disk a few times, not per event.
A signed event that fails schema or mapping goes to the dead-letter queue in that same transaction and is
answered 400 / INVALID_ARGUMENT. Unsigned or badly signed requests are counted (in memory, flushed with the
next write) and never stored; so are requests refused because the inbox is full, which a read transaction
decides before anything is queued (the committer checks again, authoritatively).
"""

from __future__ import annotations

import logging
import math
import queue
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import orjson

from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.errors import EventRejected, InboxFull, StorageFull, Unauthenticated, Unavailable, UnknownSource
from resolver.events import counters, dlq, envelope, pace, signatures
from resolver.events.format import interpret
from resolver.store import Store

_U64 = struct.Struct(">Q")
GROUP_COMMIT_MAX = 256  # admissions written by one transaction at most
COMMIT_TIMEOUT_S = 30.0
log = logging.getLogger("resolver.events")


@dataclass(frozen=True, slots=True)
class _Item:
    """An admission waiting for the committer."""

    meta: dict[str, Any]
    body: bytes
    key: bytes
    rejection: EventRejected | None
    now_us: int
    done: Future[Admission]


@dataclass(frozen=True, slots=True)
class Admission:
    webhook_id: str
    duplicate: bool
    inbox_sequence: int
    http_status: int  # 202, or for a duplicate the status its first delivery got


def append(txn: Any, inbox: Any, stored: bytes) -> int:
    """Put `stored` (an envelope) at the inbox's tail, in the caller's write transaction; its sequence number."""
    with txn.cursor(db=inbox) as cur:
        seq = _U64.unpack(cur.key())[0] + 1 if cur.last() else 1
    txn.put(_U64.pack(seq), stored, db=inbox, append=True)
    return seq


def dedupe_key(source: str, webhook_id: str) -> bytes:
    return source.encode() + b"\0" + webhook_id.encode()


def remember(txn: Any, db: Mapping[str, Any], key: bytes, outcome: dict[str, Any]) -> None:
    """Record a webhook-id's first outcome (dedupe), with its place in the sweep order."""
    txn.put(key, orjson.dumps(outcome), db=db["ev_ids"])
    txn.put(_U64.pack(outcome["at_us"]) + key, b"", db=db["ev_ids_exp"])


def sweep_ids(store: Store, before_us: int, limit: int = 1000) -> int:
    """Forget dedupe entries accepted before `before_us` (up to `limit`); how many were removed.

    Past this window a re-delivered event is admitted again, and then changes nothing: its fields carry the
    same event time as the values it set (resolver.events.apply).
    """
    db = store.db
    removed = 0
    with store.write() as view, view.txn.cursor(db=db["ev_ids_exp"]) as cur:
        if not cur.first():
            return 0
        while removed < limit:
            k = cur.key()
            if not k or _U64.unpack_from(k)[0] >= before_us:
                break
            view.txn.delete(k[8:], db=db["ev_ids"])
            removed += 1
            if not cur.delete():
                break
    return removed


class Ingestor:
    """Admits events into the inbox of one store. Thread-safe."""

    def __init__(self, store: Store, settings: Settings, schema: AttributeSchema,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.schema = schema
        self.clock = clock
        self.secrets = signatures.SourceSecrets(settings)  # swapped on SIGHUP (resolver.reload)
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._committer: threading.Thread | None = None
        self._closed = False
        # The applier's pace, for the retry delay of a full inbox: its floor here; the events process, where the
        # applier runs, points it at the current pace (resolver.events.process.watch_serving).
        self.drain_rate: Callable[[], float] = lambda: pace.floor(settings.events)

    def _count(self, name: str) -> None:
        with self._lock:
            self._pending[name] += 1

    def _take_pending(self) -> Counter[str]:
        with self._lock:
            taken, self._pending = self._pending, Counter()
        return taken

    def flush(self) -> None:
        """Write the in-memory counts (received, rejected) to the store."""
        with self._lock:
            if not self._pending:
                return
        taken = self._take_pending()
        with self.store.write() as view:
            counters.add(view.txn, self.store.db["ev_counters"], taken)

    def admit(self, source: str, headers: Mapping[str, str], body: bytes) -> Admission:
        """Admit one event; raises UnknownSource, Unauthenticated, InboxFull or EventRejected (dead-lettered).

        Returns (or raises a dead-lettered EventRejected) only after the transaction storing it committed.
        """
        return self.submit(source, headers, body).result(timeout=COMMIT_TIMEOUT_S)

    def submit(self, source: str, headers: Mapping[str, str], body: bytes) -> Future[Admission]:
        """Check one event here and queue it for the committer, without waiting: what `admit` does before it
        blocks. Raises UnknownSource, Unauthenticated, EventRejected (too large) or InboxFull (the inbox is at its
        high-water mark) at once; the future ends with the Admission, or InboxFull / a dead-lettered
        EventRejected, once the transaction has committed.
        An asynchronous transport awaits the future instead of holding a thread for each request.
        """
        self._count("received")
        headers = {k.lower(): v for k, v in headers.items()}
        spec = self.settings.sources.get(source)
        if spec is None:
            self._count("rejected_other")
            raise UnknownSource(f"no source system {source!r} is configured")
        if len(body) > self.settings.events.max_body_bytes:
            self._count("rejected_other")
            raise EventRejected(f"the body is larger than {self.settings.events.max_body_bytes} bytes",
                                reason="TOO_LARGE")
        now = self.clock()
        try:
            webhook_id = signatures.verify(headers, body, self.secrets.of(source), now,
                                           self.settings.events.timestamp_tolerance_s)
        except Unauthenticated:
            self._count("rejected_unsigned")
            raise
        key = dedupe_key(source, webhook_id)
        self._refuse_if_full(key)
        rejection: EventRejected | None = None
        try:
            interpret(source, webhook_id, body, self.settings, self.schema)
        except EventRejected as exc:
            rejection = exc
        now_us = int(now * 1_000_000)
        meta = {"source": source, "webhook_id": webhook_id, "received_us": now_us,
                "headers": signatures.redact(headers)}
        item = _Item(meta, body, key, rejection, now_us, Future())
        self._submit(item)
        return item.done

    def _full(self, in_inbox: int) -> InboxFull | None:
        """InboxFull (with the delay in which the applier makes room for a batch, at `drain_rate()`) at the
        high-water mark."""
        ev = self.settings.events
        if in_inbox < ev.high_water:
            return None
        retry = max(1, math.ceil((in_inbox - ev.high_water + ev.batch) / max(self.drain_rate(), 1e-3)))
        return InboxFull(f"the event inbox is full; retry in {retry}s", retry_after_s=retry)

    def _refuse_if_full(self, key: bytes) -> None:
        """Answer a full inbox from a read transaction (counted in memory), so a sender that ignores Retry-After
        costs no write transaction and no disk flush per request. A re-delivery of an event already seen goes on
        to the committer, which answers it as a duplicate; the committer checks the mark again (authoritative)."""
        db = self.store.db
        with self.store.read() as view:
            if view.txn.get(key, db=db["ev_ids"]) is not None:
                return
            full = self._full(int(view.txn.stat(db["ev_inbox"])["entries"]))
        if full is not None:
            self._count("throttled")
            raise full

    # -- group commit: one committer thread writes every admission waiting, in one synced transaction ---------
    def _submit(self, item: _Item) -> None:
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down; retry")
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name="inbox-committer", daemon=True)
                self._committer.start()
            self._queue.put(item)

    def _commit_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.settings.events.commit_window_ms / 1000.0
            while len(batch) < GROUP_COMMIT_MAX:
                try:
                    wait = deadline - time.monotonic()
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            # a caller that stopped waiting (its future cancelled) is not written; the others can no longer cancel
            batch = [item for item in batch if item.done.set_running_or_notify_cancel()]
            if not batch:
                continue
            outcomes: list[Admission | BaseException] = []
            try:
                with self.store.write() as view:
                    deltas: Counter[str] = self._take_pending()
                    outcomes = [self._admit_in(view.txn, item, deltas) for item in batch]
                    counters.add(view.txn, self.store.db["ev_counters"], deltas)
            except BaseException as exc:  # nothing was stored: every caller gets the error
                if isinstance(exc, StorageFull):  # the operator's to fix, and its message says how: no traceback
                    log.warning("inbox write of %d event(s) refused: %s", len(batch), exc.message)
                else:
                    log.exception("inbox write failed")
                outcomes = [exc] * len(batch)
            for item, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    item.done.set_exception(outcome)
                else:
                    item.done.set_result(outcome)

    def _admit_in(self, txn: Any, item: _Item, deltas: Counter[str]) -> Admission | BaseException:
        db = self.store.db
        webhook_id = item.meta["webhook_id"]
        seen = txn.get(item.key, db=db["ev_ids"])
        if seen is not None:
            deltas["duplicates"] += 1
            return Admission(webhook_id, True, 0, int(orjson.loads(seen).get("status", 202)))
        full = self._full(int(txn.stat(db["ev_inbox"])["entries"]))
        if full is not None:
            deltas["throttled"] += 1
            return full
        deltas["accepted"] += 1
        if item.rejection is not None:
            item.rejection.dlq_id = dlq.put(txn, db["ev_dlq"], item.meta, item.body, item.rejection,
                                            origin="admission", now_us=item.now_us, ring=self.store.sealer.ring,
                                            counters_db=db["ev_counters"])
            remember(txn, db, item.key, {"status": 400, "at_us": item.now_us, "dlq": item.rejection.dlq_id})
            deltas["dead_lettered"] += 1
            return item.rejection
        seq = append(txn, db["ev_inbox"], envelope.encode(item.meta, item.body, self.store.sealer.ring))
        remember(txn, db, item.key, {"status": 202, "at_us": item.now_us})
        return Admission(webhook_id, False, seq, 202)

    def close(self) -> None:
        """Stop the committer after the admissions already queued (later ones: UNAVAILABLE)."""
        with self._lock:
            self._closed = True
            committer = self._committer
        if committer is not None:
            self._queue.put(None)
            committer.join(COMMIT_TIMEOUT_S)
