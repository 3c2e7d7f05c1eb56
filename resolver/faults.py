"""Crash points for tests: kill this process at a chosen step of the write path, as a power cut would.

TEST-ONLY. The environment variable `RESOLVER_TEST_CRASH=POINT:N` makes the process `os._exit(137)` (the exit code
of a kill -9) the N-th time it reaches POINT; nothing is flushed, no handler runs, no caller is answered. The
reliability suite (tests/reliability/test_crash_points.py) sets it on a `resolver serve` it starts; it has no use
in production and must never be set there. The points, in resolver.writer's order:

- `before_txn`: a batch of commands is queued and taken by the writer thread; no write transaction begun yet;
- `mid_txn`: inside the batch's write transaction, right after one command was applied, before the commit;
- `after_commit`: the batch committed and synced, before any of its callers is answered.

The variable is read once, when this module is first imported (each process, a spawned worker too, reads it at
its start and counts on its own). Unset, `CRASH` is None and a crash point costs the caller one attribute load and
a None check. A malformed value is a ValueError at import: a test that means to crash must not silently run clean.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

ENV_VAR = "RESOLVER_TEST_CRASH"
POINTS = ("before_txn", "mid_txn", "after_commit")
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL


@dataclass
class CrashPoint:
    """Exit at the `nth` time `point` is reached (counted in this process)."""

    point: str
    nth: int
    seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reached(self, point: str) -> None:
        """Count `point`; at the chosen one's `nth` time, say so on stderr and exit at once with EXIT_CODE."""
        if point != self.point:
            return
        with self._lock:
            self.seen += 1
            if self.seen != self.nth:
                return
            # a raw write: the logging machinery may hold locks or buffers a crash must not wait for
            os.write(2, f"resolver: test crash point {point} reached ({self.nth}), exiting {EXIT_CODE}\n".encode())
            os._exit(EXIT_CODE)


def parse(text: str) -> CrashPoint | None:
    """`POINT:N` -> its CrashPoint; "" -> None; anything else -> ValueError naming the expected form."""
    if not text:
        return None
    point, _, nth = text.partition(":")
    if point not in POINTS or not nth.isdigit() or int(nth) < 1:
        raise ValueError(f"{ENV_VAR}={text!r}: expected POINT:N with POINT one of {', '.join(POINTS)} and N >= 1 "
                         "(a test-only crash hook)")
    return CrashPoint(point, int(nth))


CRASH: CrashPoint | None = parse(os.environ.get(ENV_VAR, ""))
