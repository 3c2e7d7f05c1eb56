"""Unmerge (contract §7): undo one merge exactly, from the merge journal, in one write transaction.

The merged-away customer comes back as it was before the merge (identifiers, attributes, uuid; its version
moves forward), and its alias is removed. On the survivor:

- an email or phone the merged customer brought leaves unless the survivor held it before the merge, or some
  holder took it after the merge, or a customer still merged into the survivor holds it too (its identifiers keep
  resolving to the survivor) (provenance: `Record.held`, holder -> since when);
- an external_id it brought leaves (external_ids are unique: it goes back to its owner);
- per attribute: a value written after the merge (the change log says so; for entries retention deleted, the
  journal entry's `written_since`: resolver.retention) stays; any other goes back to what the survivor would hold
  had the merge not brought the restored customer: what it had before the merge (set, or absent), with what the
  customers merged in the same request brought (merge's own rule, `resolver.merge.take_attributes`);
- the CRM slots it brought leave with it.

Blocked (UnmergeBlocked, every blocker named) when something later depends on the merge: the survivor was
merged into another customer or deleted since, or an identifier the merge brought has left the survivor
since (an identifier change: undoing the merge would resurrect a value someone removed).
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from resolver import ledger
from resolver.config import Settings
from resolver.erase import tombstone
from resolver.errors import Blocker, FailedPrecondition, FieldViolation, InvalidInput, NotFound, UnmergeBlocked
from resolver.merge import take_attributes
from resolver.normalize import Kind, mask
from resolver.records import Record, held_key
from resolver.store import Txn, uuid_bytes, uuid_text


@dataclass(frozen=True, slots=True)
class UnmergeCommand:
    idempotency_key: str
    fingerprint: str
    survivor_uuid: str
    merged_uuid: str
    now_us: int
    expires_us: int


@dataclass(frozen=True, slots=True)
class UnmergeResult:
    survivor_uuid: str
    survivor_version: int
    merged_uuid: str
    merged_version: int
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"survivor_uuid": self.survivor_uuid, "survivor_version": self.survivor_version,
                "merged_uuid": self.merged_uuid, "merged_version": self.merged_version}

    @classmethod
    def from_json(cls, d: dict[str, Any], *, replayed: bool) -> UnmergeResult:
        return cls(d["survivor_uuid"], d["survivor_version"], d["merged_uuid"], d["merged_version"], replayed)


def prepare(key: str, survivor: str, merged: str, settings: Settings, *, now_us: int) -> UnmergeCommand:
    """Validate the request (every bad field listed) and fix its clock."""
    violations: list[FieldViolation] = []
    if (bad_key := ledger.check_key(key)) is not None:
        violations.append(bad_key)
    canonical: list[str] = []
    for where, text in (("survivor_uuid", survivor), ("merged_uuid", merged)):
        try:
            canonical.append(str(uuidlib.UUID(text)))
        except ValueError:
            violations.append(FieldViolation(where, "not a UUID", "INVALID" if text else "REQUIRED"))
    if len(canonical) == 2 and canonical[0] == canonical[1]:
        violations.append(FieldViolation("merged_uuid", "the merged customer, not the survivor", "INVALID"))
    if violations:
        raise InvalidInput(violations)
    fp = ledger.fingerprint({"op": "unmerge", "survivor": canonical[0], "merged": canonical[1]})
    return UnmergeCommand(key, fp, canonical[0], canonical[1], now_us,
                          now_us + int(settings.reliability.idempotency_retention_s * 1_000_000))


def apply(txn: Txn, cmd: UnmergeCommand) -> UnmergeResult:
    """Undo the merge inside the caller's write transaction; a domain error before any write if it cannot."""
    stored = ledger.replay(txn, cmd.idempotency_key, cmd.fingerprint, cmd.now_us)
    if stored is not None:
        return UnmergeResult.from_json(stored, replayed=True)
    sid, mid = uuid_bytes(cmd.survivor_uuid), uuid_bytes(cmd.merged_uuid)
    entry, before, snapshot = _journal_entry(txn, sid, mid, cmd)
    survivor = txn.record(sid)
    blockers = _blockers(txn, sid, survivor, snapshot)
    if blockers:
        raise UnmergeBlocked(blockers)
    assert survivor is not None
    at_us = entry["at_us"]
    after = survivor.copy()
    sealer = txn.store.sealer
    # who else is still merged into the survivor: their identifiers keep resolving to it (contract §3), and the
    # attributes the same merge took from them stay
    others = [sealer.open_record(Record.from_json(m)) for m in entry["merged"] if m["uuid"] != cmd.merged_uuid]
    still = {(key, holder) for e in txn.journal(sid) for m in e["merged"] if m["uuid"] != cmd.merged_uuid
             for key, holders in Record.from_json(m).held.items() for holder in holders}

    for kind, value in snapshot.identifiers():
        if kind is Kind.EXTERNAL_ID:
            if after.external_id == value:
                after.external_id = None
            elif value in after.merged_external_ids:
                after.merged_external_ids.remove(value)
            txn.index_remove(kind, value, sid)
            continue
        key = held_key(kind, value)
        mine = after.held.get(key, {})
        had = before.held.get(key, {})
        for holder in snapshot.held.get(key, {}):
            if holder in mine and holder not in had and mine[holder] <= at_us and (key, holder) not in still:
                if after.release(kind, value, holder):
                    txn.index_remove(kind, value, sid)
    for slot in snapshot.slot_us.keys() - before.slot_us.keys():
        if after.slot_us.get(slot, 0) <= at_us:
            after.slot_us.pop(slot, None)
    # the change log after the merge, and what retention folded into the journal entry before deleting log entries
    written = _written_since(txn, sid, entry["seq"]) | set(entry.get("written_since", ()))
    # what the survivor would hold had the merge not brought the restored customer (the others merged with it did)
    without = before.copy()
    for rec in others:
        take_attributes(without, rec, before.updated_us)
    changed: dict[str, Any] = {}
    changed_old: dict[str, Any] = {}
    for name in {*after.attributes, *after.field_us, *without.attributes}:
        if name in written:
            continue  # written since the merge: it stays
        now = after.attributes.get(name)
        if name in without.attributes:
            after.attributes[name] = without.attributes[name]
        else:
            after.attributes.pop(name, None)
        if after.attributes.get(name) != now:
            changed[name], changed_old[name] = after.attributes.get(name), now
        if name in without.field_us:
            after.field_us[name] = without.field_us[name]
        else:
            after.field_us.pop(name, None)
    after.version += 1
    after.updated_us = cmd.now_us
    txn.put_record(after)

    restored = snapshot.copy()
    restored.version += 1
    restored.updated_us = cmd.now_us
    txn.put_record(restored)
    for kind, value in restored.identifiers():
        txn.index_add(kind, value, mid)
    txn.delete_alias(mid)
    rest = [m for m in entry["merged"] if m["uuid"] != cmd.merged_uuid]
    if rest:
        txn.journal_put(sid, entry["seq"], {**entry, "merged": rest})
    else:
        txn.journal_delete(sid, entry["seq"])
    _rebase_later_merges(txn, sid, entry["seq"], at_us, before, snapshot)
    txn.append_change({"at_us": cmd.now_us, "customer_uuid": after.uuid, "action": "UNMERGED", "version": after.version,
                       "restored_uuid": restored.uuid, "restored_version": restored.version,
                       "merge_seq": entry["seq"], "pii_of": [restored.uuid], "attributes": changed,
                       "attributes_old": changed_old,
                       "removed": sorted([k.value, v] for k, v in set(survivor.identifiers()) - set(after.identifiers()))})
    out = UnmergeResult(after.uuid, after.version, restored.uuid, restored.version)
    ledger.record(txn, cmd.idempotency_key, cmd.fingerprint, cmd.expires_us, out.to_json())
    return out


