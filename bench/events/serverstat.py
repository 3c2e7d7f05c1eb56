"""The server's processes by role (supervisor, gRPC workers, events process): their CPU, and which of them
holds each connection. Read from /proc through bench.procstat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import procstat

EVENTS_PROCESS = "resolver-events"  # the comm of `resolver serve`'s events process (webhooks + applier)
OUTBOUND_PROCESS = "resolver-outbox"  # ... and of its outbound process (the deliverer)
_NAMED = {EVENTS_PROCESS: "events process", OUTBOUND_PROCESS: "outbound process"}


def _role_of_children(server_pid: int, stats: dict[int, procstat.ProcStat]) -> dict[int, str]:
    """The server's children that have a role: the events and outbound processes, and each spawned gRPC worker in
    pid order. Other children (the resource tracker) are left out."""
    roles: dict[int, str] = {}
    workers = 0
    for pid in procstat.child_pids(server_pid, stats):
        if (named := _NAMED.get(procstat.comm(pid))) is not None:
            roles[pid] = named
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            roles[pid] = f"worker {workers}"
            workers += 1
    return roles


def process_cpu(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes by role: the supervisor (worker 0 with one worker), each
    spawned gRPC worker, the events process (webhooks + applier)."""
    stats = procstat.snapshot()
    out: dict[str, float] = {}
    if server_pid in stats:
        out["supervisor"] = stats[server_pid].cpu_s
    for pid, role in _role_of_children(server_pid, stats).items():
        out[role] = out.get(role, 0.0) + stats[pid].cpu_s
    return out


def process_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores each server process kept busy between two `process_cpu` readings."""
    return {k: round((v - before.get(k, 0.0)) / max(seconds, 1e-9), 3) for k, v in after.items()}


def connection_placement(server_pid: int, grpc_port: int, ports: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Which server process holds each established connection on each named group of ports (the gRPC workers
    are the children listening on the shared `grpc_port`: SO_REUSEPORT spreads its connections over them at
    random; each also has its own port; webhooks and the applier are the events process's)."""
    kids = procstat.child_pids(server_pid)
    owner = procstat.socket_owners([server_pid, *kids])
    socks = [s for s in procstat.tcp_sockets() if s.inode in owner]
    # the workers: the children listening on the gRPC port (not the resource tracker), in start order
    workers = sorted({owner[s.inode] for s in socks if s.state == procstat.LISTEN and s.local_port == grpc_port
                      and owner[s.inode] != server_pid}) or kids
    counts: dict[str, dict[str, int]] = {}
    for s in socks:
        if s.state != procstat.ESTABLISHED:
            continue
        for name, group in ports.items():
            if s.local_port in group:
                pid = owner[s.inode]
                label = ("events process" if procstat.comm(pid) == EVENTS_PROCESS else "supervisor" if pid not in workers
                         else f"worker {workers.index(pid)}")
                counts.setdefault(label, {}).setdefault(name, 0)
                counts[label][name] += 1
    return {"workers": workers, "connections": counts}
