"""The parent's half of the import's hot path (pure-Python twin of ext/_load_parent.pxi): the queue of plain
creates.

`CreateQueue` holds the plain creates of one write transaction: `take` proves that a packed create
(resolver/_load_consts.py) is still a create here (nothing holds its idempotency key, external_id or emails; its
phones may be held: it is then `shared`) and queues its writes; resolver.bulk.BulkWriter writes them (`drain`). In
an initial load (`fresh`: every database the load writes held no entry when it began), a key nobody in this load
claimed cannot be held by anyone, so `take` asks the store only about keys the load did claim (`KeyFilter`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from resolver._load_consts import CHANGE_REF, LEDGER_REF, SEQ, unpack

__all__ = ["CreateQueue", "Drained", "KeyFilter"]

_PHONE = 3  # resolver.normalize.Kind


class KeyFilter:
    """The ledger and index keys one initial load has claimed (queued or written): a key not in it is held by
    nobody. (The compiled twin keeps a Bloom filter instead: a false "maybe" costs one store lookup.)"""

    def __init__(self, expected: int) -> None:
        self._keys: set[bytes] = set()

    def add(self, key: bytes) -> None:
        self._keys.add(key)

    def maybe(self, key: bytes) -> bool:
        """False: no row of this load claimed `key`. True: one may have."""
        return key in self._keys


class Drained(NamedTuple):
    """What `CreateQueue.drain` hands over: each database's queued (key, value) pairs, in queue order."""

    tables: dict[str, list[tuple[bytes, bytes]]]  # records, ix_*, ledger, ledger_exp, pii_refs: sorted
    changes: list[tuple[bytes, bytes]]
    shared: list[tuple[int, bytes]]  # (position among the creates queued, packed create) of creates whose phones
    # others hold: their ledger entries are written at the flush (resolver.bulk.BulkWriter._answers)
    uuids: list[bytes]  # the creates' uuids, in queue order (a create's position is its index here)


class CreateQueue:
    """Creates of one write transaction, queued (see the module docstring).

    `get(key, default, db)` is the transaction's; `dbs` its handles by database name; `index_names` the index
    database of each Kind; `filter` a KeyFilter when the transaction is an initial load's (else None: every
    key is looked up); `last_seq()` reads the change log's last sequence number.
    """

    def __init__(self, get: Callable[..., Any], dbs: dict[str, Any], index_names: dict[int, str],
                 filter: KeyFilter | None, last_seq: Callable[[], int]) -> None:
        self._get = get
        self._ledger_db = dbs["ledger"]
        self._index_db = {kind: dbs[name] for kind, name in index_names.items()}
        self._names = dict(index_names)
        self._filter = filter
        self._last_seq = last_seq
        self.seq = -1  # the last change-log sequence number (-1: read it when needed)
        self._claimed: set[bytes] = set()  # index keys queued since the last drain
        self._claimed_keys: set[bytes] = set()  # ledger keys queued since the last drain
        self._new()

    def _new(self) -> None:
        self._tables: dict[str, list[tuple[bytes, bytes]]] = {
            name: [] for name in ("records", *self._names.values(), "ledger", "ledger_exp", "pii_refs")}
        self._changes: list[tuple[bytes, bytes]] = []
        self._shared: list[tuple[int, bytes]] = []
        self._uuids: list[bytes] = []

    def __len__(self) -> int:
        """Creates queued since the last drain."""
        return len(self._uuids)

    def _held(self, key: bytes, claimed: set[bytes], db: Any) -> bool:
        """Whether `key` is queued since the last drain or stored in `db`."""
        if self._filter is not None and not self._filter.maybe(key):
            return False
        return key in claimed or self._get(key, None, db) is not None

    def take(self, entry: bytes) -> bool:
        """Queue the writes of the packed create `entry` if it is a create in this transaction: nothing holds
        its key, its external_id or its emails (phones may be held: it is then shared). False: it needs apply."""
        e = unpack(entry)
        lkey, uid = e.ledger_key, e.uuid
        if self._held(lkey, self._claimed_keys, self._ledger_db):
            return False
        shared = False
        for kind, k in e.keys:
            if self._held(k, self._claimed, self._index_db[kind]):
                if kind != _PHONE:
                    return False
                shared = True
        tables, claimed, names = self._tables, self._claimed, self._names
        for kind, k in e.keys:
            self.claim(k)
            claimed.add(k)
            tables[names[kind]].append((k, uid))
        self.claim(lkey)
        self._claimed_keys.add(lkey)
        position = len(self._uuids)
        self._uuids.append(uid)
        tables["records"].append((uid, e.record))
        if shared:
            self._shared.append((position, entry))
        else:
            tables["ledger"].append((lkey, e.ledger_entry))
        tables["ledger_exp"].append((SEQ.pack(e.expires_us) + lkey, b""))
        if self.seq < 0:
            self.seq = self._last_seq()
        self.seq += 1
        packed_seq = SEQ.pack(self.seq)
        self._changes.append((packed_seq, b'%s"seq":%d,%s' % (e.change_head, self.seq, e.change_tail)))
        tables["pii_refs"] += [(uid + LEDGER_REF + lkey, b""), (uid + CHANGE_REF + packed_seq, b"")]
        return True

    def claim(self, key: bytes) -> None:
        """`key` (a ledger or index key) is written by this load: an initial load's filter must know it."""
        if self._filter is not None:
            self._filter.add(key)

    def drain(self) -> Drained:
        """Everything queued since the last drain, each table's pairs in key order (the queue is empty
        afterwards)."""
        for items in self._tables.values():
            items.sort()
        out = Drained(self._tables, self._changes, self._shared, self._uuids)
        self._claimed.clear()
        self._claimed_keys.clear()
        self._new()
        return out
