"""The reliability report: each test adds what it tried, what held and the figures it measured; the session writes
them, with each test's outcome, to tests/reliability/out/report.md (git-ignored), `make reliability`'s output."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "report.md"

# `make reliability` sets RELIABILITY=full: the counts (20 kills, 60 s of overload, 10,000 model steps...).
# `make test` runs the same tests short, so each stays a few seconds to a minute.
FULL = os.environ.get("RELIABILITY", "") == "full"


def scaled(short: int, full: int) -> int:
    """`full` under `make reliability`, `short` under `make test`."""
    return full if FULL else short


@dataclass
class Row:
    """One test's line of the report. `tried`: what was done, with counts; `held`: the promises checked;
    `figures`: what was measured (latencies, rates, sizes), as text."""

    test: str
    tried: str
    held: str
    figures: str = ""
    outcome: str = "not run to the end"


@dataclass
class Report:
    rows: dict[str, Row] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, nodeid: str, tried: str, held: str, figures: str = "") -> None:
        self.rows[nodeid] = Row(nodeid.split("::")[-1], tried, held, figures)

    def outcome(self, nodeid: str, outcome: str) -> None:
        if nodeid in self.rows:
            self.rows[nodeid].outcome = outcome
        elif outcome != "passed":  # a test that failed before it could report still shows, as failed
            self.rows[nodeid] = Row(nodeid.split("::")[-1], "", "", "", outcome)

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", "<br>")

        lines = [
            "# Reliability report",
            "",
            f"Scale: {'full (`make reliability`)' if FULL else 'short (`make test`)'}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.started))}; "
            f"{int(time.time() - self.started)} s; {platform.node()}, {os.cpu_count()} CPUs.",
            "",
            "| Test | Outcome | What was tried | What held | Figures |",
            "|---|---|---|---|---|",
        ]
        for _, row in sorted(self.rows.items()):  # by test id: the same order however the tests were spread
            lines.append(f"| {cell(row.test)} | {row.outcome} | {cell(row.tried)} | {cell(row.held)} | {cell(row.figures)} |")
        return "\n".join(lines) + "\n"

    def rows_out(self) -> list[list[str]]:
        """Every row as plain lists (what an xdist worker can send its controller)."""
        return [[nodeid, r.test, r.tried, r.held, r.figures, r.outcome] for nodeid, r in self.rows.items()]

    def rows_in(self, rows: list[list[str]]) -> None:
        """A worker's `rows_out`, added to this report."""
        for nodeid, *fields in rows:
            self.rows[nodeid] = Row(*fields)

    def write(self) -> Path:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(self.markdown())
        return OUT


REPORT = Report()
