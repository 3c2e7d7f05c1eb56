"""The replicated log: one JetStream stream, reached from threads through one NATS connection.

nats-py is asyncio; the service is threads (gRPC handlers, the applier). `CommandLog` runs one event loop in a
daemon thread and offers blocking calls with bounded waits; every NATS failure surfaces as ClusterError. The
connection reconnects by itself to any of the configured servers (a killed server is not the end of a node).

The stream is created on first use with the blueprint's retention (age and size, oldest discarded), replica count
and de-duplication window; a stream that exists already is used as it is (its creator's settings win; an operator
changes them with the nats CLI).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from resolver.config.tables import ClusterSettings
from resolver.errors import ClusterError

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api
except ImportError as exc:  # an optional dependency: say which extra brings it, not a bare traceback
    raise ClusterError(f"[cluster] needs the NATS client ({exc}): pip install 'resolver[cluster]'") from exc

log = logging.getLogger("resolver.cluster")
T = TypeVar("T")
QUIET_S = 5.0  # while NATS is away the client fails every reconnect: one line per this many seconds says so
_NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)
STREAM_NAME_IN_USE = 10058  # JetStream's error code for a stream created with another configuration meanwhile


def subject(spec: ClusterSettings) -> str:
    """The one subject of the stream: one subject keeps a single total order."""
    return f"{spec.stream}.commands"


@dataclass(frozen=True, slots=True)
class Appended:
    """Where the stream put a published command; `duplicate`: the stream already held this message id at `seq`."""

    seq: int
    duplicate: bool


class Bounds(NamedTuple):
    """The oldest sequence the stream still holds (retention removes older ones) and its newest."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Fetched:
    """Commands read from the stream, in order, and the stream's last sequence as the last of them was delivered (its
    sequence plus the commands still pending after it: the reader's only subject holds every command; 0: none read)."""

    commands: list[tuple[int, bytes]]  # (stream sequence, bytes)
    stream_last: int


