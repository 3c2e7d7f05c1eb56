"""Merge (contract §7): duplicates fold into a survivor, in one write transaction.

The merged-away customers' identifiers move to the survivor (their external_ids too: they keep resolving
to it), per attribute the most recently set value wins (ties: the survivor's), and each merged uuid
becomes an alias of the survivor. The merge journal (`Txn.journal_put`) keeps the records as they were
before, so that `resolver.unmerge` can undo the merge exactly.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from resolver import ledger
from resolver.config import Settings
from resolver.errors import FieldViolation, InvalidInput, NotFound
from resolver.identifiers import Identifiers
from resolver.normalize import Kind
from resolver.records import Record
from resolver.store import Txn, uuid_bytes

MAX_MERGED = 50


@dataclass(frozen=True, slots=True)
class MergeCommand:
    idempotency_key: str
    fingerprint: str
    survivor_uuid: str
    merged_uuids: tuple[str, ...]
    source_system: str
    now_us: int
    expires_us: int


@dataclass(frozen=True, slots=True)
class MergeResult:
    customer_uuid: str
    version: int
    merged_uuids: tuple[str, ...]
    identifiers: Identifiers
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"customer_uuid": self.customer_uuid, "version": self.version, "merged_uuids": list(self.merged_uuids),
                "identifiers": self.identifiers.as_dict()}

    @classmethod
    def from_json(cls, d: dict[str, Any], *, replayed: bool) -> MergeResult:
        ids = d["identifiers"]
        return cls(customer_uuid=d["customer_uuid"], version=d["version"], merged_uuids=tuple(d["merged_uuids"]),
                   identifiers=Identifiers(ids["external_id"], list(ids["emails"]), list(ids["phones"])),
                   replayed=replayed)


def take_attributes(result: Record, rec: Record, survivor_updated_us: int) -> dict[str, Any]:
    """Merge's rule per attribute, `rec` into `result`: the most recently set value wins, ties the survivor's (a field
    the survivor cleared later than `rec` set it stays cleared). The attributes taken, with what `result` held before
    (None: absent). `survivor_updated_us`: when the survivor was last written (for fields set before field times
    were kept)."""
    old: dict[str, Any] = {}
    for name, value in rec.attributes.items():
        theirs = rec.field_us.get(name, rec.updated_us)
        ours = result.field_us.get(name, survivor_updated_us if name in result.attributes else -1)
        if theirs > ours:
            old.setdefault(name, result.attributes.get(name))
            result.attributes[name] = value
            result.field_us[name] = theirs
    return old


def prepare(key: str, survivor: str, merged: list[str], source_system: str, settings: Settings, *,
            now_us: int) -> MergeCommand:
    """Validate the request (every bad field listed) and fix its clock."""
    violations: list[FieldViolation] = []
    if (bad_key := ledger.check_key(key)) is not None:
        violations.append(bad_key)
    canonical: list[str] = []
    for i, text in enumerate([survivor, *merged]):
        where = "survivor_uuid" if i == 0 else f"merged_uuids[{i - 1}]"
        try:
            canonical.append(str(uuidlib.UUID(text)))
        except ValueError:
            violations.append(FieldViolation(where, "not a UUID", "INVALID"))
    if not merged:
        violations.append(FieldViolation("merged_uuids", "name at least one customer to merge", "REQUIRED"))
    elif len(merged) > MAX_MERGED:
        violations.append(FieldViolation("merged_uuids", f"at most {MAX_MERGED} at once", "INVALID"))
    elif len(set(canonical)) != len(canonical) and not violations:
        violations.append(FieldViolation("merged_uuids", "each customer once, and never the survivor", "INVALID"))
    if violations:
        raise InvalidInput(violations)
    fp = ledger.fingerprint({"op": "merge", "survivor": canonical[0], "merged": canonical[1:], "source_system": source_system})
    return MergeCommand(idempotency_key=key, fingerprint=fp, survivor_uuid=canonical[0],
                        merged_uuids=tuple(canonical[1:]), source_system=source_system, now_us=now_us,
                        expires_us=now_us + int(settings.reliability.idempotency_retention_s * 1_000_000))


def apply(txn: Txn, cmd: MergeCommand) -> MergeResult:
    """Execute the merge inside the caller's write transaction; NotFound before any write if a party is missing."""
    stored = ledger.replay(txn, cmd.idempotency_key, cmd.fingerprint, cmd.now_us)
    if stored is not None:
        return MergeResult.from_json(stored, replayed=True)
    survivor_id = txn.survivor(uuid_bytes(cmd.survivor_uuid))
    survivor = txn.record(survivor_id)
    if survivor is None:
        raise NotFound(f"no customer {cmd.survivor_uuid}")
    others: list[Record] = []
    for text in cmd.merged_uuids:
        uid = txn.survivor(uuid_bytes(text))
        rec = txn.record(uid)
        if rec is None:
            raise NotFound(f"no customer {text}")
        if uid != survivor_id and rec not in others:
            others.append(rec)

    result = survivor.copy()
    held = set(result.identifiers())  # what the survivor holds already: sets keep this linear in identifiers
    taken: dict[str, Any] = {}  # attribute values the survivor took from the merged
    taken_old: dict[str, Any] = {}  # ... and what it held before (None: absent)
    for rec in others:
        for kind, value in rec.identifiers():
            txn.index_remove(kind, value, uuid_bytes(rec.uuid))
            if kind is Kind.EXTERNAL_ID:
                if result.external_id is None:
                    result.external_id = value
                elif not result.holds(kind, value):
                    result.merged_external_ids.append(value)
            elif (kind, value) not in held:
                held.add((kind, value))
                (result.emails if kind is Kind.EMAIL else result.phones).append(value)
        for key, holders in rec.held.items():  # provenance travels with the identifiers
            mine = result.held.setdefault(key, {})
            for holder, since in holders.items():
                mine.setdefault(holder, since)
        for slot, at in rec.slot_us.items():
            result.slot_us[slot] = max(at, result.slot_us.get(slot, at))
        for name, was in take_attributes(result, rec, survivor.updated_us).items():
            taken_old.setdefault(name, was)
            taken[name] = result.attributes[name]
        txn.delete_record(uuid_bytes(rec.uuid))
        txn.put_alias(uuid_bytes(rec.uuid), survivor_id)
    uid = uuid_bytes(result.uuid)
    for kind, value in set(result.identifiers()) - set(survivor.identifiers()):
        txn.index_add(kind, value, uid)
    if others:
        result.version += 1
        result.updated_us = cmd.now_us
        txn.put_record(result)
        merged_uuids = [r.uuid for r in others]
        seq = txn.append_change({
            "at_us": cmd.now_us,
            "customer_uuid": result.uuid,
            "action": "MERGED",
            "version": result.version,
            "source_system": cmd.source_system,
            "merged_uuids": merged_uuids,
            "added": sorted([k.value, v] for k, v in set(result.identifiers()) - set(survivor.identifiers())),
            "attributes": taken,
            "attributes_old": taken_old,
            "pii_of": merged_uuids,  # the identifiers added are theirs
        })
        # the journal keeps the records as they were, so that Unmerge can undo this merge exactly
        txn.journal_put(survivor_id, seq, {"seq": seq, "at_us": cmd.now_us, "survivor_before": survivor.to_json(),
                                           "merged": [r.to_json() for r in others]})
    out = MergeResult(customer_uuid=result.uuid, version=result.version, merged_uuids=tuple(r.uuid for r in others),
                      identifiers=Identifiers(result.external_id, list(result.emails), list(result.phones)))
    ledger.record(txn, cmd.idempotency_key, cmd.fingerprint, cmd.expires_us, out.to_json())
    return out


