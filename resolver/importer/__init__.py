"""`resolver import FILE`: bulk-load customers from JSON lines (UpsertRequest, proto3 JSON) or CSV.

Each row is an Upsert, validated exactly as the API validates it (`resolver.upsert.prepare`). Into a store
that holds no customer, the import is an initial load, all or nothing (a load killed part way leaves an empty
store): built beside the store and put in place whole when no other process uses the data directory
(resolver.importer.staged), else ONE write transaction, committed once at the end. Into a store that holds
customers, it is incremental: one durable write transaction per batch, so a stopped import keeps every batch
before it (resolver.importer.commit). Either way a row that cannot be applied is refused alone and goes to a rejects
file with its reasons and its original text, to fix and re-import. A row without an idempotency key gets one
derived from its normalized content, so importing the same file (or an edited copy) again replays every
unchanged row and creates nothing twice (resolver.importer.prepare).

formats: what the file is, its reader; jsonl, csvrows: reading and parsing rows; prepare: row -> validated,
encoded command (no store access, so it runs in worker processes too); pool: those workers, and the rows in
file order; commit: the batches and the rejects file; report: what the user sees; rows: the row type they
all share. A `resolver export` file (its header line, or `--format export`) goes to restore_rows instead: it loads
into an empty store only, all or nothing.

Exit codes: 0 every row was applied, 1 some were rejected, 2 the file, its header or an option is unusable.
"""

from __future__ import annotations

import argparse
import functools
import gc
import time
from contextlib import ExitStack
from pathlib import Path

import lmdb

from resolver.bootstrap import build_service
from resolver.config import Settings
from resolver.errors import IdentifierError, StoreError
from resolver.importer import restore_rows, staged
from resolver.importer.commit import Importer
from resolver.importer.formats import format_of, open_source, scan
from resolver.importer.pool import prepared, start_workers
from resolver.importer.prepare import Defaults, Preparer
from resolver.importer.report import fail
from resolver.importer.rows import FileProblem
from resolver.normalize import check_region
from resolver.uuids import LoadUuids

__all__ = ["run_import"]


def run_import(settings: Settings, args: argparse.Namespace) -> int:
    """Import args.file into the store of `settings`; print a summary line; exit code 0, 1 or 2."""
    path = Path(args.file)
    if args.format == "export" or (args.format != "csv" and restore_rows.is_export(path)):
        return restore_rows.run_export_import(settings, path)  # a `resolver export` file: its own loader
    fmt = format_of(path, args.format)
    if fmt is None:
        return fail(f"{path}: cannot tell the format from the name; give --format jsonl or --format csv")
    if args.batch_size < 1:
        return fail("--batch-size must be at least 1")
    try:
        region = check_region(args.default_region) or ""
    except IdentifierError as exc:
        return fail(f"--default-region {args.default_region!r}: {exc.message}")
    if not path.is_file():
        return fail(f"{path}: no such file")
    rejects = Path(args.rejects) if args.rejects else path.with_name(path.name + ".rejected.jsonl")
    if rejects.resolve() == path.resolve():
        return fail(f"{rejects}: the rejects file cannot be the input file")
    if not rejects.parent.is_dir():
        return fail(f"{rejects}: no such directory for the rejects file")

    started = time.monotonic()
    lines, size = scan(path)
    with ExitStack() as stack:
        try:
            source = open_source(path, fmt, settings, stack)
        except FileProblem as exc:
            return fail(f"{path}: {exc}")
        preparer = Preparer(settings, source.parse, Defaults(region, args.source_system), LoadUuids.start())
        gc.freeze()  # what is loaded by now lives as long as the import: full collections need not walk it
        # Fork the workers first: an LMDB environment must never cross a fork.
        workers = start_workers(preparer, lines, path if fmt == "jsonl" else None)
        if workers is not None:
            stack.callback(workers.close)
        try:
            stage = None if args.commit_every_batch else staged.begin(settings, stack)
        except (StoreError, lmdb.Error) as exc:
            return fail(f"storage error: {exc}")
        # an initial load is not sent to the CRM (outbox=False)
        service = build_service(stage.settings if stage else settings, writer=False, outbox=False,
                                durable=stage is None)
        stack.callback(service.close)  # (a second close, after `install` closed the copy, does nothing)
        importer = Importer(service, rejects, preparer.command, batch_size=args.batch_size, progress=not args.no_progress,
                            every_batch=args.commit_every_batch, commit_rows=staged.COMMIT_ROWS if stage else 0,
                            finish=functools.partial(staged.install, stage, service.store) if stage else None)
        return importer.run(prepared(source.rows, preparer, workers), total=lines - source.header_lines,
                            skip=source.header_lines, name=path, started=started, size=size)
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow exceptions
