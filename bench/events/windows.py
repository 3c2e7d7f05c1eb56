"""A window of call-setup load through `python -m bench.loadgen` (its own process), and the machine around it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procstat
from bench.events import PY, ROOT
from bench.events.serverstat import process_cores, process_cpu
from bench.loadgen.runner import GAP_S, LEAD_S

WARMUP_S = 2.0  # unrecorded load before each window
CLIENT_SETUP_S = 0.1  # once connected, each client parses its queries and makes a warm call before the lead
# the loadgen's timeline after its clients connected: their set-up, its fixed lead, the warm-up, then the gap
# between the warm-up and the recorded window
RECORDED_AFTER_CONNECT_S = CLIENT_SETUP_S + LEAD_S + WARMUP_S + GAP_S


def spread_target(target: str, spread: bool) -> str:
    """The load clients' target: with `spread`, every worker's own port (`ipv4:A:P1,A:P2`, round_robin, as
    ResolverClient opens it), else `target` (the shared port). Through the shared port SO_REUSEPORT puts each
    client's one connection on a worker at random, and a window whose load all lands on one worker measures that
    worker's queue, not what the window is about (bench/README.md)."""
    from resolver.client import workers_target

    return (workers_target(target, timeout=10) if spread else None) or target


@dataclass(frozen=True)
class Load:
    """The call-setup load of every window: against which server, how fast, from how many client processes,
    and where each window's loadgen writes its JSON and log."""

    target: str
    server_pid: int
    queries: Path
    rate: float
    clients: int
    realtime: bool
    out: Path

    def ports(self) -> tuple[int, ...]:
        """The server ports the load clients connect to: the shared port, or every worker's (`ipv4:A:P1,A:P2`)."""
        return tuple(int(address.rsplit(":", 1)[1]) for address in self.target.removeprefix("ipv4:").split(","))

    def connections(self) -> int:
        """The connections established to those ports now (the load clients' and any others)."""
        return sum(procstat.established_to(p) for p in self.ports())

    def wait_connected(self, before: int, timeout: float = 60.0) -> None:
        """Wait (at most `timeout` s) until a started window's clients are connected: one connection per client
        and port more than `before` (`connections()` before the start)."""
        want, deadline = before + self.clients * len(self.ports()), time.monotonic() + timeout
        while self.connections() < want and time.monotonic() < deadline:
            time.sleep(0.01)

    def start(self, duration: float, name: str) -> subprocess.Popen[bytes]:
        """Start one window's loadgen: a warm-up, then `duration` s recorded."""
        cmd = [PY, "-m", "bench.loadgen", "--target", self.target, "--scenario", "call-setup", "--queries",
               str(self.queries), "--rate", f"{self.rate:g}", "--duration", f"{duration:g}", "--windows", "1",
               "--no-floor", "--warmup", f"{WARMUP_S:g}", "--clients", str(self.clients), "--server-pid",
               str(self.server_pid), "--json", str(self.out / f"{name}.loadgen.json")]
        if self.realtime:
            cmd.append("--realtime")
        return subprocess.Popen(cmd, cwd=ROOT, stdout=(self.out / f"{name}.loadgen.log").open("wb"),
                                stderr=subprocess.STDOUT)

    def finish(self, proc: subprocess.Popen[bytes], name: str, timeout: float) -> dict[str, Any]:
        """Wait for a window's loadgen; its call-setup figures and the clients' priority."""
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"loadgen window {name} did not finish in {timeout:.0f}s") from None
        if rc != 0:
            raise RuntimeError(f"loadgen window {name} failed: {(self.out / f'{name}.loadgen.log').read_text()[-2000:]}")
        doc = json.loads((self.out / f"{name}.loadgen.json").read_text())
        res: dict[str, Any] = doc["results"]["call-setup"]
        res["client_priority"] = doc.get("client_priority", "normal")
        return res

    def window(self, duration: float, name: str) -> dict[str, Any]:
        """One whole window (no events pushed): the loadgen's figures and the machine's around it."""
        meter = Meter(self.server_pid)
        res = self.finish(self.start(duration, name), name, duration + 120)
        res["machine"] = meter.figures()
        return res


class Meter:
    """The machine from now until `figures()`: load average, CPU busy, the CPU other processes used (another
    benchmark on the box spoils the figures), and each server process's CPU."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.load0, self.busy0, self.other0 = os.getloadavg(), procstat.cpu_jiffies(), procstat.foreign_cpu()
        self.t0 = time.monotonic()
        self.server0 = process_cpu(server_pid)

    def figures(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        return {"loadavg_before": [round(x, 2) for x in self.load0],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "busy_fraction": procstat.busy_since(self.busy0), "wall_s": round(wall, 1),
                "other_processes_cores": procstat.foreign_cores(self.other0, wall),
                "server_process_cores": process_cores(self.server0, process_cpu(self.server_pid), wall)}
