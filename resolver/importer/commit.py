"""Applying prepared rows: one durable write transaction per batch, and the rejects file.

Within a batch, a row that is a plain create (nothing in the store or earlier in its batch holds its key or
identifiers) is written from the bytes its worker encoded, without a nested transaction; every other row goes
through `resolver.upsert.apply` in its own nested transaction, so a row that cannot be applied (NOT_FOUND,
ALREADY_EXISTS, ...) is rolled back alone and the rest of its batch commits (resolver.bulk says why both
write the same bytes). Refused rows go to the rejects file with their reasons and their original text.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO, cast

import lmdb
from tqdm import tqdm

from resolver.bulk import BulkWriter, command_from
from resolver.config import Settings
from resolver.errors import ResolverError
from resolver.importer.prepare import reasons_for
from resolver.importer.report import Tally, fail, progress, summary
from resolver.importer.rows import FileProblem, Prepared, Row
from resolver.service import Service
from resolver.store import Txn
from resolver.upsert import UpsertCommand, UpsertResult, apply
from resolver.writer import apply_nested


class Importer:
    """Applies prepared rows in batches of `batch_size` rows, writes the refused ones to `rejects`."""

    def __init__(self, service: Service, rejects: Path, *, batch_size: int = 2000, progress: bool = True) -> None:
        self.store = service.store
        self.settings = service.settings
        self.rejects_path = rejects
        self.batch_size = batch_size
        self.progress = progress
        self.tally = Tally()
        self._rejects: TextIO | None = None
        self._done_line = 0  # every row up to this line is committed or in the rejects file

    def run(self, prepared: Iterator[list[Row]], *, total: int, skip: int, name: Path, started: float) -> int:
        """Apply every row; print the summary; 0 (all applied), 1 (some refused) or 2 (stopped early).

        `total` rows are expected (the progress bar's end); `skip` lines precede the first (a CSV header).
        """
        bar = progress(total, name, enabled=self.progress)
        code = 0
        try:
            self._consume(prepared, bar, total, skip)
        except FileProblem as exc:
            code = fail(f"{name}: {exc}; every row before it is committed or rejected")
        except KeyboardInterrupt:
            code = fail(f"interrupted; rows up to line {self._done_line} are committed or rejected "
                        "(run the same import again to finish: committed rows replay)")
        except lmdb.Error as exc:
            code = fail(f"storage error: {exc}; rows up to line {self._done_line} are committed or rejected")
        finally:
            bar.close()
            if self._rejects is not None:
                self._rejects.close()
        summary(self.tally, time.monotonic() - started, self.rejects_path)
        return code or (1 if self.tally.rejected else 0)

    def _consume(self, prepared: Iterator[list[Row]], bar: tqdm, total: int, skip: int) -> None:
        batch: list[Row] = []  # outcome: Prepared
        refused: list[Row] = []  # outcome: the reasons
        shown = 0
        line = 0
        try:
            for rows in prepared:
                for row in rows:
                    line = row.line
                    self.tally.rows += 1
                    (batch if type(row.outcome) is Prepared else refused).append(row)
                    if len(batch) + len(refused) >= self.batch_size:
                        self._commit(batch, refused, line)
                        batch, refused = [], []
                        bar.update(line - skip - shown)
                        shown = line - skip
        except FileProblem:
            self._commit(batch, refused, line)  # every row read before the unreadable part is applied
            raise
        self._commit(batch, refused, line)
        bar.update(max(total - shown, 0))

    def _commit(self, batch: list[Row], refused: list[Row], line: int) -> None:
        """Apply one batch in one durable write transaction: plain creates from their pre-encoded writes,
        every other row through `apply` in its own nested transaction (resolver.bulk)."""
        counts = Tally()
        if batch:
            store, settings = self.store, self.settings
            run = functools.partial(_apply_row, settings)
            with store.write() as view:
                bulk = BulkWriter(view)
                for row in batch:
                    prepared = cast(Prepared, row.outcome)
                    if prepared.planned is not None and bulk.try_create(prepared.planned):
                        counts.created += 1
                        continue
                    bulk.flush()  # apply must see every earlier row
                    cmd = command_from(prepared.blob)
                    try:
                        result = bulk.replay(cmd) or apply_nested(store, view, run, cmd)
                    except ResolverError as exc:
                        refused.append(Row(row.line, row.original, None, reasons_for(exc)))
                        continue
                    finally:
                        bulk.touched()
                    if result.replayed:
                        counts.replayed += 1
                    elif result.action == "CREATED":
                        counts.created += 1
                    elif result.action == "UPDATED":
                        counts.updated += 1
                    else:
                        counts.unchanged += 1
                bulk.flush()
        # committed: the counts and the refusals are now true
        t = self.tally
        t.created += counts.created
        t.updated += counts.updated
        t.unchanged += counts.unchanged
        t.replayed += counts.replayed
        t.rejected += len(refused)
        if refused:
            out = self._rejects_file()
            for row in sorted(refused, key=lambda r: r.line):
                out.write(json.dumps({"line": row.line, "reasons": row.outcome, "input": row.original},
                                     ensure_ascii=False))
                out.write("\n")
            out.flush()
        self._done_line = line

    def _rejects_file(self) -> TextIO:
        if self._rejects is None:
            self._rejects = open(self.rejects_path, "w", encoding="utf-8")
        return self._rejects


def _apply_row(settings: Settings, view: Txn, cmd: UpsertCommand) -> UpsertResult:
    return apply(view, cmd, settings)
