"""Applying prepared rows, and the rejects file. Two ways, by what the store holds when the import starts:

- **Initial load** (the store holds no customer record): ONE write transaction for the whole file, committed and
  synced once, after the last row: all or nothing. A load that stops early (a storage error, an unreadable
  part of the file, Ctrl-C, kill -9, a power cut) leaves the store as it was: empty; run it again. Batches
  still pace the work (the bulk queue below, the progress bar), not durability. The transaction holds LMDB's
  write lock until it commits: a server's writes wait for the load (its reads go on, and see an empty store).
  Into a staging copy (resolver.importer.staged: nothing else has the store open), the same, except that the
  copy is committed every `commit_rows` rows, unsynced, and `finish` puts it in place after the last commit.
- **Incremental** (the store holds customers): one durable write transaction per batch, so a row that cannot
  be applied is refused alone and the rest of its batch commits, and a stopped import keeps every batch
  committed before it.

Within a batch, a row that is a plain create (nothing in the store or earlier in its batch holds its key or
identifiers) is written from the bytes its worker encoded; every other row goes through `resolver.upsert.apply`
(resolver.bulk says why both write the same bytes). Incrementally, `apply` runs in a nested transaction, so a
refused row is rolled back alone. In an initial load it runs in the load's transaction itself: committing a
nested transaction merges its dirty pages into its parent's list, a cost that grows with the parent, and the
load's transaction holds gigabytes. `apply` raises before it writes anything (its contract), so a refused row
still leaves nothing behind; a tripwire (every database's entry count before and after) aborts the load if
that contract is ever broken. Either way the store ends byte for byte the same.

An initial load that starts on databases holding no entry at all needs no lookup to prove a create: nothing can
hold a key that no row of the load has claimed, and the load's `KeyFilter` (resolver._load_py) remembers every
key it claims, so the store is asked only about the few it may have. A row of the fast path travels as its packed
create alone; the command of one that turns out to need `apply` is rebuilt from its line (`command`), and a
re-imported one is answered from the ledger without it (resolver.bulk.BulkWriter.replay_entry).

Refused rows go to the rejects file with their reasons and their original text, as they are met.
"""

from __future__ import annotations

import functools
import gc
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO, cast

import lmdb
from tqdm import tqdm

from resolver._hotpath import KeyFilter, entry_derived
from resolver._load_py import Entry, entry_head, unpack
from resolver.bulk import BulkWriter, command_from
from resolver.config import Settings
from resolver.errors import ResolverError, StorageFull, StoreError
from resolver.importer.prepare import Repeats, original, reasons_for, rekeyed
from resolver.importer.report import Tally, fail, progress, summary
from resolver.importer.rows import FileProblem, Item, Prepared, Row
from resolver.importer.staged import Chunked
from resolver.service import Service
from resolver.store import Store, Txn
from resolver.upsert import UpsertCommand, UpsertResult, apply
from resolver.writer import apply_nested

# the databases a row's writes add entries to (the tripwire of an unnested apply)
_WRITTEN = ("records", "ix_external", "ix_email", "ix_phone", "ledger", "ledger_exp", "changes", "pii_refs")
Apply = Callable[[Store, Txn, Callable[[Txn, UpsertCommand], UpsertResult], UpsertCommand], UpsertResult]
Command = Callable[[Entry], UpsertCommand]  # a packed create's command, rebuilt (resolver.importer.prepare.Preparer)
KEYS_PER_ROW = 5  # what an initial load's KeyFilter is sized for: a ledger key and a few identifiers per row


