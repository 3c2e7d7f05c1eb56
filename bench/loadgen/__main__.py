"""`python -m bench.loadgen` (also `resolver bench load`): open-loop load against a running server."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.loadgen.runner import PhaseResult, realtime_priority
from bench.loadgen.schedule import SCHEDULES
from bench.loadgen.sweep import run_interleaved, sweep
from bench.loadgen.workload import SCENARIOS, Data


def build_parser(prog: str = "python -m bench.loadgen") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--target", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    p.add_argument("--scenario", default="call-setup", choices=(*SCENARIOS, "sweep"))
    p.add_argument("--rate", type=float, default=2000.0, help="offered requests/s (all clients together)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of recorded scenario load")
    p.add_argument("--schedule", default="uniform", choices=SCHEDULES)
    p.add_argument("--clients", type=int, default=1, help="client processes, each sending rate/N")
    p.add_argument("--server-pid", type=int, default=0, help="server process (its workers are included) for CPU/request")
    p.add_argument("--queries", default="", help="lookup mix (JSONL ResolveRequest) from bench/dataset.py")
    p.add_argument("--upserts", default="", help="update mix (JSONL UpsertRequest) from bench/dataset.py")
    p.add_argument("--no-floor", action="store_true", help="do not interleave health-check windows")
    p.add_argument("--windows", type=int, default=4, help="alternating scenario/floor windows")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds before the windows")
    p.add_argument("--timeout", type=float, default=1.0, help="per-request deadline, seconds")
    p.add_argument("--sweep-of", default="call-setup", choices=SCENARIOS, help="scenario the sweep raises")
    p.add_argument("--rates", default="500,1000,2000,3000,4000,5000,6000,8000", help="sweep steps, requests/s")
    p.add_argument("--step", type=float, default=4.0, help="seconds per sweep step")
    p.add_argument("--latency-target-ms", type=float, help="p99 target for the knee (default: the blueprint's)")
    p.add_argument("--config", help="blueprint whose reliability.latency_target_ms the sweep uses")
    p.add_argument("--realtime", action="store_true",
                   help="run the client processes under SCHED_FIFO 1 (root), so the measuring side is not delayed "
                        "by other work on a shared machine (see runner.realtime_priority)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON here (default: stdout only)")
    return p


def _line(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    cpu = r["server_cpu_per_request_us"]
    return (f"{r['label']:>12}: {r['achieved_rate']:8.1f}/s of {r['offered_rate']:g}/s  p50 {lat['p50']:.3f}  "
            f"p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  p99.9 {lat['p99.9']:.3f}  max {lat['max']:.3f} ms  "
            f"errors {r['errors'] or 0}  server CPU/req {'-' if cpu is None else f'{cpu:.0f} µs'}  "
            f"send lag p99 {r['send_lag_us']['p99']} µs")


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench.loadgen") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return _run(args)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    data = Data(queries=args.queries, upserts=args.upserts)
    priority = realtime_priority() if args.realtime else "normal"
    if args.scenario == "sweep":
        target_ms = args.latency_target_ms
        if target_ms is None:
            from resolver.config import load_settings

            target_ms = load_settings(args.config).reliability.latency_target_ms
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        out: dict[str, Any] = sweep(args.sweep_of, rates, target_ms, target=args.target, server_pid=args.server_pid,
                                    clients=args.clients, data=data, step_s=args.step, floor=not args.no_floor,
                                    progress=lambda s: [print(f"{s['rate']:>6g}/s " + _line(v), flush=True)
                                                        for k, v in s.items() if k != "rate"])
        print(f"knee (p99 <= {target_ms:g} ms): " + ", ".join(f"{k} {v or '-'}/s" for k, v in out["knee"].items()))
    else:
        res: dict[str, PhaseResult] = run_interleaved(
            args.scenario, args.rate, clients=args.clients, data=data, target=args.target,
            server_pid=args.server_pid, duration_s=args.duration, windows=args.windows, floor=not args.no_floor,
            warmup_s=args.warmup, schedule=args.schedule, timeout_s=args.timeout)
        out = {"scenario": args.scenario, "rate": args.rate, "schedule": args.schedule, "clients": args.clients,
               "results": {k: v.summary() for k, v in res.items()}}
        for r in out["results"].values():
            print(_line(r))
    out["client_priority"] = priority
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
