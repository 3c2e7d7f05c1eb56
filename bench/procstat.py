"""Accounting from /proc, the one reader of it in bench/: CPU seconds of a process, of a process tree and of
every process outside a run; how busy the machine was; TCP connections and which process holds each."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

TICK = os.sysconf("SC_CLK_TCK")
ESTABLISHED, LISTEN = "01", "0A"  # socket states as /proc/net/tcp writes them


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/PID/stat says of one process that the benches use."""

    ppid: int
    cpu_s: float  # utime + stime so far


def stat(pid: int) -> ProcStat | None:
    """The parent and CPU seconds of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # the command name may hold spaces or parentheses: fields start after the last ')'
    fields = raw[raw.rindex(")") + 2:].split()
    return ProcStat(int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)


def snapshot() -> dict[int, ProcStat]:
    """Every live process."""
    return {int(n): st for n in os.listdir("/proc") if n.isdigit() and (st := stat(int(n))) is not None}


def child_pids(pid: int, stats: dict[int, ProcStat] | None = None) -> list[int]:
    """The live children of `pid`, in pid order."""
    stats = snapshot() if stats is None else stats
    return sorted(p for p, st in stats.items() if st.ppid == pid)


def tree(pid: int, stats: dict[int, ProcStat]) -> set[int]:
    """`pid` and every descendant of it in `stats`."""
    children: dict[int, list[int]] = {}
    for p, st in stats.items():
        children.setdefault(st.ppid, []).append(p)
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by one process, or None if it is gone."""
    st = stat(pid)
    return None if st is None else st.cpu_s


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and every live descendant."""
    stats = snapshot()
    return sum(stats[p].cpu_s for p in tree(pid, stats) if p in stats)


PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int | None:
    """Resident memory of one process (/proc/PID/statm), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and every live descendant, summed (pages two of them share count twice)."""
    return sum(r for p in tree(pid, snapshot()) if (r := rss_bytes(p)) is not None)


def foreign_cpu() -> dict[int, float]:
    """CPU seconds so far of every live process that is not this run's (not this process or a descendant)."""
    stats = snapshot()
    ours = tree(os.getpid(), stats)
    return {pid: st.cpu_s for pid, st in stats.items() if pid not in ours}


def foreign_cores(before: dict[int, float], seconds: float) -> float:
    """Cores other processes kept busy since `before` (processes that exited meanwhile are missed)."""
    now = foreign_cpu()
    return round(sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items()) / max(seconds, 1e-9), 2)


def comm(pid: int) -> str:
    """The process's name (/proc/PID/comm), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name ("" where /proc/cpuinfo does not say)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


class Jiffies(NamedTuple):
    idle: int
    total: int


def cpu_jiffies() -> Jiffies:
    """The machine's idle and total jiffies so far (all CPUs)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return Jiffies(f[3] + f[4], sum(f[:8]))


def busy_since(before: Jiffies) -> float:
    """The fraction of the machine's CPU time that was busy since `before`."""
    idle, total = cpu_jiffies()
    return round(1 - (idle - before.idle) / max(total - before.total, 1), 3)


class TcpSocket(NamedTuple):
    local_port: int
    remote_port: int
    state: str  # ESTABLISHED, LISTEN, ...
    inode: str


def tcp_sockets() -> list[TcpSocket]:
    """Every IPv4 and IPv6 TCP socket of the machine's network namespace."""
    out: list[TcpSocket] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) >= 10:
                out.append(TcpSocket(int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3], f[9]))
    return out


def established_to(port: int) -> int:
    """Established TCP connections whose remote end is port `port` (the client side of each)."""
    return sum(1 for s in tcp_sockets() if s.state == ESTABLISHED and s.remote_port == port)


def socket_owners(pids: list[int]) -> dict[str, int]:
    """Socket inode -> the process (of `pids`) that holds it open."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    return owner


class MachineWatch:
    """How busy the machine was from its making until `figures()`: the load average before and after, the share of
    all CPUs busy, the cores other processes (not this run's) kept busy, and what the machine is."""

    def __init__(self) -> None:
        self.load0, self.jiffies, self.foreign0 = os.getloadavg()[0], cpu_jiffies(), foreign_cpu()
        self.t0 = time.monotonic()

    def figures(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        return {"loadavg_before": self.load0, "loadavg_after": os.getloadavg()[0], "cores": os.cpu_count(),
                "busy": busy_since(self.jiffies), "foreign_cores": foreign_cores(self.foreign0, elapsed),
                "cpu_model": cpu_model()}
