"""`python -m bench.outbound [options]` runs the bench (see bench.outbound); `python -m bench.outbound receive ...` is the
receiver and `python -m bench.outbound backlog ...` the backlog writer, which the bench starts in processes of their
own."""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import bench.outbound
from bench.outbound import ROOT, log

PROG = "python -m bench.outbound"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=bench.outbound.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--messages", type=int, default=20_000, help="outbound messages in each backlog (B and D)")
    p.add_argument("--rate", type=float, default=1000.0, help="call-setup Resolves/s in windows A, B and C")
    p.add_argument("--baseline", type=float, default=20.0, help="seconds of windows A and C")
    p.add_argument("--window-b", type=float, default=10.0, help="seconds of window B (the drain under load)")
    p.add_argument("--concurrency", type=int, default=64, help="[outbound.CRM] concurrency: customers in flight")
    p.add_argument("--dest-rate", type=float, default=0.0, help="[outbound.CRM] rate_per_s (default 0: unlimited)")
    p.add_argument("--clients", type=int, default=2, help="load client processes")
    p.add_argument("--spread", action=argparse.BooleanOptionalAction, default=True,
                   help="each client round_robin over every worker's own port (the default, as ResolverClient does); "
                        "--no-spread: through the shared port, where SO_REUSEPORT places each client's connection on "
                        "a worker at random, and one saturated worker can make a window's p99")
    p.add_argument("--realtime-clients", action=argparse.BooleanOptionalAction, default=True,
                   help="load clients under SCHED_FIFO 1 (the default; root): the measuring side, on other machines "
                        "in production")
    p.add_argument("--receiver-sched-idle", action=argparse.BooleanOptionalAction, default=True,
                   help="the receiver (the CRM, another machine in production) under SCHED_IDLE (the default)")
    p.add_argument("--repeat", type=int, default=1, help="independent runs (OUT/run-1 ...), then OUT/summary.md")
    p.add_argument("--out", default="bench/out/outbound")
    p.add_argument("--work", help="where the dataset and data go (default: a temp dir, removed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench once (or `--repeat N` times); exit 1 if a message was lost or the counters do not conserve."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["receive"]:
        from bench.outbound import receiver

        return receiver.main(argv[1:])
    if argv[:1] == ["backlog"]:
        from bench.outbound import backlog

        return backlog.main(argv[1:])
    a = build_parser().parse_args(argv)
    out = Path(a.out) if Path(a.out).is_absolute() else ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.repeat > 1:
        return repeat(argv, a.repeat, out)
    from bench.outbound.run import render, run

    started = time.monotonic()
    results: dict[str, Any] = {"command": f"{PROG} " + shlex.join(argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "settings": {k: v for k, v in vars(a).items() if k not in ("out", "work", "repeat")}}
    with ExitStack() as stack:
        work = Path(a.work) if a.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="outbound-")))
        work.mkdir(parents=True, exist_ok=True)
        results["verdicts"] = run(a, work, out, results, stack)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render(results))
    v = results["verdicts"]
    log(f"report: {out / 'report.md'} ({results['elapsed_s']:.0f} s): p99 B / A {v['p99_ratio_b_over_a']}x, drain "
        f"{v['drain_rate_idle_per_s']}/s idle, {v['drain_rate_under_load_per_s']}/s under load")
    return 0 if v["every_message_acknowledged"] and v["conserved"] and v["bad_signatures"] == 0 else 1


def repeat(argv: list[str], n: int, out: Path) -> int:
    """`n` whole runs one after another (OUT/run-k), then OUT/summary.md and OUT/summary.json with the medians."""
    once: list[str] = []
    skip = False
    for arg in argv:  # the same command without --repeat / --out
        if skip:
            skip = False
        elif arg in ("--repeat", "--out"):
            skip = True
        elif not arg.startswith(("--repeat=", "--out=")):
            once.append(arg)
    codes = []
    for k in range(1, n + 1):
        log(f"run {k} of {n}")
        codes.append(main(once + ["--out", str(out / f"run-{k}")]))
    summary = summarize(out, n, f"{PROG} " + shlex.join(argv), all(c == 0 for c in codes))
    return 0 if summary["every_run_lost_nothing"] else 1


def summarize(out: Path, n: int, command: str, lost_nothing: bool) -> dict[str, Any]:
    """OUT/summary.json and OUT/summary.md from OUT/run-1 .. run-n: each run's p99s and ratios, and the medians.
    B / C too: C runs after the drain with nothing draining, so it shows how far the machine drifted meanwhile."""
    runs = []
    for k in range(1, n + 1):
        r = json.loads((out / f"run-{k}" / "results.json").read_text())
        p99 = {w: r[f"window_{w}"]["latency_ms"]["p99"] for w in "abc"}
        runs.append({"run": k, "started": r["started"], "a_p99_ms": p99["a"], "b_p99_ms": p99["b"], "c_p99_ms": p99["c"],
                     "p99_ratio_b_over_c": round(p99["b"] / p99["c"], 3) if p99["c"] else None, **r["verdicts"]})

    def median(key: str) -> float | None:
        values = [x[key] for x in runs if x.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {"command": command, "runs": runs, "every_run_lost_nothing": lost_nothing,
               "median_p99_ratio_b_over_a": median("p99_ratio_b_over_a"),
               "median_p99_ratio_b_over_c": median("p99_ratio_b_over_c"),
               "median_drain_rate_idle_per_s": median("drain_rate_idle_per_s"),
               "median_drain_rate_under_load_per_s": median("drain_rate_under_load_per_s")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# Outbound bench: {n} runs", "", f"`{command}`", "",
             "| run | started | A p99 ms | B p99 ms | C p99 ms | B / A | B / C | drain covered B | drain idle /s "
             "| under load /s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['run']} | {x['started']} | {x['a_p99_ms']:.3f} | {x['b_p99_ms']:.3f} | {x['c_p99_ms']:.3f} | "
              f"{x['p99_ratio_b_over_a']} | {x['p99_ratio_b_over_c']} | {x['drain_covered_window_b']} | "
              f"{x['drain_rate_idle_per_s']} | {x['drain_rate_under_load_per_s']} |" for x in runs]
    lines += ["", f"Median B / A: **{summary['median_p99_ratio_b_over_a']}x** (target <= 1.3x), B / C "
                  f"{summary['median_p99_ratio_b_over_c']}x; median drain with no load: "
                  f"**{summary['median_drain_rate_idle_per_s']}/s** (target >= 1,000/s); under load: "
                  f"{summary['median_drain_rate_under_load_per_s']}/s; nothing lost in every run: {lost_nothing}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    log(f"summary: {out / 'summary.md'}: median B / A {summary['median_p99_ratio_b_over_a']}x, B / C "
        f"{summary['median_p99_ratio_b_over_c']}x, drain {summary['median_drain_rate_idle_per_s']}/s idle")
    return summary


if __name__ == "__main__":
    sys.exit(main())
