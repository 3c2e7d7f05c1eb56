"""The use cases over one store: Resolve, Upsert, Merge, Unmerge, GetCustomer and the ledger sweep.

Built by resolver.bootstrap (the composition root), never by an entry point itself.
"""

from __future__ import annotations

import logging
import threading
import time

from resolver import merge as merging
from resolver import retention
from resolver import unmerge as unmerging
from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.errors import DeadlineExceeded
from resolver.normalize import Policy
from resolver.resolve import Resolver
from resolver.store import Store, Txn
from resolver.upsert import UpsertCommand, UpsertInput, UpsertResult, apply, prepare
from resolver.writer import Writer

log = logging.getLogger("resolver.service")


def now_us() -> int:
    return time.time_ns() // 1000


class Service:
    """Resolve, Upsert, Merge and GetCustomer over one open store.

    `writer` is None for a read-only or bulk user (the importer commits its own batches): upsert and merge
    then raise RuntimeError. `close` closes the writer and the store.
    """

    def __init__(self, settings: Settings, store: Store, schema: AttributeSchema, policy: Policy,
                 writer: Writer | None) -> None:
        self.settings = settings
        self.store = store
        self.schema = schema
        self.policy = policy
        self.resolver = Resolver(store, settings, schema, policy)
        self.resolve = self.resolver.resolve
        self.resolve_many = self.resolver.resolve_many
        self.get_customer = self.resolver.get_customer
        self._writer = writer
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def upsert(self, inp: UpsertInput, deadline: float | None = None) -> UpsertResult:
        """Validate, then apply in one durable write transaction. `deadline` as in Resolver.resolve."""
        cmd = prepare(inp, self.settings, self.schema, self.policy, now_us=now_us(), deadline=deadline)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the write started; nothing was written")
        return self.writer.submit(self._apply_upsert, cmd, deadline=deadline)

    @property
    def writer(self) -> Writer:
        """The one writer thread of this store (RuntimeError if this service was built without one)."""
        if self._writer is None:
            raise RuntimeError("this service was built without a writer (resolver.bootstrap.build_service)")
        return self._writer

    def _apply_upsert(self, view: Txn, cmd: UpsertCommand) -> UpsertResult:
        return apply(view, cmd, self.settings)

    def merge(self, key: str, survivor: str, merged: list[str], source_system: str = "",
              deadline: float | None = None) -> merging.MergeResult:
        """Merge `merged` into `survivor` in one durable write transaction (contract §7)."""
        cmd = merging.prepare(key, survivor, merged, source_system, self.settings, now_us=now_us())
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the merge started; nothing was written")
        return self.writer.submit(merging.apply, cmd, deadline=deadline)

    def unmerge(self, key: str, survivor: str, merged: str, deadline: float | None = None) -> unmerging.UnmergeResult:
        """Undo the merge of `merged` into `survivor` in one durable write transaction (contract §7)."""
        cmd = unmerging.prepare(key, survivor, merged, self.settings, now_us=now_us())
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the unmerge started; nothing was written")
        return self.writer.submit(unmerging.apply, cmd, deadline=deadline)

    def sweep_ledger(self, now: int | None = None, batch: int = 1000) -> int:
        """Delete expired idempotency entries in write transactions of up to `batch`; how many were deleted."""
        total = 0
        while True:
            with self.store.write() as view:
                n = view.ledger_sweep(now if now is not None else now_us(), batch)
            total += n
            if n < batch:
                return total

    def sweep_changes(self, now: int | None = None, batch: int = 1000) -> int:
        """Delete change-log entries past `[changes]` retention (resolver.retention); how many were deleted."""
        return retention.sweep_changes(self.store, self.settings.changes, now if now is not None else now_us(), batch)

    def start_sweeper(self) -> None:
        """Sweep the ledger and the change log now and every `storage.sweep_interval_s` in a daemon thread (a
        cluster node's change log is not swept by its clock: its retention is a command, resolver.cluster.retention)."""
        own_changes = not self.settings.cluster.nats

        def run() -> None:
            while not self._stop.is_set():
                try:
                    n = self.sweep_ledger()
                    if n:
                        log.info("ledger sweep removed %d expired idempotency entries", n)
                except Exception:  # the sweeper must never take the server down; it retries next round
                    log.exception("ledger sweep failed")
                try:
                    n = self.sweep_changes() if own_changes else 0
                    if n:
                        log.info("change-log retention removed %d entries", n)
                except Exception:
                    log.exception("change-log retention sweep failed")
                self._stop.wait(self.settings.storage.sweep_interval_s)

        self._sweeper = threading.Thread(target=run, name="ledger-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        if self._writer is not None:
            self._writer.close()
        self.store.close()
