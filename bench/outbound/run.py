"""One run of the outbound bench (see bench.outbound): dataset and import, the held receiver, the server, a backlog,
windows A, B (drain under load), C and D (drain with no load), then the accounting; `report` renders it."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import select
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import procstat
from bench.events.run import machine_info
from bench.events.windows import RECORDED_AFTER_CONNECT_S, Load, Meter, spread_target
from bench.outbound import PY, ROOT, log

SECRET_ENV = "BENCH_OUTBOUND_CRM_SECRET"
SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)")
RESOLVER = str(Path(PY).parent / "resolver")


def blueprint(a: argparse.Namespace, receiver_port: int) -> str:
    """The events bench's server, storage, matching and attributes; no CRM source (no events process); one
    destination, CRM, at the receiver, rate unlimited."""
    return f"""\
version = 1
name = "outbound bench"
[server]
workers = 2
threads = 16
max_concurrent_rpcs = 256
grace_period_s = 5
[storage]
map_size_mb = 4096
max_readers = 1024
[matching]
write_keys = ["external_id", "email"]
default_region = "US"
max_fanout = 25
max_candidates = 10
[attributes.name]
type = "string"
max_length = 200
[attributes.status]
type = "string"
enum = ["Active", "Churned", "Prospect", "Suspended"]
owner = "SALESFORCE"
[attributes.tier]
type = "string"
enum = ["bronze", "silver", "gold", "platinum"]
[attributes.credit_limit]
type = "number"
minimum = 0
owner = "SALESFORCE"
[attributes.preferred_language]
type = "string"
pattern = "^[a-z]{{2}}(-[A-Z]{{2}})?$"
[views.default]
fields = ["name", "status", "tier", "preferred_language"]
[logging]
payload = "masked"
level = "INFO"
[outbound.CRM]
url = "http://127.0.0.1:{receiver_port}/crm/webhooks"
secrets = [{{ env = "{SECRET_ENV}" }}]
events = ["customer.created", "customer.updated", "customer.merged", "customer.deleted"]
fields = ["status", "credit_limit", "tier"]
rate_per_s = {a.dest_rate:g}
concurrency = {a.concurrency}
timeout_s = 600
max_age_s = 86400
"""


class Receiver:
    """The receiver process (bench.outbound.receiver): started held; `go`, `hold`, `stats`, `stop`."""

    def __init__(self, a: argparse.Namespace, out: Path) -> None:
        cmd = [PY, "-m", "bench.outbound", "receive", "--secret-env", SECRET_ENV, "--held",
               *(["--sched-idle"] if a.receiver_sched_idle else [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=(out / "receiver.log").open("wb"))
        line = self._line(30)
        if not line.startswith("ready "):
            raise SystemExit(f"the receiver did not start: {(out / 'receiver.log').read_text()[-2000:]}")
        self.port = int(line.split()[1])

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return ""
        return self.proc.stdout.readline().decode().strip()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def stats(self) -> dict[str, Any]:
        self.send("stats")
        got: dict[str, Any] = json.loads(self._line(30))
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


class Server:
    """`resolver serve` on port 0; stopped once."""

    def __init__(self, config: Path, data: Path, out: Path) -> None:
        from bench.run import Proc

        self.log_path = out / "server.log"
        self.proc = Proc([RESOLVER, "serve", "--config", str(config), "--data-dir", str(data), "--listen",
                          "127.0.0.1:0"], "serving on", self.log_path)
        self.pid = self.proc.pid
        m = SERVING.search(self.log_path.read_text())
        if not m:
            self.proc.stop()
            raise SystemExit(f"cannot read the port from {self.log_path}")
        self.target = f"127.0.0.1:{m.group(1)}"

    def stop(self) -> None:
        self.proc.stop()


class Sampler:
    """GetOutboundCounters every `period` s in a thread: (t since t0, delivered, pending)."""

    def __init__(self, stub: Any, t0: float, period: float = 0.5) -> None:
        self.stub, self.t0, self.period = stub, t0, period
        self.rows: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c = counters(self.stub)
                self.rows.append((round(time.monotonic() - self.t0, 3), c.counters["delivered"], c.pending))
            except Exception as exc:  # noqa: BLE001 - a missed sample is reported, never fatal
                log(f"counter sample failed: {exc}")
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def counters(stub: Any) -> Any:
    from resolver.v1 import resolver_pb2 as pb

    return stub.GetOutboundCounters(pb.GetOutboundCountersRequest(), timeout=10)


def wait_until(what: str, cond: Any, timeout: float, every: float = 0.2) -> float:
    """Poll `cond` until true; the seconds it took (SystemExit past `timeout`)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"{what}: not within {timeout:g}s")
        time.sleep(every)
    return time.monotonic() - t0


