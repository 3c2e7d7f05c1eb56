"""What the machine does during a window: CPU by process group and thread, vmstat, disk flushes; the disk's own
flush latency."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from pathlib import Path

# -- /proc accounting --------------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")
KTHREADS = ("kworker", "jbd2", "ksoftirqd", "kswapd", "flush", "kcompactd", "kdamond", "rcu_")


def _stat(path: str) -> tuple[int, str, float] | None:
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    f = raw[raw.rindex(")") + 2:].split()
    return int(f[1]), comm, (int(f[11]) + int(f[12])) / TICK


def cpu_by_group(server_pids: dict[str, int], client_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far: each server's process tree, the load clients, kernel threads by kind, the rest."""
    procs: dict[int, tuple[int, str, float]] = {}
    for n in os.listdir("/proc"):
        if n.isdigit() and (st := _stat(f"/proc/{n}/stat")) is not None:
            procs[int(n)] = st
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(p)
    out: dict[str, float] = {}
    seen: set[int] = set()
    for name, pid in server_pids.items():
        todo, tot = [pid], 0.0
        while todo:
            p = todo.pop()
            if p in procs and p not in seen:
                seen.add(p)
                tot += procs[p][2]
                todo += children.get(p, [])
        out[f"server:{name}"] = tot
    out["clients"] = sum(procs[p][2] for p in client_pids if p in procs)
    seen.update(client_pids)
    seen.add(os.getpid())
    for p, (ppid, comm, cpu) in procs.items():
        if p in seen:
            continue
        kind = next((k for k in KTHREADS if comm.startswith(k)), None) if ppid == 2 else None
        key = f"k:{kind}" if kind else "other"
        out[key] = out.get(key, 0.0) + cpu
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the threads of one server tree, by thread name (pid-less)."""
    out: dict[str, float] = {}
    todo = [pid]
    procs = {int(n): _stat(f"/proc/{n}/stat") for n in os.listdir("/proc") if n.isdigit()}
    while todo:
        p = todo.pop()
        todo += [c for c, st in procs.items() if st and st[0] == p]
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            st = _stat(f"/proc/{p}/task/{t}/stat")
            if st:
                name = re.sub(r"[-_]?\d+$", "", st[1])
                out[name] = out.get(name, 0.0) + st[2]
    return out


def system_times() -> dict[str, float]:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: int(v) / TICK for n, v in zip(names, f, strict=False)}


def vmstat() -> dict[str, int]:
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, v = line.split()
        if k in ("nr_dirty", "nr_writeback", "pgpgout", "nr_dirtied", "nr_written"):
            out[k] = int(v)
    return out


def diskstats(dev_of: Path) -> dict[str, int]:
    """Writes, sectors written, flushes of the block device holding `dev_of`."""
    st = os.stat(dev_of)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if int(f[0]) == major and int(f[1]) == minor:
            return {"writes": int(f[7]), "sectors_w": int(f[9]), "write_ms": int(f[10]),
                    "flushes": int(f[18]) if len(f) > 18 else -1, "flush_ms": int(f[19]) if len(f) > 19 else -1}
    return {}


class Sampler(threading.Thread):
    """Peak Dirty + Writeback pages (vmstat) every 50 ms while a window runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_ev = threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self.stop_ev.wait(0.05):
            v = vmstat()
            self.peak = max(self.peak, v["nr_dirty"] + v["nr_writeback"])


# -- the disk's own flush latency --------------------------------------------------------------------------------


def disk_probe(directory: Path, seconds: float, rate: float = 100.0) -> dict[str, list[int]]:
    """µs of one 4 KiB pwrite + fdatasync (`disk1`) and of the LMDB pair (`disk2`: 4 pages + fdatasync, then
    one page + fdatasync) on a preallocated file in `directory`'s filesystem, alternating, paced at `rate`/s."""
    path = directory / "fsync-probe.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    out: dict[str, list[int]] = {"disk1": [], "disk2": []}
    try:
        size = 4 << 20
        os.pwrite(fd, b"\0" * size, 0)
        os.fsync(fd)
        page = os.urandom(4096)
        rng = random.Random(1)
        t_next = time.monotonic()
        end = t_next + seconds
        i = 0
        while time.monotonic() < end:
            t_next += 1 / rate
            d = t_next - time.monotonic()
            if d > 0:
                time.sleep(d)
            off = rng.randrange(1, size // 4096 - 4) * 4096
            t = time.perf_counter_ns()
            if i % 2 == 0:
                os.pwrite(fd, page, off)
                os.fdatasync(fd)
                out["disk1"].append((time.perf_counter_ns() - t) // 1000)
            else:
                os.pwrite(fd, page * 4, off)
                os.fdatasync(fd)
                os.pwrite(fd, page, 0)
                os.fdatasync(fd)
                out["disk2"].append((time.perf_counter_ns() - t) // 1000)
            i += 1
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return out


