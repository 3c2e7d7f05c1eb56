"""`resolver check`: verify, in one read transaction, that the identifier indexes and the records agree.

What is checked:

- every record decodes, is stored under its own uuid, and each of its identifiers is in the index of its
  kind, under its key, with the record's uuid;
- every index entry points to an existing record holding an identifier of that kind with that key;
- no external_id is held by two records;
- every alias leads (through at most a few hops, without a cycle) to an existing record or a deleted
  customer's tombstone; a deleted customer has no record, and every deleted CRM record has its tombstone;
- provenance: every email and phone of a record has a holder (a CRM slot or an Upsert's source), and every
  holding names an identifier the record holds (with the index checks: every index entry has a holder);
- interactions: each stored one has its by-id entry and belongs to a live customer (resolver.history.problems);
- change events are conserved: accepted = applied + dead-lettered + in inbox (resolver.events.counters);
- outbound messages are conserved: committed = delivered + pending + dead + discarded (resolver.outbound.outbox).

How, in bounded memory: one pass over the records looks each expected entry up in its index (a B-tree
lookup, no set of a million keys in RAM) and counts them. An index then has exactly
``entries - expected + missing`` entries that no record explains, so it is scanned entry by entry only when
that number is above zero, and only until they are all found.

Problems are readable lines; identifiers in them are masked (`resolver.normalize.mask`), never raw.
"""

from __future__ import annotations

import time
from typing import Any

from resolver import history
from resolver.bootstrap import open_store
from resolver.config import Settings
from resolver.events import counters
from resolver.normalize import Kind, mask
from resolver.outbound import outbox
from resolver.records import Record, held_key
from resolver.store import INDEX_NAMES, Txn, uuid_text

KINDS = (Kind.EXTERNAL_ID, Kind.EMAIL, Kind.PHONE)
KIND_NAMES = {Kind.EXTERNAL_ID: "external_id", Kind.EMAIL: "email", Kind.PHONE: "phone"}
MAX_ALIAS_HOPS = 64


def run_check(settings: Settings) -> int:
    """Check the store named in `settings` and print a summary and every problem: 0 if consistent, else 1.

    A data directory without a store raises StoreError (the CLI reports it, exit 2); nothing is created.
    """
    started = time.monotonic()
    store = open_store(settings, readonly=True)  # StoreError when there is no store: nothing is created
    try:
        with store.read() as view:
            records = view.count("records")
            aliases = view.count("aliases")
            entries = {kind: view.count(INDEX_NAMES[kind]) for kind in KINDS}
            problems = find_problems(view)
            events = counters.snapshot(view.txn, store)
            sent = outbox.snapshot(view.txn, store)
    finally:
        store.close()
    elapsed = time.monotonic() - started
    print(
        f"check: {store.path}: {records} records, {aliases} aliases; index entries: "
        + ", ".join(f"{KIND_NAMES[k]} {entries[k]}" for k in KINDS)
        + f"; {len(problems)} problem(s) in {elapsed:.1f}s"
    )
    c = events["counters"]
    print(
        f"events: received {c['received']}, rejected unsigned {c['rejected_unsigned']}, throttled {c['throttled']}, "
        f"duplicates {c['duplicates']}, accepted {c['accepted']} = applied {c['applied']} + dead-lettered "
        f"{c['dead_lettered']} + in inbox {events['in_inbox']} (DLQ holds {events['in_dlq']}, "
        f"{c['discarded']} discarded); {c['conflicts']} conflict(s)"
    )
    if not events["conserved"]:
        problems.append(
            f"event counters do not conserve: accepted {c['accepted']} != applied {c['applied']} + dead-lettered "
            f"{c['dead_lettered']} + in inbox {events['in_inbox']}, or dead-lettered != in DLQ {events['in_dlq']} "
            f"+ discarded {c['discarded']}"
        )
    o = sent["counters"]
    if o["committed"] or not sent["conserved"]:
        print(f"outbound: committed {o['committed']} = delivered {o['delivered']} + pending {sent['pending']} + dead "
              f"{sent['dead']} + discarded {o['discarded']}")
    if not sent["conserved"]:
        problems.append("outbound counters do not conserve: committed != delivered + pending + dead + discarded")
    for line in problems:
        print(f"  - {line}")
    if problems:
        print(f"check: FAILED: {len(problems)} problem(s): the indexes and the records disagree")
        return 1
    print("check: OK: indexes, records and aliases agree")
    return 0