class Importer:
    """Applies prepared rows in batches of `batch_size` rows, writes the refused ones to `rejects`. `command`
    rebuilds the command of a packed create that turns out to need `apply` (resolver.importer.prepare.Preparer)."""

    def __init__(self, service: Service, rejects: Path, command: Command, *, batch_size: int = 2000,
                 progress: bool = True, every_batch: bool = False, commit_rows: int = 0,
                 finish: Callable[[], None] | None = None) -> None:
        self.store = service.store
        self.settings = service.settings
        self.rejects_path = rejects
        self.batch_size = batch_size
        self.progress = progress
        self.every_batch = every_batch  # commit each batch even into an empty store (no initial load)
        # an initial load into a staging copy (resolver.importer.staged): commit every `commit_rows` rows (0: once),
        # then `finish` (the copy put in place; StoreError: it was not, and the load stops as any failed load)
        self.commit_rows = commit_rows
        self.finish = finish
        self.command = command
        self.filter: KeyFilter | None = None  # an initial load's, when it starts on databases with no entry
        self.tally = Tally()
        self.repeats = Repeats()
        self.initial = False  # an initial load (decided when `run` opens the store's write transaction)
        self._rejects: TextIO | None = None
        self._done_line = 0  # incremental: every row up to this line is committed or in the rejects file

    def run(self, prepared: Iterator[list[Item]], *, total: int, skip: int, name: Path, started: float,
            size: int = 0) -> int:
        """Apply every row; print the summary; 0 (all applied), 1 (some refused) or 2 (stopped early).

        `total` rows are expected (the progress bar's end); `skip` lines precede the first (a CSV header);
        `size`: the file's bytes (an initial load first checks that the map has room for them).
        """
        bar = progress(total, name, enabled=self.progress)
        code = 0
        try:
            view = self.store.write()
            if self.every_batch or view.count("records"):
                view.txn.abort()
                self._consume(prepared, bar, total, skip, self._commit_batch)
            else:
                self.initial = True
                load = Chunked(self.store, view, self.commit_rows)
                with load:  # committed when the block ends normally (synced, but in a staging copy); aborted on error
                    room_problem = _map_room(self.store, size)
                    if room_problem:
                        raise StoreError(room_problem)
                    if not any(_footprint(view)):  # nothing to find in the store but what this load writes
                        self.filter = KeyFilter(max(total, 1) * KEYS_PER_ROW)
                    # The queued writes are tuples of bytes, made by the million and freed at each flush, in no
                    # reference cycle: the cyclic collector would walk them all for nothing.
                    gc.disable()
                    try:
                        counts = self._load(load, prepared, bar, total, skip)
                    finally:
                        gc.enable()
                if self.finish is not None:
                    self.finish()
                self._count(counts)  # committed: the counts are now true
        except FileProblem as exc:
            code = fail(f"{name}: {exc}; " + (_NOTHING if self.initial else "every row before it is committed or rejected"))
        except KeyboardInterrupt:
            code = fail(f"interrupted; {self._what_stays()}")
        except StorageFull as exc:  # a full map or disk (resolver.store says which, and what to do)
            code = fail(f"storage error: {exc.message}; {self._what_stays()}")
        except (lmdb.Error, StoreError) as exc:
            code = fail(f"storage error: {exc}; {self._what_stays()}")
        finally:
            bar.close()
            if self._rejects is not None:
                self._rejects.close()
        summary(self.tally, time.monotonic() - started, self.rejects_path)
        if self.initial and code == 0:
            print("import: an initial load into an empty store, " + (
                "built beside it and put in place whole" if self.finish else "committed in one transaction"), flush=True)
        return code or (1 if self.tally.rejected else 0)

    def _what_stays(self) -> str:
        """What an import that stopped early has committed, and what to do."""
        if self.initial:
            return _NOTHING
        return (f"rows up to line {self._done_line} are committed or rejected (run the same import again to finish: "
                "committed rows replay)")

    def _consume(self, prepared: Iterator[list[Item]], bar: tqdm, total: int, skip: int,
                 step: Callable[[list[Item], list[Row], int], None]) -> None:
        """Hand the rows to `step` a batch at a time (batch: the prepared rows, packed creates or rows with a
        Prepared outcome; refused: the others), in file order. Incrementally the rows read before an unreadable
        part of the file are applied before it is reported; an initial load stops without them (it commits
        nothing)."""
        batch: list[Item] = []
        refused: list[Row] = []
        shown = 0
        line = 0
        size = self.batch_size
        try:
            for items in prepared:
                for item in items:
                    if type(item) is bytes:
                        batch.append(self._settled(item) if entry_derived(item) else item)
                    else:
                        row = cast(Row, item)
                        outcome = row.outcome
                        if type(outcome) is Prepared:
                            batch.append(self._settled_row(row) if outcome.derived else row)
                        else:
                            refused.append(row)
                    if len(batch) + len(refused) >= size:
                        line = _line(item)
                        self.tally.rows += len(batch) + len(refused)
                        step(batch, refused, line)
                        batch, refused = [], []
                        bar.update(line - skip - shown)
                        shown = line - skip
                if items:
                    line = _line(items[-1])
        except FileProblem:
            self.tally.rows += len(batch) + len(refused)
            if not self.initial:
                step(batch, refused, line)  # every row read before the unreadable part is applied
            raise
        self.tally.rows += len(batch) + len(refused)
        step(batch, refused, line)
        bar.update(max(total - shown, 0))

    def _settled(self, entry: bytes) -> Item:
        """A keyless row's packed create as it is to be applied: itself the first time its content is seen, else
        re-keyed for its occurrence and left to `apply` (resolver.importer.prepare.Repeats)."""
        e = unpack(entry)
        occurrence = self.repeats.occurrence(e.ledger_key)
        if occurrence == 1:
            return entry
        return Row(e.line, original(e), None, rekeyed(self.command(e), occurrence))

    def _settled_row(self, row: Row) -> Row:
        prepared = cast(Prepared, row.outcome)
        key = unpack(prepared.planned).ledger_key if prepared.planned is not None \
            else command_from(prepared.blob).idempotency_key.encode("utf-8")
        occurrence = self.repeats.occurrence(key)
        if occurrence == 1:
            return row
        return Row(row.line, row.original, None, rekeyed(command_from(prepared.blob), occurrence))

    def _commit_batch(self, batch: list[Item], refused: list[Row], line: int) -> None:
        """Incremental: one batch in one durable write transaction."""
        counts = Tally()
        if batch:
            with self.store.write() as view:
                self._apply(view, batch, refused, counts, apply_nested)
        counts.rejected = len(refused)
        self._count(counts)  # committed: the counts are now true
        self._write_rejects(refused)
        self._done_line = line

    def _load(self, load: Chunked, prepared: Iterator[list[Item]], bar: tqdm, total: int, skip: int) -> Tally:
        """Initial load: every batch into `load` (the caller commits its last transaction); what became of the
        rows."""
        counts = Tally()

        def step(batch: list[Item], refused: list[Row], line: int) -> None:
            if batch:
                self._apply(load.view, batch, refused, counts, _apply_in_place)
                load.applied(len(batch))
            counts.rejected += len(refused)
            self._write_rejects(refused)

        self._consume(prepared, bar, total, skip, step)
        return counts

    def _apply(self, view: Txn, batch: list[Item], refused: list[Row], counts: Tally, run_apply: Apply) -> None:
        """Apply one batch in `view`: plain creates from their packed writes, every other row through `apply`
        (by `run_apply`: nested, or in place); the rows `apply` refuses are added to `refused`."""
        run = functools.partial(_apply_row, self.settings)
        bulk = BulkWriter(view, self.settings.matching.max_fanout, self.filter)
        try_create = bulk.try_create
        created = 0
        for item in batch:
            if type(item) is bytes:
                if try_create(item):
                    created += 1
                    continue
            else:
                planned = cast(Prepared, cast(Row, item).outcome).planned
                if planned is not None and try_create(planned):
                    created += 1
                    continue
            bulk.flush()  # apply must see every earlier row
            try:
                result = self._replay_or_apply(bulk, view, functools.partial(run_apply, self.store, view, run), item)
            except StorageFull:
                raise  # not the row's fault: the import stops, the batch is not committed
            except ResolverError as exc:
                row = _row(item)
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
        counts.created += created

    def _replay_or_apply(self, bulk: BulkWriter, view: Txn, run_apply: Callable[[UpsertCommand], UpsertResult],
                         item: Item) -> UpsertResult:
        """The stored answer of a row whose key is in the ledger (IdempotencyKeyReused for another request), else
        what `apply` makes of it. A packed create's command is rebuilt from its line only for `apply`: a
        re-imported row needs none."""
        if type(item) is bytes:
            entry = unpack(item)
            result = bulk.replay_entry(entry)
            if result is not None:
                return result
            cmd = self.command(entry)
        else:
            cmd = command_from(cast(Prepared, cast(Row, item).outcome).blob)
            result = bulk.replay(cmd)
            if result is not None:
                return result
        result = run_apply(cmd)
        bulk.applied(cmd, result)
        return result

    def _count(self, counts: Tally) -> None:
        t = self.tally
        t.created += counts.created
        t.updated += counts.updated
        t.unchanged += counts.unchanged
        t.replayed += counts.replayed
        t.rejected += counts.rejected

    def _write_rejects(self, refused: list[Row]) -> None:
        if not refused:
            return
        out = self._rejects_file()
        for row in sorted(refused, key=lambda r: r.line):
            out.write(json.dumps({"line": row.line, "reasons": row.outcome, "input": row.original}, ensure_ascii=False))
            out.write("\n")
        out.flush()

    def _rejects_file(self) -> TextIO:
        if self._rejects is None:
            self._rejects = open(self.rejects_path, "w", encoding="utf-8")
        return self._rejects


