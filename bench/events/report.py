"""OUT/report.md of one run (verdicts first, then latency per window, intake and drain, `resolver check`), and
OUT/summary.md of repeated runs. Reads only the results dict that results.json holds."""

from __future__ import annotations

import os
import statistics
from typing import Any

from bench.machine import SLOW_US, describe


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _slowest_slices(b: dict[str, Any], samples: list[list[Any]], n: int = 5) -> list[str]:
    """The worst `n` slices of window B (the loadgen's slowest call per slice, from B's start = the release),
    each with the event counters sampled nearest to it: a p99 made by one stall shows as one slice far above
    the rest, and whether the inbox was admitting or draining then."""
    worst = b.get("slowest_per_slice_ms") or []
    if not worst:
        return []
    width = b.get("slice_s", 0.1)
    rows = []
    for k in sorted(range(len(worst)), key=worst.__getitem__, reverse=True)[:n]:
        t = k * width
        near = min(samples, key=lambda row: abs(row[0] - t)) if samples else None
        where = f" (at {near[0]:.1f} s: applied {near[2]:,}, in inbox {near[5]:,})" if near else ""
        rows.append(f"{t:.1f} s: {worst[k]:.2f} ms{where}")
    median = statistics.median(worst)
    return [f"- Slowest calls of window B by {width * 1000:g} ms slice (median slice {median:.2f} ms): "
            + "; ".join(rows) + ".", ""]


