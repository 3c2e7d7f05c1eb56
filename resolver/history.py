"""The `interactions` database: each customer's bounded interaction history (resolver.interactions records into it;
resolver.erase forgets a deleted customer's; `resolver check` reads `problems`).

Keys (rev_us = 2**64 - 1 - occurred_us, 8 bytes big-endian, so that key order is newest first; the interaction_id in
UTF-8 keeps equal times apart):

| key                                                   | value                                              |
| ----------------------------------------------------- | -------------------------------------------------- |
| b"C" + customer uuid (16) + rev_us + interaction_id   | the interaction (JSON): a customer's history; the  |
|                                                       | newest `[interactions] history` are kept           |
| b"U" + rev_us + interaction_id                        | an interaction recorded unassociated (nobody       |
|                                                       | matched); the newest UNASSOCIATED_KEPT are kept    |
| b"N"                                                  | how many b"U" entries there are (8, big-endian)    |
| b"I" + interaction_id                                 | the key of its entry above (a retry once the       |
|                                                       | ledger has forgotten it; erasure)                  |

A customer's list is one cursor walk from b"C" + uuid, newest first; keeping it bounded costs a walk of `history`
keys per interaction recorded. b"U" sorts after every other prefix, so the oldest unassociated interaction is the
last key of the database.
"""

from __future__ import annotations

import struct
from typing import Any

from resolver.records import decode_json, encode_json
from resolver.store import Txn, uuid_bytes

UNASSOCIATED_KEPT = 10_000
_HISTORY, _UNASSOCIATED, _UNASSOCIATED_COUNT, _BY_ID = b"C", b"U", b"N", b"I"
_U64 = struct.Struct(">Q")
_REV = 2**64 - 1


def put(txn: Txn, entry: dict[str, Any], keep: int) -> None:
    """Store an interaction (`entry`: its JSON, with interaction_id, customer_uuid ("" when unassociated) and
    occurred_us) and its by-id entry; then drop what falls beyond the bounds: the customer's oldest past `keep`."""
    db = txn.store.db["interactions"]
    id_bytes = entry["interaction_id"].encode("utf-8")
    owner = entry["customer_uuid"]
    prefix = _HISTORY + uuid_bytes(owner) if owner else _UNASSOCIATED
    key = prefix + _U64.pack(_REV - entry["occurred_us"]) + id_bytes
    txn.txn.put(key, encode_json(entry), db=db)
    txn.txn.put(_BY_ID + id_bytes, key, db=db)
    if owner:
        with txn.txn.cursor(db=db) as cur:
            beyond = _keys(cur, prefix)[keep:]
    else:
        raw = txn.txn.get(_UNASSOCIATED_COUNT, db=db)
        count = (_U64.unpack(raw)[0] if raw is not None else 0) + 1
        beyond = []
        if count > UNASSOCIATED_KEPT:
            with txn.txn.cursor(db=db) as cur:
                if cur.last() and cur.key()[:1] == _UNASSOCIATED:
                    beyond = [bytes(cur.key())]
                    count -= 1
        txn.txn.put(_UNASSOCIATED_COUNT, _U64.pack(count), db=db)
    _delete(txn, beyond, len(prefix) + 8)


def by_id(txn: Txn, interaction_id: str) -> dict[str, Any] | None:
    """The stored interaction of that id (None: none, or no longer kept)."""
    db = txn.store.db["interactions"]
    where = txn.txn.get(_BY_ID + interaction_id.encode("utf-8"), db=db)
    raw = txn.txn.get(where, db=db) if where is not None else None
    return decode_json(raw) if raw is not None else None


def newest(view: Txn, uids: list[bytes], n: int) -> list[dict[str, Any]]:
    """The `n` most recent interactions of the customers `uids` together, newest first."""
    db = view.store.db.get("interactions")
    if db is None:  # a read-only open of a store written before interactions existed
        return []
    rows: list[tuple[bytes, bytes]] = []
    with view.txn.cursor(db=db) as cur:
        for uid in uids:
            prefix = _HISTORY + uid
            rows += [(k[len(prefix):], k) for k in _keys(cur, prefix, n)]
    rows.sort()  # by rev_us, then interaction_id: newest first across the customers
    return [decode_json(raw) for _, k in rows[:n] if (raw := view.txn.get(k, db=db)) is not None]


def forget(view: Txn, uid: bytes) -> int:
    """Delete customer `uid`'s interactions (their details are PII) in the caller's write transaction (erasure);
    how many there were."""
    prefix = _HISTORY + uid
    with view.txn.cursor(db=view.store.db["interactions"]) as cur:
        keys = _keys(cur, prefix)
    _delete(view, keys, len(prefix) + 8)
    return len(keys)


def _keys(cur: Any, prefix: bytes, limit: int | None = None) -> list[bytes]:
    """The keys under `prefix`, in key order (newest first), at most `limit`."""
    out: list[bytes] = []
    if cur.set_range(prefix):
        for k in cur.iternext(keys=True, values=False):
            if not k.startswith(prefix) or (limit is not None and len(out) >= limit):
                break
            out.append(bytes(k))
    return out


def _delete(txn: Txn, keys: list[bytes], id_at: int) -> None:
    """Delete interaction entries (the interaction_id starts at `id_at` in each key) and their by-id entries."""
    db = txn.store.db["interactions"]
    for key in keys:
        txn.txn.delete(key, db=db)
        by_id_key = _BY_ID + key[id_at:]
        if txn.txn.get(by_id_key, db=db) == key:
            txn.txn.delete(by_id_key, db=db)


def problems(view: Txn) -> list[str]:
    """What `resolver check` finds wrong here: an entry without its by-id entry (or one pointing elsewhere), a by-id
    entry without its entry, interactions of a customer who no longer exists (erasure forgets them), a count of
    unassociated ones that is off. Readable lines, no interaction content."""
    db = view.store.db.get("interactions")
    if db is None:
        return []
    out: list[str] = []
    entries: set[bytes] = set()
    ids: dict[bytes, bytes] = {}
    unassociated = 0
    counted = 0
    owners: dict[bytes, bool] = {}
    with view.txn.cursor(db=db) as cur:
        for raw_key, value in cur:
            key = bytes(raw_key)
            kind = key[:1]
            if kind == _BY_ID:
                ids[key[1:]] = bytes(value)
            elif kind == _UNASSOCIATED_COUNT:
                counted = _U64.unpack(value)[0]
            elif kind in (_HISTORY, _UNASSOCIATED):
                entries.add(key)
                if kind == _UNASSOCIATED:
                    unassociated += 1
                elif (uid := key[1:17]) not in owners:
                    owners[uid] = view.record(view.survivor(uid)) is not None
            else:
                out.append(f"interactions: an entry of unknown kind {kind!r}")
    out += [f"interactions: customer {uid.hex()} has interactions but no record (not forgotten on erasure)"
            for uid, alive in owners.items() if not alive]
    for key in entries:
        at = 25 if key[:1] == _HISTORY else 9
        if ids.get(key[at:]) != key:
            out.append(f"interactions: entry {key[:at].hex()}… has no by-id entry pointing to it")
    out += [f"interactions: a by-id entry of {len(k)} bytes points to no entry" for k, v in ids.items() if v not in entries]
    if counted != unassociated:
        out.append(f"interactions: {unassociated} unassociated interaction(s), counted {counted}")
    return out