class Reader:
    """An ephemeral consumer reading the stream in order from one sequence on (no acks: the position is the
    applier's, stored in LMDB)."""

    def __init__(self, log: CommandLog, sub: Any) -> None:
        self._log = log
        self._sub = sub

    def fetch(self, batch: int, timeout: float) -> Fetched:
        """Up to `batch` commands, in order; none when none came within `timeout` s."""

        async def fetch() -> Fetched:
            try:
                msgs = await self._sub.fetch(batch, timeout=timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            if not msgs:
                return Fetched([], 0)
            last = msgs[-1].metadata
            return Fetched([(m.metadata.sequence.stream, m.data) for m in msgs],
                           last.sequence.stream + last.num_pending)

        return self._log.call(fetch(), timeout + 5)

    def close(self) -> None:
        try:
            self._log.call(self._sub.unsubscribe(), 5)
        except ClusterError:
            pass  # the consumer is ephemeral: the server drops it once inactive


class CommandLog:
    """A connection to the NATS cluster and the stream of `spec` (created if missing). `close` when done."""

    def __init__(self, spec: ClusterSettings, name: str = "resolver") -> None:
        self.spec = spec
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cluster-io", daemon=True)
        self._thread.start()
        self._logged = 0.0
        self._closing = False
        self._nc: Any = None
        try:
            wait = spec.connect_timeout_s * 3
            try:
                self._nc = self.call(nats.connect(servers=list(spec.nats), name=name, error_cb=self._on_error,
                                                  disconnected_cb=self._on_disconnected,
                                                  connect_timeout=spec.connect_timeout_s, max_reconnect_attempts=-1,
                                                  reconnect_time_wait=0.25), wait)
            except ClusterError as exc:
                raise ClusterError(f"cannot reach NATS at {', '.join(spec.nats)} within {wait:g}s ({exc})") from None
            self._js = self._nc.jetstream()
            self.call(self._ensure_stream(), spec.connect_timeout_s * 4 + 5)
        except BaseException:
            self.close()  # a connection made before the stream was refused is closed too, not left to the collector
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the connection's loop and wait for it, at most `timeout` s (ClusterError on any failure)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except _NATS_ERRORS as exc:
            future.cancel()
            raise ClusterError(f"NATS: {type(exc).__name__}: {exc}") from exc

    async def _on_error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged >= QUIET_S:
            self._logged = now
            log.warning("NATS: %s: %s (reconnecting)", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS: disconnected; reconnecting to any of %d server(s)", len(self.spec.nats))

    async def _ensure_stream(self) -> None:
        spec = self.spec
        config = api.StreamConfig(
            name=spec.stream, subjects=[subject(spec)], num_replicas=spec.replicas, storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD, max_age=spec.stream_max_age_s,
            max_bytes=spec.stream_max_mb * 1024 * 1024, duplicate_window=spec.dedupe_window_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.connect_timeout_s * 4
        while True:
            try:
                try:
                    await self._js.stream_info(spec.stream)
                    return
                except nats.js.errors.NotFoundError:
                    await self._js.add_stream(config)
                    return
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code == STREAM_NAME_IN_USE:  # created meanwhile by another node: use it
                    return
                raise ClusterError(f"NATS refused stream {spec.stream!r}: {exc.description}") from None
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError,
                    TimeoutError):
                # a cluster that just started has no JetStream leader yet: retry within the bound
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.25)
            except nats.js.errors.APIError as exc:  # answered and refused (replicas > servers, ...): say why
                raise ClusterError(f"NATS refused stream {spec.stream!r}: {exc.description}") from None

    def publish(self, data: bytes, msg_id: str, timeout: float) -> Appended:
        """Append one command (de-duplicated by `msg_id` within the window); where the stream put it, once the
        stream's replicas hold it (JetStream acknowledges after its Raft group committed the message)."""
        ack = self.call(self._js.publish(subject(self.spec), data, timeout=timeout, stream=self.spec.stream,
                                         headers={"Nats-Msg-Id": msg_id}), timeout + 1)
        return Appended(ack.seq, bool(ack.duplicate))

    def bounds(self) -> Bounds:
        """The oldest sequence the stream still holds and its newest, asked of the stream now."""
        info = self.call(self._js.stream_info(self.spec.stream), self.spec.connect_timeout_s + 1)
        return Bounds(int(info.state.first_seq), int(info.state.last_seq))

    def key_value(self, bucket: str, ttl: float) -> Any:
        """The JetStream key-value bucket `bucket` (nats.js.kv.KeyValue: its coroutines run through `call`), created
        if missing with `ttl` (a key not written again for `ttl` s is gone), the stream's replica count and one
        revision per key; a bucket that exists is used as it is."""

        async def open_bucket() -> Any:
            try:
                return await self._js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            try:
                return await self._js.create_key_value(bucket=bucket, ttl=ttl, history=1,
                                                       replicas=self.spec.replicas, storage=api.StorageType.FILE)
            except nats.js.errors.BadRequestError:  # created meanwhile by another node (else the lookup says why)
                return await self._js.key_value(bucket)

        return self.call(open_bucket(), self.spec.connect_timeout_s * 2 + 1)

    def reader(self, start: int) -> Reader:
        """Read the stream in order from sequence `start`."""
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                                    ack_policy=api.AckPolicy.NONE, inactive_threshold=60.0, num_replicas=1,
                                    mem_storage=True)
        sub = self.call(self._js.pull_subscribe(subject(self.spec), stream=self.spec.stream, config=config),
                        self.spec.connect_timeout_s + 1)
        return Reader(self, sub)

    def close(self) -> None:
        """Close the connection and stop its loop (a second call does nothing)."""
        if self._closing:
            return
        self._closing = True
        if self._nc is not None:
            try:
                self.call(self._nc.close(), 5)
            except ClusterError:
                pass  # closing anyway
        self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_all() -> None:  # a connect still retrying, say: ended, not destroyed while pending
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(5)
        except Exception:  # the loop is stopped below whatever the tasks did
            log.debug("NATS: tasks did not end cleanly", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
