"""Server CPU per call for hostile and normal requests (issue 12: requests decoded and held to `[limits]` by us).

    python -m bench.hostile [--rounds 5] [--calls 3000] [--block 100] [--customers 5000] [--out bench/out/hostile]

A temporary LMDB directory gets N customers (one phone, email and external id each, one write transaction),
then two servers are started on it, each in its own process (`python -m bench.hostile --serve VARIANT`):

- **new**: resolver.bootstrap.build_server, the servicer registered by resolver.api.handlers.register (the
  service decodes the raw bytes itself, then checks them against `[limits]`);
- **old**: `baseline_build_server` below, the same server with the servicer registered by the generated
  `add_IdentityResolverServicer_to_server` (grpcio deserializes with ResolveRequest.FromString, no limits):
  the pre-issue-12 baseline, built from today's code so nothing else differs.

Both are `load_settings(None)` with data_dir, listen 127.0.0.1:0, map_size_mb 256 and identifiers_per_request
100 (the default) overridden, no sweeper, `settle()`d after start as `resolver serve` does. One client in this
process sends each case's calls sequentially (pre-serialized bytes, 5 s deadline, every answer's status
checked); the server's CPU per call is the utime+stime of the server process tree (bench/procstat.py) after
the calls minus before, divided by the calls. Each round gives every case --calls calls in blocks of --block,
the cases taking turns block by block (the order rotated at each block), so drift on this shared machine hits
all cases alike; a figure is the median over rounds, a ratio the median of per-round ratios. /proc counts CPU
in clock ticks (10 ms) and each block is read before and after: over 30 blocks of 100 calls that leaves a
case's figure uncertain by ~2 ticks, ~7 µs per call.

Prints the table; writes OUT/results.json (every round's figure).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procstat

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 100  # identifiers_per_request, the default of resolver.config.tables.LimitSettings
RESOLVE = "/resolver.v1.IdentityResolver/Resolve"
HEALTH = "/grpc.health.v1.Health/Check"
UNDECODABLE = b"\x0a\x40" + b"x" * 18  # 20 bytes: field 1 says 64 bytes follow, 18 do (truncated)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def phone(i: int) -> str:
    """Valid, distinct US numbers (i < 80,000) over eight area codes (as bench/conftest.py's)."""
    area = (201, 212, 305, 415, 617, 650, 713, 917)[i % 8]
    return f"+1{area}253{i // 8 % 10000:04d}"


def settings_for(data_dir: Path) -> Any:
    from resolver.config import load_settings

    return load_settings(None).with_overrides(data_dir=str(data_dir), listen="127.0.0.1:0", map_size_mb=256,
                                              identifiers_per_request=LIMIT)


def load_customers(data_dir: Path, n: int) -> None:
    """N customers, one transaction (loading is not what is measured)."""
    from resolver.bootstrap import build_service
    from resolver.identifiers import RawIdentifiers
    from resolver.service import now_us
    from resolver.upsert import UpsertInput, apply, prepare

    svc = build_service(settings_for(data_dir))
    try:
        with svc.store.write() as view:
            for i in range(n):
                inp = UpsertInput(f"hostile-{i}", RawIdentifiers(f"EXT-{i}", (f"user{i}@example.com",), (phone(i),)),
                                  {"name": f"Customer {i}", "tier": "gold"})
                apply(view, prepare(inp, svc.settings, svc.schema, svc.policy, now_us=now_us()), svc.settings)
    finally:
        svc.close()


# ---------------------------------------------------------------------------------------------------------------
# The pre-issue-12 baseline: build_server as it is, but the servicer registered with the generated stub.


def baseline_build_server(settings: Any) -> Any:
    """PRE-ISSUE-12 BASELINE (measurement only): resolver.bootstrap.build_server itself, with the servicer
    registered by the generated `resolver_pb2_grpc.add_IdentityResolverServicer_to_server` in place of
    `resolver.api.handlers.register`, so grpcio deserializes every request with ResolveRequest.FromString and no
    `[limits]` check runs; everything else is today's server. (Only in the bench's child process.)"""
    from resolver.api import handlers
    from resolver.bootstrap import build_server
    from resolver.v1 import resolver_pb2_grpc

    def generated(server: Any, servicer: Any, limits: Any) -> None:
        resolver_pb2_grpc.add_IdentityResolverServicer_to_server(servicer, server)

    handlers.register = generated  # type: ignore[assignment]
    return build_server(settings, sweeper=False, events_in_process=False)


def serve(variant: str, data_dir: Path) -> None:
    """The child: serve `variant` until stdin closes; the port is the one line written to stdout."""
    from resolver.bootstrap import build_server
    from resolver.logs import setup_logging
    from resolver.server import settle

    settings = settings_for(data_dir)
    setup_logging(settings)
    running = (build_server(settings, sweeper=False, events_in_process=False) if variant == "new"
               else baseline_build_server(settings))
    settle()
    print(running.port, flush=True)
    sys.stdin.read()  # the parent closes our stdin (or dies): stop
    running.stop(0)


# ---------------------------------------------------------------------------------------------------------------
# The client side.


@dataclass
class Server:
    variant: str
    proc: subprocess.Popen[str]
    port: int

    def cpu(self) -> float:
        return procstat.tree_cpu_seconds(self.proc.pid)


def start(variant: str, data_dir: Path, logdir: Path) -> Server:
    with open(logdir / f"server-{variant}.log", "w") as err:  # the child's stderr, shown if it fails to start
        proc = subprocess.Popen([sys.executable, "-m", "bench.hostile", "--serve", variant, "--data-dir", str(data_dir)],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise SystemExit(f"the {variant} server did not start:\n{(logdir / f'server-{variant}.log').read_text()[-2000:]}")
    return Server(variant, proc, int(line))


def stop(server: Server) -> None:
    assert server.proc.stdin is not None
    server.proc.stdin.close()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


@dataclass
class Case:
    key: str
    label: str
    server: Server
    method: str
    requests: list[bytes]
    expect: str  # the status code name every call must get


def resolve_bytes(rng: random.Random, customers: int, phones: int, count: int) -> list[bytes]:
    from resolver.v1 import resolver_pb2 as pb

    return [pb.ResolveRequest(identifiers=pb.Identifiers(phones=[phone(i) for i in rng.sample(range(customers), phones)]))
            .SerializeToString() for _ in range(count)]


def run_block(case: Case, call: Callable[..., Any], start: int, calls: int) -> float:
    """Server CPU seconds spent on `calls` sequential calls of `case` (requests from index `start` on)."""
    import grpc

    reqs, n = case.requests, len(case.requests)
    bad = 0
    before = case.server.cpu()
    for i in range(start, start + calls):
        try:
            call(reqs[i % n], timeout=5.0)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        bad += code != case.expect
    after = case.server.cpu()
    if bad:
        raise SystemExit(f"{case.label}: {bad} of {calls} calls did not answer {case.expect}")
    return after - before


def run_round(cases: list[Case], calls: dict[str, Callable[..., Any]], n: int, block: int, first: int) -> dict[str, float]:
    """One round: every case `n` calls, in blocks of `block` interleaved across the cases (the order rotated at
    each block); server CPU µs per call of each case."""
    cpu = dict.fromkeys((c.key for c in cases), 0.0)
    for b, start in enumerate(range(0, n, block)):
        k = (first + b) % len(cases)
        for case in cases[k:] + cases[:k]:
            cpu[case.key] += run_block(case, calls[case.key], start, min(block, n - start))
    return {key: s / n * 1e6 for key, s in cpu.items()}


def check_match(channel: Any, request: bytes) -> None:
    from resolver.v1 import resolver_pb2 as pb

    resp = pb.ResolveResponse.FromString(channel.unary_unary(RESOLVE)(request, timeout=5.0))
    if resp.outcome != pb.OUTCOME_MATCHED:
        raise SystemExit(f"a one-phone Resolve did not match: {resp}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2

    rng = random.Random(12)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        data, logdir = Path(tmp) / "data", Path(tmp)
        log(f"{args.customers} customers -> {data}")
        load_customers(data, args.customers)
        servers = {v: start(v, data, logdir) for v in ("new", "old")}
        channels = {v: grpc.insecure_channel(f"127.0.0.1:{s.port}") for v, s in servers.items()}
        try:
            one = resolve_bytes(rng, args.customers, 1, 1000)
            at = resolve_bytes(rng, args.customers, LIMIT, 64)
            over = resolve_bytes(rng, args.customers, LIMIT + 1, 64)
            health = [health_pb2.HealthCheckRequest(service="").SerializeToString()]
            new, old = servers["new"], servers["old"]
            cases = [
                Case("health", "health Check (floor)", new, HEALTH, health, "OK"),
                Case("one", "Resolve, 1 phone", new, RESOLVE, one, "OK"),
                Case("one_old", "Resolve, 1 phone, old registration", old, RESOLVE, one, "OK"),
                Case("at", f"Resolve, {LIMIT} phones (at the limit)", new, RESOLVE, at, "OK"),
                Case("over", f"Resolve, {LIMIT + 1} phones (over the limit)", new, RESOLVE, over, "INVALID_ARGUMENT"),
                Case("bad", "undecodable 20 bytes", new, RESOLVE, [UNDECODABLE], "INVALID_ARGUMENT"),
                Case("over_old", f"Resolve, {LIMIT + 1} phones, old registration (served)", old, RESOLVE, over, "OK"),
                Case("bad_old", "undecodable 20 bytes, old registration", old, RESOLVE, [UNDECODABLE], "INTERNAL"),
            ]
            for v in servers:
                check_match(channels[v], one[0])
            calls = {c.key: channels[c.server.variant].unary_unary(c.method, _registered_method=True) for c in cases}
            log(f"warm-up: {min(args.calls, 500)} calls of every case")
            run_round(cases, calls, min(args.calls, 500), args.block, 0)
            load0, jiffies, foreign0, w0 = os.getloadavg(), procstat.cpu_jiffies(), procstat.foreign_cpu(), time.monotonic()
            per: dict[str, list[float]] = {c.key: [] for c in cases}
            foreign: list[float] = []
            for r in range(args.rounds):
                f0, r0 = procstat.foreign_cpu(), time.monotonic()
                for key, us in run_round(cases, calls, args.calls, args.block, r).items():
                    per[key].append(us)
                foreign.append(procstat.foreign_cores(f0, time.monotonic() - r0))
                log(f"round {r + 1}/{args.rounds} (other processes {foreign[-1]} cores): "
                    + ", ".join(f"{k} {v[-1]:.0f}" for k, v in per.items()))
            elapsed = time.monotonic() - w0
            machine = {"loadavg_before": load0[0], "loadavg_after": os.getloadavg()[0],
                       "busy": procstat.busy_since(jiffies), "foreign_cores": procstat.foreign_cores(foreign0, elapsed),
                       "foreign_cores_per_round": foreign, "cpu": procstat.cpu_model(), "cores": os.cpu_count()}
        finally:
            for ch in channels.values():
                ch.close()
            for s in servers.values():
                stop(s)
    return {"cases": {c.key: {"label": c.label, "variant": c.server.variant, "answer": c.expect, "us": per[c.key]}
                      for c in cases},
            "machine": machine, "calls": args.calls, "block": args.block, "rounds": args.rounds,
            "customers": args.customers, "measured_s": round(elapsed, 1), "run_s": round(time.monotonic() - t0, 1)}


# What each row's ratio is taken against (per round, then the median).
RATIO_TO = {"health": "one", "one": "one_old", "at": "one", "over": "bad", "bad": "one", "over_old": "over",
            "bad_old": "bad"}


def ratio(res: dict[str, Any], a: str, b: str) -> list[float]:
    return [x / y for x, y in zip(res["cases"][a]["us"], res["cases"][b]["us"], strict=True)]


def fmt(us: float) -> str:
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def table(res: dict[str, Any]) -> str:
    """The cases as a markdown table, then the run's conditions in one line."""
    cases = res["cases"]
    rows = ["| case | server | answer | µs CPU per call, median | min..max | ratio (median per round) | ratio to |",
            "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for key, c in cases.items():
        us, base = c["us"], RATIO_TO.get(key)
        rt = f"{statistics.median(ratio(res, key, base)):.2f}" if base else "1.00"
        to = cases[base]["label"] if base else "(baseline)"
        rows.append(f"| {c['label']} | {c['variant']} | {c['answer']} | {fmt(statistics.median(us))} | "
                    f"{fmt(min(us))}..{fmt(max(us))} | {rt} | {to} |")
    m = res["machine"]
    rows += ["", f"{res['rounds']} rounds × {res['calls']:,} calls per case (blocks of {res['block']}, interleaved), "
             f"{res['customers']:,} customers; load average {m['loadavg_before']:.2f} → {m['loadavg_after']:.2f}, "
             f"machine busy {m['busy']:.0%} of {m['cores']} cores, other processes "
             f"{', '.join(str(x) for x in m['foreign_cores_per_round'])} cores per round; "
             f"measured {res['measured_s']} s, whole run {res['run_s']} s"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds, every case --calls calls in each (default 5)")
    p.add_argument("--calls", type=int, default=3000, help="calls per case per round (default 3000)")
    p.add_argument("--block", type=int, default=100, help="calls of one case before the next case's (default 100)")
    p.add_argument("--customers", type=int, default=5000, help="customers loaded first (default 5000, at most 80,000)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "hostile"), help="where results.json goes")
    p.add_argument("--serve", choices=("new", "old"), help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, Path(args.data_dir))
        return 0
    if not (LIMIT + 1 <= args.customers <= 80_000) or min(args.rounds, args.calls, args.block) < 1:
        p.error("--customers must be 101..80,000, --rounds, --calls and --block at least 1")
    res = measure(args)
    res["command"] = "python -m bench.hostile " + " ".join(argv if argv is not None else sys.argv[1:])
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