def find_problems(view: Txn) -> list[str]:
    """Every inconsistency between records, indexes and aliases in `view`'s snapshot, one readable line each."""
    problems: list[str] = []
    txn = view.txn
    store = view.store
    key = store.hasher.key
    expected = dict.fromkeys(KINDS, 0)
    missing = dict.fromkeys(KINDS, 0)
    # external_ids whose own index entry is missing: their other holders cannot be found through the index
    unindexed_ext: dict[str, list[bytes]] = {}
    shared_ext: dict[str, set[bytes]] = {}
    cursors = {kind: txn.cursor(db=store.ix[kind]) for kind in KINDS}
    try:
        with txn.cursor(db=store.db["records"]) as records:
            for raw_uid, raw in records:
                uid = bytes(raw_uid)
                rec, problem = _decode(uid, raw)
                if rec is None:
                    problems.append(problem)
                    continue
                if problem:
                    problems.append(problem)
                problems += _provenance_problems(uid, rec)
                for kind, value, k in _keyed_identifiers(rec, key):
                    expected[kind] += 1
                    cur = cursors[kind]
                    if not cur.set_key_dup(k, uid):
                        missing[kind] += 1
                        problems.append(
                            f"customer {_uuid_label(uid)}: {KIND_NAMES[kind]} {mask(kind, value)} "
                            f"is not in {INDEX_NAMES[kind]}"
                        )
                        if kind is Kind.EXTERNAL_ID:
                            unindexed_ext.setdefault(value, []).append(uid)
                    elif kind is Kind.EXTERNAL_ID and cur.count() > 1:
                        holders = _holders(view, cur, k, value)
                        if len(holders) > 1:
                            shared_ext.setdefault(value, set()).update(holders)
        for value, uids in unindexed_ext.items():
            holders = set(uids)
            cur = cursors[Kind.EXTERNAL_ID]
            k = key(Kind.EXTERNAL_ID, value)
            if cur.set_key(k):
                holders.update(_holders(view, cur, k, value))
            if len(holders) > 1:
                shared_ext.setdefault(value, set()).update(holders)
        for value, holders in shared_ext.items():
            names = ", ".join(sorted(uuid_text(u) for u in holders))
            problems.append(
                f"external_id {mask(Kind.EXTERNAL_ID, value)} is held by {len(holders)} customers ({names}); "
                "it must be unique"
            )
        for kind in KINDS:
            unexplained = view.count(INDEX_NAMES[kind]) - expected[kind] + missing[kind]
            if unexplained > 0:
                problems += _unexplained_entries(view, kind, unexplained)
    finally:
        for cur in cursors.values():
            cur.close()
    problems += _alias_problems(view)
    problems += _tombstone_problems(view)
    problems += history.problems(view)
    return problems


def _provenance_problems(uid: bytes, rec: Record) -> list[str]:
    """Every email and phone has a holder (a CRM slot or an Upsert's source), and every holding names an
    identifier the record holds (contract §5: an identifier leaves only when its last holder lets it go)."""
    problems = []
    held = {held_key(kind, value) for kind, value in rec.identifiers() if kind is not Kind.EXTERNAL_ID}
    for kind, value in rec.identifiers():
        if kind is not Kind.EXTERNAL_ID and not rec.held.get(held_key(kind, value)):
            problems.append(f"customer {_uuid_label(uid)}: {KIND_NAMES[kind]} {mask(kind, value)} has no holder "
                            "(no CRM slot or Upsert source)")
    for k in rec.held.keys() - held:
        kind = Kind.PHONE if k.startswith("phone:") else Kind.EMAIL
        problems.append(f"customer {_uuid_label(uid)}: a holder is recorded for {KIND_NAMES[kind]} "
                        f"{mask(kind, k.split(':', 1)[1])}, which the customer does not hold")
    return problems


def _tombstone_problems(view: Txn) -> list[str]:
    """A deleted customer has no record; every deleted CRM record leads to a tombstone."""
    problems: list[str] = []
    tombs, by_ext = view.store.db.get("ev_tombs"), view.store.db.get("ev_tomb_ext")
    if tombs is None or by_ext is None:
        return problems  # a store written before deletions existed
    txn = view.txn
    with txn.cursor(db=by_ext) as cur:
        for k, uid in cur:
            if txn.get(bytes(uid), db=tombs) is None:
                problems.append(f"deleted record {bytes(k).hex()[:12]}… -> {_uuid_label(bytes(uid))}: no tombstone")
    with txn.cursor(db=tombs) as cur:
        for uid, raw in cur:
            if b'"customer_uuid"' in raw and txn.get(bytes(uid), db=view.store.db["records"]) is not None:
                problems.append(f"customer {_uuid_label(bytes(uid))} is deleted (tombstone) but still has a record")
    return problems


