"""`ReplicatedWriter`: resolver.writer.Writer's interface, with every command going through the replicated log.

`submit(fn, command)` publishes the command (its type names its apply function: resolver.cluster.codec; `fn` is
the same function as the caller would run on one machine, and is not used here), waits until this node's applier
has applied it, and returns what that apply returned or raises what it raised: read-your-writes on the node that
took the write, and every other node applies the same command at the same position of the same log. The position
(the stream sequence) goes into the call's answer as `log_sequence` (resolver.cluster.written): a read on another
node that names it as `min_sequence` sees the write (resolver.cluster.reads).

Retries: the JetStream message id is derived from the idempotency key and the request's fingerprint, so a retry
within the de-duplication window is not appended again; its caller gets the answer of the first apply (marked
`replayed`, as the ledger would mark it). If this process no longer holds that answer (it restarted since), the
retry is appended once more under a derived id, and the ledger, applied in order on every node, answers it.

A stream without a leader (an election after a NATS server died) is waited out, publishing again under the same
message id, within `[cluster] apply_timeout_s`. Past it the answer is UNAVAILABLE, which callers retry with the
same key: the log did not confirm the command, or took it and this node has not applied it in time (it will be
applied, once, and the retry reads its answer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from resolver.cluster import written
from resolver.cluster.applier import Applier, stored_position
from resolver.cluster.codec import encode, message_id
from resolver.cluster.horizon import Horizon
from resolver.cluster.log import Appended, CommandLog
from resolver.cluster.outcomes import Outcome, Outcomes
from resolver.cluster.reads import ReadGate
from resolver.config import Settings
from resolver.errors import ClusterError, DeadlineExceeded, Unavailable
from resolver.store import Store, Txn

T = TypeVar("T")
C = TypeVar("C")


class ReplicatedWriter:
    """Publishes commands to the stream and answers from this node's applier (started here, stopped by close);
    `reads` admits this node's reads (resolver.cluster.reads)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.spec = settings.cluster
        self.outcomes = Outcomes(stored_position(store, self.spec.stream))  # ClusterError: another stream's store
        self.log = CommandLog(self.spec, name=f"resolver {store.path}")
        self.horizon = Horizon()
        try:  # how far the stream goes before the first read is admitted: a node that starts behind says so at once
            self.horizon.saw(self.log.bounds().last)
        except BaseException:
            self.log.close()
            raise
        self.applier = Applier(store, settings, self.log, self.outcomes, self.horizon)
        self.reads = ReadGate(self.spec, self.applier, self.outcomes, self.horizon)
        self.applier.start()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cluster-submit")
        self._closed = False

    @property
    def position(self) -> int:
        """The last stream sequence applied to this node's store."""
        return self.outcomes.applied

    def submit(self, fn: Callable[[Txn, C], T], command: C, *, deadline: float | None = None) -> T:
        """Apply one command through the log; its result or its error, once applied (durably) on this node. The
        sequence it was applied at is recorded for the call's answer (resolver.cluster.written).

        `deadline` (time.monotonic()): passed before the command is published, DeadlineExceeded (stage "queued"),
        nothing written. Once published the command will be applied, on every node, whatever any clock says
        (skipping it on one node by its own clock would part the replicas), so a deadline that passes while this
        node applies it answers UNAVAILABLE: in the log, retry with the same key to read its answer."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the write was published; nothing was written",
                                   stage="queued")
        data, mid = encode(command), message_id(command)
        appended = self._publish(data, mid, deadline)
        outcome = self._wait(appended.seq, deadline)
        if outcome is None and appended.duplicate:
            # the first apply's answer is not held here: append the retry itself, the ledger answers it
            appended = self._publish(data, f"{mid}@{appended.seq}", deadline)
            outcome = self._wait(appended.seq, deadline)
        if outcome is None:
            raise Unavailable(f"stream sequence {appended.seq} was applied, but its answer is not held by this process; "
                              "retry with the same key")
        if not outcome.ok:
            raise outcome.value
        written.record(appended.seq)
        result: T = outcome.value
        if appended.duplicate and dataclasses.is_dataclass(result) and hasattr(result, "replayed"):
            result = dataclasses.replace(result, replayed=True)  # type: ignore[type-var]
        return result

    def submit_nowait(self, fn: Callable[[Txn, C], T], command: C, *, deadline: float | None = None) -> Future[T]:
        """`submit` in a pool thread; the future is resolved as `submit` returns or raises."""
        return self._pool.submit(self.submit, fn, command, deadline=deadline)

    def close(self) -> None:
        """Stop the applier after its batch, then the connection (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self.applier.stop()
        self.log.close()

    def _publish(self, data: bytes, mid: str, deadline: float | None) -> Appended:
        """Append, retrying within `apply_timeout_s` (and the caller's deadline) while the stream has no leader (an
        election after a server died takes seconds): the same message id, so a publish that did land before its
        answer was lost lands once."""
        until = self._until(deadline)
        pause = 0.05
        while True:
            if self.applier.behind is not None:
                raise Unavailable(f"this node cannot apply the log: {self.applier.behind}")
            try:
                appended = self.log.publish(data, mid, timeout=max(0.5, until - time.monotonic()))
            except ClusterError as exc:
                if time.monotonic() + pause >= until:
                    raise Unavailable(f"the replicated log did not confirm the write ({exc}); retry with the same key "
                                      "(a retry is never applied twice)") from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
            else:
                self.horizon.saw(appended.seq)
                return appended

    def _wait(self, seq: int, deadline: float | None) -> Outcome | None:
        try:
            return self.outcomes.wait(seq, max(0.0, self._until(deadline) - time.monotonic()))
        except TimeoutError:
            raise Unavailable(f"the write is in the log at sequence {seq} but this node has applied only "
                              f"{self.outcomes.applied}; retry with the same key") from None

    def _until(self, deadline: float | None) -> float:
        """The instant this write stops waiting: `apply_timeout_s` from now, or the caller's deadline if sooner."""
        until = time.monotonic() + self.spec.apply_timeout_s
        return until if deadline is None else min(until, deadline)


def read_gate(writer: object) -> ReadGate | None:
    """If `writer` is a ReplicatedWriter, its node's read gate; None for a local Writer (one machine: every
    acknowledged write is visible to every read, so there is nothing to wait for or refuse)."""
    return writer.reads if isinstance(writer, ReplicatedWriter) else None


def on_behind(writer: object, listener: Callable[[str], None]) -> None:
    """If `writer` is a ReplicatedWriter, call `listener(reason)` once its node falls behind the stream for good (the
    composition root turns health NOT_SERVING with it); nothing for a local Writer."""
    if isinstance(writer, ReplicatedWriter):
        writer.applier.on_behind(listener)
