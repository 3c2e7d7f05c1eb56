"""The bulk path of `resolver import`: most rows of a load are creates nobody's identifiers collide with.

A worker process that prepared a command (resolver.upsert.prepare) also encodes, with
`resolver.upsert.planned_create`, everything `apply` would write for it *if* it turns out to be a plain
create: the record, its index keys, the change-log entry (all but its sequence number) and the ledger entry,
as bytes. The parent then only has to prove the "if" inside its write transaction: no ledger entry under
the row's idempotency key and no index entry under any of its identifiers' keys, neither stored nor claimed
by an earlier row of the batch. Under those conditions `apply` would find no target, no holder, no potential
duplicate and could not fail, so the row needs no nested transaction and no probe: its pre-encoded puts are
queued and written in key order (`Txn.put_many`), byte for byte what `apply` would have written.

Every other row (an identifier someone holds, a customer_uuid, an expected_version, a removal, a key seen
before) goes through the one implementation of the rules, `resolver.upsert.apply`, in a nested
transaction, after the queued puts are written so that it sees every earlier row. A key already in the
ledger is answered by `resolver.ledger.replay` directly (it only reads).

What crosses the process boundary is small named tuples of bytes and strings (cheap to pickle); the
command itself travels as one `marshal` blob that is only decoded for the rows that need `apply`.
"""

from __future__ import annotations

import marshal
import struct
from typing import Any, NamedTuple

from resolver import ledger
from resolver._hotpath import KeyHasher
from resolver.crypto import Sealer
from resolver.identifiers import Identifiers, Skipped
from resolver.normalize import Kind
from resolver.records import encode_json
from resolver.store import INDEX_NAMES, Txn, ledger_exp_key, pii_change_ref, pii_ledger_ref, uuid_bytes
from resolver.upsert import UpsertCommand, UpsertResult, planned_create

_U64 = struct.Struct(">Q")
_TABLES = ("records", "ix_external", "ix_email", "ix_phone", "ledger", "ledger_exp", "pii_refs")
_SEQ_AT = b',"source_system":'  # the change-log key that sorts right after "seq"


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
    ledger_entry: bytes
    expiry_key: bytes  # the ledger entry's key in ledger_exp (-> b"")


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
    values sealed as `Txn.put_record` and `Txn.append_change` seal them."""
    planned = planned_create(cmd)
    if planned is None:
        return None
    rec, change, result = planned
    keys = tuple((INDEX_NAMES[kind], hasher.key(kind, value)) for kind, value in rec.identifiers())
    if len(set(keys)) != len(keys):
        return None  # two identifiers of one kind under one key (a hash collision): let apply deal with it
    encoded = encode_json(sealer.seal_change(change))
    cut = encoded.rindex(_SEQ_AT) + 1  # after "source_system" only "version" (an integer) follows
    lkey = cmd.idempotency_key.encode("utf-8")
    entry = ledger.entry(cmd.fingerprint, cmd.expires_us, result.to_json())
    return Planned(ledger_key=lkey, index_keys=keys, uuid=uuid_bytes(rec.uuid), record=sealer.encode_record(rec),
                   change_head=encoded[:cut], change_tail=encoded[cut:], ledger_entry=encode_json(entry),
                   expiry_key=ledger_exp_key(cmd.expires_us, lkey))


# -- parent side -----------------------------------------------------------------------------------------


class BulkWriter:
    """Planned creates of one write transaction, queued until a row needs `apply` or the batch ends."""

    def __init__(self, view: Txn) -> None:
        self.view = view
        self._queued: dict[str, list[tuple[bytes, bytes]]] = {name: [] for name in _TABLES}
        self._changes: list[tuple[bytes, bytes]] = []
        self._claimed: set[bytes] = set()  # index keys queued in this batch
        self._claimed_keys: set[bytes] = set()  # ledger keys queued in this batch
        self._seq: int | None = None  # the last change-log sequence number (None: read it when needed)

    def try_create(self, planned: Planned) -> bool:
        """Queue the row's writes if it is a plain create in this transaction; False: it needs `apply`."""
        lkey, uid = planned.ledger_key, planned.uuid
        view, claimed = self.view, self._claimed
        if lkey in self._claimed_keys or view.has("ledger", lkey):
            return False
        for name, k in planned.index_keys:
            if k in claimed or view.has(name, k):
                return False
        queued = self._queued
        for name, k in planned.index_keys:
            claimed.add(k)
            queued[name].append((k, uid))
        self._claimed_keys.add(lkey)
        queued["records"].append((uid, planned.record))
        queued["ledger"].append((lkey, planned.ledger_entry))
        queued["ledger_exp"].append((planned.expiry_key, b""))
        if self._seq is None:
            self._seq = view.last_change_seq()
        self._seq += 1
        change = b"%s\"seq\":%d,%s" % (planned.change_head, self._seq, planned.change_tail)
        self._changes.append((_U64.pack(self._seq), change))
        queued["pii_refs"] += [(pii_ledger_ref(uid, lkey), b""), (pii_change_ref(uid, self._seq), b"")]
        return True

    def flush(self) -> None:
        """Write every queued create (each table in key order, the change log appended)."""
        if not self._changes:
            return
        view = self.view
        for name, items in self._queued.items():
            if items:
                view.put_many(name, items)
                items.clear()
        view.put_many("changes", self._changes, append=True)
        self._changes = []
        self._claimed.clear()
        self._claimed_keys.clear()

    def touched(self) -> None:
        """Someone else wrote to the transaction (`apply`): the change log may have grown."""
        self._seq = None

    def replay(self, cmd: UpsertCommand) -> UpsertResult | None:
        """The stored response when the row's key is in the ledger (raises IdempotencyKeyReused), else None."""
        stored: dict[str, Any] | None = ledger.replay(self.view, cmd.idempotency_key, cmd.fingerprint, cmd.now_us)
        return UpsertResult.from_json(stored, replayed=True) if stored is not None else None
