"""The deliverer: sends the outbox's messages as signed webhooks (Standard Webhooks), until acknowledged or dead.

One per data directory (under `resolver serve`, in a process of its own: resolver.outbound.process; in
`build_server`, a thread), on an asyncio loop (uvloop) in a thread of its own, with aiohttp's client.

- **In order per customer**: a *lane* is a (destination, customer) pair; its next message waits until the previous
  one is acknowledged or dead, and "acknowledged" means its removal from `ob_queue` has committed. So a crash never
  makes an older message of a customer arrive after a newer one, except as a re-send of the same webhook-id.
- **Parallel across customers**: lanes wait in a first-in first-out ready queue per destination, served by
  `[outbound.NAME] concurrency` workers (a lane goes to the back after each message: round robin).
- **Rate**: at most `rate_per_s` attempts per second per destination (0: unlimited); a 429 pauses the whole
  destination until its Retry-After. And, across destinations, the events applier's adaptive pace
  (resolver.events.pace, `[events] rate_per_s` / `min_rate_per_s` / `idle_cpu` / `busy_cpu`): up to the ceiling
  while the serving processes are idle, down to the floor while Resolve keeps them busy, so a drain costs Resolve
  little (a SCHED_IDLE process alone was not enough on a 2-core machine: bench/README.md).
- **Durable**: the queue is the truth. The deliverer reads new message ids (up to WINDOW ahead) and, before each
  attempt, the message itself (gone: erased, skip it). Every outcome commits through a group-commit writer
  (resolver.writer: one synced transaction for all outcomes waiting): acknowledged (removed, delivered +1),
  retried (attempts, last error and the earliest next attempt kept with the message, so a restarted deliverer
  waits as long), dead (to `ob_dlq`). A kill -9 loses nothing; what was in flight is sent again, with the same
  webhook-id and body.
- **A cluster node** (resolver.bootstrap): its decisions (resolver.outbound.settle) go through the node's
  replicated writer, so every node's outbox follows them, and it sends only while its `turn` (the delivery lease,
  resolver.cluster.lease) is held: checked before each message and again right before its attempt.
- The verdict on each answer and the back-off: resolver.outbound.policy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp

from resolver.config import OutboundSpec, Settings
from resolver.events.pace import CpuSource, Pacer, ProcessButThread
from resolver.events.signatures import sign
from resolver.outbound import outbox, policy, settle
from resolver.outbound.settle import Settle
from resolver.store import Store
from resolver.writer import Writer

_new_loop: Callable[[], asyncio.AbstractEventLoop]
try:
    import uvloop

    _new_loop = uvloop.new_event_loop
except ImportError:  # pragma: no cover - a platform without uvloop delivers on asyncio's loop
    _new_loop = asyncio.new_event_loop

log = logging.getLogger("resolver.outbound")
T = TypeVar("T")
POLL_S = 0.05  # the queue is looked at for new messages this often
WINDOW = 10_000  # messages read ahead of delivery at most (ids and lanes in memory)
STOP_GRACE_S = 5.0  # on stop, attempts in flight get this long to be answered (else they are sent again later)
TURN_WAIT_S = 0.2  # while another node delivers, the workers look this often whether this one's turn came
NO_SECRET_WAIT_S = 60.0  # a destination without a usable secret sends nothing; its lanes look again this often
REPORT_S = 10.0  # while messages flow, a line in the log this often
MAX_ANSWER_BYTES = 64 * 1024  # of an answer's body, read (and dropped); beyond it the connection is closed
USER_AGENT = "resolver-outbound/1"
PACE_WINDOW_S = 0.1  # the pace's slots are handed out per window: rate x this many at its start, together


class Turn(Protocol):
    """Whether this deliverer may send now: in a cluster exactly one node's may (resolver.cluster.lease)."""

    def held(self) -> bool:
        """True while this node holds the turn (checked before every attempt)."""

    def close(self) -> None:
        """Give the turn up (the deliverer stopped)."""


@dataclass(eq=False)
class _Lane:
    """One customer's messages for one destination, oldest first; in one place at a time: the ready queue, a
    worker, or a timer."""

    key: str
    ids: deque[int] = field(default_factory=deque)


