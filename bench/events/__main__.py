"""`python -m bench.events [options]` runs the bench (see bench.events); `python -m bench.events push ...` is the
pusher and `python -m bench.events backlog ...` the backlog writer, which the bench starts in processes of their
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

import bench.events
from bench.events import ROOT, floor_rate, log
from bench.events.report import render, render_summary
from resolver.config.tables import EventSettings

DEFAULTS = EventSettings()

PROG = "python -m bench.events"
SETTINGS = ("customers", "events", "rate", "baseline", "drain_rate", "batch", "high_water", "connections", "push_budget",
            "clients", "events_nice", "events_sched_idle", "commit_window_ms", "pusher_sched_idle", "realtime_clients",
            "min_drain_rate", "idle_cpu", "busy_cpu", "idle_events", "idle_connections", "backlog_events", "window_b")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=bench.events.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--events", type=int, default=20_000, help="signed UPDATE events to push")
    p.add_argument("--rate", type=float, default=1000.0, help="call-setup Resolves/s offered in every window")
    p.add_argument("--baseline", type=float, default=20.0, help="seconds of window A (and of window C)")
    p.add_argument("--no-after", action="store_true", help="skip window C (the baseline after the drain)")
    p.add_argument("--drain-rate", type=float, default=DEFAULTS.rate_per_s,
                   help="[events] rate_per_s: the applier's ceiling, its pace while the serving processes are idle "
                        "(default: the server's, %(default)g/s)")
    p.add_argument("--min-drain-rate", type=float, default=DEFAULTS.min_rate_per_s,
                   help="[events] min_rate_per_s: the applier's floor, its pace while they are busy (default: the "
                        "server's, %(default)g/s; below the admission rate, so the inbox fills during window B). "
                        "Equal to --drain-rate: a fixed pace, as before the pace adapted")
    p.add_argument("--idle-cpu", type=float, default=DEFAULTS.idle_cpu,
                   help="[events] idle_cpu (default: the server's, %(default)g)")
    p.add_argument("--busy-cpu", type=float, default=DEFAULTS.busy_cpu,
                   help="[events] busy_cpu (default: the server's, %(default)g)")
    p.add_argument("--idle-events", type=int,
                   help="window D: events pushed over HTTP and drained with no Resolve load, after window C "
                        "(default: --events; 0: no window D)")
    p.add_argument("--idle-connections", type=int, default=32,
                   help="concurrent keep-alive requests of the pusher in window D (each waits for its group commit, so "
                        "with few the intake, not the applier, sets the pace)")
    p.add_argument("--backlog-events", type=int,
                   help="window E: events written into the inbox past its high-water mark, faster than the applier "
                        "drains them, with no Resolve load: the applier's own rate (default: --events; 0: no window E)")
    p.add_argument("--window-b", type=float,
                   help="seconds of window B (default: the expected drain at the floor, less a margin, at most 120)")
    p.add_argument("--batch", type=int, default=100, help="[events] batch")
    p.add_argument("--high-water", type=int, default=2000, help="[events] high_water: 429s above it")
    p.add_argument("--connections", type=int, default=4, help="concurrent keep-alive requests of the pusher")
    p.add_argument("--push-budget", type=float,
                   help="seconds the pusher may take, then it gives up (default: 1.5 x events / the floor, at least 150)")
    p.add_argument("--clients", type=int, default=2, help="load client processes")
    p.add_argument("--events-nice", type=int, default=10,
                   help="[events] process_nice: the events process's nice increment (server setting, not load)")
    p.add_argument("--commit-window-ms", type=float, default=5.0,
                   help="[events] commit_window_ms: admissions within this of the first share one synced commit")
    p.add_argument("--pusher-sched-idle", action=argparse.BooleanOptionalAction, default=True,
                   help="run the pusher (the CRM's side, not the server) under SCHED_IDLE (the default): in production "
                        "it is on another machine; here it then takes only CPU the server and the load clients leave")
    p.add_argument("--spread", action=argparse.BooleanOptionalAction, default=True,
                   help="each load client round_robin over every worker's own port (the default, as ResolverClient "
                        "does); --no-spread: through the shared port, where SO_REUSEPORT places each client's "
                        "connection on a worker at random, and one saturated worker can make a window's p99")
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
    if argv[:1] == ["backlog"]:
        from bench.events import backlog

        return backlog.main(argv[1:])
    a = build_parser().parse_args(argv)
    if a.push_budget is None:
        a.push_budget = max(150.0, 1.5 * a.events / floor_rate(a))
    if a.idle_events is None:
        a.idle_events = a.events
    if a.backlog_events is None:
        a.backlog_events = a.events
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
                     "b_p99_ms": r["window_b"]["latency_ms"]["p99"],
                     "floor_us_per_call": r["machine"].get("grpc_floor", {}).get("floor_us_per_call"), **r["verdicts"]})
    ratios = [x["p99_ratio_b_over_a"] for x in runs if x["p99_ratio_b_over_a"] is not None]
    median = statistics.median(ratios) if ratios else float("nan")
    healthy = [x["p99_ratio_b_over_a"] for x in runs
               if x["p99_ratio_b_over_a"] is not None and not x.get("baseline_overloaded")]

    def median_of(key: str) -> float | None:
        values = [x[key] for x in runs if x.get(key) is not None]
        return round(statistics.median(values), 1) if values else None

    summary = {"command": f"{PROG} " + shlex.join(argv), "runs": runs,
               "median_p99_ratio_b_over_a": round(median, 3), "every_run_lost_nothing": all(c == 0 for c in codes),
               "median_p99_ratio_b_over_a_healthy_baseline": round(statistics.median(healthy), 3) if healthy else None,
               "median_drain_rate_under_load_per_s": median_of("drain_rate_under_load_per_s"),
               "median_drain_rate_idle_per_s": median_of("drain_rate_idle_per_s"),
               "median_drain_rate_idle_push_per_s": median_of("drain_rate_idle_push_per_s")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(render_summary(summary))
    log(f"summary: {out / 'summary.md'} (median B / A {median:.2f}x; median drain under load "
        f"{summary['median_drain_rate_under_load_per_s']}/s, with no load {summary['median_drain_rate_idle_per_s']}/s)")
    return 0 if summary["every_run_lost_nothing"] else 1


if __name__ == "__main__":
    sys.exit(main())
