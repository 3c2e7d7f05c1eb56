"""`resolver compact`: rewrite the store with its live entries only, so that an erasure can be verified on disk.

LMDB frees the pages that held a deleted customer without zeroing them, and leaves the bytes of a deleted entry
in the free space inside pages that stay in use. The new data.mdb holds every entry of every named database and
nothing else: its bytes are the live entries, B-tree structure and zeros.

Why not LMDB's compacting copy (`env.copy(path, compact=True)`, MDB_CP_COMPACT): it drops the free pages, but it
copies each page with `mdb_page_copy`, which rounds the free gap inside the page inward to 8-byte words: up to 6
bytes at each edge of the gap (all of a gap under 8 bytes) come along. After a page's lowest node is deleted,
the bytes below the next node are the end of the deleted entry: tests/integration/test_compact.py finds the last
6 bytes of a deleted value in such a copy, with LMDB 0.9 and 1.0 alike. So the entries are written instead, in
key order, through one write transaction into a new environment opened with `meminit=True`: each page LMDB
allocates there starts zeroed, and a buffer it reuses only ever held pages of that new environment, which hold
live entries only.

Steps (any failure before the rename leaves data.mdb as it was, removes the copy and raises StoreError):
1. hold `serve.lock` exclusive and check that no process has the environment open (resolver.datalock);
2. one read transaction of the store: every named database (listed from the main database, so one added later
   is copied too), its flags and entries, written to `DATA_DIR/.compact-*/data.mdb`; give it the old file's
   permissions and owner; fsync the file and its directory;
3. open the copy and compare, in one read transaction, the entries of every named database with the source's;
4. with LMDB's lock held exclusive (resolver.datalock.replacing): check that nothing was committed since the
   snapshot, rename the copy over data.mdb, fsync the directory; empty and remove lock.mdb (the next open makes
   a new one).

The copy is made inside the data directory, not beside it: only there is it sure to be on the same filesystem
(a data directory is often a mount point of its own), which the atomic rename needs.
Blocks of the old file freed by the filesystem, backups and snapshots of the volume are beyond its reach.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from resolver import datalock
from resolver.config import Settings
from resolver.errors import StoreError

DATA_FILE = "data.mdb"
WORK_PREFIX = datalock.COPY_PREFIXES[0]  # a killed compaction's copy: removed at the next lock
# Named databases a store may hold: the ones resolver.store opens, with room for those added later.
MAX_DBS = 128


@dataclass(frozen=True)
class Copied:
    """What `copy_live` wrote: the source snapshot's transaction id and the entries of each named database."""

    txnid: int
    entries: dict[bytes, int]


