"""Apply one change event to the store, inside the caller's write transaction (deterministic: the clock and
the new uuid are fixed by the caller, contract §10).

Attributes: per field the newest event timestamp wins: the event time of every value set by an event is kept
in `ev_fields` (uuid + attribute), and an event older than it leaves the field alone ("stale"). An
`old_value` that differs from the stored value is a conflict: counted and written in the change-log entry.

Identifiers (contract §5): each (source, CRM field, CRM record) is a slot holding at most one email or phone
(`resolver.records.slot_holder`). A new value replaces what the slot held; the old one leaves the customer
and its index entry only when no other slot or Upsert holds it (`Record.release`). Per slot the newest event
wins (`Record.slot_us`), as for attributes. The whole event is computed before anything is written, and a
rejection aborts the caller's nested transaction: nothing of a refused event is applied.

DELETE erases the customer (resolver.erase): it stops resolving at once; its tombstone refuses older or
replayed events for the record (RECORD_DELETED); a CREATE newer than the deletion makes a new customer. A DELETE
of a CRM record merged into another customer (a CRM deletes the losers of its own merges) detaches that record
only: the customer stays.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from resolver.attributes import AttributeSchema
from resolver.erase import erase, forget_record_tombstone, merged_uuid_of, record_tombstone, tombstone_of_record
from resolver.errors import EventRejected
from resolver.events.format import ChangeEvent
from resolver.normalize import Kind, mask
from resolver.records import Record, held_key, slot_holder, upsert_holder
from resolver.store import Txn, uuid_bytes, uuid_text

_U64 = struct.Struct(">Q")
_MISSING = object()
MAX_DUPLICATES_REPORTED = 10


@dataclass(slots=True)
class Applied:
    customer_uuid: str
    action: str  # CREATED | UPDATED | UNCHANGED | DELETED
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    potential_duplicates: list[str] = field(default_factory=list)


def apply_event(view: Txn, ev: ChangeEvent, schema: AttributeSchema, *, now_us: int, new_uuid: str,
                identifiers_per_customer: int = 1 << 30, max_fanout: int = 1 << 30) -> Applied:
    """Apply `ev`; raise EventRejected (UNKNOWN_RECORD, FIELD_OWNED_BY_OTHER_SOURCE, RECORD_DELETED,
    LIMIT_EXCEEDED) before writing anything when it cannot be applied."""
    txn = view.txn
    dbs = view.store.db
    owned = schema.owned_by_others([c.attribute for c in ev.changes], ev.source)
    if owned:
        raise EventRejected(f"attribute(s) {', '.join(owned)} are owned by another source system",
                            reason="FIELD_OWNED_BY_OTHER_SOURCE")
    _, hits = view.probe(Kind.EXTERNAL_ID, ev.external_id, limit=1 << 30)
    current = view.record(hits[0]) if hits else None
    if current is None:
        tomb = tombstone_of_record(view, ev.external_id)
        if tomb is not None:
            if ev.event_type != "CREATE" or ev.timestamp_us <= tomb.deleted_us:
                raise EventRejected(f"{ev.event_type} for a record deleted at the source (deleted at event time "
                                    f"{tomb.deleted_us} µs; only a newer CREATE brings it back)",
                                    reason="RECORD_DELETED")
            forget_record_tombstone(view, ev.external_id)
        elif ev.event_type != "CREATE":
            raise EventRejected(f"{ev.event_type} for a record_id no customer holds", reason="UNKNOWN_RECORD")
    if ev.event_type == "DELETE":
        assert current is not None
        if current.external_id != ev.external_id:  # a CRM record merged into this customer: only it goes
            return _detach(view, current, ev, now_us)
        erase(view, current, source_system=ev.source, deleted_us=ev.timestamp_us, now_us=now_us,
              event=_event_json(ev))
        return Applied(current.uuid, "DELETED")

    created = current is None
    rec = Record(uuid=new_uuid, external_id=ev.external_id, created_us=now_us) if current is None else current.copy()
    uid = uuid_bytes(rec.uuid)
    out = Applied(rec.uuid, "CREATED" if created else "UPDATED")
    changed: dict[str, Any] = {}
    old_values: dict[str, Any] = {}  # what each changed attribute held before (None: absent)
    for c in ev.changes:
        key = uid + c.attribute.encode()
        prev = txn.get(key, db=dbs["ev_fields"])
        if prev is not None and _U64.unpack(prev)[0] >= ev.timestamp_us:
            out.stale.append(c.attribute)
            continue
        stored = rec.attributes.get(c.attribute)
        if c.has_old and not _same(c.old, stored):
            out.conflicts.append({"field": c.attribute, "expected_old": c.old, "stored": stored})
        txn.put(key, _U64.pack(ev.timestamp_us), db=dbs["ev_fields"])
        before = rec.attributes.get(c.attribute, _MISSING)
        if c.new is None:
            if before is _MISSING:
                continue
            del rec.attributes[c.attribute]
        elif before is not _MISSING and _same(before, c.new):
            continue
        else:
            rec.attributes[c.attribute] = c.new
        rec.field_us[c.attribute] = ev.timestamp_us
        changed[c.attribute] = c.new
        old_values[c.attribute] = None if before is _MISSING else before
    added, removed, slots_moved = _apply_slots(rec, ev, out, now_us)
    if len(rec.emails) + len(rec.phones) > identifiers_per_customer and added:
        raise EventRejected(f"the customer would hold more than {identifiers_per_customer} emails and phones "
                            "(limits.identifiers_per_customer)", reason="LIMIT_EXCEEDED")
    touched = bool(changed or added or removed or slots_moved)
    if not created and not touched:
        out.action = "UNCHANGED"
    if created or touched:
        rec.version += 1
        rec.updated_us = now_us
        if created:
            view.index_add(Kind.EXTERNAL_ID, ev.external_id, uid)
        for kind, value in removed:
            view.index_remove(kind, value, uid)
        for kind, value in added:
            view.index_add(kind, value, uid)
        view.put_record(rec)
        out.potential_duplicates = _sharing(view, uid, added, max_fanout)
    if created or touched or out.conflicts:
        view.append_change({
            "at_us": now_us, "customer_uuid": rec.uuid, "action": out.action, "version": rec.version,
            "source_system": ev.source, "event": _event_json(ev), "attributes": changed, "attributes_old": old_values,
            "added": ([[Kind.EXTERNAL_ID.value, ev.external_id]] if created else []) + [[k.value, v] for k, v in added],
            "removed": [[k.value, v] for k, v in removed],
            "conflicts": out.conflicts, "stale": out.stale,
            "skipped": [[s.kind.value, s.masked, s.reason] for s in ev.skipped],
            "potential_duplicates": out.potential_duplicates,
        })
    return out


def _apply_slots(rec: Record, ev: ChangeEvent, out: Applied, now_us: int
                 ) -> tuple[list[tuple[Kind, str]], list[tuple[Kind, str]], bool]:
    """Move each slot the event changes (newest event per slot wins); the identifiers that entered and left the
    record's set, and whether any slot moved at all (a slot may move onto a value another holder keeps)."""
    added: list[tuple[Kind, str]] = []
    removed: list[tuple[Kind, str]] = []
    moved = False
    for s in ev.slots:
        holder = slot_holder(ev.source, s.crm_field, ev.external_id)
        if rec.slot_us.get(holder, -1) >= ev.timestamp_us:
            out.stale.append(s.crm_field)
            continue
        rec.slot_us[holder] = ev.timestamp_us
        old = rec.slot_value(s.kind, holder)
        if old is None and s.old is not None and _adopt(rec, s.kind, s.old, holder, ev.source, now_us):
            old = s.old
        if s.has_old and s.old != old:
            out.conflicts.append({"field": s.crm_field, "expected_old": _masked(s.kind, s.old),
                                  "stored": _masked(s.kind, old)})
        if s.new == old:
            continue
        moved = True
        if old is not None and rec.release(s.kind, old, holder):
            if (s.kind, old) in added:
                added.remove((s.kind, old))
            else:
                removed.append((s.kind, old))
        if s.new is not None and rec.add(s.kind, s.new, holder, now_us):
            if (s.kind, s.new) in removed:
                removed.remove((s.kind, s.new))
            else:
                added.append((s.kind, s.new))
    return added, removed, moved