class _Destination:
    """One `[outbound.NAME]`: its lanes, its ready queue, its HTTP session, its rate and its pause (a 429)."""

    def __init__(self, spec: OutboundSpec) -> None:
        self.spec = spec
        self.lanes: dict[str, _Lane] = {}
        self.ready: asyncio.Queue[_Lane] = asyncio.Queue()
        self.session: aiohttp.ClientSession | None = None
        self.paused_until = 0.0  # monotonic: a 429 holds every attempt until then
        self._next_slot = 0.0  # monotonic: the rate limit's next free slot

    async def gate(self) -> None:
        """Wait for this destination's pause (a 429) and for a slot of its rate."""
        now = time.monotonic()
        if now < self.paused_until:
            await asyncio.sleep(self.paused_until - now)
            now = time.monotonic()
        if self.spec.rate_per_s > 0:
            slot = max(now, self._next_slot)
            self._next_slot = slot + 1.0 / self.spec.rate_per_s
            if slot > now:
                await asyncio.sleep(slot - now)


class Deliverer:
    """`start()` the delivery thread, `stop()` it (attempts in flight get STOP_GRACE_S to finish)."""

    def __init__(self, store: Store, settings: Settings, *, poll_s: float = POLL_S, window: int = WINDOW,
                 writer: Writer | None = None, turn: Turn | None = None) -> None:
        self.store = store
        self.settings = settings
        self.poll_s = poll_s
        self.window = window
        self.writer: Writer | None = writer  # given (a cluster node's, not closed here), or made by start()
        self._own_writer = writer is None
        self.turn = turn  # whether this deliverer may send now (a cluster's lease); None: always
        self.stats: dict[str, int] = dict.fromkeys(("delivered", "retried", "dead", "skipped"), 0)
        self._dests: dict[str, _Destination] = {}
        self._cursor = 0  # the highest message id read so far
        self._loaded = 0  # messages read and not yet done
        self._busy: set[asyncio.Task[None]] = set()  # workers in an attempt (the others wait for a lane)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self.pacer = Pacer(settings.events)
        self._watching = False
        self._pace_lock: asyncio.Lock | None = None
        self._window_end = 0.0  # monotonic: the end of the pace's current window ...
        self._window_left = 0  # ... and the attempts it may still start in it

    def watch(self, source: CpuSource) -> None:
        """Pace by the CPU of `source` (resolver.events.pace.serving_processes in the outbound process); call before
        start(). Without it the deliverer watches its own process but its loop's thread (a thread of a server)."""
        self._watching = True
        self.pacer.use(source)

    # -- the thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.writer is None:
            self.writer = Writer(self.store)
        self._thread = threading.Thread(target=self._run, name="outbound-deliverer", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        loop = _new_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("the outbound deliverer failed")
        finally:
            self._started.set()
            loop.close()

    @property
    def alive(self) -> bool:
        """The delivery thread is running (False once stopped, or if it failed)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = STOP_GRACE_S + 10) -> None:
        """Stop taking messages, give attempts in flight STOP_GRACE_S, commit what was decided, stop the writer."""
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass  # the loop has just ended
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the outbound deliverer did not stop within %gs", timeout)
        if self.writer is not None and self._own_writer:
            self.writer.close()
        if self.turn is not None:
            self.turn.close()

    # -- the loop -----------------------------------------------------------------------------------------------
    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._pace_lock = asyncio.Lock()
        if not self._watching:
            self.pacer.use(ProcessButThread(threading.get_native_id()))
        self._dests = {name: _Destination(spec) for name, spec in self.settings.outbound.items()}
        workers: list[asyncio.Task[None]] = []
        for dest in self._dests.values():
            if dest.spec.unresolved or not dest.spec.secrets:
                log.warning("outbound %s has no usable signing secret (unresolved: %s): nothing is sent to it; its "
                            "messages wait, and are dead-lettered after max_age_s", dest.spec.name,
                            ", ".join(dest.spec.unresolved) or "none configured")
            dest.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=dest.spec.concurrency),
                timeout=aiohttp.ClientTimeout(total=dest.spec.timeout_s),
                headers={"user-agent": USER_AGENT, "content-type": "application/json"})
            workers += [asyncio.create_task(self._worker(dest)) for _ in range(dest.spec.concurrency)]
        self._started.set()
        report_at = time.monotonic() + REPORT_S
        reported = dict(self.stats)
        try:
            while not self._stopping.is_set():
                try:
                    self._fill()
                except Exception:
                    log.exception("reading the outbound queue failed; retrying")
                if time.monotonic() >= report_at:
                    report_at = time.monotonic() + REPORT_S
                    if self.stats != reported:
                        done = {k: v - reported[k] for k, v in self.stats.items()}
                        log.info("outbound: %d delivered, %d retried, %d dead-lettered in %gs; %d read ahead",
                                 done["delivered"], done["retried"], done["dead"], REPORT_S, self._loaded)
                        reported = dict(self.stats)
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.poll_s)
                except TimeoutError:
                    pass
        finally:
            await self._shutdown(workers)

    async def _shutdown(self, workers: list[asyncio.Task[None]]) -> None:
        """Workers waiting for a lane stop at once; those in an attempt get STOP_GRACE_S to see it answered."""
        for w in workers:
            if w not in self._busy:
                w.cancel()
        if self._busy:
            _, late = await asyncio.wait(set(self._busy), timeout=STOP_GRACE_S)
            for w in late:
                w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for dest in self._dests.values():
            if dest.session is not None:
                await dest.session.close()

    def _fill(self) -> None:
        """Read new message ids (up to the window) into their lanes; a new lane goes to the ready queue."""
        if self._loaded >= self.window:
            return
        unknown: list[int] = []
        with self.store.read() as view:
            for message_id, meta in outbox.iter_pending(view.txn, self.store, self._cursor):
                self._cursor = message_id
                dest = self._dests.get(meta["destination"])
                if dest is None:
                    unknown.append(message_id)
                    continue
                lane_key = meta["customer_uuid"] or f"#{message_id}"  # no customer: a lane of its own
                lane = dest.lanes.get(lane_key)
                if lane is None:
                    lane = dest.lanes[lane_key] = _Lane(lane_key)
                    dest.ready.put_nowait(lane)
                lane.ids.append(message_id)
                self._loaded += 1
                if self._loaded >= self.window:
                    break
        for message_id in unknown if self._turn() else ():  # a destination not in the blueprint: shown, not stuck
            self._submit(Settle(message_id, "dead", 0, error="its [outbound] destination is not in the blueprint",
                                reason="UNKNOWN_DESTINATION", now_us=_now_us()))

    async def _worker(self, dest: _Destination) -> None:
        task = asyncio.current_task()
        assert task is not None
        while True:
            while not self._turn():  # another node delivers: no lane is taken (and none spins) meanwhile
                await asyncio.sleep(TURN_WAIT_S)
            lane = await dest.ready.get()
            self._busy.add(task)
            try:
                delay = await self._serve(dest, lane)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbound %s: delivering failed; the customer's messages wait and are retried",
                              dest.spec.name)
                delay = dest.spec.backoff_max_s
            finally:
                self._busy.discard(task)
            if self._stopping is not None and self._stopping.is_set():
                return
            self._requeue(dest, lane, delay)

    def _requeue(self, dest: _Destination, lane: _Lane, delay: float | None) -> None:
        """Put `lane` back in the ready queue (after `delay` s), or forget it once it is empty."""
        if not lane.ids:
            del dest.lanes[lane.key]
        elif delay:
            asyncio.get_running_loop().call_later(delay, dest.ready.put_nowait, lane)
        else:
            dest.ready.put_nowait(lane)

    def _turn(self) -> bool:
        return self.turn is None or self.turn.held()

    def _done(self, lane: _Lane, stat: str) -> None:
        lane.ids.popleft()
        self._loaded -= 1
        self.stats[stat] += 1

    async def _serve(self, dest: _Destination, lane: _Lane) -> float | None:
        """Try the head message of `lane` once; the delay before the lane may go again (None: at once)."""
        spec = dest.spec
        if not self._turn():
            return TURN_WAIT_S
        message_id = lane.ids[0]
        with self.store.read() as view:
            found = outbox.pending(view.txn, self.store, message_id)
        if found is None:  # erased (or acknowledged by a deliverer before a restart): nothing to send
            self._done(lane, "skipped")
            return None
        meta, body = found
        now_us = _now_us()
        if now_us - meta["queued_us"] > spec.max_age_s * 1e6:
            error = f"older than max_age_s ({spec.max_age_s:g}s); last error: {meta['last_error'] or '(never tried)'}"
            await self._commit(Settle(message_id, "dead", 0, error=error, reason="EXPIRED", now_us=now_us))
            self._dead(spec, meta, "EXPIRED", error)
            self._done(lane, "dead")
            return None
        if meta["next_us"] > now_us:  # a retry decided before a restart: wait as long as was decided
            return (meta["next_us"] - now_us) / 1e6
        if not spec.secrets or spec.unresolved:
            return min(NO_SECRET_WAIT_S, max(0.0, meta["queued_us"] / 1e6 + spec.max_age_s - now_us / 1e6) + 0.01)
        await self._paced()
        await dest.gate()
        if not self._turn():  # the node lost its turn while it waited: what it has not sent, it does not send
            return TURN_WAIT_S
        verdict = await self._attempt(dest, meta, body)
        now_us = _now_us()
        if verdict.outcome == policy.ACK:
            await self._commit(Settle(message_id, "ack", 1))
            self._done(lane, "delivered")
            return None
        if verdict.outcome == policy.DEAD:
            await self._commit(Settle(message_id, "dead", 1, error=verdict.error, reason="REJECTED", now_us=now_us))
            self._dead(spec, meta, "REJECTED", verdict.error)
            self._done(lane, "dead")
            return None
        delay = (verdict.retry_after_s if verdict.retry_after_s is not None
                 else policy.backoff_s(meta["attempts"] + 1, spec.backoff_initial_s, spec.backoff_max_s))
        if verdict.throttled:
            dest.paused_until = max(dest.paused_until, time.monotonic() + delay)
        next_us = now_us + int(delay * 1e6)
        await self._commit(Settle(message_id, "retry", 1, error=verdict.error, next_us=next_us,
                                  throttled=verdict.throttled))
        self.stats["retried"] += 1
        return delay

    async def _paced(self) -> None:
        """Wait for a slot of the adaptive pace: each PACE_WINDOW_S window (the rate read again at its start, so a
        burst of Resolve slows the deliverer within ~0.1 s) lets rate x PACE_WINDOW_S attempts start at once, so
        at a slow pace they still share wake-ups and group commits instead of paying for one each."""
        assert self._pace_lock is not None
        async with self._pace_lock:
            while True:
                now = time.monotonic()
                if now >= self._window_end:
                    rate = self.pacer.rate()
                    self._window_end = now + PACE_WINDOW_S
                    self._window_left = max(1, round(rate * PACE_WINDOW_S))
                if self._window_left > 0:
                    self._window_left -= 1
                    return
                await asyncio.sleep(self._window_end - now)

    async def _attempt(self, dest: _Destination, meta: dict[str, Any], body: bytes) -> policy.Verdict:
        """POST the message once, freshly signed; the verdict on the answer (or on its absence)."""
        spec = dest.spec
        assert dest.session is not None
        wid = meta["webhook_id"]
        stamp = int(time.time())
        headers = {"webhook-id": wid, "webhook-timestamp": str(stamp),
                   "webhook-signature": " ".join(sign(key, wid, stamp, body) for key in spec.secrets)}
        try:
            async with dest.session.post(spec.url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(MAX_ANSWER_BYTES)
                return policy.judge(resp.status, resp.headers.get("Retry-After"), time.time())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return policy.failed(exc)

    def _dead(self, spec: OutboundSpec, meta: dict[str, Any], reason: str, error: str) -> None:
        log.info("outbound message %d (%s, %s) to %s dead-lettered (%s): %s", meta["id"], meta["event_type"],
                 meta["webhook_id"], spec.name, reason, error)

    def _submit(self, decision: Settle) -> Future[bool]:
        assert self.writer is not None
        return self.writer.submit_nowait(settle.apply, decision)

    async def _commit(self, decision: Settle) -> bool:
        """Apply `decision` in the writer's next group commit (a cluster node's: through the replicated log); once
        it is durable (here), whether the message was still queued."""
        return await asyncio.wrap_future(self._submit(decision))


def _now_us() -> int:
    return time.time_ns() // 1000
