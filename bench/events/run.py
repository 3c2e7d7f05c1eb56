"""One run of the events bench: dataset and import, the server, windows A, B (push + drain under load), C, D
(push + drain with no load) and E (a backlog drained with no load), then the accounting. `run` fills the results
dict that `report.render` reads and returns the verdicts."""

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
from bench.events import PY, ROOT, floor_rate, log
from bench.events.accounting import (
    applier_pace,
    check_visible,
    drain_figures,
    idle_drain_figures,
    merge_pushes,
    reconcile,
    verdicts,
)
from bench.events.blueprint import blueprint
from bench.events.crm import SECRET_ENV, SOURCE, new_secret
from bench.events.serverstat import connection_placement
from bench.events.windows import RECORDED_AFTER_CONNECT_S, Load, Meter, spread_target
from resolver.events.applier import QUIET_S

SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+) .*webhooks on http://127\.0\.0\.1:(\d+)")
RESOLVER = str(Path(PY).parent / "resolver")


def machine_info() -> dict[str, Any]:
    """The machine and the code the figures belong to."""
    model = procstat.cpu_model()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip())
    from bench.machine import floor_cpu_per_call
    from resolver import _hotpath

    return {"cpus": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "git": git + ("+dirty" if dirty else ""),
            "hot_path": getattr(_hotpath, "IMPLEMENTATION", getattr(_hotpath, "implementation", "?")),
            "grpc_floor": floor_cpu_per_call()}  # is the machine in a slow phase? (bench/machine.py)


def counters_row(stub: Any) -> list[int]:
    """The event counters now, as a Sampler row has them (accepted, applied, dead-lettered, throttled, in_inbox)."""
    from resolver.v1 import resolver_pb2 as pb

    s = stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)
    c = s.counters
    return [c["accepted"], c["applied"], c["dead_lettered"], c["throttled"], s.in_inbox]


class Sampler:
    """GetEventCounters every `period` s in a thread: (t since `t0`, accepted, applied, dead-lettered, throttled,
    in_inbox), the counters less `base` (the counters when the window began; the inbox as it is). One light unary
    call every half second next to the Resolve load."""

    def __init__(self, stub: Any, t0: float, period: float = 0.5, base: list[int] | None = None) -> None:
        self.stub, self.t0, self.period = stub, t0, period
        self.base = base or [0, 0, 0, 0, 0]
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
                b = self.base
                self.rows.append([round(time.monotonic() - self.t0, 3), c["accepted"] - b[0], c["applied"] - b[1],
                                  c["dead_lettered"] - b[2], c["throttled"] - b[3], s.in_inbox])
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

        self.log_path = out / "server.log"
        self.proc = Proc([RESOLVER, "serve", "--config", str(setup.config), "--data-dir", str(setup.data),
                          "--listen", "127.0.0.1:0"], "serving on", self.log_path)
        self.pid = self.proc.pid
        self._stopped = False
        m = SERVING.search((out / "server.log").read_text())
        if not m:
            self.stop()
            raise SystemExit(f"cannot read the ports from {out / 'server.log'}")
        self.grpc_port, self.http_port = int(m.group(1)), int(m.group(2))
        self.target = f"127.0.0.1:{self.grpc_port}"

    def log_size(self) -> int:
        """How many bytes the server has logged so far (where a window's lines start)."""
        return self.log_path.stat().st_size

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.proc.stop()


