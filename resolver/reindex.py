"""`resolver reindex --config NEW.toml`: rebuild a store's identifier indexes under NEW's `[index]` hash and key.

Index keys are 16-byte hashes of the normalized identifiers (resolver._keys_py); `meta` names the algorithm and
key id that made them, and a store opened under another is refused (resolver.store). Every record holds its
identifiers (external_id, merged_external_ids, emails, phones) as they were normalized, so the indexes are rebuilt
from the records alone: the OLD secret is never needed, and a lost key costs a reindex under a new one, no data.

What changes, in ONE write transaction (LMDB commits it whole or not at all: an error, a full map or a crash leaves
the old indexes and `meta` as they were):
- `ix_external`, `ix_email`, `ix_phone` are emptied, then every identifier of every record is added through
  `Txn.index_add` with the store's hasher built from NEW: the server's own code path, so the keys are the ones a
  server under NEW computes;
- `ev_tomb_ext` (a deleted CRM record's external_id key -> its tombstoned uuid, resolver.erase) cannot follow: the
  external_id left with the customer, so its key under NEW cannot be computed. When the key changes and it is not
  empty, reindex refuses unless told to drop those entries (`--drop-record-tombstones`): a late CREATE for such a
  record then makes a new customer instead of being refused (RECORD_DELETED); the uuids stay tombstoned;
- `meta` names NEW's hash and key id.
No other database is keyed by an identifier hash: aliases, tombstones, the merge journal, `pii_refs` and the
interactions are keyed by uuid, the ledger by idempotency key, the logs and queues by sequence.

Offline only, like `resolver compact` (resolver.datalock): every server process holds its hasher from start-up, so
swapping keys under it would split the index; `serve.lock` (no server runs) and LMDB's lock, held exclusive (no
process has the store open, none opens it until the rewrite is committed), keep it so.
LMDB frees the pages of the old index without zeroing them: `resolver compact` afterwards drops them from the file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from resolver import datalock
from resolver.compact import DATA_FILE
from resolver.config import Settings
from resolver.errors import StorageFull, StoreError
from resolver.normalize import Kind
from resolver.records import Record
from resolver.store import INDEX_NAMES, Store, Txn, index_meta

DOING = "reindexing"
KINDS = (Kind.EXTERNAL_ID, Kind.EMAIL, Kind.PHONE)
TOMBSTONES_FLAG = "--drop-record-tombstones"


@dataclass(frozen=True, slots=True)
class IndexStamp:
    """How a store's index keys are made: what `meta` records."""

    hash: str
    key_id: str

    def __str__(self) -> str:
        return f"{self.hash} (key id {self.key_id})" if self.key_id else self.hash


@dataclass(frozen=True, slots=True)
class Reindexed:
    """What `rebuild` did."""

    before: IndexStamp
    after: IndexStamp
    records: int
    entries: dict[str, int]  # per index database, after
    tombstones_dropped: int

    @property
    def key_changed(self) -> bool:
        return self.before != self.after


def run_reindex(settings: Settings, *, drop_record_tombstones: bool = False) -> int:
    """Reindex the store named in `settings` under its `[index]` and print a summary and the advice to compact: 0.
    StoreError (the CLI's exit 2) when a process uses the store or a step fails: the store is then unchanged."""
    started = time.monotonic()
    data_dir = Path(settings.server.data_dir)
    if not (data_dir / DATA_FILE).is_file():
        raise StoreError(f"{data_dir}: no resolver data here (data.mdb missing)")
    with datalock.exclusive(data_dir, doing=DOING), datalock.replacing(data_dir, doing=DOING):
        try:
            store = Store(settings, reindexing=True)
            try:
                with store.write() as view:
                    done = rebuild(view, settings, drop_record_tombstones=drop_record_tombstones)
            finally:
                store.close()
        except StorageFull as exc:
            raise StoreError(f"{data_dir}: not reindexed, the store is unchanged: {exc.message} (the old and the new "
                             "index share the map until the commit)") from None
        except (lmdb.Error, StoreError) as exc:
            raise StoreError(f"{data_dir}: not reindexed, the store is unchanged: {exc}") from exc
    print(f"reindex: {data_dir}: {done.before} -> {done.after}: {done.records} records; index entries: "
          + ", ".join(f"{INDEX_NAMES[k]} {done.entries[INDEX_NAMES[k]]}" for k in KINDS)
          + f"; {done.tombstones_dropped} deleted-record tombstone(s) dropped, in {time.monotonic() - started:.1f}s")
    if done.key_changed:
        print(f"reindex: next, before any server starts, run `resolver compact` on {data_dir}: LMDB freed the pages "
              "that held the old index keys without zeroing them")
    return 0


def stored_stamp(view: Txn, settings: Settings) -> IndexStamp:
    """The hash and key id `meta` records (resolver.store.index_meta names the entries, hash first)."""
    hash_, key_id = ((view.txn.get(k, db=view.store.db["meta"]) or b"").decode() for k in index_meta(settings))
    return IndexStamp(hash_, key_id)


def rebuild(view: Txn, settings: Settings, *, drop_record_tombstones: bool) -> Reindexed:
    """Inside the write transaction `view` of a store opened for reindexing under `settings`: rebuild the three
    indexes from the records, drop what cannot follow (above), record the new hash and key id in `meta`.
    StoreError, before any write, when `ev_tomb_ext` would be dropped without `drop_record_tombstones`."""
    txn, store = view.txn, view.store
    before = stored_stamp(view, settings)
    after = IndexStamp(settings.index.hash, settings.index.key_id)
    tombs = store.db["ev_tomb_ext"]
    dropped = int(txn.stat(tombs)["entries"]) if before != after else 0
    if dropped and not drop_record_tombstones:
        raise StoreError(
            f"{dropped} deleted CRM record(s) are remembered by the index key of their external_id (ev_tomb_ext), "
            f"which cannot be computed under {after}: the external_id was erased with the customer. Reindexing "
            "forgets them (a late CREATE for such a record then makes a new customer instead of being refused as "
            f"RECORD_DELETED; the deleted uuids stay tombstoned): run again with {TOMBSTONES_FLAG} to accept that"
        )
    if dropped:
        txn.drop(tombs, delete=False)
    for kind in KINDS:
        txn.drop(store.ix[kind], delete=False)
    records = 0
    with txn.cursor(db=store.db["records"]) as cur:
        for raw_uid, raw in cur:
            uid = bytes(raw_uid)
            try:
                identifiers = Record.decode(raw).identifiers()
                if not all(isinstance(value, str) for _, value in identifiers):
                    raise TypeError("an identifier is not text")
            except (ValueError, KeyError, TypeError, AttributeError):
                raise StoreError(f"record {uid.hex()} cannot be decoded (`resolver check` says more)") from None
            for kind, value in identifiers:
                view.index_add(kind, value, uid)
            records += 1
    for k, v in index_meta(settings).items():
        txn.put(k, v, db=store.db["meta"])
    entries = {INDEX_NAMES[kind]: view.count(INDEX_NAMES[kind]) for kind in KINDS}
    return Reindexed(before, after, records, entries, dropped)
