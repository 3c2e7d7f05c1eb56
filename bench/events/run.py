"""One run of the events bench: dataset and import, the server, windows A, B (push + drain) and C, then the
accounting. `run` fills the results dict that `report.render` reads and returns the verdicts."""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import select
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procstat
from bench.events import PY, ROOT, log
from bench.events.accounting import check_visible, drain_figures, reconcile, verdicts
from bench.events.blueprint import blueprint
from bench.events.crm import SECRET_ENV, SOURCE, new_secret
from bench.events.serverstat import connection_placement
from bench.events.windows import RECORDED_AFTER_CONNECT_S, Load, Meter

SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+) .*webhooks on http://127\.0\.0\.1:(\d+)")
RESOLVER = str(Path(PY).parent / "resolver")


def machine_info() -> dict[str, Any]:
    """The machine and the code the figures belong to."""
    model = procstat.cpu_model()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip())
    from resolver import _hotpath

    return {"cpus": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "git": git + ("+dirty" if dirty else ""),
            "hot_path": getattr(_hotpath, "IMPLEMENTATION", getattr(_hotpath, "implementation", "?"))}


class Sampler:
    """GetEventCounters every `period` s in a thread: (t since `t0`, accepted, applied, dead-lettered, throttled,
    in_inbox). One light unary call every half second next to the Resolve load."""

    def __init__(self, stub: Any, t0: float, period: float = 0.5) -> None:
        self.stub, self.t0, self.period = stub, t0, period
        self.rows: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counter-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from resolver.v1 import resolver_pb2 as pb

        while not self._stop.is_set():
            try:
                s = self.stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)
                c = s.counters
                self.rows.append([round(time.monotonic() - self.t0, 3), c["accepted"], c["applied"], c["dead_lettered"],
                                  c["throttled"], s.in_inbox])
            except Exception as exc:  # noqa: BLE001 - a missed sample is reported, never fatal
                self.rows.append([round(time.monotonic() - self.t0, 3), -1, -1, -1, -1, -1])
                log(f"counter sample failed: {exc}")
            self._stop.wait(self.period)

    def last(self) -> list[float] | None:
        good = [r for r in self.rows if r[1] >= 0]
        return good[-1] if good else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass(frozen=True)
class Setup:
    """What the import left for the server: its blueprint, data directory and the lookup mix."""

    config: Path
    data: Path
    queries: Path


def prepare(a: argparse.Namespace, work: Path, results: dict[str, Any]) -> Setup:
    """Write the dataset and the blueprint into `work`, make the run's secret, and import the customers."""
    from bench.dataset import generate

    ds, data = work / "dataset", work / "data"
    log(f"dataset: {a.customers} customers -> {ds}")
    results["dataset"] = generate(ds, a.customers, max(a.customers, 20_000), 0)
    config = work / "events-bench.toml"
    config.write_text(blueprint(a))
    os.environ[SECRET_ENV] = new_secret()  # the server, `resolver check` and the pusher inherit it
    cmd = [RESOLVER, "import", str(ds / "customers.jsonl"), "--config", str(config), "--data-dir", str(data),
           "--no-progress"]
    t = time.monotonic()
    imp = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if imp.returncode != 0:
        raise SystemExit(f"import failed:\n{imp.stdout}\n{imp.stderr[-3000:]}")
    results["import"] = {"summary": imp.stdout.strip().splitlines()[-1], "seconds": round(time.monotonic() - t, 1)}
    log(results["import"]["summary"])
    return Setup(config, data, ds / "queries.jsonl")


class Server:
    """`resolver serve` on port 0 (gRPC and webhooks), its ports read from its log; stopped once."""

    def __init__(self, setup: Setup, out: Path) -> None:
        from bench.run import Proc

        self.proc = Proc([RESOLVER, "serve", "--config", str(setup.config), "--data-dir", str(setup.data),
                          "--listen", "127.0.0.1:0"], "serving on", out / "server.log")
        self.pid = self.proc.pid
        self._stopped = False
        m = SERVING.search((out / "server.log").read_text())
        if not m:
            self.stop()
            raise SystemExit(f"cannot read the ports from {out / 'server.log'}")
        self.grpc_port, self.http_port = int(m.group(1)), int(m.group(2))
        self.target = f"127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.proc.stop()


