"""Erasure (contract §5 DELETE, §7 Forget): a customer's PII and index entries leave the store, and a
tombstone without PII stays, inside the caller's write transaction.

What goes: the record, its index entries, the PII in every change-log entry and ledger response that copies it
(found through `pii_refs`, redacted in place: the sequence numbers and uuids stay), the merge journal of every
customer merged into it (they follow it: their aliases lead to the tombstone). What stays, with no PII: the
aliases (uuids), the tombstone under the uuid (source, the deletion's event time, when it was applied) and,
per external_id the customer held, its index key -> uuid (`ev_tomb_ext`), so that an older or replayed CRM
event for the record is refused (RECORD_DELETED) and a newer CREATE makes a new customer.

LMDB frees the pages that held the PII without zeroing them: until they are reused, the bytes are still in
data.mdb. `resolver compact` rewrites the store with live pages only; an erasure that must be verifiable on
disk is followed by it (README, "Erasure").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from resolver import history
from resolver.normalize import Kind
from resolver.outbound import outbox
from resolver.records import Record, decode_json, encode_json
from resolver.store import Txn, uuid_bytes, uuid_text

# what a redacted change-log entry keeps: who, when, what kind of change; never a value
_CHANGE_KEEPS = ("seq", "at_us", "customer_uuid", "action", "version", "source_system", "event", "merged_uuids",
                 "restored_uuid", "restored_version", "merge_seq", "erased_uuids", "interaction_id")
_NO_IDENTIFIERS: dict[str, Any] = {"external_id": None, "emails": [], "phones": []}


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a deleted customer."""

    customer_uuid: str
    source_system: str
    deleted_us: int  # the deletion's event time (the CRM's clock)
    at_us: int  # when it was applied

    def to_json(self) -> dict[str, Any]:
        return {"customer_uuid": self.customer_uuid, "source_system": self.source_system,
                "deleted_us": self.deleted_us, "at_us": self.at_us}


@dataclass(frozen=True, slots=True)
class Erased:
    customer_uuids: tuple[str, ...]  # the customer and every customer merged into it
    changes_redacted: int
    ledger_redacted: int
    seq: int  # the DELETED change-log entry
    interactions: int = 0  # interactions forgotten
    outbound: int = 0  # queued or dead outbound messages dropped


def erase(view: Txn, rec: Record, *, source_system: str, deleted_us: int, now_us: int,
          event: dict[str, Any] | None = None) -> Erased:
    """Erase the live customer `rec` (a survivor, never an alias)."""
    uid = uuid_bytes(rec.uuid)
    family = _family(view, uid)
    for kind, value in rec.identifiers():
        view.index_remove(kind, value, uid)
    view.delete_record(uid)
    record_tombstone(view, rec.uuid, ([rec.external_id] if rec.external_id is not None else []) + rec.merged_external_ids,
                     source_system=source_system, deleted_us=deleted_us, now_us=now_us)
    texts = {uuid_text(u) for u in family}
    changes = ledger = interactions = outbound = 0
    for member in family:
        seqs, keys = view.pii_refs(member)
        for seq in seqs:
            entry = view.change(seq)
            if entry is not None:
                view.replace_change(seq, {k: entry[k] for k in _CHANGE_KEEPS if k in entry} | {"redacted_us": now_us})
                changes += 1
        for key in keys:
            stored = view.ledger_get(key)
            if stored is not None and texts & {stored["response"].get("customer_uuid"),
                                               *stored["response"].get("merged_uuids", ())}:
                response = dict(stored["response"])
                if "identifiers" in response:
                    response["identifiers"] = _NO_IDENTIFIERS
                response["skipped"] = []
                view.ledger_replace(key, {**stored, "response": response})
                ledger += 1
        view.drop_pii_refs(member)
        for entry in view.journal(member):
            view.journal_delete(member, entry["seq"])
        view.drop_event_times(member)
        interactions += history.forget(view, member)  # its interactions: their details are PII
        outbound += outbox.forget_customer(view, member)  # messages copying its PII (customer.deleted copies none)
    seq = view.append_change({"at_us": now_us, "customer_uuid": rec.uuid, "action": "DELETED",
                              "version": rec.version + 1, "source_system": source_system,
                              "erased_uuids": sorted(texts), **({"event": event} if event else {})}, pii=False)
    return Erased(tuple(sorted(texts)), changes, ledger, seq, interactions, outbound)


def record_tombstone(view: Txn, customer_uuid: str, external_ids: list[str], *, source_system: str, deleted_us: int,
                     now_us: int) -> None:
    """Tombstone `customer_uuid` (no PII) and the CRM records (`external_ids`) it held."""
    uid = uuid_bytes(customer_uuid)
    tomb = Tombstone(customer_uuid, source_system, deleted_us, now_us)
    view.txn.put(uid, encode_json(tomb.to_json()), db=view.store.db["ev_tombs"])
    for ext in external_ids:
        view.txn.put(view.key(Kind.EXTERNAL_ID, ext), uid, db=view.store.db["ev_tomb_ext"])


def merged_uuid_of(view: Txn, survivor: bytes, external_id: str) -> str | None:
    """The uuid the customer holding `external_id` had before it was merged into `survivor` (None: unknown)."""
    for entry in view.journal(survivor):
        for merged in entry["merged"]:
            if merged["external_id"] == external_id or external_id in merged.get("merged_external_ids", ()):
                return str(merged["uuid"])
    return None


def tombstone(view: Txn, uid: bytes) -> Tombstone | None:
    """The tombstone of a deleted customer's uuid (None: not deleted)."""
    raw = view.txn.get(uid, db=view.store.db["ev_tombs"])
    if raw is None:
        return None
    d = decode_json(raw)
    if "customer_uuid" not in d:  # written before erasure existed: a DELETE that kept the record
        return None
    return Tombstone(d["customer_uuid"], d["source_system"], d["deleted_us"], d["at_us"])


def tombstone_of_record(view: Txn, external_id: str) -> Tombstone | None:
    """The tombstone of the customer that held `external_id` when it was deleted (None: none did)."""
    uid = view.txn.get(view.key(Kind.EXTERNAL_ID, external_id), db=view.store.db["ev_tomb_ext"])
    return tombstone(view, uid) if uid is not None else None


def forget_record_tombstone(view: Txn, external_id: str) -> None:
    """A newer CREATE brings the record back as a new customer: the external_id is free again."""
    view.txn.delete(view.key(Kind.EXTERNAL_ID, external_id), db=view.store.db["ev_tomb_ext"])


def _family(view: Txn, uid: bytes) -> list[bytes]:
    """`uid` and every customer merged into it, transitively (from the merge journal)."""
    out = [uid]
    i = 0
    while i < len(out):
        for entry in view.journal(out[i]):
            out += [uuid_bytes(m["uuid"]) for m in entry["merged"] if uuid_bytes(m["uuid"]) not in out]
        i += 1
    return out
