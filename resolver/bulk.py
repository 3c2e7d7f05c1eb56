"""The bulk path of `resolver import`: most rows of a load are creates nobody's identifiers collide with.

A worker process that prepared a command (resolver.upsert.prepare) also encodes (`plan`) everything `apply`
would write for it *if* it turns out to be a plain create: the record, its index keys, the change-log entry
(all but its sequence number) and the ledger entry, as bytes. The parent then only has to prove the "if"
inside its write transaction: no ledger entry under the row's idempotency key and no index entry under any of
its identifiers' keys, neither stored nor claimed by an earlier row of the batch. Under those conditions
`apply` would find no target, no holder, no potential duplicate and could not fail, so the row needs no
nested transaction and no probe: its pre-encoded puts are queued and written in key order (`Txn.put_many`),
byte for byte what `apply` would have written.

A create whose phones (and only its phones) are held already is still a create: a phone never selects a
customer (contract §4.3). `apply` would write the same record, index entries and change-log entry; only its
answer differs, naming the other holders as potential duplicates. So it is queued too, and its ledger entry
(the answer) is made when the batch is flushed: the holders `apply` would have found are those under its
phones' keys then, minus itself and the rows queued after it (counted out of the fan-out limit too).

Key order also decides HOW the queued puts are written. A batch's records are keyed by uuids that increase in
file order (resolver.uuids.LoadUuids), its `pii_refs` start with those uuids, its `ledger_exp` keys with an
expiry that grows with the clock, the change log with a sequence number: where a batch's sorted keys all sort
after the last key stored, they are appended (LMDB's MDB_APPEND: no search, full pages), else put in key
order. The ledger (idempotency keys) and the index databases (hashes) are put in key order: in a dupsort
database py-lmdb's append is MDB_APPENDDUP, which searches for the key like a put anyway.

Every other row (an external_id or email someone holds, a customer_uuid, an expected_version, a removal, a
key seen before) goes through the one implementation of the rules, `resolver.upsert.apply`, after the queued
puts are written so that it sees every earlier row. A key already in the ledger is answered by
`resolver.ledger.replay` directly (it only reads).

`plan` builds a create's writes directly rather than through `resolver.upsert.planned_create` (a Record, the
general `_updated`, three encodings: the largest cost of a worker); tests/unit/test_import_plan.py proves the
two give the same bytes. What crosses the process boundary is plain tuples of bytes and strings (cheap to
pickle); the command itself travels as one `marshal` blob that is only decoded for the rows that need `apply`.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any, NamedTuple

import orjson

from resolver import ledger
from resolver._hotpath import KeyHasher
from resolver.crypto import Sealer
from resolver.identifiers import Identifiers, Skipped
from resolver.normalize import Kind
from resolver.records import encode_json, held_key, upsert_holder
from resolver.store import INDEX_NAMES, Txn, ledger_exp_key, pii_change_ref, pii_ledger_ref, uuid_bytes, uuid_text
from resolver.upsert import MAX_DUPLICATES_REPORTED, UpsertCommand, UpsertResult

_U64 = struct.Struct(">Q")
_TABLES = ("records", "ix_external", "ix_email", "ix_phone", "ledger", "ledger_exp", "pii_refs")
_APPENDABLE = frozenset(("records", "ledger", "ledger_exp", "pii_refs"))  # plain databases (not dupsort)
_SEQ_AT = b',"source_system":'  # the change-log key that sorts right after "seq"
_EXTERNAL_ID, _EMAIL, _PHONE = int(Kind.EXTERNAL_ID), int(Kind.EMAIL), int(Kind.PHONE)  # plain ints: cheaper keys
_EXTERNALS, _EMAILS, _PHONES = INDEX_NAMES[Kind.EXTERNAL_ID], INDEX_NAMES[Kind.EMAIL], INDEX_NAMES[Kind.PHONE]
_dumps = orjson.dumps  # records.encode_json's encoding (compact, keys sorted), without its two Python calls
_SORTED = orjson.OPT_SORT_KEYS
_EVERY = 1 << 62  # a probe limit no key reaches


class Planned(NamedTuple):
    """Every write of one plain create, encoded: what `BulkWriter.try_create` queues."""

    ledger_key: bytes  # the idempotency key
    # (index database name, key) per identifier, each -> uuid; pairs, as a mapping's items: several per row
    # cross the process boundary, and a named tuple costs several times a plain one to pickle and unpickle
    index_keys: tuple[tuple[str, bytes], ...]
    uuid: bytes
    record: bytes
    change_head: bytes  # the change-log entry up to its sequence number ...
    change_tail: bytes  # ... and after it (the number is only known in the write transaction)
    ledger_entry: bytes  # the answer of a create nobody shares an identifier with (no potential duplicates)
    expiry_key: bytes  # the ledger entry's key in ledger_exp (-> b"")
    phones: tuple[str, ...]  # the normalized phones, by `index_keys`' order among its phone keys


# -- worker side -----------------------------------------------------------------------------------------


def command_blob(cmd: UpsertCommand) -> bytes:
    """The command as one marshal blob (plain values only; `command_from` rebuilds it exactly)."""
    return marshal.dumps((
        cmd.idempotency_key, cmd.fingerprint, cmd.customer_uuid,
        (cmd.add.external_id, cmd.add.emails, cmd.add.phones),
        (cmd.remove.external_id, cmd.remove.emails, cmd.remove.phones),
        cmd.attributes, cmd.source_system, cmd.expected_version,
        tuple((int(s.kind), s.masked, s.reason, s.detail) for s in cmd.skipped),
        cmd.new_uuid, cmd.now_us, cmd.expires_us,
    ))


def command_from(blob: bytes) -> UpsertCommand:
    key, fp, customer_uuid, add, remove, attributes, source, version, skipped, new_uuid, now, expires = marshal.loads(blob)
    return UpsertCommand(
        idempotency_key=key, fingerprint=fp, customer_uuid=customer_uuid,
        add=Identifiers(add[0], add[1], add[2]), remove=Identifiers(remove[0], remove[1], remove[2]),
        attributes=attributes, source_system=source, expected_version=version,
        skipped=tuple(Skipped(Kind(k), m, r, d) for k, m, r, d in skipped),
        new_uuid=new_uuid, now_us=now, expires_us=expires,
    )


def plan(cmd: UpsertCommand, hasher: KeyHasher, sealer: Sealer) -> Planned | None:
    """Everything `apply` would write for `cmd` as a plain create, encoded (None: not a plain create), sensitive
    values sealed as `Txn.put_record` and `Txn.append_change` seal them.

    The create rule of `resolver.upsert._updated(None, cmd)` and `planned_create`, written out: identifiers
    and attributes as given (a None attribute is no value to clear on a new record), every email and phone
    held by the command's source since now, version 1.
    """
    if cmd.customer_uuid is not None or cmd.expected_version or cmd.remove.external_id is not None \
            or cmd.remove.emails or cmd.remove.phones:
        return None
    now, uid_text, ext = cmd.now_us, cmd.new_uuid, cmd.add.external_id
    emails = list(dict.fromkeys(cmd.add.emails))
    phones = list(dict.fromkeys(cmd.add.phones))
    holding = {upsert_holder(cmd.source_system): now}
    held = {held_key(Kind.EMAIL, e): dict(holding) for e in emails}
    held.update((held_key(Kind.PHONE, p), dict(holding)) for p in phones)
    attributes = {name: value for name, value in cmd.attributes.items() if value is not None}
    key = hasher.key
    keys = [(_EXTERNALS, key(_EXTERNAL_ID, ext))] if ext is not None else []
    keys += [(_EMAILS, key(_EMAIL, e)) for e in emails]
    keys += [(_PHONES, key(_PHONE, p)) for p in phones]
    if len(set(keys)) != len(keys):
        return None  # two identifiers of one kind under one key (a hash collision): let apply deal with it
    added = [[_EXTERNAL_ID, ext]] if ext is not None else []
    added += [[_EMAIL, e] for e in emails]
    added += [[_PHONE, p] for p in phones]
    added.sort()
    record = {"uuid": uid_text, "external_id": ext, "emails": emails, "phones": phones,
              "attributes": sealer.sealed(uid_text, attributes), "version": 1, "created_us": now, "updated_us": now,
              "field_us": dict.fromkeys(attributes, now), "merged_external_ids": [], "held": held, "slot_us": {}}
    change = {"at_us": now, "customer_uuid": uid_text, "action": "CREATED", "version": 1,
              "source_system": cmd.source_system, "added": added, "removed": [], "attributes": attributes,
              "attributes_old": dict.fromkeys(attributes)}
    encoded = _dumps(sealer.seal_change(change), option=_SORTED)
    cut = encoded.rindex(_SEQ_AT) + 1  # after "source_system" only "version" (an integer) follows
    response = {"customer_uuid": uid_text, "action": "CREATED", "version": 1,
                "identifiers": {"external_id": ext, "emails": emails, "phones": phones}, "potential_duplicates": [],
                "skipped": [[int(s.kind), s.masked, s.reason, s.detail] for s in cmd.skipped]}
    lkey = cmd.idempotency_key.encode("utf-8")
    entry = ledger.entry(cmd.fingerprint, cmd.expires_us, response)
    return Planned(lkey, tuple(keys), uuid_bytes(uid_text), _dumps(record, option=_SORTED), encoded[:cut], encoded[cut:],
                   _dumps(entry, option=_SORTED), ledger_exp_key(cmd.expires_us, lkey), tuple(phones))


# -- parent side -----------------------------------------------------------------------------------------


class _Shared(NamedTuple):
    """A queued create whose phones others hold: its answer waits for the flush (`BulkWriter._answers`)."""

    position: int  # among the creates queued since the last flush
    planned: Planned


class BulkWriter:
    """Creates of one write transaction, queued until a row needs `apply` or the batch ends.

    `max_fanout`: the blueprint's [matching] max_fanout (a phone held by more customers names none of them as
    a potential duplicate).
    """

    def __init__(self, view: Txn, max_fanout: int) -> None:
        self.view = view
        self.max_fanout = max_fanout
        self._get = view.txn.get
        self._dbs = view.store.db
        self._ledger = view.store.db["ledger"]
        self._queued: dict[str, list[tuple[bytes, bytes]]] = {name: [] for name in _TABLES}
        self._changes: list[tuple[bytes, bytes]] = []
        self._claimed: set[bytes] = set()  # index keys queued in this batch
        self._claimed_keys: set[bytes] = set()  # ledger keys queued in this batch
        self._positions: dict[bytes, int] = {}  # uuid -> position of the creates queued since the last flush
        self._shared: list[_Shared] = []
        self._seq: int | None = None  # the last change-log sequence number (None: read it when needed)

    def try_create(self, planned: Planned) -> bool:
        """Queue the row's writes if it is a create in this transaction (nothing holds its key, its external_id
        or its emails); False: it needs `apply`."""
        lkey, uid = planned.ledger_key, planned.uuid
        claimed, get, dbs = self._claimed, self._get, self._dbs
        if lkey in self._claimed_keys or get(lkey, None, self._ledger) is not None:
            return False
        shared = False
        for name, k in planned.index_keys:
            if k in claimed or get(k, None, dbs[name]) is not None:
                if name != _PHONES:
                    return False
                shared = True
        queued = self._queued
        for name, k in planned.index_keys:
            claimed.add(k)
            queued[name].append((k, uid))
        self._claimed_keys.add(lkey)
        position = len(self._positions)
        self._positions[uid] = position
        queued["records"].append((uid, planned.record))
        if shared:
            self._shared.append(_Shared(position, planned))
        else:
            queued["ledger"].append((lkey, planned.ledger_entry))
        queued["ledger_exp"].append((planned.expiry_key, b""))
        if self._seq is None:
            self._seq = self.view.last_change_seq()
        self._seq += 1
        change = b"%s\"seq\":%d,%s" % (planned.change_head, self._seq, planned.change_tail)
        self._changes.append((_U64.pack(self._seq), change))
        queued["pii_refs"] += [(pii_ledger_ref(uid, lkey), b""), (pii_change_ref(uid, self._seq), b"")]
        return True

    def flush(self) -> None:
        """Write every queued create (each table in key order, appended where its keys allow; the change log
        appended), then the answers of the creates whose phones others hold."""
        if not self._changes:
            return
        view = self.view
        for name, items in self._queued.items():
            if items:
                items.sort()
                view.put_many(name, items, append=name in _APPENDABLE and _after_last(view, name, items[0][0]))
                items.clear()
        view.put_many("changes", self._changes, append=True)
        self._changes = []
        self._claimed.clear()
        self._claimed_keys.clear()
        if self._shared:
            answers = self._answers()
            view.put_many("ledger", answers)
        self._positions.clear()
        self._shared = []

    def _answers(self) -> list[tuple[bytes, bytes]]:
        """The ledger entries of the queued creates whose phones others hold, now that every queued index entry
        is written: what `apply`'s `_potential_duplicates` would have found at each one's turn (its external_id
        and emails were held by nobody else)."""
        view, positions, limit = self.view, self._positions, self.max_fanout
        probe = Txn(view.store, view.txn).probe  # a Txn of its own: its prober's cursors see the puts above
        out = []
        with view.txn.cursor(db=view.store.db[_PHONES]) as cur:
            for position, planned in self._shared:
                me = planned.uuid
                others: set[bytes] = set()
                keys = [k for name, k in planned.index_keys if name == _PHONES]
                for key, phone in zip(keys, planned.phones, strict=True):
                    under = list(cur.iternext_dup()) if cur.set_key(key) else []
                    if sum(1 for u in under if positions.get(u, -1) <= position) > limit:
                        continue  # fanned out at its turn: apply names none of them
                    others.update(h for h in probe(Kind.PHONE, phone, _EVERY).uuids
                                  if h != me and positions.get(h, -1) <= position)
                entry = orjson.loads(planned.ledger_entry)
                entry["response"]["potential_duplicates"] = sorted(uuid_text(u) for u in others)[:MAX_DUPLICATES_REPORTED]
                out.append((planned.ledger_key, encode_json(entry)))
        return out

    def touched(self) -> None:
        """Someone else wrote to the transaction (`apply`): the change log may have grown."""
        self._seq = None

    def replay(self, cmd: UpsertCommand) -> UpsertResult | None:
        """The stored response when the row's key is in the ledger (raises IdempotencyKeyReused), else None."""
        stored: dict[str, Any] | None = ledger.replay(self.view, cmd.idempotency_key, cmd.fingerprint, cmd.now_us)
        return UpsertResult.from_json(stored, replayed=True) if stored is not None else None


def _after_last(view: Txn, name: str, key: bytes) -> bool:
    """Whether `key` sorts after every key of the named database (an empty one too)."""
    with view.txn.cursor(db=view.store.db[name]) as cur:
        return not cur.last() or cur.key() < key
