"""Issue 13's targets table: peak call volume from one channel or many, with and without writes (`make bench`).

    .venv/bin/python -m bench.targets [--repeat 3] [--rate 2000] [--layouts normal,pinned] [--out DIR]

Runs, for each CPU layout, bench.channels (Resolve against the health check from 1 and 4 channels, plain and
round_robin, plus a rate sweep of one round_robin channel) and bench.writes_vs_reads (Resolve alone, with 5%
Upserts mixed in, alone again; the disk's own flush latency), each `--repeat` rounds on the same 200k-customer
data (made once under --work). Layouts: `normal` (server and load clients share both cores) and `pinned` (server
on CPU 0, load clients on CPU 1: the clients cannot take the server's CPU, and the server has one core). Every
figure is a median over rounds of a ratio taken within one round. Prints the table and writes DIR/targets.md
and DIR/targets.json (each row names the command that measured it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.writes_vs_reads.servers import ROOT, log

PY = sys.executable


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure, its target and how it is read from one layout's results."""

    figure: str
    target: str
    source: str  # "channels" | "writes"
    read: Callable[[dict[str, Any]], float | None]
    meets: Callable[[float], bool]


def _ratio_by_round(layout: str, num: Callable[[dict[str, Any]], float], den: Callable[[dict[str, Any]], float]
                    ) -> Callable[[dict[str, Any]], float | None]:
    def read(res: dict[str, Any]) -> float | None:
        vals = [num(r) / den(r) for r in res["rounds"] if r["layout"] == layout and den(r)]
        return statistics.median(vals) if vals else None

    return read


