"""Storage: one LMDB environment in the data directory, its named databases, and transactions.

Named databases (all keys fixed-width where it matters, so LMDB compares bytes cheaply):

| name        | key                               | value                          |
| ----------- | --------------------------------- | ------------------------------ |
| meta        | text                              | format, index hash, key id     |
| records     | uuid (16 bytes)                   | Record JSON                    |
| ix_external | index key (16) — unique by rule   | uuid (16), dupsort/dupfixed    |
| ix_email    | index key (16)                    | uuid (16), dupsort/dupfixed    |
| ix_phone    | index key (16)                    | uuid (16), dupsort/dupfixed    |
| aliases     | merged-away uuid (16)             | survivor uuid (16)             |
| ledger      | idempotency key (UTF-8)           | {fp, exp_us, response} JSON    |
| ledger_exp  | exp_us (8, big-endian) + key      | empty: the sweeper's order     |
| changes     | sequence (8, big-endian)          | change JSON                    |
| ev_inbox    | sequence (8, big-endian)          | event envelope (resolver.events.envelope) |
| ev_dlq      | dead-letter id (8, big-endian)    | event envelope + reason        |
| ev_ids      | source + NUL + webhook-id         | first outcome JSON (dedupe)    |
| ev_ids_exp  | accepted µs (8, big-endian) + key | empty: the dedupe sweep's order |
| ev_fields   | uuid (16) + attribute name        | event time of the value (8, big-endian µs) |
| ev_tombs    | uuid (16)                         | tombstone JSON, no PII (DELETE events) |
| ev_tomb_ext | external_id index key (16)        | uuid (16) of the deleted customer |
| ev_counters | counter name                      | count (8, big-endian)          |
| merges      | survivor uuid (16) + sequence (8) | merge journal entry JSON (the records before) |
| pii_refs    | uuid (16) + b"C" + sequence (8), or uuid (16) + b"L" + ledger key | empty: where a customer's PII is copied |
| interactions | see resolver.history            | interaction records, per customer and by id |
| ob_queue    | see resolver.outbound             | outbound messages waiting for delivery |
| ob_dlq      | see resolver.outbound             | outbound messages that could not be delivered |
| ob_state    | see resolver.outbound             | outbound counters and delivery state |
| audit       | sequence (8, big-endian)          | erasure audit entry JSON, no PII (resolver.audit) |

Every `Txn.append_change` calls the store's `change_listeners` (each `listener(txn, seq, change)`) in the same
transaction: that is how the transactional outbox (resolver.outbound) learns of every committed change.

A transaction's merge journal (resolver.journal) and `pii_refs` reading side (resolver.pii_refs) live in modules of
their own; `Txn` inherits them. What an LMDB error of a write transaction means to its caller (a full map or disk:
StorageFull) is decided in resolver.storage_errors.

Sensitive attributes (blueprint `sensitive = true`) are encrypted at rest (resolver.crypto): `Txn.put_record`,
`append_change` and `journal_put` seal them, each under its customer's uuid; `Txn.record` opens them for the use
cases; `stored_record`, `journal`, `change` and the raw databases hand them out sealed. The events inbox and
dead-letter queue seal whole bodies (resolver.events.envelope).

`pii_refs` lets a deletion find every change-log entry and ledger response that copies a customer's
identifiers or attributes (`Txn.append_change` and `Txn.ledger_put` write it; resolver.pii_refs), without scanning
the log.

Index keys are hashes (resolver._hotpath.KeyHasher); every hit is confirmed against the identifiers
stored in the candidate record, so a hash collision can never return a wrong customer.

Contract: open the environment once per process, after any fork; one short read transaction per request;
one write transaction per mutating request, synced to disk before it returns.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import Any

import lmdb

from resolver import metrics, storage_errors
from resolver._hotpath import KeyHasher, Prober
from resolver._probe_types import Probed
from resolver.config import Settings
from resolver.crypto import Sealer
from resolver.errors import StoreError
from resolver.journal import MergeJournal
from resolver.normalize import Kind
from resolver.pii_refs import PiiRefs, pii_change_ref, pii_ledger_ref, pii_owners
from resolver.records import Record, decode_json, encode_json

FORMAT_VERSION = 1
_U64 = struct.Struct(">Q")
_INDEX_DBS = {Kind.EXTERNAL_ID: b"ix_external", Kind.EMAIL: b"ix_email", Kind.PHONE: b"ix_phone"}
INDEX_NAMES = {kind: name.decode() for kind, name in _INDEX_DBS.items()}  # also keys of Store.db
_PLAIN_DBS = (b"meta", b"records", b"aliases", b"ledger", b"ledger_exp", b"changes")
# CRM change events (resolver.events); a read-only open of an older store simply lacks them.
EVENT_DBS = (b"ev_inbox", b"ev_dlq", b"ev_ids", b"ev_ids_exp", b"ev_fields", b"ev_tombs", b"ev_tomb_ext",
             b"ev_counters", b"merges", b"pii_refs", b"interactions", b"ob_queue", b"ob_dlq", b"ob_state",
             b"audit")


def uuid_bytes(text: str) -> bytes:
    """The 16-byte key of a customer uuid in canonical text form (ValueError if malformed)."""
    if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":
        raw = bytes.fromhex(text.replace("-", ""))  # ValueError on anything but hex digits
        if len(raw) == 16:  # (fromhex skips whitespace: a short result is no uuid)
            return raw
    return uuidlib.UUID(text).bytes  # other spellings uuid accepts, or its error


def uuid_text(raw: bytes | bytearray) -> str:
    """The canonical text form of a 16-byte uuid (what uuid.UUID prints, without building one)."""
    h = bytes(raw).hex()
    if len(h) != 32:
        raise ValueError("a uuid is 16 bytes")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def ledger_exp_key(expires_us: int, key: bytes) -> bytes:
    """The `ledger_exp` key of a ledger entry: its expiry first, so the sweeper walks them in time order."""
    return _U64.pack(expires_us) + key


def index_meta(settings: Settings) -> dict[bytes, bytes]:
    """The `meta` entries naming how the store's index keys are made: hash algorithm and key id."""
    return {b"hash": settings.index.hash.encode(), b"key_id": settings.index.key_id.encode()}


