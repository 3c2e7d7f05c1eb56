"""An initial load built beside the store and swapped in whole, when nothing else uses the data directory.

Why: an initial load in place is ONE write transaction (resolver.importer.commit), and LMDB keeps every page a
transaction dirties in memory until its commit; past its dirty-page limit it spills them to the file and reads
them back, so the transaction costs more per row the larger the load (bench/README.md, "An initial load built
beside the store"). Built beside the store, the load commits every `COMMIT_ROWS` rows without syncing, and the
store itself still changes once, all or nothing:

1. `serve.lock` is held exclusive for the whole load (resolver.datalock: no server starts meanwhile; taking it
   removes the copy a killed load left), and no process may have the store open;
2. the store is opened once (made, if there was none, exactly as any first open makes it), must hold no
   customer record, and is copied, live entries only (resolver.compact.copy_live: a few pages), into
   `DATA_DIR/.load-*/` (inside the data directory: the rename below needs the same filesystem);
3. the import writes into that copy, opened without syncs (`durable=False`), committing every `COMMIT_ROWS`
   rows: a crash now can leave the copy torn, never the store, which nothing has written;
4. once the last row is in: the copy is synced (LMDB, then the file and its directory), and with LMDB's lock held
   exclusive (resolver.datalock.replacing) and nothing committed to the store since the copy was made, the copy
   is renamed over data.mdb and the directory synced.

A load that stops before step 4 (a refused file, a full map, Ctrl-C) removes the copy; one killed with kill -9
leaves it, and the next command that takes serve.lock on that directory (`serve`, `import`, `compact`, `backup`)
removes it. Either way the store is as empty as before.

When a server (or any process) has the store open, or the store holds customers, `begin` answers None and the
import runs in place: one transaction (initial load) or a durable one per batch (incremental).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import lmdb

from resolver import datalock
from resolver.bootstrap import open_store
from resolver.compact import DATA_FILE, copy_store, put_in_place
from resolver.config import Settings
from resolver.errors import StoreError
from resolver.store import Store, Txn

STAGE_PREFIX = datalock.COPY_PREFIXES[1]
COMMIT_ROWS = 100_000  # rows per unsynced commit of the copy (bench/README.md: 20k-250k measured)


@dataclass(frozen=True)
class Stage:
    """Where an initial load is being built: `settings` name the copy (`work`) in place of `data_dir`."""

    data_dir: Path
    work: Path
    settings: Settings
    txnid: int  # the store's last transaction when it was copied: it must still be the last at the swap
    original: os.stat_result  # the store's data.mdb (the copy takes its permissions and owner)


def begin(settings: Settings, stack: ExitStack) -> Stage | None:
    """A Stage for an initial load of the store in `settings`, its locks and clean-up held by `stack`; None when the
    load must run in place (the store is in use, or holds customers)."""
    data_dir = Path(settings.server.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    held = ExitStack()
    try:
        held.enter_context(datalock.exclusive(data_dir, doing="loading"))
        datalock.refuse_if_open(data_dir)
    except StoreError:
        held.close()
        return None  # a server or another process has the store: it reads on while the load runs in place
    try:
        empty = _holds_no_customer(settings)
    except BaseException:
        held.close()
        raise
    if not empty:
        held.close()
        return None  # incremental: a server may start meanwhile, as before
    stack.enter_context(held)
    work = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=data_dir))
    stack.callback(shutil.rmtree, work, True)  # removed whatever happens (after the swap it holds nothing)
    copied = copy_store(settings, work)
    staged = dataclasses.replace(settings, server=dataclasses.replace(settings.server, data_dir=work))
    return Stage(data_dir, work, staged, copied.txnid, (data_dir / DATA_FILE).stat())


class Chunked:
    """A load's write transaction `view`. With `every` > 0 (into a staging copy only) it is committed and begun anew
    once `every` rows are in it, when the loader says a row boundary is reached (`applied`); with 0 it is the one
    transaction of the load. As a context manager: the last transaction committed on a normal exit, aborted on an
    error."""

    def __init__(self, store: Store, view: Txn, every: int) -> None:
        self.store = store
        self.view = view
        self.every = every
        self.rows = 0  # in `view`

    def applied(self, rows: int) -> None:
        """`rows` more rows are written: commit here if it is time (then `view` is a new transaction; a staging
        copy is only ever used whole, so any point between two writes will do)."""
        self.rows += rows
        if self.every and self.rows >= self.every:
            self.view.__exit__(None, None, None)
            self.view = self.store.write()
            self.rows = 0

    def __enter__(self) -> Chunked:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *args: object) -> None:
        self.view.__exit__(exc_type, *args)


def install(stage: Stage, store: Store) -> None:
    """Sync the loaded copy (`store`, which this closes) and put it in place of the store's data.mdb, whole;
    StoreError, with the store unchanged, if that cannot be done."""
    try:
        store.env.sync(True)
    finally:
        store.close()
    try:
        put_in_place(stage.data_dir, stage.work, stage.txnid, stage.original, during="during the load")
    except (lmdb.Error, OSError, StoreError) as exc:
        raise StoreError(f"the load was not put in place, the store is unchanged: {exc}") from exc


def _holds_no_customer(settings: Settings) -> bool:
    """Whether the store (made here if there is none) holds no customer record: what makes an import an initial
    load (resolver.importer.commit)."""
    store = open_store(settings)
    try:
        with store.read() as view:
            return view.count("records") == 0
    finally:
        store.close()
