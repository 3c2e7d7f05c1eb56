"""What `resolver import` tells its user: the progress bar, the final summary line, and fatal messages."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(slots=True)
class Tally:
    """Rows read so far and what became of them (counted once their batch is committed)."""

    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    replayed: int = 0
    rejected: int = 0


def fail(message: str) -> int:
    """Print why the import cannot go on (or stopped) on stderr; the exit code for it, 2."""
    print(f"resolver import: {message}", file=sys.stderr)
    return 2


def progress(total: int, name: Path, *, enabled: bool) -> tqdm:
    """A progress bar on stderr, counting `total` rows (shown only on a terminal unless disabled)."""
    return tqdm(total=total, unit="rows", desc=f"import {name.name}", file=sys.stderr,
                disable=True if not enabled else None, mininterval=0.5, smoothing=0.1, dynamic_ncols=True)


def summary(t: Tally, elapsed: float, rejects: Path) -> None:
    """The summary line on stdout (scripts and bench/import_rate.py read it), then where the rejects are."""
    print(f"import: {t.rows} rows, {t.created} created, {t.updated} updated, {t.unchanged} unchanged, "
          f"{t.replayed} replayed, {t.rejected} rejected in {elapsed:.1f}s ({t.rows / max(elapsed, 1e-9):.0f} rows/s)",
          flush=True)
    if t.rejected:
        print(f"import: {t.rejected} row(s) rejected: see {rejects}", flush=True)
