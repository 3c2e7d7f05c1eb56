"""Admission control: a worker refuses at once the calls it cannot start in time, instead of queueing them until the
callers' deadlines pass (contract §1: a call-setup answer in far under ~200 ms, or a fast "no").

grpcio hands every call it accepts to the handler pool, whose queue has no bound of its own. With
`maximum_concurrent_rpcs` at 256, at twice the rate a worker could answer each call waited for everything queued
before it (a quarter of a second), and on a busy machine until its deadline, having cost the server its full work
(tests/reliability/test_overload.py).

Three bounds, per worker:
- Room (resolver.api.backlog): while the handler pool holds `[server] threads + max_queued_calls` calls, the worker
  stops asking gRPC's core for more of the API's calls; they wait there, costing no Python, and a refusal budget
  (`[server] refusal_share` refusals per call answered) answers some of them OVERLOADED as they are taken. This is
  the bound that holds when the worker is short of CPU: refusing every excess call in Python took the CPU its
  answers needed (goodput 54-60% of the knee at twice the knee, 86-163% gated: bench/README.md).
- Time (here): the handler pool keeps when each call waiting for a thread was queued (`HandlerPool.oldest_wait`),
  and the interceptor (resolver.api.interceptors), which grpcio runs in its polling thread before a call reaches
  the pool, asks `Admission.admits` first. While the oldest waiting call has waited `[server] max_queue_wait_ms`, a
  new call of the IdentityResolver service is answered RESOURCE_EXHAUSTED (reason OVERLOADED, RetryInfo: that same
  wait) from a thread of its own (`Admission.refusals`), never queued behind the work it would have waited for. A
  burst the threads drain in time is never refused, and when calls are slow for want of anything but CPU (writes
  behind a slow disk) the calls taken wait about that long at most. Health and reflection are never refused here
  (a load balancer's probe keeps its answer), nor are streams served from a pool of their own (WatchChanges has
  `[changes] max_watchers`).
- Count (gRPC's own): past `[server] max_concurrent_rpcs` calls in progress, grpcio refuses in its polling thread,
  RESOURCE_EXHAUSTED without details. A refusal of ours costs nearly what an answer does (grpcio's per-call work: a
  thread hop, a call object, the request read, the status sent), so only one refusal waits for the refusal thread
  at a time; past that, the call is queued after all.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import grpc

from resolver import errors, metrics
from resolver.api.status import to_status

T = TypeVar("T")
log = logging.getLogger("resolver.admission")
LOG_EVERY_S = 10.0  # refusals are logged as one line per this many seconds, never one line per call

# grpcio builds a method handler from a behaviour by arity
_BUILD = {"unary_unary": grpc.unary_unary_rpc_method_handler, "stream_unary": grpc.stream_unary_rpc_method_handler,
          "unary_stream": grpc.unary_stream_rpc_method_handler, "stream_stream": grpc.stream_stream_rpc_method_handler}


class PoolWatcher(Protocol):
    """What is told of every call that enters and leaves a HandlerPool (resolver.api.backlog.Gate)."""

    def started(self) -> None: ...
    def finished(self) -> None: ...
    def refuses(self) -> bool: ...


class HandlerPool(ThreadPoolExecutor):
    """grpcio's handler pool, which knows how long its oldest waiting call has waited for a thread.

    grpcio submits every call it accepts here, even one whose client left before a thread took it (that one then
    ends at once); the pool's queue is first in, first out, so the calls started are always the oldest queued and
    `_queued` (their submission times, oldest first; deque appends and pops are thread-safe) holds exactly the
    calls still waiting."""

    def __init__(self, threads: int, name: str = "rpc") -> None:
        super().__init__(max_workers=threads, thread_name_prefix=name)
        self._queued: deque[float] = deque()
        self.gate: PoolWatcher | None = None  # told of every call in and out (resolver.api.backlog)

    def waiting(self) -> int:
        """Calls waiting for a thread now."""
        return len(self._queued)

    def oldest_wait(self) -> float:
        """Seconds the oldest call waiting for a thread has waited (0: none waits)."""
        try:
            return time.monotonic() - self._queued[0]
        except IndexError:  # none waits (or the last one was just started)
            return 0.0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self._queued.append(time.monotonic())
        try:
            future = super().submit(self._run, fn, args, kwargs)
        except BaseException:  # shut down: nothing was queued
            self._queued.pop()
            raise
        if self.gate is not None:
            # grpcio submits under its server lock, which `finished` takes too: never counted out before in
            self.gate.started()
        return future

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        self._queued.popleft()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.gate is not None:
                self.gate.finished()


class Admission:
    """Whether the worker takes one more call of the service (`admits`), and the handlers that refuse one
    (`refusal`): answered from a pool of one thread of their own, waiting for no handler thread, without the access
    log line (one WARNING line every LOG_EVERY_S counts them instead; the metrics count each, code
    RESOURCE_EXHAUSTED): an overloaded worker must not spend on logging its refusals what it lacks for answers."""

    def __init__(self, pool: HandlerPool, max_wait_ms: float) -> None:
        self.pool = pool
        self.max_wait = max_wait_ms / 1000
        self.refusals = HandlerPool(1, "rpc-refuse")
        # the retry delay: about the time the queue ahead of a new call takes to drain
        self.error = errors.Overloaded(
            f"this worker's calls already wait {max_wait_ms:g} ms for a thread; retry shortly, preferably elsewhere",
            retry_after_s=self.max_wait, limit="server.max_queue_wait_ms")
        self._status = to_status(self.error)
        self._handlers: dict[str, grpc.RpcMethodHandler | None] = {}
        self._refused = 0  # since the last log line; only the refusal thread counts
        self._logged = time.monotonic()

    def admits(self) -> bool:
        """True unless the oldest call waiting for a handler thread has waited the limit, or calls wait in gRPC's
        core for room in the pool and the gate's refusal budget has one left (resolver.api.backlog)."""
        gate = self.pool.gate
        return self.pool.oldest_wait() < self.max_wait and (gate is None or not gate.refuses())

    def refusal(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        """The handler that answers `rpc` (a method name) OVERLOADED in `handler`'s arity, built once per method;
        None for a method served from a pool of its own, which admission never refuses, and None while earlier
        refusals still wait for the refusal thread: refusing costs about what answering does, so past what that
        thread keeps up with the call is queued after all, and gRPC's own count (`max_concurrent_rpcs`) refuses
        the excess, for a third of the cost."""
        if self.refusals.waiting():
            return None
        if rpc in self._handlers:
            return self._handlers[rpc]
        arity = next(name for name in _BUILD if getattr(handler, name) is not None)
        refusal = None
        if getattr(getattr(handler, arity), "experimental_thread_pool", None) is None:
            status = self._status

            def refuse(request: Any, context: grpc.ServicerContext) -> Any:
                self._count(rpc)
                context.abort_with_status(status)

            def refuse_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._count(rpc)
                context.abort_with_status(status)
                yield  # a generator, as grpcio expects of a streaming method

            behaviour: Any = refuse_stream if handler.response_streaming else refuse
            behaviour.experimental_thread_pool = self.refusals  # grpcio runs the behaviour there
            refusal = _BUILD[arity](behaviour, request_deserializer=handler.request_deserializer,
                                    response_serializer=handler.response_serializer)
        self._handlers[rpc] = refusal
        return refusal

    def _count(self, rpc: str) -> None:
        metrics.rpc_done(rpc, "RESOURCE_EXHAUSTED", 0.0)
        self._refused += 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S:
            log.warning("overloaded: refused %d call(s) in the last %.0f s (RESOURCE_EXHAUSTED, OVERLOADED): calls "
                        "waited %g ms for a handler thread", self._refused, now - self._logged, self.max_wait * 1000)
            self._refused, self._logged = 0, now