_NOTHING = "nothing was committed: the store is as empty as before (run the same import again)"
# An initial load of bench/dataset.py's rows needs about 7 bytes of map per byte of input (a record with its
# provenance, index, ledger and change-log entries); the check before a load asks for less, so that it only
# refuses what cannot fit: a file of few bytes per row can need more, and then meets a full map (MapFullError,
# nothing committed) instead.
MAP_BYTES_PER_INPUT_BYTE = 3


def _map_room(store: Store, size: int) -> str:
    """Why the map is too small for an initial load of `size` input bytes ("" when it is not)."""
    info, stat = store.env.info(), store.env.stat()
    free = info["map_size"] - (info["last_pgno"] + 1) * stat["psize"]
    need = size * MAP_BYTES_PER_INPUT_BYTE
    if need <= free:
        return ""
    return (f"an initial load of {size / 2**20:.0f} MB of input needs about {need / 2**20:.0f} MB of LMDB map, "
            f"{free / 2**20:.0f} MB are free: raise [storage] map_size_mb (the file is sparse: a large map costs "
            "no disk)")


def _line(item: Item) -> int:
    """The (first) line of a prepared row."""
    return entry_head(item)[0] if type(item) is bytes else cast(Row, item).line


def _row(item: Item) -> Row:
    """A prepared row as the rejects file needs it (its line and its original text)."""
    if type(item) is bytes:
        entry = unpack(item)
        return Row(entry.line, original(entry), None)
    return cast(Row, item)


def _apply_row(settings: Settings, view: Txn, cmd: UpsertCommand) -> UpsertResult:
    return apply(view, cmd, settings)


def _apply_in_place(store: Store, view: Txn, fn: Callable[[Txn, UpsertCommand], UpsertResult],
                    cmd: UpsertCommand) -> UpsertResult:
    """`fn(txn, cmd)` straight in the transaction of `view`, with a Txn of its own (no record cached by an earlier
    row). A refusal must have written nothing: StoreError (the load aborts) if any database grew."""
    before = _footprint(view)
    try:
        return fn(Txn(store, view.txn), cmd)
    except ResolverError:
        if _footprint(view) != before:
            raise StoreError("a refused row left writes behind (resolver.upsert.apply must raise before it "
                             "writes)") from None
        raise


def _footprint(view: Txn) -> tuple[int, ...]:
    return tuple(view.count(name) for name in _WRITTEN)
