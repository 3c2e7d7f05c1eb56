"""Issue 19's figures: Resolve on a cluster node while the cluster takes writes, against one machine in the same run;
write latency end to end; read throughput from one node to three.

    python -m bench.cluster [--customers 20000] [--read-rate 500] [--write-rate 1000] [--seconds 20] [--rounds 2]

Everything on 127.0.0.1: one `resolver serve` (one worker: a cluster node serves with one) and a cluster of three
NATS JetStream servers and three `resolver serve --cluster` nodes (resolver.cluster.local, as `make cluster`), each
on its own copy of one store of `--customers` customers. Rounds alternate the two layouts; in each:
- `alone`: Resolve at `--read-rate` (open loop, bench/loadgen) on one serving process (the single server; node r0);
- `writes`: the same, while phone-only Upserts go at `--write-rate` to the single server, or to node r1 (the cluster
  applies each on every node: r0 pays for it in its applier). The Upserts' own latency is the write p99 end to end
  (publish, replication to a majority, this node's apply, the answer).
Then reads over 1, 2 and 3 nodes: `--sweep-rate` Resolves/s in all, split evenly (one load generator per node).

On one 2-core machine every NATS server, every node and the load generators share the same two cores, so the
cluster's figures here are a lower bound of what a node per machine does; the report says how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procstat
from bench.hostile import load_customers, phone
from bench.loadgen.runner import Phase, PhaseResult, run_phases
from bench.loadgen.workload import Data
from bench.security import Server, log, write_report
from resolver.cluster.local import LocalNats, ResolverNode, start_nodes

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 2  # load generator processes per stream of load


def _dataset(work: Path, customers: int, templates: int) -> tuple[Path, Data]:
    """The seed store (customers with one phone each), the Resolve mix over them and Upsert templates of new
    phones (phone-only: each Upsert creates a customer, the heaviest ordinary write)."""
    seed = work / "seed"
    load_customers(seed, customers)
    queries, upserts = work / "queries.jsonl", work / "upserts.jsonl"
    queries.write_text("".join(json.dumps({"identifiers": {"phones": [phone(i)]}}) + "\n"
                               for i in range(customers)))
    upserts.write_text("".join(json.dumps({"identifiers": {"phones": [phone(customers + j)]}}) + "\n"
                               for j in range(templates)))
    return seed, Data(queries=str(queries), upserts=str(upserts))


def _copy(seed: Path, to: Path) -> Path:
    shutil.copytree(seed, to)
    for f in to.iterdir():  # an unsynced copy stalls the first synced commit (bench/README.md)
        with f.open("rb+") as handle:
            os.fsync(handle.fileno())
    return to


def _p99_ms(result: PhaseResult, code: str | None = None) -> float:
    hist = result.hist() if code is None else result.hist_of(code)
    return round(hist.get_value_at_percentile(99) / 1000, 2)


def _summary(result: PhaseResult) -> dict[str, Any]:
    return {"offered": result.offered_rate, "achieved": round(result.achieved_rate), "p50_ms":
            round(result.hist().get_value_at_percentile(50) / 1000, 2), "p99_ms": _p99_ms(result),
            "codes": dict(result.codes)}


def _together(streams: list[tuple[list[Phase], Data]]) -> list[list[PhaseResult]]:
    """Several phase lists at once, each from its own load generator processes (threads here start them within
    milliseconds of each other; each list's first phase is a warm-up that absorbs the difference)."""
    out: list[list[PhaseResult]] = [[] for _ in streams]

    def run(i: int, phases: list[Phase], data: Data) -> None:
        out[i] = run_phases(phases, clients=CLIENTS, data=data)

    threads = [threading.Thread(target=run, args=(i, phases, data)) for i, (phases, data) in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _round(read_at: str, write_at: str, data: Data, a: argparse.Namespace) -> dict[str, Any]:
    """Resolve alone, then Resolve while Upserts flow; the Upserts' own latency."""
    warm = Phase("warm-up", "call-setup", a.read_rate, 1.0, target=read_at, record=False)
    alone = run_phases([warm, Phase("alone", "call-setup", a.read_rate, a.seconds, target=read_at)], clients=CLIENTS,
                       data=data)[0]
    reads, writes = _together([
        ([Phase("warm-up", "call-setup", a.read_rate, 2.0, target=read_at, record=False),
          Phase("writes", "call-setup", a.read_rate, a.seconds, target=read_at)], data),
        ([Phase("warm-up", "crm-sync", a.write_rate, 1.5, target=write_at, record=False, timeout_s=10.0),
          Phase("upserts", "crm-sync", a.write_rate, a.seconds + 1.0, target=write_at, timeout_s=10.0)], data),
    ])
    return {"alone": _summary(alone), "writes": _summary(reads[0]), "upserts": _summary(writes[0])}


def _sweep(targets: list[str], data: Data, a: argparse.Namespace) -> dict[str, Any]:
    """`--sweep-rate` Resolves/s split over the first k nodes, k = 1..len(targets)."""
    out = {}
    for k in range(1, len(targets) + 1):
        share = a.sweep_rate / k
        results = _together([([Phase("warm-up", "call-setup", share, 1.0, target=t, record=False),
                               Phase("sweep", "call-setup", share, a.seconds, target=t)], data) for t in targets[:k]])
        per = [r[0] for r in results]
        out[str(k)] = {"achieved": round(sum(r.achieved_rate for r in per)),
                       "ok_per_s": round(sum(r.ok for r in per) / a.seconds),
                       "p99_ms": max(_p99_ms(r) for r in per), "codes": [dict(r.codes) for r in per]}
        log(f"reads over {k} node(s): {out[str(k)]['ok_per_s']} OK/s of {a.sweep_rate:g} offered, "
            f"p99 {out[str(k)]['p99_ms']} ms")
    return out


def measure(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="resolver-bench-cluster-"))
    stops: list[Callable[[], Any]] = []
    try:
        log(f"{a.customers} customers into the seed store")
        seed, data = _dataset(work, a.customers, templates=max(1000, int(a.write_rate * (a.seconds + 5) * a.rounds)))
        config = work / "bench.toml"
        config.write_text("[server]\nworkers = 1\n[storage]\nmap_size_mb = 4096\n")
        single = Server("single", config, _copy(seed, work / "single"), 1, work)
        stops.append(single.stop)
        nats = LocalNats(work / "nats").start()
        stops.append(nats.stop)
        nodes = [ResolverNode(f"r{i}", _copy(seed, work / f"r{i}" / "data"), nats.urls, config) for i in range(3)]
        start_nodes(nodes)
        stops.extend(node.stop for node in nodes)
        watch = procstat.MachineWatch()
        here = f"127.0.0.1:{single.port}"
        rounds: list[dict[str, Any]] = []
        for r in range(a.rounds):
            order = ("single", "cluster") if r % 2 == 0 else ("cluster", "single")
            got = {}
            for layout in order:
                read_at, write_at = (here, here) if layout == "single" else (nodes[0].address, nodes[1].address)
                got[layout] = _round(read_at, write_at, data, a)
                log(f"round {r + 1}/{a.rounds} {layout}: Resolve p99 {got[layout]['alone']['p99_ms']} ms alone, "
                    f"{got[layout]['writes']['p99_ms']} ms with writes; Upsert p99 {got[layout]['upserts']['p99_ms']} "
                    f"ms at {got[layout]['upserts']['achieved']}/s")
            rounds.append(got)
        sweep = _sweep([n.address for n in nodes], data, a)
        machine = watch.figures()
        return {"customers": a.customers, "read_rate": a.read_rate, "write_rate": a.write_rate, "seconds": a.seconds,
                "sweep_rate": a.sweep_rate, "rounds": rounds, "sweep": sweep, "machine": machine}
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(work, ignore_errors=True)


def _median(rounds: list[dict[str, Any]], layout: str, window: str, key: str = "p99_ms") -> float:
    return round(statistics.median(r[layout][window][key] for r in rounds), 2)


def report(res: dict[str, Any]) -> str:
    rounds = res["rounds"]
    lines = [f"# Cluster bench (issue 19)\n\n{res['date']} · `{res['command']}` · {res['machine']['cpu_model']}, "
             f"{res['machine']['cores']} cores, busy {res['machine']['busy']:.0%}, other processes "
             f"{res['machine']['foreign_cores']:.2f} cores\n",
             f"{res['customers']:,} customers; Resolve at {res['read_rate']:g}/s, phone-only Upserts at "
             f"{res['write_rate']:g}/s, {res['seconds']:g} s windows, {len(rounds)} rounds alternating the layouts "
             "(medians below).\n",
             "| layout | Resolve p99 alone | Resolve p99 with writes | ratio | Upsert p99 | Upserts achieved/s | codes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for layout, name in (("single", "one machine"), ("cluster", "cluster node r0 (writes to r1)")):
        alone, mixed = _median(rounds, layout, "alone"), _median(rounds, layout, "writes")
        lines.append(f"| {name} | {alone} ms | {mixed} ms | {mixed / alone:.2f}x | "
                     f"{_median(rounds, layout, 'upserts')} ms | {_median(rounds, layout, 'upserts', 'achieved'):g} | "
                     f"{rounds[-1][layout]['upserts']['codes']} |")
    single_mixed, cluster_mixed = _median(rounds, "single", "writes"), _median(rounds, "cluster", "writes")
    lines += ["", f"Resolve p99 with writes, cluster node / one machine: **{cluster_mixed / single_mixed:.2f}x**.", "",
              f"Reads over 1-3 nodes ({res['sweep_rate']:g} Resolves/s in all, split evenly):", "",
              "| nodes | OK/s | p99 |", "| ---: | ---: | ---: |"]
    lines += [f"| {k} | {v['ok_per_s']} | {v['p99_ms']} ms |" for k, v in res["sweep"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--read-rate", type=float, default=500.0, help="Resolves/s on the node measured (default 500)")
    p.add_argument("--write-rate", type=float, default=1000.0, help="Upserts/s into the cluster (default 1000)")
    p.add_argument("--sweep-rate", type=float, default=3000.0, help="Resolves/s split over 1-3 nodes (default 3000)")
    p.add_argument("--seconds", type=float, default=20.0, help="each window (default 20)")
    p.add_argument("--rounds", type=int, default=2, help="rounds alternating the layouts (default 2)")
    p.add_argument("--out", default="bench/out/cluster")
    a = p.parse_args(argv)
    if min(a.customers, a.read_rate, a.write_rate, a.sweep_rate, a.seconds, a.rounds) <= 0:
        p.error("every figure above 0")
    res = measure(a)
    res["command"] = "python -m bench.cluster " + " ".join(argv if argv is not None else sys.argv[1:])
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC")
    write_report(res, ROOT / a.out, report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