def _detach(view: Txn, current: Record, ev: ChangeEvent, now_us: int) -> Applied:
    """DELETE of a CRM record that was merged into `current` (CRMs delete the losing records of their own merges):
    the customer stays; the record's external_id and what its slots alone held leave it, and the record is
    tombstoned under the uuid it had, so that its older events are refused (RECORD_DELETED)."""
    rec = current.copy()
    uid = uuid_bytes(rec.uuid)
    rec.merged_external_ids.remove(ev.external_id)
    removed: list[tuple[Kind, str]] = [(Kind.EXTERNAL_ID, ev.external_id)]
    view.index_remove(Kind.EXTERNAL_ID, ev.external_id, uid)
    suffix = ":" + ev.external_id
    for key, holders in list(rec.held.items()):
        kind = Kind.PHONE if key.startswith("phone:") else Kind.EMAIL
        value = key.split(":", 1)[1]
        for holder in [h for h in holders if h.startswith("slot:") and h.endswith(suffix)]:
            if rec.release(kind, value, holder):
                view.index_remove(kind, value, uid)
                removed.append((kind, value))
    for slot in [s for s in rec.slot_us if s.endswith(suffix)]:
        del rec.slot_us[slot]
    rec.version += 1
    rec.updated_us = now_us
    view.put_record(rec)
    merged_uuid = merged_uuid_of(view, uid, ev.external_id)
    if merged_uuid is not None:
        record_tombstone(view, merged_uuid, [ev.external_id], source_system=ev.source, deleted_us=ev.timestamp_us,
                         now_us=now_us)
    view.append_change({"at_us": now_us, "customer_uuid": rec.uuid, "action": "UPDATED", "version": rec.version,
                        "source_system": ev.source, "event": _event_json(ev), "attributes": {}, "attributes_old": {},
                        "added": [], "removed": [[k.value, v] for k, v in removed], "detached_record": True})
    return Applied(rec.uuid, "UPDATED")