def render(r: dict[str, Any]) -> str:
    """OUT/report.md of one run, from its results."""
    s, v, d, pu, led = r["settings"], r["verdicts"], r["drain"], r["pusher"], r["ledger"]
    cnt = r["counters"]["counters"]
    wins = [("A: no events (before)", r["window_a"]), ("B: during push + drain", r["window_b"])]
    if "window_c" in r:
        wins.append(("C: no events (after)", r["window_c"]))
    a99 = r["window_a"]["latency_ms"]["p99"]
    lines = [
        "# Back-pressure bench: Resolve during an event drain (issue 5)", "",
        f"{r['started']} · git {r['machine']['git']} · {r['machine']['cpus']} CPU {r['machine']['cpu_model']} · "
        f"Python {r['machine']['python']} · hot path {r['machine']['hot_path']} · {r.get('elapsed_s', '?')} s", "",
        *([f"The machine before the run: {describe(r['machine']['grpc_floor'])}.", ""] if "grpc_floor" in r["machine"]
          else []),
        f"Command: `{r['command']}`", "",
        f"{s['customers']:,} customers; call-setup at {s['rate']:g}/s (open loop, {s['clients']} load client processes); "
        f"{s['events']:,} signed UPDATE events pushed over HTTP keep-alive with {s['connections']} concurrent requests; "
        f"inbox high-water {s['high_water']:,}, applier {_pace(s)} in batches of {s['batch']}; "
        f"webhooks and applier in the events process at nice +{s.get('events_nice', 10)}"
        f"{' under SCHED_IDLE' if s.get('events_sched_idle') else ''}, commit window {s.get('commit_window_ms', 0):g} ms"
        f"{'; the pusher under SCHED_IDLE' if s.get('pusher_sched_idle') else ''}; load clients "
        f"{r['window_a'].get('client_priority', 'normal')}.", "",
        "## Verdicts", "",
        f"- **Resolve p99 during the drain vs without it: {_ms(r['window_b']['latency_ms']['p99'])} ms vs {_ms(a99)} ms = "
        f"{v['p99_ratio_b_over_a']:.2f}×** (target ≤ 1.3×): the target "
        f"{'**holds**' if v['p99_target_holds'] else '**does NOT hold**'}"
        + (f"; against the baseline after the drain (C): {v['p99_ratio_b_over_c']:.2f}×." if v["p99_ratio_b_over_c"] else ".")
        + (f" **Window A itself refused or lost {v['baseline_refused']:,} calls ({_codes(r['window_a'].get('errors', {}))}):"
           " the server was past its knee with no event at all, so this ratio cannot judge the target.**"
           if v.get("baseline_overloaded") else ""),
        f"- **No event lost: {'yes' if v['no_event_lost'] else 'NO'}**: {led['acknowledged_202']:,} of {led['pushed']:,} "
        f"acknowledged 202 ({led['given_up']} given up by the pusher), {led['applied_once']:,} applied exactly once, "
        f"{led['dead_lettered']} dead-lettered, {led['missing_count']} acknowledged but missing, "
        f"{led['applied_twice_or_more']} applied twice, {led['unacknowledged_stored_count']} stored without a 202; "
        f"server `accepted` counter {cnt['accepted']:,}; {r['visible']['checked']} customers resolved afterwards show "
        f"their newest event's values ({r['visible']['wrong']} wrong).",
        f"- **Conservation: {'holds' if v['conserved'] else 'FAILS'}**: accepted {cnt['accepted']:,} = applied "
        f"{cnt['applied']:,} + dead-lettered {cnt['dead_lettered']:,} + in inbox {r['counters']['in_inbox']} "
        f"(`resolver check` exit {r['check']['exit']}).",
        (f"- **429s once the inbox is full: {v['throttled_429']:,}** (server `throttled` {cnt['throttled']:,}); the first "
         f"after {_s(v['first_429_s'])}, once {pu['accepted_before_first_429']:,} events were admitted "
         f"(high-water {s['high_water']:,}); largest inbox seen {d['inbox_max']:,}. Retry-After values: {pu['retry_after']}."
         if v["throttled_429"] else
         f"- **429s: none**: the inbox never reached the high-water mark ({s['high_water']:,}; largest seen "
         f"{d['inbox_max']:,}): the pusher's admissions ({_r(d['admissions_in_window_b_per_s'])}/s during B, "
         f"{_r(d['admissions_per_s'])}/s overall) did not outpace the applier ({_pace(s)}). Back-pressure was "
         "not exercised; a lower `--min-drain-rate` or `--high-water` makes it so."),
        *_drain_verdicts(r),
        f"- Events admitted and applied throughout window B: {'yes' if v['window_inside_drain'] else 'NO'} "
        f"({_r(d['admissions_in_window_b_per_s'])} admissions/s during B; inbox between {d['inbox_min_in_window_b']} and "
        f"{d['inbox_max_in_window_b']}; inbox empty {_s(d['inbox_empty_after_s'])} after the release, "
        f"B ended at {d['window_b_s']:g} s).",
        *shared_warning(wins),
        "",
        "## Resolve latency (ms, from the intended send time)", "",
        "| window | offered/s | achieved/s | p50 | p90 | p99 | p99.9 | max | errors | server CPU/req µs | send lag p99 µs "
        "| loadavg 1m before → after | CPU busy | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for name, w in wins:
        lat, mach = w["latency_ms"], w["machine"]
        lines.append(f"| {name} | {w['offered_rate']:g} | {w['achieved_rate']:.1f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
                     f"{_ms(lat['p99'])} | {_ms(lat['p99.9'])} | {_ms(lat['max'])} | {w['errors'] or 0} | "
                     f"{w['server_cpu_per_request_us'] if w['server_cpu_per_request_us'] is not None else '-'} | "
                     f"{w['send_lag_us']['p99']} | {mach['loadavg_before'][0]:.2f} → {mach['loadavg_after'][0]:.2f} | "
                     f"{mach['busy_fraction']:.0%} | {mach.get('other_processes_cores', '-')} |")
    lines.append("")
    lines.append("| ratio B / A | " + " | ".join(
        f"{k} {r['window_b']['latency_ms'][k] / r['window_a']['latency_ms'][k]:.2f}×" for k in ("p50", "p99", "p99.9", "max")
        if r["window_a"]["latency_ms"][k]) + " |")
    lines += [
        "", "Server CPU/req in B includes the admissions and the applier (the same server process tree: the events "
        "process is a child of `resolver serve`).",
        "Server CPU by process (cores, over each window): " + "; ".join(
            f"{name.split(':')[0]} {w['machine'].get('server_process_cores', '-')}" for name, w in wins) + ".",
        f"The pusher (not part of the server) used {r['window_b']['machine'].get('pusher_cores', '-')} cores during B.",
        "Connections during B per server process (gRPC: the loadgen's clients + this run's counter channel; "
        f"webhooks: the pusher's): {r['window_b'].get('connection_placement', {}).get('connections', '-')}.", "",
        "## Intake and drain", "",
        f"- Pusher: {pu['events']:,} events in {pu['elapsed_s']:.1f} s; answers {pu['codes']}; "
        f"{len(pu['duplicates'])} 202 'duplicate' (an earlier attempt had been stored).",
        f"- Admissions: {_r(d['admissions_per_s'])}/s overall (accepted / time of the last 202), "
        f"{_r(d['burst_admissions_per_s'])}/s in the first burst (before the first 429); per second: "
        f"{pu['accepted_per_s']}.",
        f"- Drain: inbox empty {_s(d['inbox_empty_after_s'])} after the first event; applier {_r(d['drain_rate_per_s'])}/s "
        f"overall, {_r(d['drain_rate_in_window_b_per_s'])}/s during window B (configured {_pace(s)}; the pace the "
        f"applier logged during B: {_pace_seen(r['window_b'].get('applier_pace'))}).",
        f"- Window B: {d['window_b_s']:g} s recorded, starting when the pusher was released; the drain was expected to "
        f"take {s['events'] / _floor(s):.0f} s (at the applier's floor).", "",
        *_slowest_slices(r["window_b"], d["samples"]),
        "Inbox over time (s after the release: accepted, applied, in inbox), every 2 s:", "", "```",
    ]
    last = -2.0
    for row in d["samples"]:
        if row[0] - last >= 2.0 or row is d["samples"][-1]:
            lines.append(f"{row[0]:6.1f} s  accepted {row[1]:6d}  applied {row[2]:6d}  throttled {row[4]:6d}  "
                         f"in inbox {row[5]:5d}")
            last = row[0]
    lines += ["```", "", *_idle_windows(r),
              "## `resolver check` (server stopped)", "", "```", *r["check"]["output"], "```", "",
              "## How it runs", "",
              "Separate processes: `resolver serve` (2 workers, the example blueprint's server settings), the loadgen "
              "(`python -m bench.loadgen`, its own client processes), the pusher (`python -m bench.events push`). "
              "The pusher is released when the loadgen's recorded window starts (estimated from its clients' connections, "
              f"{r['window_b']['machine']['connected_s_before_go']:.2f} s before); window B is shorter than the expected "
              "drain so every Resolve in it competes with admissions and/or the applier. Figures: `results.json`.", ""]
    return "\n".join(lines)


def _floor(s: dict[str, Any]) -> float:
    return float(min(s.get("min_drain_rate", s["drain_rate"]), s["drain_rate"]))


def _pace(s: dict[str, Any]) -> str:
    """The applier's configured pace: adaptive between its floor and ceiling, or fixed (results of older runs)."""
    low, high = _floor(s), s["drain_rate"]
    if low >= high:
        return f"{high:g}/s (fixed)"
    return (f"{low:g}-{high:g}/s (adaptive: {high:g}/s while the serving processes use at most "
            f"{100 * s.get('idle_cpu', 0):g}% of the CPU, {low:g}/s from {100 * s.get('busy_cpu', 0):g}%)")


def _pace_seen(p: dict[str, Any] | None) -> str:
    if not p or p.get("pace_low") is None:
        return "none logged"
    return f"{p['pace_low']}-{p['pace_high']}/s"


def _drain_verdicts(r: dict[str, Any]) -> list[str]:
    """The drain rate under Resolve load (B) and without it (D over HTTP, E from a backlog), against 10x the old
    fixed 100/s."""
    v, d = r["verdicts"], r["drain"]
    out = [f"- **Drain under Resolve load: {_r(v.get('drain_rate_under_load_per_s'))}/s** during window B "
           f"(the applier's pace there: {_pace_seen(r['window_b'].get('applier_pace'))}; after B, with the load gone, "
           f"{_r(d['drain_rate_per_s'])}/s over the whole drain)."]
    held = v.get("idle_drain_target_holds")
    verdict = f"target ≥ 1,000/s, 10× the old fixed 100/s: {'**holds**' if held else '**does NOT hold**'}"
    if w := r.get("window_e"):
        out.append(f"- **Drain with no Resolve load, a backlog (window E): {_r(w['drain_rate_per_s'])}/s** "
                   f"({w['applied']:,} events from the first write until the inbox was empty, "
                   f"{_s(w['inbox_empty_after_s'])}; {verdict}); the applier's pace: {_pace_seen(w.get('applier_pace'))}.")
    if w := r.get("window_d"):
        out.append(f"- Drain with no Resolve load, pushed over HTTP (window D): {_r(w['drain_rate_per_s'])}/s "
                   f"({w['applied']:,} events, admissions {_r(w['admissions_per_s'])}/s, largest inbox {w['inbox_max']:,}"
                   + ("" if r.get("window_e") else f"; {verdict}") + f"); the applier's pace: "
                   f"{_pace_seen(w.get('applier_pace'))}.")
    return out


def _idle_windows(r: dict[str, Any]) -> list[str]:
    """The sections on windows D and E: drains with no Resolve load."""
    lines: list[str] = []
    for key, title, how in (
            ("window_d", "Window D: pushed over HTTP, no Resolve load",
             f"pushed over HTTP as fast as {r['settings'].get('idle_connections', '?')} concurrent requests allowed"),
            ("window_e", "Window E: a backlog, no Resolve load",
             "written into the inbox by the backlog writer (the admission path, not HTTP, past the high-water mark)")):
        w = r.get(key)
        if not w:
            continue
        pu, mach = w["pusher"], w["machine"]
        lines += [f"## {title}", "",
                  f"- {w['events']:,} events (numbered after the earlier windows', so newer) {how}; answers {pu['codes']}; "
                  f"admissions {_r(w['admissions_per_s'])}/s; largest inbox {w['inbox_max']:,}.",
                  f"- Drained at {_r(w['drain_rate_per_s'])}/s: inbox empty {_s(w['inbox_empty_after_s'])} after the "
                  "release.",
                  f"- Server CPU by process (cores): {mach.get('server_process_cores', '-')}; other processes "
                  f"{mach.get('other_processes_cores', '-')} cores; loadavg {mach['loadavg_before'][0]:.2f} → "
                  f"{mach['loadavg_after'][0]:.2f}.",
                  "- What the applier logged: " + ("; ".join(
                      f"{x['events']} events in {x['seconds']:g} s ({x['per_s']}/s), pace {x['pace_low']}-"
                      f"{x['pace_high']}/s" + (" (inbox empty)" if x["inbox_empty"] else "")
                      for x in (w.get("applier_pace") or {}).get("lines", [])) or "nothing") + ".", ""]
    return lines


def shared_warning(wins: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """A plain warning when processes outside this run used CPU during a window (another benchmark, a build)."""
    busy = [(name, w["machine"].get("other_processes_cores") or 0.0) for name, w in wins]
    if all(c < 0.15 for _, c in busy):
        return [f"- The machine was quiet apart from this run (other processes ≤ {max(c for _, c in busy):.2f} cores "
                "in every window)."]
    return ["- **The machine was shared**: other processes kept " + ", ".join(f"{c:.2f} cores busy in {n}" for n, c in busy)
            + " (of " + str(os.cpu_count()) + "): the latency figures are not clean."]


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _codes(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in sorted(errors.items()))


def _overloaded_baselines(summary: dict[str, Any]) -> list[str]:
    """The summary's line on runs whose window A itself refused or lost calls (none: no line)."""
    runs = summary["runs"]
    over = [str(x["run"]) for x in runs if x.get("baseline_overloaded")]
    if not over:
        return []
    healthy = summary.get("median_p99_ratio_b_over_a_healthy_baseline")
    if healthy is None:
        return ["**Every run had window A itself refusing or losing calls: no ratio here can judge the target.**"]
    return [f"**{len(over)} of {len(runs)} runs had window A itself refusing or losing calls (runs {', '.join(over)}): "
            "the server was past its knee with no event at all, and their ratios measure this machine, not the "
            f"drain.** Median over the other runs: {healthy:.2f}×."]


def render_summary(summary: dict[str, Any]) -> str:
    """OUT/summary.md of `--repeat N`: each run's p99s and ratios, and the median ratio."""
    runs, median = summary["runs"], summary["median_p99_ratio_b_over_a"]
    lines = ["# Back-pressure bench: Resolve p99 during an event drain, repeated (issue 5)", "",
             f"Command: `{summary['command']}`", "",
             f"**Median p99 ratio (B during the drain / A without it): {median:.2f}×** over {len(runs)} runs (target ≤ 1.3×); "
             f"no event lost and counters conserved in every run: {'yes' if summary['every_run_lost_nothing'] else '**NO**'}.",
             f"Median drain rate under Resolve load (B): {_r(summary.get('median_drain_rate_under_load_per_s'))}/s; "
             f"with no Resolve load, a backlog (E): {_r(summary.get('median_drain_rate_idle_per_s'))}/s (target ≥ "
             f"1,000/s); pushed over HTTP (D): {_r(summary.get('median_drain_rate_idle_push_per_s'))}/s.",
             *_overloaded_baselines(summary),
             "Machine: server CPU per bare grpcio health check before each run (bench/machine.py; fast phase ~150 µs, "
             f"slow over {SLOW_US} µs: the p99 ratios of a slow run measure this machine).",
             "", "| run | started | health check CPU µs | p99 A ms | p99 B ms | B / A | B / C | drain in B /s | drain in D /s "
             "| drain in E /s | report |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in runs:
        c = f"{x['p99_ratio_b_over_c']:.2f}×" if x["p99_ratio_b_over_c"] else "-"
        lines.append(f"| {x['run']} | {x['started']} | {_r(x.get('floor_us_per_call'))} | {x['a_p99_ms']:.3f} | "
                     f"{x['b_p99_ms']:.3f} | "
                     f"{x['p99_ratio_b_over_a']:.2f}× | {c} | {_r(x.get('drain_rate_under_load_per_s'))} | "
                     f"{_r(x.get('drain_rate_idle_push_per_s'))} | {_r(x.get('drain_rate_idle_per_s'))} | "
                     f"run-{x['run']}/report.md |")
    return "\n".join(lines) + "\n"