def run_compact(settings: Settings) -> int:
    """Compact the store named in `settings` and print one summary line: 0. StoreError (the CLI's exit 2) when a
    process uses the store or a step fails: data.mdb is then unchanged, unless the message says it was compacted."""
    started = time.monotonic()
    data_dir = Path(settings.server.data_dir)
    data = data_dir / DATA_FILE
    if not data.is_file():
        raise StoreError(f"{data_dir}: no resolver data here (data.mdb missing)")
    with datalock.exclusive(data_dir):
        datalock.refuse_if_open(data_dir)
        original = data.stat()
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=data_dir))
        try:
            copied = copy_store(settings, work)
            verify_copy(work, copied)
            put_in_place(data_dir, work, copied.txnid, original, during="while it was being copied")
        except (lmdb.Error, OSError, StoreError) as exc:
            if not (work / DATA_FILE).exists():  # renamed over data.mdb: only syncing it failed
                raise StoreError(f"{data_dir}: compacted, but finishing failed: {exc}") from exc
            raise StoreError(f"{data_dir}: not compacted, the store is unchanged: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
    after = data.stat().st_size
    print(f"compact: {data_dir}: {original.st_size} -> {after} bytes, {sum(copied.entries.values())} entries in "
          f"{len(copied.entries)} databases, in {time.monotonic() - started:.1f}s")
    return 0


def copy_store(settings: Settings, target: Path) -> Copied:
    """`copy_live` of the store named in `settings` (opened read-only, with LMDB's lock) into `target`."""
    data_dir = Path(settings.server.data_dir)
    map_size = settings.storage.map_size_mb * 1024 * 1024
    source = lmdb.open(str(data_dir), readonly=True, lock=True, map_size=map_size, max_dbs=MAX_DBS,
                       max_readers=settings.storage.max_readers)
    try:
        return copy_live(source, target, map_size=max(map_size, (data_dir / DATA_FILE).stat().st_size))
    finally:
        source.close()


def put_in_place(data_dir: Path, work: Path, txnid: int, original: os.stat_result, *, during: str) -> None:
    """Rename `work`/data.mdb over the store's (`original`: its stat, whose mode and owner the copy takes), synced,
    with LMDB's lock held exclusive, if the store's last transaction is still `txnid`; StoreError ("the store
    changed `during`...") otherwise, the store unchanged. Once the rename is done, `work` holds no data.mdb."""
    copy = work / DATA_FILE
    _same_mode_and_owner(copy, original)
    datalock.sync_file(copy)
    datalock.sync_dir(work)
    with datalock.replacing(data_dir):
        now = _last_txnid(data_dir)
        if now != txnid:
            raise StoreError(f"the store changed {during} (transaction {txnid}, now {now}): a process wrote to it")
        os.replace(copy, data_dir / DATA_FILE)
        datalock.sync_dir(data_dir)


def copy_live(source: lmdb.Environment, target: Path, *, map_size: int) -> Copied:
    """Write every entry of every named database of `source`, from one read snapshot and in key order, into a new
    environment in the empty directory `target` (one write transaction, synced): the new data.mdb holds the live
    entries and no other bytes of the source."""
    names = _names(source)
    dbs = {}
    for name in names:  # a read-only environment opens handles outside a transaction (resolver.store)
        try:
            dbs[name] = source.open_db(name, create=False)
        except lmdb.IncompatibleError:
            raise StoreError(f"the main database holds {name!r}, which is not a named database: "
                             "not a resolver store") from None
    # meminit: each page LMDB allocates starts zeroed, so no byte of this process's memory reaches the file
    target_env = lmdb.open(str(target), map_size=map_size, max_dbs=max(len(names), 1), lock=False, sync=True,
                           metasync=True, meminit=True, writemap=False, lib_version=source.lib_version()[0])
    try:
        entries: dict[bytes, int] = {}
        with source.begin(buffers=True) as snapshot, target_env.begin(write=True) as out:
            if _names(source, snapshot) != names:
                raise StoreError("the store changed while it was being copied: a named database came or went")
            for name, db in dbs.items():
                copy = target_env.open_db(name, txn=out, create=True, **db.flags())
                with snapshot.cursor(db=db) as src, out.cursor(db=copy) as dst:
                    read, written = dst.putmulti(src.iternext(keys=True, values=True), append=True)
                entries[name] = snapshot.stat(db)["entries"]
                if not read == written == entries[name]:
                    raise StoreError(f"{name.decode(errors='replace')}: {entries[name]} entries, {read} read, "
                                     f"{written} written")
            txnid = snapshot.id()
    finally:
        target_env.close()
    return Copied(txnid, entries)


def verify_copy(target: Path, copied: Copied) -> None:
    """Open the environment in `target` and check, in one read transaction, that it holds the named databases of
    `copied` with the same number of entries each (StoreError if not)."""
    env = lmdb.open(str(target), readonly=True, lock=False, max_dbs=max(len(copied.entries), 1))
    try:
        names = _names(env)
        if set(names) != set(copied.entries):
            raise StoreError(f"the copy holds databases {sorted(names)}, the store {sorted(copied.entries)}")
        dbs = {name: env.open_db(name, create=False) for name in names}
        with env.begin() as txn:
            found = {name: txn.stat(db)["entries"] for name, db in dbs.items()}
    finally:
        env.close()
    if found != copied.entries:
        wrong = ", ".join(f"{n.decode(errors='replace')} {found[n]} (store {copied.entries[n]})"
                          for n in names if found[n] != copied.entries[n])
        raise StoreError(f"the copy does not hold what the store holds: {wrong}")


def _names(env: lmdb.Environment, txn: lmdb.Transaction | None = None) -> list[bytes]:
    """The keys of the main database: the names of the named databases (LMDB 1.0 stores them with their
    terminating NUL, 0.9 without; open_db takes either)."""
    if txn is None:
        with env.begin() as own:
            return _names(env, own)
    with txn.cursor() as cur:
        return [bytes(k).removesuffix(b"\0") for k in cur.iternext(keys=True, values=False)]


def _last_txnid(data_dir: Path) -> int:
    """The last committed transaction of the environment, read from data.mdb's meta pages (no lock file: the
    caller holds LMDB's lock exclusive)."""
    env = lmdb.open(str(data_dir), readonly=True, lock=False)
    try:
        return int(env.info()["last_txnid"])
    finally:
        env.close()


def _same_mode_and_owner(path: Path, original: os.stat_result) -> None:
    """Give the copy the original's permissions and, if they differ, owner: a compact run as root on a store a
    service user owns must leave a file that user can open."""
    os.chmod(path, stat.S_IMODE(original.st_mode))
    st = path.stat()
    if (st.st_uid, st.st_gid) != (original.st_uid, original.st_gid):
        os.chown(path, original.st_uid, original.st_gid)
