"""`python -m bench.events [options]` runs the bench (see bench.events); `python -m bench.events push ...` is the
pusher, which the bench starts in a process of its own."""

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

import bench.events
from bench.events import ROOT, log
from bench.events.report import render, render_summary

PROG = "python -m bench.events"
SETTINGS = ("customers", "events", "rate", "baseline", "drain_rate", "batch", "high_water", "connections", "push_budget",
            "clients", "events_nice", "events_sched_idle", "commit_window_ms", "pusher_sched_idle", "realtime_clients")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=bench.events.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--events", type=int, default=20_000, help="signed UPDATE events to push")
    p.add_argument("--rate", type=float, default=1000.0, help="call-setup Resolves/s offered in every window")
    p.add_argument("--baseline", type=float, default=20.0, help="seconds of window A (and of window C)")
    p.add_argument("--no-after", action="store_true", help="skip window C (the baseline after the drain)")
    p.add_argument("--drain-rate", type=float, default=100.0,
                   help="[events] rate_per_s: the applier's pace (the server's default; below the admission rate, "
                        "so the inbox fills)")
    p.add_argument("--batch", type=int, default=100, help="[events] batch")
    p.add_argument("--high-water", type=int, default=2000, help="[events] high_water: 429s above it")
    p.add_argument("--connections", type=int, default=4, help="concurrent keep-alive requests of the pusher")
    p.add_argument("--push-budget", type=float,
                   help="seconds the pusher may take, then it gives up (default: 1.5 x events / drain rate, at least 150)")
    p.add_argument("--clients", type=int, default=2, help="load client processes")
    p.add_argument("--events-nice", type=int, default=10,
                   help="[events] process_nice: the events process's nice increment (server setting, not load)")
    p.add_argument("--commit-window-ms", type=float, default=5.0,
                   help="[events] commit_window_ms: admissions within this of the first share one synced commit")
    p.add_argument("--pusher-sched-idle", action=argparse.BooleanOptionalAction, default=True,
                   help="run the pusher (the CRM's side, not the server) under SCHED_IDLE (the default): in production "
                        "it is on another machine; here it then takes only CPU the server and the load clients leave")
    p.add_argument("--realtime-clients", action=argparse.BooleanOptionalAction, default=True,
                   help="run the load clients (the contact-center platform, the measuring side) under SCHED_FIFO 1 "
                        "(the default; needs root): in production they are on other machines; here, at normal "
                        "priority, their own scheduling delay was most of window B's p99 (bench/README.md)")
    p.add_argument("--events-sched-idle", action=argparse.BooleanOptionalAction, default=True,
                   help="[events] process_sched_idle (default true, as the server's default)")
    p.add_argument("--repeat", type=int, default=1,
                   help="independent runs (OUT/run-1 ...), then OUT/summary.md with each run's ratio and the median: "
                        "one run's p99 ratio moves a lot between runs on a small shared machine (bench/README.md)")
    p.add_argument("--out", default="bench/out/events")
    p.add_argument("--work", help="where the dataset and data go (default: a temp dir, removed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench once (or `--repeat N` times); exit 1 if an event was lost or the counters do not conserve."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["push"]:
        from bench.events import pusher

        return pusher.main(argv[1:])
    a = build_parser().parse_args(argv)
    if a.push_budget is None:
        a.push_budget = max(150.0, 1.5 * a.events / a.drain_rate)
    out = Path(a.out) if Path(a.out).is_absolute() else ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.repeat > 1:
        return repeat(argv, a.repeat, out)
    from bench.events.run import machine_info, run

    started = time.monotonic()
    results: dict[str, Any] = {"command": f"{PROG} " + shlex.join(argv),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
                               "settings": {k: getattr(a, k) for k in SETTINGS}}
    with ExitStack() as stack:
        work = Path(a.work) if a.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="events-drain-")))
        work.mkdir(parents=True, exist_ok=True)
        results["verdicts"] = run(a, work, out, results, stack)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render(results))
    log(f"report: {out / 'report.md'} ({results['elapsed_s']:.0f} s)")
    v = results["verdicts"]
    return 0 if v["no_event_lost"] and v["conserved"] else 1


def repeat(argv: list[str], n: int, out: Path) -> int:
    """`n` whole runs one after another, each with its own server, dataset and report in OUT/run-k; then
    OUT/summary.md and OUT/summary.json: every run's p99 during and without the drain, and the median ratio."""
    once: list[str] = []
    skip = False
    for arg in argv:  # the same command without --repeat / --out (each run gets its own folder)
        if skip:
            skip = False
        elif arg in ("--repeat", "--out"):
            skip = True
        elif not arg.startswith(("--repeat=", "--out=")):
            once.append(arg)
    codes, runs = [], []
    for k in range(1, n + 1):
        log(f"run {k} of {n}")
        codes.append(main(once + ["--out", str(out / f"run-{k}")]))
        r = json.loads((out / f"run-{k}" / "results.json").read_text())
        runs.append({"run": k, "started": r["started"], "a_p99_ms": r["window_a"]["latency_ms"]["p99"],
                     "b_p99_ms": r["window_b"]["latency_ms"]["p99"], **r["verdicts"]})
    ratios = [x["p99_ratio_b_over_a"] for x in runs if x["p99_ratio_b_over_a"] is not None]
    median = statistics.median(ratios) if ratios else float("nan")
    summary = {"command": f"{PROG} " + shlex.join(argv), "runs": runs,
               "median_p99_ratio_b_over_a": round(median, 3), "every_run_lost_nothing": all(c == 0 for c in codes)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(render_summary(summary))
    log(f"summary: {out / 'summary.md'} (median B / A {median:.2f}x)")
    return 0 if summary["every_run_lost_nothing"] else 1


if __name__ == "__main__":
    sys.exit(main())