def _p99(kind: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: float(r[kind]["latency_ms"]["p99"])


def _cpu(kind: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: float(r[kind]["server_cpu_per_request_us"] or 0.0)


def _writes(key: str) -> Callable[[dict[str, Any]], float | None]:
    def read(res: dict[str, Any]) -> float | None:
        main = res["summary"].get("main")
        return None if main is None else float(main["median"][key])

    return read


def _knee_ratio(res: dict[str, Any]) -> float | None:
    sweep, limit = res.get("sweep") or [], res.get("target_ms", 2.0)
    knee = {k: max((s["rate"] for s in sweep if s[k]["latency_ms"]["p99"] <= limit), default=None)
            for k in ("call-setup", "floor")}
    return knee["call-setup"] / knee["floor"] if knee["call-setup"] and knee["floor"] else None


ROWS = (
    Row("Resolve p99 / health p99, 1 channel (round_robin, the README's), rate", "<= 1.25", "channels",
        _ratio_by_round("1ch-rr", _p99("call-setup"), _p99("floor")), lambda x: x <= 1.25),
    Row("Resolve p99 / health p99, 1 channel to the shared port, rate", "(reference)", "channels",
        _ratio_by_round("1ch", _p99("call-setup"), _p99("floor")), lambda x: x <= 1.25),
    Row("Resolve p99 / health p99, 4 channels to the shared port, rate", "<= 1.25", "channels",
        _ratio_by_round("4ch", _p99("call-setup"), _p99("floor")), lambda x: x <= 1.25),
    Row("Resolve p99 / health p99, 4 round_robin channels, rate", "<= 1.25", "channels",
        _ratio_by_round("4ch-rr", _p99("call-setup"), _p99("floor")), lambda x: x <= 1.25),
    Row("Resolve p99 with 5% Upserts / without, 4 round_robin channels, rate", "<= 1.3", "writes",
        _writes("mixed_over_alone"), lambda x: x <= 1.3),
    Row("worst 100 ms slice's p99 in the window after writes / before", "<= 2", "writes",
        _writes("slice_after_over_before"), lambda x: x <= 2),
    Row("server CPU per Resolve / per health check (4 round_robin channels)", "<= 1.15", "channels",
        _ratio_by_round("4ch-rr", _cpu("call-setup"), _cpu("floor")), lambda x: x <= 1.15),
    Row("Upsert p99 / the disk's fsync p99 in the same round", "<= 3", "writes",
        _writes("upsert_over_disk1"), lambda x: x <= 3),
    Row("1 channel: highest rate with Resolve p99 <= 2 ms / the same for health", ">= 0.9", "channels",
        _knee_ratio, lambda x: x >= 0.9),
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/wvr")
    p.add_argument("--repeat", type=int, default=3, help="rounds per bench (figures are medians over them)")
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--duration", type=float, default=8.0, help="recorded seconds per layout/window")
    p.add_argument("--sweep", default="250,500,1000,1500,2000,2500,3000")
    p.add_argument("--layouts", default="normal,pinned")
    p.add_argument("--out", default=str(ROOT / "bench/out/targets"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    commands: dict[str, dict[str, str]] = {}
    for layout in a.layouts.split(","):
        pin = ["--pin"] if layout == "pinned" else []
        runs = {
            "channels": [PY, "-m", "bench.channels", "--work", a.work, "--rounds", str(a.repeat), "--rate", f"{a.rate:g}",
                         "--duration", f"{a.duration:g}", "--sweep", a.sweep, *pin],
            "writes": [PY, "-m", "bench.writes_vs_reads", "--work", a.work, "--rounds", str(a.repeat), "--rate",
                       f"{a.rate:g}", "--window", f"{a.duration:g}", "--clients", "4", *pin],
        }
        for source, cmd in runs.items():
            path = out / f"{source}-{layout}.json"
            commands.setdefault(layout, {})[source] = shlex.join(cmd[1:])
            log(f"{layout}: {shlex.join(cmd[1:])}")
            subprocess.run([*cmd, "--json", str(path)], cwd=ROOT, check=True)
            results.setdefault(layout, {})[source] = json.loads(path.read_text())
    table = render(results, commands, a)
    print(table)
    (out / "targets.md").write_text(table)
    (out / "targets.json").write_text(json.dumps({"args": vars(a), "commands": commands, "results": results}, indent=1))
    log(f"table: {out / 'targets.md'}")
    return 0


def render(results: dict[str, dict[str, Any]], commands: dict[str, dict[str, str]], a: argparse.Namespace) -> str:
    layouts = list(results)
    lines = [f"Medians of {a.repeat} rounds at {a.rate:g}/s, ratios within a round "
             f"(`python -m bench.targets --repeat {a.repeat} --rate {a.rate:g}`).", "",
             "| figure | target | " + " | ".join(layouts) + " |", "| --- | --- |" + " ---: |" * len(layouts)]
    for row in ROWS:
        cells = []
        for layout in layouts:
            v = row.read(results[layout][row.source])
            cells.append("n/a" if v is None else f"{v:.2f}" + ("" if row.target.startswith("(") or row.meets(v)
                                                               else " (missed)"))
        lines.append(f"| {row.figure.replace(', rate', f' at {a.rate:g}/s')} | {row.target} | " + " | ".join(cells) + " |")
    lines += ["", "Server CPU per call (µs, medians): "]
    for layout in layouts:
        ch, wr = results[layout]["channels"], results[layout]["writes"]["summary"].get("main", {}).get("median", {})
        res = [_cpu("call-setup")(r) for r in ch["rounds"] if r["layout"] == "4ch-rr"]
        flo = [_cpu("floor")(r) for r in ch["rounds"] if r["layout"] == "4ch-rr"]
        lines.append(f"- {layout}: Resolve {statistics.median(res):.0f}, health {statistics.median(flo):.0f}, "
                     f"Upsert {wr.get('cpu_per_upsert_us', float('nan')):.0f} (mixed window less its Resolves)")
    lines += ["", "Commands (per layout):"]
    for layout, cmds in commands.items():
        lines += [f"- {layout} {source}: `python {cmd}`" for source, cmd in cmds.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