def backlog(a: argparse.Namespace, config: Path, data: Path, stub: Any, round_: int) -> dict[str, Any]:
    """Write `--messages` changes (round `round_`) into the outbox from the backlog writer; wait until committed."""
    before = counters(stub).counters["committed"]
    r = subprocess.run([PY, "-m", "bench.outbound", "backlog", "--config", str(config), "--data-dir", str(data),
                        "--customers", str(a.customers), "--messages", str(a.messages), "--round", str(round_)],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the backlog writer failed:\n{r.stderr[-3000:]}")
    made: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    wait_until("backlog committed", lambda: counters(stub).counters["committed"] >= before + a.messages, 60)
    return made


def run(a: argparse.Namespace, work: Path, out: Path, results: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
    """The whole run in `work`, its figures into `results`; the verdicts."""
    import grpc

    from bench.dataset import generate
    from resolver.v1 import resolver_pb2_grpc

    results["machine"] = machine_info()
    os.environ[SECRET_ENV] = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    receiver = Receiver(a, out)
    stack.callback(receiver.stop)
    ds, data, config = work / "dataset", work / "data", work / "outbound-bench.toml"
    log(f"dataset: {a.customers} customers -> {ds}")
    results["dataset"] = generate(ds, a.customers, max(a.customers, 20_000), 0)
    config.write_text(blueprint(a, receiver.port))
    imp = subprocess.run([RESOLVER, "import", str(ds / "customers.jsonl"), "--config", str(config), "--data-dir",
                          str(data), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    if imp.returncode != 0:
        raise SystemExit(f"import failed:\n{imp.stdout}\n{imp.stderr[-3000:]}")
    server = Server(config, data, out)
    stack.callback(server.stop)
    channel = grpc.insecure_channel(server.target)
    stack.callback(channel.close)
    stub = resolver_pb2_grpc.IdentityResolverStub(channel)
    results["server"] = {"target": server.target, "pid": server.pid, "blueprint": config.read_text()}
    assert counters(stub).counters["committed"] == 0, "the import queued outbound messages"
    target = spread_target(server.target, a.spread)
    results["server"]["load_target"] = target
    load = Load(target, server.pid, ds / "queries.jsonl", a.rate, a.clients, a.realtime_clients, out)

    log(f"backlog: {a.messages} changes, the receiver held")
    results["backlog_b"] = backlog(a, config, data, stub, 1)
    log(f"window A: call-setup at {a.rate:g}/s for {a.baseline:g}s, {a.messages} messages waiting, deliverer held")
    results["window_a"] = load.window(a.baseline, "a_baseline")
    log(f"  A: p99 {results['window_a']['latency_ms']['p99']:.3f} ms")

    log(f"window B: call-setup at {a.rate:g}/s for {a.window_b:g}s while the outbox drains")
    base_conns = load.connections()
    meter = Meter(server.pid)
    loadgen = load.start(a.window_b, "b_drain")
    load.wait_connected(base_conns)
    time.sleep(RECORDED_AFTER_CONNECT_S)
    go = time.monotonic()
    receiver_cpu = procstat.cpu_seconds(receiver.proc.pid) or 0.0
    receiver.send("go")
    sampler = Sampler(stub, go)
    b = load.finish(loadgen, "b_drain", a.window_b + 120)
    ended_b = time.monotonic() - go
    b["machine"] = meter.figures() | {
        "receiver_cores": round(((procstat.cpu_seconds(receiver.proc.pid) or 0.0) - receiver_cpu) / ended_b, 3)}
    drained_s = ended_b + wait_until("drained after B", lambda: counters(stub).pending == 0, 600)
    sampler.stop()
    in_b = [r for r in sampler.rows if r[0] <= ended_b]
    delivered_in_b = in_b[-1][1] - sampler.rows[0][1] if in_b else 0
    b["drain"] = {"delivered_during_b": delivered_in_b, "rate_during_b_per_s": round(delivered_in_b / ended_b, 1),
                  "pending_when_b_ended": in_b[-1][2] if in_b else None, "drained_after_s": round(drained_s, 1),
                  "samples": sampler.rows}
    results["window_b"] = b
    log(f"  B: p99 {b['latency_ms']['p99']:.3f} ms; {delivered_in_b} delivered during B "
        f"({b['drain']['rate_during_b_per_s']}/s), {b['drain']['pending_when_b_ended']} still pending when it ended; "
        f"outbox empty after {drained_s:.1f}s")

    log(f"window C: call-setup at {a.rate:g}/s for {a.baseline:g}s, outbox empty")
    results["window_c"] = load.window(a.baseline, "c_after")
    log(f"  C: p99 {results['window_c']['latency_ms']['p99']:.3f} ms")

    receiver.send("hold")
    log(f"window D: a second backlog of {a.messages}, then drained with no Resolve load")
    results["backlog_d"] = backlog(a, config, data, stub, 2)
    meter = Meter(server.pid)
    go = time.monotonic()
    receiver_cpu = procstat.cpu_seconds(receiver.proc.pid) or 0.0
    receiver.send("go")
    took = wait_until("drained in D", lambda: counters(stub).pending == 0, 600, every=0.05)
    d = {"messages": a.messages, "seconds": round(took, 2), "rate_per_s": round(a.messages / took, 1),
         "machine": meter.figures() | {
             "receiver_cores": round(((procstat.cpu_seconds(receiver.proc.pid) or 0.0) - receiver_cpu) / took, 3)}}
    d["receiver"] = receiver.stats()
    results["window_d"] = d
    log(f"  D: {a.messages} delivered in {took:.1f}s: {d['rate_per_s']}/s")

    snap = counters(stub)
    results["counters"] = {"counters": dict(snap.counters), "pending": snap.pending, "dead": snap.dead,
                           "conserved": snap.conserved}
    results["receiver"] = receiver.stats()
    channel.close()
    server.stop()
    chk = subprocess.run([RESOLVER, "check", "--config", str(config), "--data-dir", str(data)], cwd=ROOT,
                         capture_output=True, text=True)
    results["check"] = {"exit": chk.returncode, "output": (chk.stdout + chk.stderr).strip().splitlines()}
    return verdicts(a, results)


def verdicts(a: argparse.Namespace, r: dict[str, Any]) -> dict[str, Any]:
    c, rcv = r["counters"], r["receiver"]
    pa, pb_ = r["window_a"]["latency_ms"]["p99"], r["window_b"]["latency_ms"]["p99"]
    return {"p99_ratio_b_over_a": round(pb_ / pa, 3) if pa else None,
            "drain_covered_window_b": bool(r["window_b"]["drain"]["pending_when_b_ended"]),
            "drain_rate_idle_per_s": r["window_d"]["rate_per_s"],
            "drain_rate_under_load_per_s": r["window_b"]["drain"]["rate_during_b_per_s"],
            "every_message_acknowledged": rcv["acknowledged_ids"] == c["counters"]["committed"] == 2 * a.messages,
            "resent_after_ack": rcv["resent_after_ack"], "bad_signatures": rcv["bad_signatures"],
            "conserved": c["conserved"] and c["counters"]["delivered"] == 2 * a.messages,
            "check_passed": r["check"]["exit"] == 0}


def render(r: dict[str, Any]) -> str:
    v, m = r["verdicts"], r["machine"]
    rows = [(name, r[key]) for name, key in (("A: outbox full, deliverer held", "window_a"),
                                             ("B: outbox draining", "window_b"), ("C: outbox empty", "window_c"))]
    lines = [f"# Outbound delivery bench ({r['started']})", "", f"`{r['command']}`", "",
             f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, git {m['git']}, hot path "
             f"{m['hot_path']}.", "",
             "| window | Resolve p50 ms | p99 ms | p99.9 ms | achieved/s | machine busy | other processes (cores) "
             "| server processes (cores) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, w in rows:
        lat, mach = w["latency_ms"], w.get("machine", {})
        cores = ", ".join(f"{k} {v}" for k, v in mach.get("server_process_cores", {}).items())
        lines.append(f"| {name} | {lat['p50']:.3f} | {lat['p99']:.3f} | {lat['p99.9']:.3f} | {w['achieved_rate']:.0f} "
                     f"| {mach.get('busy_fraction', '-')} | {mach.get('other_processes_cores', '-')} | {cores} |")
    b, d = r["window_b"]["drain"], r["window_d"]
    lines += ["", f"- p99 B / A: **{v['p99_ratio_b_over_a']}x** (target <= 1.3x); the drain covered window B: "
                  f"{v['drain_covered_window_b']} ({b['pending_when_b_ended']} pending when B ended)",
              f"- delivered during B: {b['delivered_during_b']} ({b['rate_during_b_per_s']}/s under load); outbox "
              f"empty {b['drained_after_s']} s after the receiver opened",
              f"- D, no Resolve load: {d['messages']} messages in {d['seconds']} s: **{d['rate_per_s']}/s** "
              f"(target >= 1,000/s); machine busy {d['machine'].get('busy_fraction')}; outbound process "
              f"{d['machine']['server_process_cores'].get('outbound process')} cores, the receiver (the CRM's side) "
              f"{d['machine'].get('receiver_cores')} (in B: {r['window_b']['machine'].get('receiver_cores')})",
              f"- every message acknowledged: {v['every_message_acknowledged']}; re-sent after an acknowledgement: "
              f"{v['resent_after_ack']}; bad signatures: {v['bad_signatures']}; counters conserve: {v['conserved']}; "
              f"`resolver check`: {'passed' if v['check_passed'] else 'FAILED'}",
              "", "Counters: " + ", ".join(f"{k} {x}" for k, x in sorted(r["counters"]["counters"].items())),
              "", f"Load target: `{r['server'].get('load_target')}` (each client round_robin over every worker's own "
                  "port, unless `--no-spread`)."]
    return "\n".join(lines) + "\n"
