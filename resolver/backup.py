"""`resolver backup DIR` and `resolver restore DIR`: a consistent, compacted copy of a store that may be serving,
with a manifest that lets the copy be verified before it is put back.

Backup (the server keeps serving and writing):
1. hold `serve.lock` shared (resolver.datalock.serving), as a server does: `compact` and `reindex`, which replace
   data.mdb, refuse while a backup runs, and a backup refuses while they run;
2. open the live environment read-only beside the serving processes (LMDB's lock file shares it) and copy every
   named database from ONE read transaction into `DIR/data.mdb` (resolver.compact.copy_live: entries in key
   order into a new environment, so free pages and the bytes of deleted or erased entries stay behind, which
   LMDB's own compacting copy does not guarantee; see resolver.compact). Every write acknowledged before that
   transaction began is in the copy; nothing committed after it is;
3. fsync, compare the entries of every database with the snapshot's, run `resolver check` on the copy;
4. write `DIR/manifest.json` last (atomically): its presence says the backup is complete and checked.

Restore (into an empty data directory, no server on it): verify the manifest and the SHA-256 of data.mdb before
anything is written; hold `serve.lock` exclusive; copy data.mdb into a work directory inside the target (hashing
again as it goes), compare its databases and meta with the manifest, rename it into place with LMDB's lock held
(resolver.datalock.replacing), run `resolver check`. Any failure leaves no data.mdb in the target.

The manifest names the last change-log sequence in the copy: a node bootstrapped from a backup replays the
change log from the next one (contract §10).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from resolver import __version__, datalock
from resolver.check import run_check
from resolver.compact import DATA_FILE, MAX_DBS, Copied, copy_live, verify_copy
from resolver.config import Settings
from resolver.errors import StoreError
from resolver.records import decode_json, encode_json

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
WORK_PREFIX = ".restore-"
_CHUNK = 1 << 20
_U64 = struct.Struct(">Q")
_META_KEYS = ("format", "hash", "key_id")


class Facts(NamedTuple):
    """What a copy's own databases say: its meta entries (format, hash, key_id) and its last change sequence."""

    meta: dict[str, str]
    last_change_seq: int


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` records about a backup's data.mdb. `counts`: entries per named database;
    `format`, `hash`, `key_id`: the store's meta (the index hash algorithm and key id the copy's keys are made
    with); `txnid`: the source's transaction the copy was read from."""

    created_at: str  # ISO 8601, UTC: when the snapshot was taken
    created_us: int
    resolver_version: str
    source: str
    size: int
    sha256: str
    txnid: int
    last_change_seq: int
    counts: dict[str, int]
    format: str
    hash: str
    key_id: str

    def to_json(self) -> dict[str, Any]:
        return {"resolver_backup": MANIFEST_VERSION, "data_file": DATA_FILE, "created_at": self.created_at,
                "created_us": self.created_us, "resolver_version": self.resolver_version, "source": self.source,
                "size": self.size, "sha256": self.sha256, "txnid": self.txnid,
                "last_change_seq": self.last_change_seq, "counts": self.counts, "format": self.format,
                "hash": self.hash, "key_id": self.key_id}

    @classmethod
    def read(cls, backup: Path) -> Manifest:
        """The manifest of the backup in `backup`; StoreError, in one sentence, when it is missing or unusable."""
        path = backup / MANIFEST_FILE
        try:
            d = decode_json(path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{backup}: no {MANIFEST_FILE}: not a backup, or one that did not finish "
                             "(`resolver backup` writes the manifest last)") from None
        except ValueError:
            raise StoreError(f"{path}: not valid JSON: the manifest is damaged") from None
        if not isinstance(d, dict) or d.get("resolver_backup") != MANIFEST_VERSION or d.get("data_file") != DATA_FILE:
            raise StoreError(f"{path}: not a manifest this version of resolver reads "
                             f"(resolver_backup {d.get('resolver_backup') if isinstance(d, dict) else None!r})")
        types = {"created_at": str, "created_us": int, "resolver_version": str, "source": str, "size": int,
                 "sha256": str, "txnid": int, "last_change_seq": int, "counts": dict, "format": str, "hash": str,
                 "key_id": str}
        wrong = sorted(k for k, t in types.items() if not isinstance(d.get(k), t))
        if wrong or not all(isinstance(k, str) and isinstance(v, int) for k, v in d["counts"].items()):
            raise StoreError(f"{path}: the manifest is damaged (fields {', '.join(wrong) or 'counts'} missing or of "
                             "the wrong type)")
        return cls(**{k: d[k] for k in types})


def run_backup(settings: Settings, target: Path) -> int:
    """Back the store of `settings` up into `target` (new or empty); print what was written. 0: the backup is
    complete and passes check; 1: the copy fails check (no manifest is written, so restore refuses it).
    StoreError (the CLI's exit 2) when it cannot be made; what it had written is removed."""
    started = time.monotonic()
    data_dir = Path(settings.server.data_dir)
    data = data_dir / DATA_FILE
    if not data.is_file():
        raise StoreError(f"{data_dir}: no resolver data here (data.mdb missing)")
    created = _claim_empty(target, "a backup goes into a new or empty directory")
    made = (DATA_FILE, datalock.LMDB_LOCK_FILE, MANIFEST_FILE + ".tmp")
    try:
        with datalock.serving(data_dir, then="back it up"):
            map_size = max(settings.storage.map_size_mb * 1024 * 1024, data.stat().st_size)
            source = lmdb.open(str(data_dir), readonly=True, lock=True, map_size=map_size, max_dbs=MAX_DBS,
                               max_readers=settings.storage.max_readers)
            try:
                created_us = time.time_ns() // 1000  # the read transaction below begins after this moment
                copied = copy_live(source, target, map_size=map_size)
            finally:
                source.close()
        copy = target / DATA_FILE
        datalock.sync_file(copy)
        datalock.sync_dir(target)
        verify_copy(target, copied)
        facts = read_facts(target)
        code = run_check(settings.with_overrides(data_dir=str(target)))
        (target / datalock.LMDB_LOCK_FILE).unlink(missing_ok=True)  # made by check's open; the copy needs none
        if code != 0:
            print(f"backup: the copy in {target} fails `resolver check` (problems above): no manifest written, so "
                  "`resolver restore` refuses it")
            return 1
        manifest = Manifest(
            created_at=_iso(created_us), created_us=created_us, resolver_version=__version__,
            source=str(data_dir.resolve()), size=copy.stat().st_size, sha256=sha256_of(copy), txnid=copied.txnid,
            last_change_seq=facts.last_change_seq,
            counts={name.decode(errors="replace"): n for name, n in sorted(copied.entries.items())},
            **facts.meta)
        _write_atomically(target / MANIFEST_FILE, encode_json(manifest.to_json()) + b"\n")
    except (lmdb.Error, OSError, StoreError) as exc:
        _remove(target, made, created)
        raise StoreError(f"backup of {data_dir} failed, nothing kept in {target}: {exc}") from exc
    print(f"backup: {data_dir} -> {target}: {manifest.size} bytes, {manifest.counts.get('records', 0)} customers, "
          f"last change {facts.last_change_seq}, sha256 {manifest.sha256[:16]}…, in {time.monotonic() - started:.1f}s")
    return 0


def run_restore(settings: Settings, backup: Path) -> int:
    """Restore the backup in `backup` into the empty data directory of `settings`; print what was restored.
    0: restored and passes check; 1: the restored store fails check (it is removed again). StoreError (exit 2)
    when the backup or the target is unusable; the target then holds no data.mdb."""
    started = time.monotonic()
    manifest = Manifest.read(backup)
    source = backup / DATA_FILE
    if not source.is_file():
        raise StoreError(f"{backup}: no {DATA_FILE} beside the manifest")
    _same_index(manifest, settings)
    if source.stat().st_size != manifest.size or sha256_of(source) != manifest.sha256:
        raise StoreError(f"{source} does not match the checksum in its manifest: the backup is damaged or was "
                         "altered; nothing was restored")
    data_dir = Path(settings.server.data_dir)
    # serve.lock is no data: a restore that failed, or a server that never got to open the store, leaves it
    created = _claim_empty(data_dir, "restore only into an empty data directory", ignore=datalock.LOCK_FILE)
    placed = False
    try:
        with datalock.exclusive(data_dir, doing="restoring"):
            datalock.refuse_if_open(data_dir)
            work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=data_dir))  # same filesystem: the rename is atomic
            try:
                if copy_hashed(source, work / DATA_FILE) != manifest.sha256:
                    raise StoreError(f"{source} changed while it was copied: its checksum no longer matches")
                datalock.sync_dir(work)
                verify_copy(work, Copied(manifest.txnid, {k.encode(): n for k, n in manifest.counts.items()}))
                want = Facts({k: getattr(manifest, k) for k in _META_KEYS}, manifest.last_change_seq)
                if read_facts(work) != want:
                    raise StoreError(f"{source} does not hold what its manifest says (meta or last change)")
                with datalock.replacing(data_dir, doing="restoring"):
                    os.replace(work / DATA_FILE, data_dir / DATA_FILE)
                    placed = True
                    datalock.sync_dir(data_dir)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            code = run_check(settings)
    except (lmdb.Error, OSError, StoreError) as exc:
        _remove(data_dir, (DATA_FILE, datalock.LMDB_LOCK_FILE) if placed else (), created)
        raise StoreError(f"restore into {data_dir} failed, nothing was restored: {exc}") from exc
    if code != 0:
        _remove(data_dir, (DATA_FILE, datalock.LMDB_LOCK_FILE), created)
        print(f"restore: the restored store fails `resolver check` (problems above): removed again from {data_dir}")
        return 1
    print(f"restore: {backup} -> {data_dir}: {manifest.size} bytes, {manifest.counts.get('records', 0)} customers, "
          f"last change {manifest.last_change_seq} (backup of {manifest.created_at}), "
          f"in {time.monotonic() - started:.1f}s")
    return 0


def read_facts(env_dir: Path) -> Facts:
    """The meta entries (format, hash, key_id) and the last change-log sequence (0: none) of the environment in
    `env_dir`, which no other process uses (opened without LMDB's lock)."""
    env = lmdb.open(str(env_dir), readonly=True, lock=False, max_dbs=MAX_DBS)
    try:
        meta_db = env.open_db(b"meta", create=False)
        changes_db = env.open_db(b"changes", create=False)
        with env.begin() as txn:
            meta = {k: (txn.get(k.encode(), db=meta_db) or b"").decode() for k in _META_KEYS}
            with txn.cursor(db=changes_db) as cur:
                last = _U64.unpack(cur.key())[0] if cur.last() else 0
    except lmdb.NotFoundError:
        raise StoreError(f"{env_dir}: not a resolver store (no meta or change log)") from None
    finally:
        env.close()
    return Facts(meta, last)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashed(source: Path, target: Path) -> str:
    """Copy `source` to the new file `target` (fsynced) and return the SHA-256 of the bytes copied (hex)."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _same_index(manifest: Manifest, settings: Settings) -> None:
    """StoreError when the backup's index keys were made with another hash algorithm or key than the
    configuration's: the restored store would not open."""
    if (manifest.hash, manifest.key_id) != (settings.index.hash, settings.index.key_id):
        raise StoreError(f"the backup's index keys are made with {manifest.hash} (key id {manifest.key_id!r}), the "
                         f"configuration says {settings.index.hash} (key id {settings.index.key_id!r}): restore with "
                         "the blueprint the backup was taken under (`resolver reindex` changes it afterwards)")


def _claim_empty(path: Path, rule: str, *, ignore: str = "") -> bool:
    """Make sure `path` is an empty directory but for a file named `ignore` (created if missing; True when this
    call created it); StoreError naming what it holds otherwise."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is not a directory: {rule}")
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir() if p.name != ignore)
        if held:
            shown = ", ".join(held[:5]) + (", …" if len(held) > 5 else "")
            raise StoreError(f"{path} is not empty (it holds {shown}): {rule}; nothing was written")
        return False
    path.mkdir(parents=True)
    return True


def _remove(path: Path, names: tuple[str, ...], created: bool) -> None:
    """Undo a failed backup or restore: remove the files `names` it wrote into `path`, and `path` itself (with the
    serve.lock a restore made) when this command created it. Only what it wrote: never a file of anyone else's."""
    for name in names:
        (path / name).unlink(missing_ok=True)
    if created:
        (path / datalock.LOCK_FILE).unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:  # something else is in it now: leave it
            pass


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, fsynced, renamed over it, directory fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    datalock.sync_dir(path.parent)


def _iso(us: int) -> str:
    """ISO 8601 in UTC, to the microsecond, of a time in µs since the epoch (integer arithmetic: exact)."""
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000).isoformat(timespec="microseconds")
