"""The change-feed watchers of one serving process (resolver.feed): admission, waking, and cutting off.

- Admission: at most `[changes] max_watchers` at once (ResourceExhausted TOO_MANY_WATCHERS beyond).
- Waking: any process may commit (the other workers, the events process), so one poller thread per process reads
  the log's last sequence every POLL_S while anyone watches (a read transaction and a cursor step: microseconds)
  and wakes the watchers waiting for it. A watcher idle at the end of the log costs nothing else.
- Cutting off: in grpcio's sync server the thread that iterates a response stream blocks inside grpcio while a
  response waits for the client's HTTP/2 flow-control window, and nothing in the generator can notice. So each
  watcher marks when it hands a response over (`sending`) and when grpcio comes back for the next (`sent`); the
  poller finds a response pending for longer than `stall_timeout_s` and has the call ended from outside
  (`end_call`, resolver.api.feed_rpc): the client gets its buffered events, then RESOURCE_EXHAUSTED. A client
  that reads slowly but reads is never cut off (it may fall behind retention: then it is OUT_OF_RANGE).
- Stopping: a watcher never finishes by itself, so a server draining its calls would wait out its whole grace
  period; `stop` (resolver.bootstrap.Running.stop, first thing) ends every watcher at once with UNAVAILABLE.

Writers never wait for watchers: a watcher only reads the log, in short read transactions of its own (an LMDB
reader never blocks the writer), and no write path calls into this module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import lmdb

from resolver.config.tables import ChangeSettings
from resolver.errors import ResolverError, ResourceExhausted, Unavailable
from resolver.store import Store

log = logging.getLogger("resolver.feed")
POLL_S = 0.02  # how often the log is polled while anyone watches: the feed's added latency at most


class Watcher:
    """One admitted WatchChanges call. `end_call(error)` ends the call with that error's status, from another
    thread than the call's (the poller's, or the one stopping the server); it is called at most once."""

    __slots__ = ("_hub", "end_call", "_pending_since", "ended", "cut")

    def __init__(self, hub: Watchers, end_call: Callable[[ResolverError], None]) -> None:
        self._hub = hub
        self.end_call = end_call
        self._pending_since: float | None = None
        self.ended = False  # the call is over (the client left, the deadline passed, the server stops)
        self.cut = False  # end_call was called

    def sending(self) -> None:
        """A response is handed to gRPC: from now until `sent`, the client is expected to take it."""
        self._pending_since = time.monotonic()

    def sent(self) -> None:
        self._pending_since = None

    def stalled_for(self, now: float) -> float:
        since = self._pending_since
        return 0.0 if since is None else now - since

    def end(self) -> None:
        """The call is over: stop waiting (a gRPC termination callback)."""
        self.ended = True
        self._hub.wake()

    def wait_past(self, seq: int, timeout: float) -> bool:
        """Block until an entry after `seq` is committed, the call ends or `timeout` passes; False once ended."""
        return self._hub.wait_past(self, seq, timeout)

    def close(self) -> None:
        self._hub.release(self)


class Watchers:
    """The watchers of one process over one store; the poller thread runs while there are any."""

    def __init__(self, store: Store, settings: ChangeSettings, poll_s: float = POLL_S) -> None:
        self.store = store
        self.max_watchers = settings.max_watchers
        self.stall_timeout_s = settings.stall_timeout_s
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._active: set[Watcher] = set()
        self._last = 0  # the newest committed sequence the poller has seen
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def count(self) -> int:
        return len(self._active)

    def admit(self, end_call: Callable[[ResolverError], None]) -> Watcher:
        """A new watcher, or ResourceExhausted when `max_watchers` are watching already (Unavailable once stopping)."""
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is stopping: watch again on another one")
            if len(self._active) >= self.max_watchers:
                raise ResourceExhausted(f"{self.max_watchers} watchers are served by this process already: retry "
                                        "later or on another worker", reason="TOO_MANY_WATCHERS",
                                        limit="changes.max_watchers")
            w = Watcher(self, end_call)
            self._active.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="feed-poller", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return w

    def stop(self) -> None:
        """End every watcher now (UNAVAILABLE) and admit no more: the server is stopping."""
        with self._cond:
            self._stopping = True
            ending = [w for w in self._active if not w.cut]
            for w in ending:
                w.cut = True
        for w in ending:
            self._end(w, Unavailable("the server is stopping: watch again, from the last sequence received, on "
                                     "another worker or server"))

    def release(self, w: Watcher) -> None:
        with self._cond:
            self._active.discard(w)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_past(self, w: Watcher, seq: int, timeout: float) -> bool:
        with self._cond:
            if self._last <= seq and not w.ended:
                self._cond.wait(timeout)
            return not w.ended

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._active:
                    self._cond.wait()
            try:
                with self.store.read() as view:
                    last = view.last_change_seq()
            except lmdb.Error:  # the store was closed under us: the server is stopping, its calls end with it
                log.debug("feed poller: the store is closed", exc_info=True)
                with self._cond:
                    self._thread = None
                return
            now = time.monotonic()
            with self._cond:
                if last != self._last:
                    self._last = last
                    self._cond.notify_all()
                stalled = [(w, t) for w in self._active if not w.cut and (t := w.stalled_for(now)) > self.stall_timeout_s]
                for w, _ in stalled:
                    w.cut = True
            for w, seconds in stalled:
                log.warning("a change-feed watcher took no event for %.1fs (changes.stall_timeout_s): cut off", seconds)
                self._end(w, ResourceExhausted(
                    f"the watcher took no event for {seconds:.0f}s (changes.stall_timeout_s): cut off; watch again from "
                    "the last sequence received", reason="WATCHER_STALLED", limit="changes.stall_timeout_s"))
            time.sleep(self.poll_s)

    @staticmethod
    def _end(w: Watcher, error: ResolverError) -> None:
        try:
            w.end_call(error)
        except Exception:  # the call may have ended meanwhile; the others must still be ended
            log.exception("ending a change-feed watcher's call failed")