def _adopt(rec: Record, kind: Kind, value: str, holder: str, source: str, at_us: int) -> bool:
    """An empty slot whose event names as old_value a value an Upsert or import from the same source system
    added takes that value over (a store loaded from a CRM export, then kept in step by its webhooks: the
    export's phone is the slot's). True when it did."""
    mine = upsert_holder(source)
    holders = rec.held.get(held_key(kind, value), {})
    if mine not in holders:
        return False
    rec.add(kind, value, holder, at_us)
    rec.release(kind, value, mine)
    return True


def _sharing(view: Txn, uid: bytes, added: list[tuple[Kind, str]], max_fanout: int) -> list[str]:
    """Other customers holding an identifier the event added (shared lines are allowed: they are named)."""
    others: set[bytes] = set()
    for kind, value in added:
        others.update(h for h in view.probe(kind, value, limit=max_fanout).uuids if h != uid)
    return sorted(uuid_text(u) for u in others)[:MAX_DUPLICATES_REPORTED]


def _masked(kind: Kind, value: str | None) -> str | None:
    return mask(kind, value) if value is not None else None


def _same(a: Any, b: Any) -> bool:
    return bool(a == b and type(a) is type(b)) or (isinstance(a, int | float) and isinstance(b, int | float)
                                                   and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _event_json(ev: ChangeEvent) -> dict[str, Any]:
    return {"webhook_id": ev.webhook_id, "event_type": ev.event_type, "timestamp_us": ev.timestamp_us,
            "object_type": ev.object_type}