@contextmanager
def _no_txn() -> Iterator[None]:
    yield None


class Store:
    """The LMDB environment of one data directory. Thread-safe; not fork-safe (open after forking)."""

    def __init__(self, settings: Settings, *, readonly: bool = False, reindexing: bool = False,
                 durable: bool = True) -> None:
        # reindexing (resolver.reindex only): the caller holds LMDB's lock exclusive (resolver.datalock.replacing),
        # so the environment opens without it, and the stored index hash and key id may differ from the settings'.
        # durable=False (an initial load's staging copy only, resolver.importer.staged): commits are not synced;
        # the copy is synced once, whole, before it replaces a store, and thrown away if anything stops first
        path = Path(settings.server.data_dir)
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        elif not (path / "data.mdb").exists():
            raise StoreError(f"{path}: no resolver data here (data.mdb missing)")
        self.path = path
        self.env = lmdb.open(
            str(path),
            map_size=settings.storage.map_size_mb * 1024 * 1024,
            max_dbs=len(_PLAIN_DBS) + len(EVENT_DBS) + len(_INDEX_DBS) + 4,
            max_readers=settings.storage.max_readers,
            max_spare_txns=64,
            readonly=readonly,
            sync=durable,
            metasync=durable,
            lock=not reindexing,
        )
        # A process killed mid-read leaves its reader slot behind; free them before serving.
        self.env.reader_check()
        # Database handles opened inside a read-only transaction die with it: read-only opens without one.
        with self.env.begin(write=True) if not readonly else _no_txn() as txn:
            self.db = {name.decode(): self.env.open_db(name, txn=txn, create=not readonly) for name in _PLAIN_DBS}
            self.ix = {
                kind: self.env.open_db(name, txn=txn, dupsort=True, dupfixed=True, create=not readonly)
                for kind, name in _INDEX_DBS.items()
            }
            for name in EVENT_DBS:
                try:
                    self.db[name.decode()] = self.env.open_db(name, txn=txn, create=not readonly)
                except lmdb.NotFoundError:
                    pass  # read-only open of a store written before events existed
        self.db.update({INDEX_NAMES[kind]: db for kind, db in self.ix.items()})
        # by kind number - 1 (a tuple: Kind is an Enum, and hashing one runs Python code)
        self.index_dbs = (self.ix[Kind.EXTERNAL_ID], self.ix[Kind.EMAIL], self.ix[Kind.PHONE])
        with self.env.begin(write=not readonly) as txn:
            self._check_meta(txn, settings, readonly, reindexing)
        self.hasher = KeyHasher(settings.index.hash, settings.index.secret)
        # sensitive attributes: sealed where records, change-log and journal entries are encoded (resolver.crypto)
        self.sealer = Sealer.from_settings(settings)
        # called by append_change with (txn, seq, change), in the change's own transaction (the outbox)
        self.change_listeners: list[Callable[[Txn, int, dict[str, Any]], None]] = []
        self.records_db = self.db["records"]

    def _check_meta(self, txn: lmdb.Transaction[bytes], settings: Settings, readonly: bool,
                    reindexing: bool = False) -> None:
        """Refuse a store written in another format or hashed with another algorithm or key (`reindexing`: the
        format only)."""
        meta = self.db["meta"]
        want = {b"format": str(FORMAT_VERSION).encode(), **index_meta(settings)}
        have = {k: txn.get(k, db=meta) for k in want}
        if all(v is None for v in have.values()):
            if txn.stat(self.db["records"])["entries"]:
                raise StoreError(f"{self.path}: records without metadata; not a resolver store")
            if not readonly:
                for k, v in want.items():
                    txn.put(k, v, db=meta)
            return
        problems = [
            f"{k.decode()} is {'(unset)' if (got := have[k]) is None else got.decode()}, configuration says {v.decode()}"
            for k, v in want.items()
            if have[k] != v and not (reindexing and k != b"format")
        ]
        if problems:
            raise StoreError(
                f"{self.path}: the store does not match the configuration: {'; '.join(problems)}. "
                "Index keys depend on the hash algorithm and key: `resolver reindex --config NEW.toml` rebuilds them "
                "for another one."
            )

    def read(self) -> Txn:
        """One read transaction (use as `with store.read() as txn`): a consistent snapshot that sees every
        commit made before it began."""
        return Txn(self, self.env.begin(buffers=False))

    def write(self) -> Txn:
        """One write transaction (`with store.write() as txn`): committed, and synced, when the block ends
        normally; aborted on any error. The commit's duration goes to resolver.metrics. A full map or disk, at a
        put or at the commit, raises StorageFull (resolver.storage_errors): nothing of the transaction is stored."""
        return _WriteTxn(self, self.env.begin(write=True))

    def nested(self, parent: Txn) -> Txn:
        """A write transaction inside `parent` (`with store.nested(parent) as txn`): merged into the parent when
        the block ends normally, rolled back alone on any error (the parent goes on); a full map raises
        StorageFull, as in `write`. It seals with `parent`'s sealer: a nested transaction is part of its parent's
        command."""
        nested = _NestedTxn(self, self.env.begin(write=True, parent=parent.txn))
        nested.sealer = parent.sealer
        return nested

    def close(self) -> None:
        self.env.close()


