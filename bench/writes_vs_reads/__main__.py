"""`python -m bench.writes_vs_reads`: the run (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.writes_vs_reads.client import Window, client_process, pct, sleep_until, window_figures
from bench.writes_vs_reads.sampling import (
    Sampler,
    cpu_by_group,
    disk_probe,
    diskstats,
    system_times,
    thread_cpu,
    vmstat,
)
from bench.writes_vs_reads.servers import ROOT, Server, Variant, log, pin, prepare
from resolver.client import workers_target

# -- the run -----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.writes_vs_reads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/wvr", help="dataset, imported data and per-variant copies (kept)")
    p.add_argument("--customers", type=int, default=200_000)
    p.add_argument("--config", default=str(ROOT / "examples/blueprint.toml"))
    p.add_argument("--rate", type=float, default=2000.0, help="requests/s in every window")
    p.add_argument("--clients", type=int, default=4, help="client processes (one channel each)")
    p.add_argument("--window", type=float, default=8.0, help="seconds per window")
    p.add_argument("--gap", type=float, default=0.5, help="seconds between windows")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--disk-probe", type=float, default=3.0, help="seconds of the flush probe per round (0: none)")
    p.add_argument("--variant", action="append", default=[], help="NAME[:KEY=VAL;...] (see above); repeatable")
    p.add_argument("--realtime", action="store_true", help="load clients under SCHED_FIFO 1 (as loadgen --realtime)")
    p.add_argument("--shared-port", action="store_true",
                   help="each client's channel to the shared port (one worker per connection, as the kernel deals "
                        "them) instead of round_robin over every worker's own port (ResolverClient's default)")
    p.add_argument("--pin", action="store_true", help="servers on CPU 0, load clients on CPU 1 (bench.channels --pin)")
    p.add_argument("--json", help="where to write every window's figures")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ds, data = prepare(work, a.customers, a.config)
    variants = [Variant.parse(s) for s in a.variant] or [Variant("main")]
    servers: dict[str, Server] = {}
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    results_all: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        for v in variants:
            servers[v.name] = Server(v, work, data, a.config)
            log(f"variant {v.name}: pid {servers[v.name].p.pid} on {servers[v.name].target}")
        targets = {n: srv.target if a.shared_port else (workers_target(srv.target) or srv.target)
                   for n, srv in servers.items()}
        if a.pin:
            for srv in servers.values():
                pin(srv.p.pid)
        windows: list[Window] = []
        for v in variants:
            windows.append(Window(v.name, "warmup", "call-setup", targets[v.name], 3.0, -1))
        names = [v.name for v in variants]
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for i, n in enumerate(order):
                if i == len(order) // 2 and a.disk_probe > 0:
                    windows.append(Window("", "disk", "", "", a.disk_probe, r))
                t = targets[n]
                windows += [Window(n, "before", "call-setup", t, a.window, r),
                            Window(n, "mixed", "mixed", t, a.window, r),
                            Window(n, "after", "call-setup", t, a.window, r)]
        total = sum(w.duration_s + a.gap for w in windows)
        log(f"{len(windows)} windows, {total / 60:.1f} min of load")
        ready, results = ctx.Queue(), ctx.Queue()
        starts = [ctx.Queue() for _ in range(a.clients)]
        run_id = os.urandom(4).hex()
        procs = [ctx.Process(target=client_process, name=f"wvr-client-{i}",
                             args=(i, a.clients, windows, a.rate, str(ds / "queries.jsonl"),
                                   str(ds / "upserts.jsonl"), run_id, a.realtime, ready, starts[i], results))
                 for i in range(a.clients)]
        for pr in procs:
            pr.start()
        errs = [e for _, e in (ready.get(timeout=120) for _ in procs) if e]
        if errs:
            raise RuntimeError(f"a client failed: {errs[0]}")
        t0 = time.monotonic_ns() + 500_000_000
        begins, at = [], t0
        for w in windows:
            begins.append(at)
            at += int((w.duration_s + a.gap) * 1e9)
        for q in starts:
            q.put(begins)
        server_pids = {n: s.p.pid for n, s in servers.items()}
        client_pids = [pr.pid for pr in procs if pr.pid]
        meta: list[dict[str, Any]] = []
        for i, w in enumerate(windows):
            sleep_until(begins[i])
            c0, s0, v0, d0 = cpu_by_group(server_pids, client_pids), system_times(), vmstat(), diskstats(data)
            th0 = thread_cpu(server_pids[w.variant]) if w.variant else {}
            sampler = Sampler()
            sampler.start()
            m: dict[str, Any] = {}
            if w.kind == "disk":
                m["disk"] = disk_probe(data.parent, w.duration_s * 0.95)
            sleep_until(begins[i] + int(w.duration_s * 1e9))
            sampler.stop_ev.set()
            c1, s1, v1, d1 = cpu_by_group(server_pids, client_pids), system_times(), vmstat(), diskstats(data)
            th1 = thread_cpu(server_pids[w.variant]) if w.variant else {}
            dur = w.duration_s
            m["cores"] = {k: round((c1[k] - c0.get(k, 0.0)) / dur, 3) for k in c1 if c1[k] - c0.get(k, 0.0) > 0}
            m["system"] = {k: round((s1[k] - s0[k]) / dur, 3) for k in s1}
            m["threads"] = {k: round((th1[k] - th0.get(k, 0.0)) / dur, 3) for k in th1
                            if th1[k] - th0.get(k, 0.0) > 0.005}
            m["pgpgout_kb_s"] = round((v1["pgpgout"] - v0["pgpgout"]) / dur)
            m["peak_dirty_wb_pages"] = sampler.peak
            m["disk_per_s"] = {k: round((d1[k] - d0[k]) / dur, 1) for k in d1}
            meta.append(m)
            if w.kind in ("before", "after", "disk") or w.kind == "mixed":
                log(f"r{w.round} {w.variant or '-':>10} {w.kind:>6}: server {m['cores'].get(f'server:{w.variant}', 0):.2f}"
                    f" clients {m['cores'].get('clients', 0):.2f} kthreads "
                    f"{sum(v for k, v in m['cores'].items() if k.startswith('k:')):.2f} cores, "
                    f"flushes {m['disk_per_s'].get('flushes')}/s")
        parts = dict(results.get(timeout=120) for _ in procs)
        for i, w in enumerate(windows):
            fig = window_figures([parts[c][i] for c in sorted(parts)]) if w.scenario else {}
            if w.kind == "disk":
                d = meta[i].pop("disk")
                fig = {k: {"n": len(v), "p50_ms": pct(v, 50) / 1000, "p99_ms": pct(v, 99) / 1000,
                           "max_ms": max(v) / 1000 if v else None} for k, v in d.items()}
            results_all.append({"variant": w.variant, "kind": w.kind, "round": w.round, "duration_s": w.duration_s,
                                **fig, **meta[i]})
    finally:
        for pr in procs:
            pr.join(timeout=15)
            if pr.is_alive():
                pr.terminate()
        for s in servers.values():
            s.stop()
    summary = summarize(results_all, [v.name for v in variants], a.rounds)
    out = {"started": started, "args": vars(a), "variants": [v.__dict__ for v in variants], "summary": summary,
           "windows": results_all}
    path = Path(a.json) if a.json else work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    log(f"every window: {path}")
    return 0


def summarize(windows: list[dict[str, Any]], names: list[str], rounds: int) -> dict[str, Any]:
    by = {(w["variant"], w["kind"], w["round"]): w for w in windows}
    out: dict[str, Any] = {}
    print()
    hdr = (f"{'variant':>10} {'rnd':>3} {'alone p99':>9} {'mixed p99':>9} {'ratio':>6} {'slice bef':>9} "
           f"{'slice aft':>9} {'ratio':>6} {'upsert p99':>10} {'disk1 p99':>9} {'disk2 p99':>9} {'up/d1':>6} "
           f"{'srv cores b/m':>13} {'kthr m':>6} {'clients m':>9} {'other':>6}")
    print(hdr)
    for n in names:
        rows = []
        for r in range(rounds):
            b, m, a, d = by.get((n, "before", r)), by.get((n, "mixed", r)), by.get((n, "after", r)), by.get(("", "disk", r))
            if not (b and m and a):
                continue
            row = {
                "alone_p99_ms": b["resolve"]["p99_ms"], "mixed_p99_ms": m["resolve"]["p99_ms"],
                "after_p99_ms": a["resolve"]["p99_ms"],
                "mixed_over_alone": m["resolve"]["p99_ms"] / b["resolve"]["p99_ms"],
                "slice_before_ms": b.get("worst_slice_p99_ms"), "slice_after_ms": a.get("worst_slice_p99_ms"),
                "slice_after_over_before": a["worst_slice_p99_ms"] / b["worst_slice_p99_ms"],
                "upsert_p99_ms": m.get("upsert", {}).get("p99_ms", float("nan")),
                "disk1_p99_ms": d["disk1"]["p99_ms"] if d else float("nan"),
                "disk2_p99_ms": d["disk2"]["p99_ms"] if d else float("nan"),
                "errors": b["errors"] + m["errors"] + a["errors"],
                "server_cores_before": b["cores"].get(f"server:{n}", 0.0),
                "server_cores_mixed": m["cores"].get(f"server:{n}", 0.0),
                "kthreads_cores_mixed": sum(v for k, v in m["cores"].items() if k.startswith("k:")),
                "clients_cores_mixed": m["cores"].get("clients", 0.0),
                # CPU of processes outside the run (another job on the machine): a round where this is high
                # measured the neighbour, not the server
                "other_cores_max": max(x["cores"].get("other", 0.0) for x in (b, m, a)),
            }
            row["upsert_over_disk1"] = row["upsert_p99_ms"] / row["disk1_p99_ms"]
            row.update(cpu_per_call(n, b, m))
            rows.append(row)
            _print_row(n, str(r), row)
        if rows:
            med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
            _print_row(n, "med", med)
            out[n] = {"rounds": rows, "median": med}
    print("targets: ratio (mixed/alone) <= 1.3; slice ratio (after/before) <= 2; up/d1 <= 3")
    return out


def cpu_per_call(name: str, before: dict[str, Any], mixed: dict[str, Any]) -> dict[str, float]:
    """Server CPU per Resolve (the write-free window) and per Upsert: the mixed window's server CPU less its
    Resolves at the write-free window's cost, over its Upserts (µs)."""
    key, dur = f"server:{name}", before["duration_s"]
    per_resolve = before["cores"].get(key, 0.0) * dur / max(1, before["resolve"]["n"])
    rest = mixed["cores"].get(key, 0.0) * mixed["duration_s"] - per_resolve * mixed["resolve"]["n"]
    per_upsert = rest / max(1, mixed.get("upsert", {}).get("n", 0))
    return {"cpu_per_resolve_us": per_resolve * 1e6, "cpu_per_upsert_us": per_upsert * 1e6}


def _print_row(n: str, r: str, x: dict[str, float]) -> None:
    print(f"{n:>10} {r:>3} {x['alone_p99_ms']:9.2f} {x['mixed_p99_ms']:9.2f} {x['mixed_over_alone']:6.2f} "
          f"{x['slice_before_ms']:9.2f} {x['slice_after_ms']:9.2f} {x['slice_after_over_before']:6.2f} "
          f"{x['upsert_p99_ms']:10.2f} {x['disk1_p99_ms']:9.2f} {x['disk2_p99_ms']:9.2f} "
          f"{x['upsert_over_disk1']:6.2f} {x['server_cores_before']:6.2f}/{x['server_cores_mixed']:<6.2f} "
          f"{x['kthreads_cores_mixed']:6.2f} {x['clients_cores_mixed']:9.2f} {x['other_cores_max']:6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