def start_pusher(a: argparse.Namespace, port: int, run_id: str, push_json: Path, out: Path,
                 stack: ExitStack, first: int = 0, events: int | None = None, connections: int | None = None,
                 log_name: str = "pusher.log", command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start the pusher (events `first` .. `first + events - 1`; default all of --events), or `command` (the
    backlog writer), and wait until it is ready; it starts once told "go" on its stdin."""
    events = a.events if events is None else events
    cmd = command or ["push", "--port", str(port), "--connections", str(connections or a.connections),
                      "--budget", f"{a.push_budget:g}"]
    # the child takes SCHED_IDLE itself: a preexec_fn would make Popen fork this process, whose gRPC fork handlers
    # then run in the child (once they killed it before exec), where without one it spawns the child directly
    pusher = subprocess.Popen([PY, "-m", "bench.events", *cmd, "--events", str(events), "--first", str(first),
                               "--customers", str(a.customers), "--run-id", run_id, "--json", str(push_json),
                               *(["--sched-idle"] if a.pusher_sched_idle else [])],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(out / log_name).open("wb"))

    def kill() -> None:
        if pusher.poll() is None:
            pusher.kill()

    stack.callback(kill)
    assert pusher.stdout is not None
    if not select.select([pusher.stdout], [], [], 60)[0] or pusher.stdout.readline().strip() != b"ready":
        raise SystemExit(f"the pusher did not start: {(out / log_name).read_text()[-2000:]}")
    return pusher


def wait_drained(a: argparse.Namespace, pusher: subprocess.Popen[bytes], sampler: Sampler, push_json: Path,
                 go: float) -> tuple[dict[str, Any], float]:
    """Wait for the pusher, then for the inbox to empty (bounded); what the pusher saw, and when the inbox was
    seen empty (s after `go`). The sampler is stopped one sample later."""
    try:
        pusher.wait(a.push_budget + 60)
    except subprocess.TimeoutExpired:
        pusher.kill()
        raise SystemExit("the pusher overran its budget") from None
    push: dict[str, Any] = json.loads(push_json.read_text())
    drain_deadline = time.monotonic() + max(60.0, 3 * a.high_water / floor_rate(a) + 30)
    while ((row := sampler.last()) is None or row[5] != 0) and time.monotonic() < drain_deadline:
        time.sleep(0.1)
    drained_at = time.monotonic() - go
    # one more sample after the inbox emptied, and the applier's line once it has stayed empty
    time.sleep(max(sampler.period, QUIET_S) + 0.3)
    sampler.stop()
    return push, drained_at


def drain_window(a: argparse.Namespace, load: Load, server: Server, stub: Any, run_id: str, out: Path,
                 results: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
    """Window B: the load while the pusher, released when the window's recording starts, fills the inbox and the
    applier drains it; then wait for the pusher and the drain. What the pusher saw."""
    drain_s = a.events / floor_rate(a)  # Resolve keeps the workers busy: the applier at its floor
    dur_b = a.window_b or round(min(120.0, max(5.0, 0.9 * drain_s - 1.0)), 1)
    push_json = out / "pusher.json"
    push_json.unlink(missing_ok=True)
    pusher = start_pusher(a, server.http_port, run_id, push_json, out, stack)
    assert pusher.stdin is not None
    log(f"window B: call-setup at {a.rate:g}/s for {dur_b:g}s while {a.events} events are pushed "
        f"(a drain at the floor, {floor_rate(a):g}/s, takes ~{drain_s:.0f}s)")
    base_conns = load.connections()
    meter = Meter(server.pid)
    loadgen = load.start(dur_b, "b_drain")
    load.wait_connected(base_conns)
    connected = time.monotonic()
    time.sleep(RECORDED_AFTER_CONNECT_S)
    base = counters_row(stub)
    log_from = server.log_size()
    go = time.monotonic()
    pusher.stdin.write(b"go\n")
    pusher.stdin.flush()
    busy_b = procstat.cpu_jiffies()
    sampler = Sampler(stub, go, base=base)
    placement: dict[str, Any] = {}
    placer = threading.Timer(3.0, lambda: placement.update(
        connection_placement(server.pid, server.grpc_port,
                             {"grpc": (server.grpc_port, *load.ports()), "webhooks": (server.http_port,)})))
    placer.start()
    pusher_cpu0 = procstat.cpu_seconds(pusher.pid)
    b = load.finish(loadgen, "b_drain", dur_b + 120)
    pusher_cpu1 = procstat.cpu_seconds(pusher.pid)
    b["applier_pace"] = applier_pace(server.log_path.read_bytes()[log_from:].decode(errors="replace"))
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
    push, drained_at = wait_drained(a, pusher, sampler, push_json, go)
    results["pusher"] = {k: v for k, v in push.items() if k not in ("accepted",)} | {"accepted_count": len(push["accepted"])}
    results["drain"] = drain_figures(sampler.rows, push, dur_b, drained_at, a.drain_rate)
    log(f"  pushed: {push['codes']}, drained {results['drain']['drained']} after {drained_at:.1f}s; applier "
        f"{results['drain']['drain_rate_in_window_b_per_s']}/s during B")
    return push


def idle_window(a: argparse.Namespace, server: Server, stub: Any, run_id: str, out: Path, results: dict[str, Any],
                stack: ExitStack, *, name: str, first: int, backlog: Setup | None = None) -> dict[str, Any]:
    """A window with no Resolve load, `results[name]`: more events (numbered from `first`, after the earlier
    windows' events, so they are newer) drained at the pace of idle serving processes. Window D: `--idle-events`
    pushed over HTTP as fast as `--idle-connections` requests allow. Window E (`backlog` given): `--backlog-events`
    written into the inbox by the backlog writer, faster than the applier drains them. What the sender saw."""
    push_json = out / f"{name}.json"
    push_json.unlink(missing_ok=True)
    if backlog is None:
        events = a.idle_events
        pusher = start_pusher(a, server.http_port, run_id, push_json, out, stack, first=first, events=events,
                              connections=a.idle_connections, log_name=f"{name}.log")
        log(f"window D: {events} events pushed over HTTP with no Resolve load ({a.idle_connections} connections; "
            f"ceiling {a.drain_rate:g}/s)")
    else:
        events = a.backlog_events
        pusher = start_pusher(a, server.http_port, run_id, push_json, out, stack, first=first, events=events,
                              log_name=f"{name}.log", command=["backlog", "--config", str(backlog.config),
                                                               "--data-dir", str(backlog.data)])
        log(f"window E: a backlog of {events} events written into the inbox, no Resolve load (ceiling {a.drain_rate:g}/s)")
    assert pusher.stdin is not None
    base = counters_row(stub)
    log_from = server.log_size()
    meter = Meter(server.pid)
    go = time.monotonic()
    pusher.stdin.write(b"go\n")
    pusher.stdin.flush()
    sampler = Sampler(stub, go, period=0.25, base=base)
    push, drained_at = wait_drained(a, pusher, sampler, push_json, go)
    d = idle_drain_figures(sampler.rows, push, drained_at)
    d["machine"] = meter.figures()
    d["applier_pace"] = applier_pace(server.log_path.read_bytes()[log_from:].decode(errors="replace"))
    d["pusher"] = {k: v for k, v in push.items() if k not in ("accepted",)} | {"accepted_count": len(push["accepted"])}
    results[name] = d
    log(f"  {name[-1].upper()}: {d['applied']} events drained at {d['drain_rate_per_s']}/s (inbox empty after "
        f"{drained_at:.1f}s); answers: {push['codes']}")
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
    target = spread_target(server.target, a.spread)
    results["server"]["load_target"] = target
    load = Load(target, server.pid, setup.queries, a.rate, a.clients, a.realtime_clients, out)

    log(f"window A: call-setup at {a.rate:g}/s for {a.baseline:g}s, no events")
    results["window_a"] = load.window(a.baseline, "a_baseline")
    log(f"  A: p99 {results['window_a']['latency_ms']['p99']:.3f} ms")

    run_id = secrets.token_hex(4)
    push = drain_window(a, load, server, stub, run_id, out, results, stack)

    if not a.no_after:
        log(f"window C: call-setup at {a.rate:g}/s for {a.baseline:g}s, inbox empty")
        results["window_c"] = load.window(a.baseline, "c_after")
        log(f"  C: p99 {results['window_c']['latency_ms']['p99']:.3f} ms")

    if a.idle_events:
        push = merge_pushes(push, idle_window(a, server, stub, run_id, out, results, stack, name="window_d",
                                              first=a.events))
    if a.backlog_events:
        push = merge_pushes(push, idle_window(a, server, stub, run_id, out, results, stack, name="window_e",
                                              first=a.events + a.idle_events, backlog=setup))

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
