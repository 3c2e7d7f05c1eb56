"""The applier's pace (contract §5): fast while the serving workers are idle, slower while they are busy.

The signal is the CPU time the serving processes use, read from /proc/PID/stat by the process the applier runs
in: nothing is added to a Resolve. (An in-flight counter in shared memory would be written twice by every call
and need the servicer to publish it; the machine's idle CPU from /proc/stat counts every other process, a load
generator or another job, as Resolve load. The measurements that chose this are in bench/README.md.)

`pace(share, ev)` is the policy, a pure function: the serving processes' share of the machine's CPU (0-1) to
applied events per second: `[events] rate_per_s` (the ceiling) at or below `idle_cpu`, `min_rate_per_s` (the
floor, never above the ceiling) at or above `busy_cpu`, and geometric in between, so each step of load divides
the rate by the same factor. `Meter` turns a source of CPU seconds into that share over a sliding window;
`Pacer` is what the applier asks, once per batch and while it waits.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from resolver.config.tables import EventSettings

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/PID/stat counts CPU in these
SAMPLE_S = 0.1  # the serving CPU is read at most this often
WINDOW_S = 0.5  # ... and its share computed over about this long: a burst of Resolve shows within ~0.1 s
RESCAN_S = 2.0  # how often the serving processes are listed again (a worker restarted, the supervisor's own)
# `resolver serve`'s background children by /proc/PID/comm (15 characters at most): they are not serving processes
EVENTS_PROCESS = "resolver-events"  # webhooks + the applier (resolver.events.process)
OUTBOUND_PROCESS = "resolver-outbox"  # the deliverer (resolver.outbound.process)


def floor(ev: EventSettings) -> float:
    """The slowest the applier goes: `min_rate_per_s`, capped at the ceiling (`rate_per_s`)."""
    return min(ev.min_rate_per_s, ev.rate_per_s)


def pace(share: float | None, ev: EventSettings) -> float:
    """Events per second for serving processes using `share` of the machine's CPU (None: not known yet, the floor).

    Non-increasing in `share`; `rate_per_s` at or below `idle_cpu`, the floor at or above `busy_cpu` (with
    `busy_cpu` at or below `idle_cpu`, a step at `busy_cpu`), `rate * (floor / rate) ** t` between, t being how
    far `share` is from `idle_cpu` to `busy_cpu`.
    """
    ceiling, lowest = ev.rate_per_s, floor(ev)
    if share is None or share >= ev.busy_cpu:
        return lowest
    if share <= ev.idle_cpu:
        return ceiling
    t = (share - ev.idle_cpu) / (ev.busy_cpu - ev.idle_cpu)
    return max(lowest, min(ceiling, ceiling * (lowest / ceiling) ** t))


# -- sources of CPU time ---------------------------------------------------------------------------------------

class CpuSource(Protocol):
    def cpu_seconds(self) -> float | None:
        """CPU seconds the watched processes used since this source was made (None: they cannot be read)."""


def ticks(path: str) -> int | None:
    """utime + stime of a /proc/.../stat file, in clock ticks (None: gone or unreadable)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    """The live children of `pid` (/proc/PID/task/*/children; a scan of /proc where the kernel lacks that file)."""
    found: set[int] = set()
    if os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    found.update(int(x) for x in f.read().split())
            except OSError:
                continue  # the thread ended meanwhile
        return sorted(found)
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc at all
        return []
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            if int(raw[raw.rindex(b")") + 2:].split()[1]) == pid:
                found.add(int(name))
    return sorted(found)