def _sched_idle() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def start_pusher(a: argparse.Namespace, port: int, run_id: str, push_json: Path, out: Path,
                 stack: ExitStack) -> subprocess.Popen[bytes]:
    """Start the pusher and wait until it is ready; it pushes once told "go" on its stdin."""
    pusher = subprocess.Popen([PY, "-m", "bench.events", "push", "--port", str(port), "--events", str(a.events),
                               "--customers", str(a.customers), "--connections", str(a.connections),
                               "--budget", f"{a.push_budget:g}", "--run-id", run_id, "--json", str(push_json)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(out / "pusher.log").open("wb"),
                              preexec_fn=_sched_idle if a.pusher_sched_idle else None)

    def kill() -> None:
        if pusher.poll() is None:
            pusher.kill()

    stack.callback(kill)
    assert pusher.stdout is not None
    if not select.select([pusher.stdout], [], [], 60)[0] or pusher.stdout.readline().strip() != b"ready":
        raise SystemExit(f"the pusher did not start: {(out / 'pusher.log').read_text()[-2000:]}")
    return pusher


def drain_window(a: argparse.Namespace, load: Load, server: Server, stub: Any, run_id: str, out: Path,
                 results: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
    """Window B: the load while the pusher, released when the window's recording starts, fills the inbox and the
    applier drains it; then wait for the pusher and the drain. What the pusher saw."""
    drain_s = a.events / a.drain_rate
    dur_b = round(min(120.0, max(5.0, 0.9 * drain_s - 1.0)), 1)
    push_json = out / "pusher.json"
    push_json.unlink(missing_ok=True)
    pusher = start_pusher(a, server.http_port, run_id, push_json, out, stack)
    assert pusher.stdin is not None
    log(f"window B: call-setup at {a.rate:g}/s for {dur_b:g}s while {a.events} events are pushed "
        f"(drain at {a.drain_rate:g}/s takes ~{drain_s:.0f}s)")
    base_conns = procstat.established_to(server.grpc_port)
    meter = Meter(server.pid)
    loadgen = load.start(dur_b, "b_drain")
    seen_deadline = time.monotonic() + 60
    while procstat.established_to(server.grpc_port) < base_conns + a.clients and time.monotonic() < seen_deadline:
        time.sleep(0.01)
    connected = time.monotonic()
    time.sleep(max(0.0, connected + RECORDED_AFTER_CONNECT_S - time.monotonic()))
    go = time.monotonic()
    pusher.stdin.write(b"go\n")
    pusher.stdin.flush()
    busy_b = procstat.cpu_jiffies()
    sampler = Sampler(stub, go)
    placement: dict[str, Any] = {}
    placer = threading.Timer(3.0, lambda: placement.update(
        connection_placement(server.pid, {"grpc": server.grpc_port, "webhooks": server.http_port})))
    placer.start()
    pusher_cpu0 = procstat.cpu_seconds(pusher.pid)
    b = load.finish(loadgen, "b_drain", dur_b + 120)
    pusher_cpu1 = procstat.cpu_seconds(pusher.pid)
    b["machine"] = meter.figures() | {
        "busy_fraction_from_go": procstat.busy_since(busy_b),
        "connected_s_before_go": round(go - connected, 3),
        # the pusher's CPU from its release to the end of B (it is still pushing then), in cores
        "pusher_cores": (round((pusher_cpu1 - pusher_cpu0) / max(time.monotonic() - go, 1e-9), 3)
                         if pusher_cpu0 is not None and pusher_cpu1 is not None else None)}
    placer.join(10)
    b["connection_placement"] = placement
    results["window_b"] = b
    log(f"  B: p99 {b['latency_ms']['p99']:.3f} ms; waiting for the pusher and the drain")
    try:
        pusher.wait(a.push_budget + 60)
    except subprocess.TimeoutExpired:
        pusher.kill()
        raise SystemExit("the pusher overran its budget") from None
    push: dict[str, Any] = json.loads(push_json.read_text())
    drain_deadline = time.monotonic() + max(60.0, 3 * a.high_water / a.drain_rate + 30)
    while ((row := sampler.last()) is None or row[5] != 0) and time.monotonic() < drain_deadline:
        time.sleep(0.2)
    drained_at = time.monotonic() - go
    time.sleep(0.6)  # one more sample after the inbox emptied
    sampler.stop()
    results["pusher"] = {k: v for k, v in push.items() if k not in ("accepted",)} | {"accepted_count": len(push["accepted"])}
    results["drain"] = drain_figures(sampler.rows, push, dur_b, drained_at, a.drain_rate)
    log(f"  pushed: {push['codes']}, drained {results['drain']['drained']} after {drained_at:.1f}s")
    return push


def run(a: argparse.Namespace, work: Path, out: Path, results: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
    """The whole run in `work` (dataset, data), its figures into `results` and `out`; the verdicts."""
    import grpc

    from resolver.v1 import resolver_pb2 as pb
    from resolver.v1 import resolver_pb2_grpc

    setup = prepare(a, work, results)
    server = Server(setup, out)
    stack.callback(server.stop)
    results["server"] = {"grpc": server.target,
                         "webhooks": f"http://127.0.0.1:{server.http_port}/v1/webhooks/{SOURCE}",
                         "pid": server.pid, "blueprint": setup.config.read_text()}
    log(f"server pid {server.pid}: gRPC {server.target}, webhooks on {server.http_port}")
    channel = grpc.insecure_channel(server.target)
    stack.callback(channel.close)
    stub = resolver_pb2_grpc.IdentityResolverStub(channel)
    stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=10)  # connected, and the store answers
    load = Load(server.target, server.pid, setup.queries, a.rate, a.clients, a.realtime_clients, out)

    log(f"window A: call-setup at {a.rate:g}/s for {a.baseline:g}s, no events")
    results["window_a"] = load.window(a.baseline, "a_baseline")
    log(f"  A: p99 {results['window_a']['latency_ms']['p99']:.3f} ms")

    run_id = secrets.token_hex(4)
    push = drain_window(a, load, server, stub, run_id, out, results, stack)

    if not a.no_after:
        log(f"window C: call-setup at {a.rate:g}/s for {a.baseline:g}s, inbox empty")
        results["window_c"] = load.window(a.baseline, "c_after")
        log(f"  C: p99 {results['window_c']['latency_ms']['p99']:.3f} ms")

    snap = stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=10)
    results["counters"] = {"counters": dict(snap.counters), "in_inbox": snap.in_inbox, "in_dlq": snap.in_dlq,
                           "conserved": snap.conserved}
    results["visible"] = check_visible(stub, pb, push["accepted"], a.customers)
    channel.close()
    server.stop()
    chk = subprocess.run([RESOLVER, "check", "--config", str(setup.config), "--data-dir", str(setup.data)],
                         cwd=ROOT, capture_output=True, text=True)
    results["check"] = {"exit": chk.returncode, "output": (chk.stdout + chk.stderr).strip().splitlines()}
    results["ledger"] = reconcile(setup.config, setup.data, run_id, push)
    return verdicts(results)