class Txn(MergeJournal, PiiRefs):
    """One LMDB transaction (`txn`, buffers=False: every value is bytes) with typed access to the databases.
    Cheap to create; never outlives its transaction. (Not "view": a view is a blueprint's attribute projection.)

    As a context manager it owns the transaction: commit on a normal exit, abort on an exception (a plain
    class, not contextlib: this sits on the Resolve path).

    `sealer` seals what the transaction writes (resolver.crypto): the store's, or, set by the cluster applier
    around one replicated command, that command's (`Sealer.for_command`: nonces derived, the same on every node).
    """

    __slots__ = ("store", "txn", "sealer", "_records", "_prober")
    store: Store  # the whole store (the inherited parts name only what they use of it)

    def __init__(self, store: Store, txn: lmdb.Transaction[bytes]) -> None:
        self.store = store
        self.txn = txn
        self.sealer = store.sealer
        self._records: dict[bytes, Record | None] = {}
        self._prober: Prober | None = None

    def __enter__(self) -> Txn:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.txn.commit()
        else:
            self.txn.abort()

    # -- records -------------------------------------------------------------------------------------------
    def record(self, uid: bytes) -> Record | None:
        """The record stored under a 16-byte uuid, decoded once per transaction."""
        try:
            return self._records[uid]
        except KeyError:
            raw = self.txn.get(uid, db=self.store.db["records"])
            rec = self.store.sealer.decode_record(raw) if raw is not None else None
            self._records[uid] = rec
            return rec

    def stored_record(self, uid: bytes) -> Record | None:
        """The record under `uid` as stored: sensitive values still sealed (resolver.crypto.Sealer.reveal opens
        them for a reader allowed to see them). Not cached, not for writing back."""
        raw = self.txn.get(uid, db=self.store.db["records"])
        return Record.decode(raw) if raw is not None else None

    def put_record(self, rec: Record) -> None:
        uid = uuid_bytes(rec.uuid)
        self.txn.put(uid, self.sealer.encode_record(rec), db=self.store.db["records"])
        self._records[uid] = rec

    def delete_record(self, uid: bytes) -> None:
        self.txn.delete(uid, db=self.store.db["records"])
        self._records[uid] = None

    def survivor(self, uid: bytes) -> bytes:
        """Follow merge aliases to the surviving customer's uuid (the uuid itself when not merged)."""
        seen = 0
        while (target := self.txn.get(uid, db=self.store.db["aliases"])) is not None:
            uid = target
            seen += 1
            if seen > 64:
                raise StoreError("alias chain longer than 64: the aliases database is damaged")
        return uid

    def put_alias(self, merged: bytes, survivor: bytes) -> None:
        self.txn.put(merged, survivor, db=self.store.db["aliases"])

    def delete_alias(self, merged: bytes) -> None:
        self.txn.delete(merged, db=self.store.db["aliases"])

    def iter_records(self) -> Iterator[Record]:
        with self.txn.cursor(db=self.store.db["records"]) as cur:
            for _, raw in cur:
                yield self.store.sealer.decode_record(raw)

    def count(self, name: str) -> int:
        """Entries in a named database (``records``, ``ledger``, ``ix_phone``, ...)."""
        return int(self.txn.stat(self.store.db[name])["entries"])

    # -- identifier indexes --------------------------------------------------------------------------------
    def key(self, kind: Kind, value: str) -> bytes:
        return self.store.hasher.key(kind, value)

    @property
    def prober(self) -> Prober:
        """The probe loop (resolver._probe_py) bound to this transaction; made on first use."""
        if self._prober is None:
            store = self.store
            self._prober = Prober(self.txn, store.index_dbs, store.records_db, store.hasher.key)
        return self._prober

    def probe(self, kind: Kind, value: str, limit: int) -> Probed:
        """Customers holding `value`.

        When more than `limit` entries share the key, no record is read and `uuids` is empty: the caller
        treats the identifier as fanned-out.
        """
        return self.prober.probe(kind, value, limit)

    def index_add(self, kind: Kind, value: str, uid: bytes) -> None:
        self.txn.put(self.key(kind, value), uid, db=self.store.ix[kind], dupdata=False)

    def index_remove(self, kind: Kind, value: str, uid: bytes) -> None:
        self.txn.delete(self.key(kind, value), uid, db=self.store.ix[kind])

    def iter_index(self, kind: Kind) -> Iterator[tuple[bytes, bytes]]:
        with self.txn.cursor(db=self.store.ix[kind]) as cur:
            yield from cur.iternext(keys=True, values=True)

    # -- idempotency ledger ----------------------------------------------------------------------------------
    def ledger_get(self, key: str) -> dict[str, Any] | None:
        raw = self.txn.get(key.encode("utf-8"), db=self.store.db["ledger"])
        return decode_json(raw) if raw is not None else None

    def ledger_put(self, key: str, entry: dict[str, Any]) -> None:
        k = key.encode("utf-8")
        old = self.txn.get(k, db=self.store.db["ledger"])
        if old is not None:
            self.txn.delete(ledger_exp_key(decode_json(old)["exp_us"], k), db=self.store.db["ledger_exp"])
        self.txn.put(k, encode_json(entry), db=self.store.db["ledger"])
        self.txn.put(ledger_exp_key(entry["exp_us"], k), b"", db=self.store.db["ledger_exp"])
        for owner in pii_owners(entry["response"]):
            self.txn.put(pii_ledger_ref(uuid_bytes(owner), k), b"", db=self.store.db["pii_refs"])

    def ledger_replace(self, key: str, entry: dict[str, Any]) -> None:
        """Overwrite an entry in place, same expiry (erasure redacts a response)."""
        self.txn.put(key.encode("utf-8"), encode_json(entry), db=self.store.db["ledger"])

    def ledger_sweep(self, now_us: int, limit: int) -> int:
        """Delete up to `limit` ledger entries that expired before `now_us`; the number deleted."""
        deleted = 0
        with self.txn.cursor(db=self.store.db["ledger_exp"]) as cur:
            if not cur.first():
                return 0
            while deleted < limit:
                k = cur.key()
                if not k or _U64.unpack_from(k)[0] >= now_us:
                    break
                raw = self.txn.pop(k[8:], db=self.store.db["ledger"])
                for owner in pii_owners(decode_json(raw)["response"]) if raw is not None else ():
                    self.txn.delete(pii_ledger_ref(uuid_bytes(owner), k[8:]), db=self.store.db["pii_refs"])
                deleted += 1
                if not cur.delete():  # moves to the next entry
                    break
        return deleted

    # -- change log ------------------------------------------------------------------------------------------
    def append_change(self, change: dict[str, Any], *, pii: bool = True) -> int:
        """Append a change with the next sequence number (1, 2, ...) and return that number. `pii`: the entry
        copies identifiers or attributes of its customer (and of those in `pii_of`): erasure redacts it.
        Sensitive attribute values are sealed (resolver.crypto): as stored, so are they passed to the listeners."""
        change = self.sealer.seal_change(change)
        with self.txn.cursor(db=self.store.db["changes"]) as cur:
            seq = _U64.unpack(cur.key())[0] + 1 if cur.last() else 1
        packed = _U64.pack(seq)
        self.txn.put(packed, encode_json({"seq": seq, **change}), db=self.store.db["changes"], append=True)
        refs = self.store.db["pii_refs"]
        for owner in (change["customer_uuid"], *change.get("pii_of", ())) if pii else ():
            if owner:  # an interaction recorded unassociated has no customer
                self.txn.put(pii_change_ref(uuid_bytes(owner), seq), b"", db=refs)
        if self.store.change_listeners:
            stored = {"seq": seq, **change}
            for listener in self.store.change_listeners:
                listener(self, seq, stored)
        return seq

    def replace_change(self, seq: int, change: dict[str, Any]) -> None:
        """Overwrite the change-log entry `seq` (erasure redacts entries in place; the sequence stays)."""
        self.txn.put(_U64.pack(seq), encode_json(self.sealer.seal_change({**change, "seq": seq})),
                     db=self.store.db["changes"])

    def change(self, seq: int) -> dict[str, Any] | None:
        raw = self.txn.get(_U64.pack(seq), db=self.store.db["changes"])
        return decode_json(raw) if raw is not None else None

    def drop_event_times(self, uid: bytes) -> None:
        """Forget the per-attribute event times of customer `uid` (`ev_fields`; erasure)."""
        with self.txn.cursor(db=self.store.db["ev_fields"]) as cur:
            if cur.set_range(uid):
                while cur.key()[:16] == uid:
                    if not cur.delete():
                        break

    def iter_changes(self, after: int = 0) -> Iterator[dict[str, Any]]:
        with self.txn.cursor(db=self.store.db["changes"]) as cur:
            if cur.set_range(_U64.pack(after + 1)):
                for _, raw in cur:
                    yield decode_json(raw)

    # -- bulk import --
    def has(self, name: str, key: bytes) -> bool:
        """Whether `key` is in the named database (``ledger``, ``ix_phone``, ...): one B-tree lookup, no decode."""
        return self.txn.get(key, db=self.store.db[name]) is not None

    def last_change_seq(self) -> int:
        """The sequence number of the newest change-log entry (0: the log is empty)."""
        with self.txn.cursor(db=self.store.db["changes"]) as cur:
            return _U64.unpack(cur.key())[0] if cur.last() else 0

    def put_many(self, name: str, items: list[tuple[bytes, bytes]], *, append: bool = False) -> None:
        """Put pre-encoded (key, value) pairs into the named database in key order (one C loop; neighbouring
        keys share B-tree pages). `append`: the keys are already sorted and all above the last one stored
        (StoreError if one is not: LMDB would skip it silently)."""
        if not append:
            items.sort()
        with self.txn.cursor(db=self.store.db[name]) as cur:
            _, added = cur.putmulti(items, dupdata=True, overwrite=True, append=append)
        if append and added != len(items):
            raise StoreError(f"{name}: {len(items) - added} of {len(items)} appended keys were not above the last "
                             "one stored")


class _WriteTxn(Txn):
    """`Store.write`'s transaction: as Txn, with the commit (and its sync) timed for resolver.metrics, and a full
    map or disk raised as StorageFull (resolver.storage_errors)."""

    __slots__ = ()

    def __exit__(self, exc_type: type[BaseException] | None, *args: object) -> None:
        if exc_type is None:
            started = perf_counter()
            storage_errors.commit(self.store.env, self.txn, durable=True)
            metrics.committed(perf_counter() - started)
        else:
            storage_errors.abort(self.store.env, self.txn, args[0] if args else None)


class _NestedTxn(Txn):
    """`Store.nested`'s transaction: merged into its parent on a normal exit (no disk write: the parent's commit
    makes it durable), rolled back alone on an error, a full map raised as StorageFull (resolver.storage_errors)."""

    __slots__ = ()

    def __exit__(self, exc_type: type[BaseException] | None, *args: object) -> None:
        if exc_type is None:
            storage_errors.commit(self.store.env, self.txn, durable=False)
        else:
            storage_errors.abort(self.store.env, self.txn, args[0] if args else None)
