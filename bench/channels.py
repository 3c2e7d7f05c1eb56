"""One channel or many (issue 13, point 2): Resolve p99 against the health check's, per client layout, one run.

    .venv/bin/python -m bench.channels [--work /tmp/wvr] [--rounds 3] [--rate 2000] [--duration 8] [--windows 4]
        [--pin] [--sweep 250,500,1000,...] [--json FILE]

The 200k-customer data directory of bench.writes_vs_reads (made once under WORK, reused), one `resolver serve`
with the blueprint's workers (2 here), and four client layouts of bench.loadgen, each sending call-setup at
--rate in windows alternating with the health check at the same rate on the same connections:

  1ch       one client process, one channel to the shared port (what a client opens by default: one
            connection, so one worker serves it)
  1ch-rr    one client process, one channel over every worker's own port, round_robin (ResolverClient's
            default: resolver.client.workers_target)
  4ch       four client processes, one channel each to the shared port (the kernel deals the connections to
            workers by a hash: with 2 workers, 5 times in 8 one worker gets 3 or 4 of them)
  4ch-rr    four client processes, one round_robin channel each

With --pin the server's processes and threads run on CPU 0 and this process and its load clients on CPU 1 (the
client then cannot take the server's CPU, at the price of the server's second core). Rounds rotate the layouts'
order. Prints, per layout, the medians over rounds of Resolve p99, health p99, their
ratio (target <= 1.25) and the server CPU per call of each; --sweep adds one round_robin channel at each rate and
the highest rate each kind keeps within --target-ms; --json writes every round and sweep step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.loadgen.sweep import run_interleaved
from bench.loadgen.workload import Data
from bench.writes_vs_reads.servers import ROOT, Server, Variant, log, pin, prepare
from resolver.client import workers_target

LAYOUTS = ("1ch", "1ch-rr", "4ch", "4ch-rr")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.channels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/wvr", help="dataset and imported data (shared with bench.writes_vs_reads)")
    p.add_argument("--customers", type=int, default=200_000)
    p.add_argument("--config", default=str(ROOT / "examples/blueprint.toml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--duration", type=float, default=8.0, help="recorded Resolve seconds per layout and round")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--pin", action="store_true", help="server on CPU 0, load clients on CPU 1")
    p.add_argument("--sweep", metavar="RATES", default="",
                   help="also: one round_robin channel at each of these rates (comma-separated), Resolve and health "
                        "interleaved; prints the highest rate whose p99 stays within --target-ms for each")
    p.add_argument("--target-ms", type=float, default=2.0)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    work = Path(a.work)
    ds, data_dir = prepare(work, a.customers, a.config)
    data = Data(queries=str(ds / "queries.jsonl"), upserts=str(ds / "upserts.jsonl"))
    server = Server(Variant("channels"), work, data_dir, a.config)
    rounds: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    try:
        spread = workers_target(server.target)
        if spread is None:
            raise SystemExit("the server names no worker ports (one worker?): nothing to spread over")
        if a.pin:
            pin(server.p.pid)
        layouts = {"1ch": (server.target, 1), "1ch-rr": (spread, 1), "4ch": (server.target, 4), "4ch-rr": (spread, 4)}
        n = len(LAYOUTS)
        for r in range(a.rounds):
            for name in LAYOUTS[r % n:] + LAYOUTS[:r % n]:
                target, clients = layouts[name]
                res = run_interleaved("call-setup", a.rate, clients=clients, data=data, target=target,
                                      server_pid=server.p.pid, duration_s=a.duration, windows=a.windows)
                row = {"round": r, "layout": name} | {k: v.summary() for k, v in res.items()}
                rounds.append(row)
                log(f"round {r} {name}: Resolve p99 {_p99(row, 'call-setup'):.2f} ms, "
                    f"health p99 {_p99(row, 'floor'):.2f} ms")
        for rate in (float(x) for x in a.sweep.split(",") if x.strip()):
            res = run_interleaved("call-setup", rate, clients=1, data=data, target=spread, server_pid=server.p.pid,
                                  duration_s=a.duration / 2, windows=2)
            step = {k: v.summary() for k, v in res.items()}
            sweep.append({"rate": rate} | step)
            log(f"sweep {rate:g}/s: Resolve p99 {_p99(step, 'call-setup'):.2f} ms, health p99 {_p99(step, 'floor'):.2f} ms")
    finally:
        server.stop()
    if sweep:
        knee = {k: max((s["rate"] for s in sweep if _p99(s, k) <= a.target_ms), default=None)
                for k in ("call-setup", "floor")}
        ratio = f"{knee['call-setup'] / knee['floor']:.2f}" if knee["call-setup"] and knee["floor"] else "n/a"
        print(f"1 channel (round_robin), highest rate with p99 <= {a.target_ms:g} ms: Resolve {knee['call-setup']}, "
              f"health {knee['floor']}, ratio {ratio} (target >= 0.9)")
    print(f"{'layout':8} {'Resolve p99':>12} {'health p99':>11} {'ratio':>6} {'CPU/Resolve':>12} {'CPU/health':>11}")
    for name in LAYOUTS:
        rows = [x for x in rounds if x["layout"] == name]
        med = {k: statistics.median(f(x) for x in rows) for k, f in (
            ("res", lambda x: _p99(x, "call-setup")), ("flo", lambda x: _p99(x, "floor")),
            ("ratio", lambda x: _p99(x, "call-setup") / _p99(x, "floor")),
            ("cpu_res", lambda x: x["call-setup"]["server_cpu_per_request_us"] or 0),
            ("cpu_flo", lambda x: x["floor"]["server_cpu_per_request_us"] or 0))}
        print(f"{name:8} {med['res']:10.2f}ms {med['flo']:9.2f}ms {med['ratio']:6.2f} {med['cpu_res']:10.0f}µs "
              f"{med['cpu_flo']:9.0f}µs")
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": rounds, "sweep": sweep, "target_ms": a.target_ms}, indent=1))
    return 0


def _p99(row: dict[str, Any], kind: str) -> float:
    return float(row[kind]["latency_ms"]["p99"])


if __name__ == "__main__":
    sys.exit(main())