class Processes:
    """The CPU of a changing set of processes (`pids()`, listed again every RESCAN_S): each counts from the first
    time it is seen, so a worker that appears does not add what it spent before."""

    def __init__(self, pids: Callable[[], Iterable[int]], clock: Callable[[], float] = time.monotonic) -> None:
        self._pids = pids
        self._clock = clock
        self._listed_at = -RESCAN_S
        self._watched: list[int] = []
        self._last: dict[int, int] = {}
        self._total = 0

    @property
    def watched(self) -> list[int]:
        return list(self._watched)

    def cpu_seconds(self) -> float | None:
        now = self._clock()
        if now - self._listed_at >= RESCAN_S:
            self._listed_at = now
            self._watched = sorted(set(self._pids()))
        seen: dict[int, int] = {}
        for pid in self._watched:
            t = ticks(f"/proc/{pid}/stat")
            if t is None:
                continue
            if pid in self._last:
                self._total += max(0, t - self._last[pid])
            seen[pid] = t
        self._last = seen
        return self._total / TICK if seen else None


def serving_processes(parent: int, me: int) -> Processes:
    """The serving side of `resolver serve`, seen from one of its background children (the events process, the
    outbound process): the parent (the supervisor; with one worker it serves gRPC itself) and the parent's other
    children but the background ones (the gRPC workers)."""
    return Processes(lambda: [parent, *(p for p in children(parent)
                                        if p != me and comm(p) not in (EVENTS_PROCESS, OUTBOUND_PROCESS))])


def comm(pid: int) -> str:
    """A process's name (/proc/PID/comm; "" when it is gone)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


class ProcessButThread:
    """This process's CPU but one thread's (the applier's): the serving load when the applier is a thread of the
    serving process (`build_server` in one process, as the tests run it)."""

    def __init__(self, tid: int) -> None:
        self._tid = tid
        self._first: int | None = None

    def cpu_seconds(self) -> float | None:
        whole, own = ticks(f"/proc/{os.getpid()}/stat"), ticks(f"/proc/{os.getpid()}/task/{self._tid}/stat")
        if whole is None or own is None:
            return None
        if self._first is None:
            self._first = whole - own
        return (whole - own - self._first) / TICK


# -- from CPU time to a rate -----------------------------------------------------------------------------------

class Meter:
    """The share of the machine's CPU (0-1) a source used over about the last WINDOW_S seconds."""

    def __init__(self, source: CpuSource, cpus: int, clock: Callable[[], float] = time.monotonic,
                 window: float = WINDOW_S) -> None:
        self.source = source
        self.cpus = max(1, cpus)
        self.clock = clock
        self.window = window
        self._readings: deque[tuple[float, float]] = deque()

    def read(self) -> float | None:
        """Take a reading; the share since the oldest reading kept, the last one at or before the window's start
        (None: fewer than two readings, or the source cannot be read)."""
        now, cpu = self.clock(), self.source.cpu_seconds()
        if cpu is None:
            self._readings.clear()
            return None
        readings = self._readings
        readings.append((now, cpu))
        while len(readings) > 2 and readings[1][0] <= now - self.window:
            readings.popleft()  # keep one reading at or before the window's start (after a gap: the gap's average)
        t0, c0 = readings[0]
        if now - t0 <= 0:
            return None
        return max(0.0, (cpu - c0) / (now - t0) / self.cpus)


class Pacer:
    """The applier's current rate: `rate()` reads the serving CPU (at most every SAMPLE_S) and returns
    `pace(share)`; `current` is the last rate returned, for other threads (the retry delay of a 429)."""

    def __init__(self, ev: EventSettings, source: CpuSource | None = None, *,
                 clock: Callable[[], float] = time.monotonic, cpus: int | None = None) -> None:
        self.ev = ev
        self.clock = clock
        self.cpus = cpus or os.cpu_count() or 1
        self.meter: Meter | None = None
        self.share: float | None = None
        self.current = floor(ev)
        self._read_at = -SAMPLE_S
        if source is not None:
            self.use(source)

    def use(self, source: CpuSource) -> None:
        """Watch `source` from now on (the readings of the previous one are dropped)."""
        self.meter = Meter(source, self.cpus, self.clock)
        self._read_at = -SAMPLE_S

    def rate(self) -> float:
        now = self.clock()
        if self.meter is not None and now - self._read_at >= SAMPLE_S:
            self._read_at = now
            self.share = self.meter.read()
            self.current = pace(self.share, self.ev)
        return self.current
