"""The bulk path of `resolver import`: most rows of a load are creates nobody's identifiers collide with.

A worker process that prepared a command (resolver.upsert.prepare) also encodes (`plan`) everything `apply`
would write for it *if* it turns out to be a plain create: the record, its index keys, the change-log entry
(all but its sequence number) and the ledger entry, as bytes, packed into one bytes object (`packed`; the layout
is resolver/_load_consts.py). Most JSON lines never get that far in Python: the fast path (resolver._load_py,
compiled as ext/_load_c.pyx) packs the same bytes from the line directly. The parent then only has to prove the
"if" inside its write transaction (`CreateQueue.take`, compiled too): no ledger entry under the row's idempotency
key and no index entry under any of its identifiers' keys, neither stored nor claimed by an earlier row of the
batch. Under those conditions `apply` would find no target, no holder, no potential duplicate and could not fail,
so the row needs no nested transaction and no probe: its pre-encoded puts are queued and written in key order
(`Txn.put_many`), byte for byte what `apply` would have written.

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
general `_updated`, three encodings); tests/unit/test_import_plan.py proves the two give the same bytes, and
tests/unit/test_import_fast.py that the fast path gives them too. What crosses the process boundary is one bytes
object per create (cheap to pickle); a general-path row's command travels beside it as one `marshal` blob that
is only decoded for the rows that need `apply`, a fast-path row's is rebuilt from its line when it does.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any, NamedTuple

import orjson

from resolver import ledger
from resolver._hotpath import CreateQueue, KeyFilter, KeyHasher
from resolver._load_py import Entry, pack, unpack
from resolver.crypto import Sealer
from resolver.identifiers import Identifiers, Skipped
from resolver.normalize import Kind
from resolver.records import encode_json, held_key, upsert_holder
from resolver.store import INDEX_NAMES, Txn, ledger_exp_key, uuid_bytes, uuid_text
from resolver.upsert import MAX_DUPLICATES_REPORTED, UpsertCommand, UpsertResult

_U64 = struct.Struct(">Q")
_APPENDABLE = frozenset(("records", "ledger", "ledger_exp", "pii_refs"))  # plain databases (not dupsort)
_SEQ_AT = b',"source_system":'  # the change-log key that sorts right after "seq"
_EXTERNAL_ID, _EMAIL, _PHONE = int(Kind.EXTERNAL_ID), int(Kind.EMAIL), int(Kind.PHONE)  # plain ints: cheaper keys
_EXTERNALS, _EMAILS, _PHONES = INDEX_NAMES[Kind.EXTERNAL_ID], INDEX_NAMES[Kind.EMAIL], INDEX_NAMES[Kind.PHONE]
_INDEX_OF_KIND = {int(kind): name for kind, name in INDEX_NAMES.items()}
_KIND_OF_INDEX = {name: int(kind) for kind, name in INDEX_NAMES.items()}
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


def packed(planned: Planned, cmd: UpsertCommand, line: int, derived: bool) -> bytes:
    """`planned` as a packed create (resolver/_load_consts.py) of the row on `line`; its command travels beside
    it (resolver.importer.rows.Prepared.blob), so it carries no line to rebuild it from."""
    keys = [(_KIND_OF_INDEX[name], key) for name, key in planned.index_keys]
    return pack(line, derived, cmd.now_us, cmd.expires_us, planned.uuid, keys, planned.ledger_key, planned.record,
                planned.change_head, planned.change_tail, planned.ledger_entry, b"")


# -- parent side -----------------------------------------------------------------------------------------


class BulkWriter:
    """Creates of one write transaction, queued until a row needs `apply` or the batch ends.

    `max_fanout`: the blueprint's [matching] max_fanout (a phone held by more customers names none of them as
    a potential duplicate). `filter`: an initial load's (resolver._load_py.KeyFilter): the keys it has claimed,
    shared by every BulkWriter of the load; None: every key is looked up in the store.
    """

    def __init__(self, view: Txn, max_fanout: int, filter: KeyFilter | None = None) -> None:
        self.view = view
        self.max_fanout = max_fanout
        self._queue = CreateQueue(view.txn.get, view.store.db, _INDEX_OF_KIND, filter, view.last_change_seq)

    def try_create(self, entry: bytes) -> bool:
        """Queue the writes of a packed create if it is a create in this transaction (nothing holds its key, its
        external_id or its emails); False: it needs `apply`."""
        return bool(self._queue.take(entry))

    def flush(self) -> None:
        """Write every queued create (each table in key order, appended where its keys allow; the change log
        appended), then the answers of the creates whose phones others hold."""
        if not len(self._queue):
            return
        drained = self._queue.drain()
        view = self.view
        for name, items in drained.tables.items():  # (sorted by the queue)
            if items:
                view.put_many(name, items, append=name in _APPENDABLE and _after_last(view, name, items[0][0]))
        view.put_many("changes", drained.changes, append=True)
        if drained.shared:
            positions = {uid: position for position, uid in enumerate(drained.uuids)}
            view.put_many("ledger", self._answers([(position, unpack(entry)) for position, entry in drained.shared],
                                                  positions))

    def _answers(self, shared: list[tuple[int, Entry]], positions: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
        """The ledger entries of the queued creates whose phones others hold, now that every queued index entry
        is written: what `apply`'s `_potential_duplicates` would have found at each one's turn (its external_id
        and emails were held by nobody else)."""
        view, limit = self.view, self.max_fanout
        probe = Txn(view.store, view.txn).probe  # a Txn of its own: its prober's cursors see the puts above
        out = []
        with view.txn.cursor(db=view.store.db[_PHONES]) as cur:
            for position, entry in shared:
                me = entry.uuid
                others: set[bytes] = set()
                keys = [k for kind, k in entry.keys if kind == _PHONE]
                for key, phone in zip(keys, orjson.loads(entry.record)["phones"], strict=True):
                    under = list(cur.iternext_dup()) if cur.set_key(key) else []
                    if sum(1 for u in under if positions.get(u, -1) <= position) > limit:
                        continue  # fanned out at its turn: apply names none of them
                    others.update(h for h in probe(Kind.PHONE, phone, _EVERY).uuids
                                  if h != me and positions.get(h, -1) <= position)
                named = sorted(uuid_text(u) for u in others)[:MAX_DUPLICATES_REPORTED]
                out.append((entry.ledger_key, _with_duplicates(entry.ledger_entry, named)))
        return out

    def applied(self, cmd: UpsertCommand, result: UpsertResult) -> None:
        """`apply` wrote `cmd` in the transaction: its ledger key and the index keys of the customer's identifiers
        are claimed (an initial load's filter must know every key written)."""
        claim, key = self._queue.claim, self.view.store.hasher.key
        claim(cmd.idempotency_key.encode("utf-8"))
        ids = result.identifiers
        if ids.external_id is not None:
            claim(key(Kind.EXTERNAL_ID, ids.external_id))
        for email in ids.emails:
            claim(key(Kind.EMAIL, email))
        for phone in ids.phones:
            claim(key(Kind.PHONE, phone))

    def touched(self) -> None:
        """Someone else wrote to the transaction (`apply`): the change log may have grown."""
        self._queue.seq = -1

    def replay(self, cmd: UpsertCommand) -> UpsertResult | None:
        """The stored response when the row's key is in the ledger (raises IdempotencyKeyReused), else None."""
        return self._replay(cmd.idempotency_key, cmd.fingerprint, cmd.now_us)

    def replay_entry(self, entry: Entry) -> UpsertResult | None:
        """`replay` of a packed create's command (its key, its fingerprint, its clock reading): a re-imported row
        is answered without its command being rebuilt."""
        fingerprint = orjson.loads(entry.ledger_entry)["fp"]
        return self._replay(entry.ledger_key.decode("utf-8"), fingerprint, entry.now_us)

    def _replay(self, key: str, fingerprint: str, now_us: int) -> UpsertResult | None:
        stored: dict[str, Any] | None = ledger.replay(self.view, key, fingerprint, now_us)
        return UpsertResult.from_json(stored, replayed=True) if stored is not None else None


_NO_DUPLICATES = b'"potential_duplicates":[]'


def _with_duplicates(ledger_entry: bytes, named: list[str]) -> bytes:
    """A create's ledger entry (sorted, compact JSON) naming `named` as its potential duplicates: what decoding it,
    setting response.potential_duplicates and encoding it again (resolver.records.encode_json) gives. The key
    occurs once, unescaped (a string holding it would have its quotes escaped)."""
    if not named:
        return ledger_entry
    return ledger_entry.replace(_NO_DUPLICATES, b'"potential_duplicates":' + encode_json(named), 1)


def _after_last(view: Txn, name: str, key: bytes) -> bool:
    """Whether `key` sorts after every key of the named database (an empty one too)."""
    with view.txn.cursor(db=view.store.db[name]) as cur:
        return not cur.last() or cur.key() < key
