"""The restart policy of a supervised process: how `resolver serve` restarts a gRPC worker (resolver.server), the
events process (resolver.events.process) or the outbound process (resolver.outbound.process) that died.

A process that dies unexpectedly is restarted after a growing backoff (`BACKOFF_S`, its last step repeated), at
most `MAX_RESTARTS` times in a row; one more death in a row and the supervisor gives up on it (a crash loop would
only burn CPU the others need). Once a process has stayed up for `HEALTHY_AFTER_S`, the count starts again: a
death a day apart is not a crash loop.

`Restarts` keeps that count for one process; the supervisor's loop asks it, never sleeping: the caller's tick
looks again until a restart is due.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_RESTARTS = 5  # consecutive; the count starts again once a process has stayed up for HEALTHY_AFTER_S
HEALTHY_AFTER_S = 60.0
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 5.0)


class Restarts:
    """The restarts of one supervised process, on `clock` (seconds, monotonic).

    The supervisor tells it what it sees: `started()` when the process (re)starts, `running()` while it is
    alive, `died()` when it exited unexpectedly (the backoff, or None: give up); `due()` says when the restart
    that `died()` scheduled is to be made.
    """

    __slots__ = ("max_restarts", "failures", "_clock", "_started_at", "_restart_at")

    def __init__(self, max_restarts: int = MAX_RESTARTS, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_restarts = max_restarts
        self.failures = 0  # consecutive unexpected exits
        self._clock = clock
        self._started_at = clock()
        self._restart_at: float | None = None

    @property
    def gave_up(self) -> bool:
        """Whether the process died more than `max_restarts` times in a row: it is not restarted again."""
        return self.failures > self.max_restarts

    @property
    def pending(self) -> bool:
        """Whether a restart is scheduled (the process is down, waiting out its backoff)."""
        return self._restart_at is not None

    def started(self) -> None:
        """The process (re)started now: its healthy stretch begins."""
        self._started_at = self._clock()

    def running(self) -> None:
        """The process is alive: once it has been for HEALTHY_AFTER_S since it started, the count starts again."""
        if self.failures and self._clock() - self._started_at >= HEALTHY_AFTER_S:
            self.failures = 0

    def died(self) -> float | None:
        """Count an unexpected exit: the seconds to wait before restarting the process (the restart is then
        pending), or None when this death is one too many in a row (`gave_up`)."""
        self.failures += 1
        if self.gave_up:
            return None
        delay = BACKOFF_S[min(self.failures, len(BACKOFF_S)) - 1]
        self._restart_at = self._clock() + delay
        return delay

    def due(self) -> bool:
        """Whether the pending restart's backoff has passed. True once: the restart is then no longer pending, and
        the caller restarts the process now (and calls `started()` when it has)."""
        if self._restart_at is None or self._clock() < self._restart_at:
            return False
        self._restart_at = None
        return True