def _decode(uid: bytes, raw: bytes | memoryview) -> tuple[Record | None, str]:
    """The record (None if unusable) and a problem line ("" when none)."""
    try:
        rec = Record.decode(bytes(raw))  # no copy: the store's read transactions hand out bytes
    except (ValueError, KeyError, TypeError):
        return None, f"record {_uuid_label(uid)}: cannot be decoded"
    if not (
        (rec.external_id is None or isinstance(rec.external_id, str))
        and isinstance(rec.emails, list)
        and isinstance(rec.phones, list)
        and isinstance(rec.merged_external_ids, list)
        and all(isinstance(v, str) for v in rec.emails + rec.phones + rec.merged_external_ids)
    ):
        return None, f"record {_uuid_label(uid)}: identifiers are malformed"
    if not isinstance(rec.uuid, str) or rec.uuid.replace("-", "") != uid.hex():  # cheaper than parsing a UUID
        return rec, f"record {_uuid_label(uid)}: its uuid field says {rec.uuid!r}"
    return rec, ""


def _keyed_identifiers(rec: Record, key: Any) -> list[tuple[Kind, str, bytes]]:
    """(kind, value, index key) for each distinct identifier of the record."""
    ids = rec.identifiers()
    if len(set(ids)) != len(ids):
        ids = list(dict.fromkeys(ids))
    return [(kind, value, key(kind, value)) for kind, value in ids]


def _holders(view: Txn, cur: Any, k: bytes, value: str) -> set[bytes]:
    """Customers under index key `k` (cursor on it) whose record really holds external_id `value`."""
    cur.set_key(k)
    found = set()
    for other in cur.iternext_dup():
        rec = _read(view, bytes(other))
        if rec is not None and rec.holds(Kind.EXTERNAL_ID, value):
            found.add(bytes(other))
    return found


def _read(view: Txn, uid: bytes) -> Record | None:
    raw = view.txn.get(uid, db=view.store.db["records"])
    if raw is None:
        return None
    rec, _ = _decode(uid, raw)
    return rec


def _unexplained_entries(view: Txn, kind: Kind, wanted: int) -> list[str]:
    """Entries of `kind`'s index no record explains; the scan stops once `wanted` of them are found."""
    problems: list[str] = []
    key = view.store.hasher.key
    where = INDEX_NAMES[kind]
    with view.txn.cursor(db=view.store.ix[kind]) as cur:
        for raw_key, raw_uid in cur:
            k, uid = bytes(raw_key), bytes(raw_uid)
            raw = view.txn.get(uid, db=view.store.db["records"])
            rec = _decode(uid, raw)[0] if raw is not None else None
            entry = f"{where}: entry {k.hex()[:12]}… -> customer {_uuid_label(uid)}"
            if raw is None:
                target = view.txn.get(uid, db=view.store.db["aliases"])
                merged = f" (an alias of {_uuid_label(bytes(target))})" if target is not None else ""
                problems.append(f"{entry}: no such record{merged}")
            elif rec is None:
                problems.append(f"{entry}: its record cannot be read")
            elif all(k != kk for kd, _, kk in _keyed_identifiers(rec, key) if kd is kind):
                problems.append(f"{entry}: the customer holds no {KIND_NAMES[kind]} with that key")
            else:
                continue
            if len(problems) >= wanted:
                break
    return problems


def _alias_problems(view: Txn) -> list[str]:
    problems = []
    aliases = view.store.db["aliases"]
    records = view.store.db["records"]
    txn = view.txn
    tombs = view.store.db.get("ev_tombs")

    def tomb(uid: bytes) -> bytes | None:  # the aliases of a deleted customer lead to its tombstone
        return txn.get(uid, db=tombs) if tombs is not None else None

    with txn.cursor(db=aliases) as cur:
        for merged, target in cur:
            merged, uid = bytes(merged), bytes(target)
            seen = {merged}
            hops = 1
            while (nxt := txn.get(uid, db=aliases)) is not None and uid not in seen and hops <= MAX_ALIAS_HOPS:
                seen.add(uid)
                uid = bytes(nxt)
                hops += 1
            head = f"alias {_uuid_label(merged)} -> {_uuid_label(bytes(target))}"
            if txn.get(merged, db=records) is not None:
                problems.append(f"{head}: the merged-away customer still has a record")
            if uid in seen:
                problems.append(f"{head}: the alias chain loops")
            elif hops > MAX_ALIAS_HOPS:
                problems.append(f"{head}: the alias chain is longer than {MAX_ALIAS_HOPS}")
            elif txn.get(uid, db=records) is None and tomb(uid) is None:
                problems.append(f"{head}: leads to {_uuid_label(uid)}, which has no record (and no tombstone)")
    return problems


def _uuid_label(raw: bytes) -> str:
    """The uuid text of a 16-byte key (or its hex when it is not 16 bytes: a damaged key)."""
    return uuid_text(raw) if len(raw) == 16 else f"<bad key {raw.hex()}>"