def _rebase_later_merges(txn: Txn, sid: bytes, seq: int, at_us: int, before: Record, restored: Record) -> None:
    """The merges into the survivor after merge `seq` recorded it holding what the restored customer had brought
    (an email or phone, per holder); it no longer holds them in its own right, so undoing those merges later must
    let them go too (unless a customer still merged holds them: `still` in `apply`)."""
    brought = {(key, holder) for key, holders in restored.held.items() for holder in holders
               if holder not in before.held.get(key, {})}
    for later in txn.journal(sid) if brought else ():
        if later["seq"] <= seq:
            continue
        was = Record.from_json(later["survivor_before"])
        held = {key: {h: since for h, since in holders.items() if (key, h) not in brought or since > at_us}
                for key, holders in was.held.items()}
        if held == was.held:
            continue
        values = {key for key, holders in held.items() if holders}
        txn.journal_put(sid, later["seq"], {**later, "survivor_before": {
            **later["survivor_before"], "held": {key: holders for key, holders in held.items() if holders},
            "emails": [e for e in was.emails if held_key(Kind.EMAIL, e) in values],
            "phones": [p for p in was.phones if held_key(Kind.PHONE, p) in values]}})


def _written_since(txn: Txn, sid: bytes, seq: int) -> set[str]:
    """The attributes the change log shows written to customer `sid` after change `seq` (Upserts, events, later
    merges): the server's order, not the event times a CRM sends."""
    names: set[str] = set()
    for s in txn.pii_refs(sid)[0]:
        if s > seq and (change := txn.change(s)) is not None and change["customer_uuid"] == uuid_text(sid):
            names.update(change.get("attributes", ()))
    return names


def _journal_entry(txn: Txn, sid: bytes, mid: bytes, cmd: UnmergeCommand
                   ) -> tuple[dict[str, Any], Record, Record]:
    """The journal entry of the merge of `mid` into `sid`, the survivor before it and the merged record."""
    sealer = txn.store.sealer  # the journal keeps sensitive values sealed, each under its record's uuid
    for entry in reversed(txn.journal(sid)):
        for m in entry["merged"]:
            if m["uuid"] == cmd.merged_uuid:
                return (entry, sealer.open_record(Record.from_json(entry["survivor_before"])),
                        sealer.open_record(Record.from_json(m)))
    target = txn.survivor(mid)
    if txn.record(mid) is not None or target == mid:
        raise FailedPrecondition(f"customer {cmd.merged_uuid} is not merged into anyone", reason="NOT_MERGED")
    raise FailedPrecondition(f"customer {cmd.merged_uuid} was not merged into {cmd.survivor_uuid} (it resolves to "
                             f"{uuid_text(target)})", reason="NOT_MERGED")


def _blockers(txn: Txn, sid: bytes, survivor: Record | None, snapshot: Record) -> list[Blocker]:
    """What depends on the merge: the survivor merged away or deleted since; identifiers it brought gone."""
    if survivor is None:
        if tombstone(txn, sid) is not None:
            return [Blocker("DELETE", uuid_text(sid), f"the survivor {uuid_text(sid)} was deleted since")]
        target = txn.survivor(sid)
        if target != sid:
            return [Blocker("MERGE", uuid_text(target), f"the survivor was merged into {uuid_text(target)} since: "
                                                        "undo that merge first")]
        raise NotFound(f"no customer {uuid_text(sid)}")
    return [
        Blocker("IDENTIFIER_CHANGE", mask(kind, value),
                f"{kind.name.lower()} {mask(kind, value)}, which the merge brought, has left the survivor since")
        for kind, value in snapshot.identifiers()
        if not survivor.holds(kind, value)
    ]
