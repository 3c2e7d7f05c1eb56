"""Group commit: one writer thread per process applies queued commands in shared write transactions.

Every mutating request is still atomic on its own (a nested transaction per command: a command that fails
rolls back alone) and durable before its caller hears back (the caller's answer is released only after the
batch's transaction committed and synced). What changes is the cost: one fsync per batch instead of one per
request, so a burst of CRM writes no longer queues behind the disk, and no handler thread waits on the LMDB
write lock (only the writer thread takes it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from resolver import faults
from resolver.errors import DeadlineExceeded, ResolverError, StorageFull
from resolver.store import Store, Txn

log = logging.getLogger("resolver.writer")
T = TypeVar("T")
C = TypeVar("C")  # a command
MAX_BATCH = 256
_STOP = object()


def apply_nested(store: Store, parent: Txn, fn: Callable[[Txn, C], T], command: C) -> T:
    """Run `fn(txn, command)` in a nested transaction of `parent`: kept if it returns, rolled back alone
    if it raises (the exception propagates; a full map as StorageFull, Store.nested). Each command gets a fresh
    Txn, so no record cached by an aborted command survives it."""
    with store.nested(parent) as txn:
        return fn(txn, command)


def _unless_expired(fn: Callable[[Txn, C], T], deadline: float) -> Callable[[Txn, C], T]:
    """`fn`, checking first, when the writer reaches the command, that its caller's deadline has not passed."""

    def apply(txn: Txn, command: C) -> T:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed while the write waited for the writer; nothing was written",
                                   stage="queued")
        return fn(txn, command)

    return apply


class Writer:
    """Applies `fn(txn, command)` for submitted commands, in submission order, in batched transactions."""

    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="resolver-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Txn, C], T], command: C, *, deadline: float | None = None) -> T:
        """Apply one command; returns its result or raises its error, once the write is durable. `deadline` (a
        time.monotonic() instant): a command still queued when it passes is skipped, DeadlineExceeded (stage
        "queued"), nothing written: its caller has stopped waiting, and a retry with the same key does the work."""
        return self.submit_nowait(fn, command, deadline=deadline).result()

    def submit_nowait(self, fn: Callable[[Txn, C], T], command: C, *, deadline: float | None = None) -> Future[T]:
        """Queue one command; its future is resolved once the write is durable (asyncio: `asyncio.wrap_future`)."""
        future: Future[T] = Future()
        self._queue.put((fn if deadline is None else _unless_expired(fn, deadline), command, future))
        return future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)  # finish this batch first, then stop
                    break
                batch.append(nxt)
            self._apply(batch)

    def _apply(self, batch: list[tuple[Callable[[Txn, Any], Any], Any, Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        if faults.CRASH is not None:  # test-only crash points (resolver.faults); None in production
            faults.CRASH.reached("before_txn")
        try:
            with self.store.write() as txn:
                for fn, command, future in batch:
                    try:
                        outcomes.append((future, True, apply_nested(self.store, txn, fn, command)))
                    except ResolverError as exc:
                        outcomes.append((future, False, exc))
                    except Exception as exc:  # a bug in one command must not sink the others
                        log.exception("a write command failed with an internal error")
                        outcomes.append((future, False, exc))
                    if faults.CRASH is not None:
                        faults.CRASH.reached("mid_txn")
        except Exception as exc:  # the batch's commit failed: nothing of it is durable
            if isinstance(exc, StorageFull):  # the operator's to fix, and its message says how: no traceback
                log.warning("a write batch of %d command(s) failed to commit: %s", len(batch), exc.message)
            else:
                log.exception("a write batch failed to commit")
            for _, _, future in batch:
                future.set_exception(exc)
            return
        if faults.CRASH is not None:
            faults.CRASH.reached("after_commit")
        # committed and synced: only now may callers answer
        for future, ok, value in outcomes:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
