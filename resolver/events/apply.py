"""Apply one change event to the store, inside the caller's write transaction (deterministic: the clock and
the new uuid are fixed by the caller, contract §10).

Per field the newest event timestamp wins: the event time of every value set by an event is kept in
`ev_fields` (uuid + attribute), and an event older than it leaves the field alone ("stale"). An `old_value`
that differs from the stored value is a conflict: counted and written in the change-log entry. DELETE writes
a tombstone only: erasure (contract §7, Forget) is not built yet, so the record and its PII are kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

from resolver.attributes import AttributeSchema
from resolver.errors import EventRejected
from resolver.events.format import ChangeEvent
from resolver.normalize import Kind
from resolver.records import Record
from resolver.store import Txn, uuid_bytes

_U64 = struct.Struct(">Q")
_MISSING = object()
TOMBSTONE_NOTE = "tombstone only: erasure (contract §7, Forget) is not built yet; the record and its PII are kept"


@dataclass(slots=True)
class Applied:
    customer_uuid: str
    action: str  # CREATED | UPDATED | UNCHANGED | DELETED
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


def apply_event(view: Txn, ev: ChangeEvent, schema: AttributeSchema, *, now_us: int, new_uuid: str) -> Applied:
    """Apply `ev`; raise EventRejected (UNKNOWN_RECORD, FIELD_OWNED_BY_OTHER_SOURCE, RECORD_DELETED) before
    writing anything when it cannot be applied."""
    txn = view.txn
    dbs = view.store.db
    owned = schema.owned_by_others([c.attribute for c in ev.changes], ev.source)
    if owned:
        raise EventRejected(f"attribute(s) {', '.join(owned)} are owned by another source system",
                            reason="FIELD_OWNED_BY_OTHER_SOURCE")
    _, hits = view.probe(Kind.EXTERNAL_ID, ev.external_id, limit=1 << 30)
    current = view.record(hits[0]) if hits else None
    tomb_raw = txn.get(uuid_bytes(current.uuid), db=dbs["ev_tombs"]) if current is not None else None
    tomb = orjson.loads(tomb_raw) if tomb_raw is not None else None

    if current is None and ev.event_type != "CREATE":
        raise EventRejected(f"{ev.event_type} for a record_id no customer holds", reason="UNKNOWN_RECORD")
    if ev.event_type == "DELETE":
        assert current is not None
        if tomb is not None and tomb["timestamp_us"] >= ev.timestamp_us:
            return Applied(current.uuid, "UNCHANGED")
        entry = {"timestamp_us": ev.timestamp_us, "source_system": ev.source, "webhook_id": ev.webhook_id}
        txn.put(uuid_bytes(current.uuid), orjson.dumps(entry), db=dbs["ev_tombs"])
        view.append_change({"at_us": now_us, "customer_uuid": current.uuid, "action": "DELETED",
                            "version": current.version, "source_system": ev.source, "event": _event_json(ev),
                            "note": TOMBSTONE_NOTE})
        return Applied(current.uuid, "DELETED")
    if tomb is not None:
        if tomb["timestamp_us"] >= ev.timestamp_us:
            # the record was deleted after this change was made: nothing of it survives
            return Applied(current.uuid if current else "", "UNCHANGED", stale=[c.attribute for c in ev.changes])
        if ev.event_type != "CREATE":
            raise EventRejected("UPDATE for a record deleted at the source (CREATE it again first)",
                                reason="RECORD_DELETED")
        if current is not None:
            txn.delete(uuid_bytes(current.uuid), db=dbs["ev_tombs"])

    created = current is None
    rec = Record(uuid=new_uuid, external_id=ev.external_id, created_us=now_us) if current is None else current.copy()
    uid = uuid_bytes(rec.uuid)
    out = Applied(rec.uuid, "CREATED" if created else "UPDATED")
    changed: dict[str, Any] = {}
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
    if not created and not changed:
        out.action = "UNCHANGED"
    if created or changed:
        rec.version += 1
        rec.updated_us = now_us
        if created:
            view.index_add(Kind.EXTERNAL_ID, ev.external_id, uid)
        view.put_record(rec)
    if created or changed or out.conflicts:
        view.append_change({
            "at_us": now_us, "customer_uuid": rec.uuid, "action": out.action, "version": rec.version,
            "source_system": ev.source, "event": _event_json(ev), "attributes": changed,
            "added": [[Kind.EXTERNAL_ID.value, ev.external_id]] if created else [], "removed": [],
            "conflicts": out.conflicts, "stale": out.stale,
        })
    return out


def _same(a: Any, b: Any) -> bool:
    return bool(a == b and type(a) is type(b)) or (isinstance(a, int | float) and isinstance(b, int | float)
                                                   and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _event_json(ev: ChangeEvent) -> dict[str, Any]:
    return {"webhook_id": ev.webhook_id, "event_type": ev.event_type, "timestamp_us": ev.timestamp_us,
            "object_type": ev.object_type}
