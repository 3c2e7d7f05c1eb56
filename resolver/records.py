"""The customer record as stored, and the change-log entry: plain data plus their byte encodings.

Records are stored as compact, key-sorted JSON (orjson: about 3x the standard library's speed, which
matters on the Resolve path): readable with any tool, exact for numbers (integers are bounded to 64 bits
by attribute validation). Times are integer microseconds since the epoch,
fixed in the command before it is applied (contract §10: no clock reads inside the apply step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from resolver.normalize import Kind

_loads = orjson.loads


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@dataclass(slots=True)
class Record:
    """One customer. `uuid` is the canonical text form; identifiers are normalized."""

    uuid: str
    external_id: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    created_us: int = 0
    updated_us: int = 0
    # when each attribute was last set or cleared: merges keep the most recent value per field
    field_us: dict[str, int] = field(default_factory=dict)
    # external_ids of customers merged into this one: they keep resolving here (contract §7)
    merged_external_ids: list[str] = field(default_factory=list)
    # provenance (contract §5): per email and phone (`held_key`), who holds it -> since when (µs). A holder is
    # an Upsert's source (`upsert_holder`) or a CRM slot (`slot_holder`); an identifier leaves the record when
    # its last holder lets it go (`release`), or when an Upsert removes it explicitly (`drop`).
    held: dict[str, dict[str, int]] = field(default_factory=dict)
    # per CRM slot, the event time of the value it was last given or cleared with: the newer event wins
    slot_us: dict[str, int] = field(default_factory=dict)

    def identifiers(self) -> list[tuple[Kind, str]]:
        """Every identifier the record holds, as (kind, normalized value)."""
        out: list[tuple[Kind, str]] = []
        if self.external_id is not None:
            out.append((Kind.EXTERNAL_ID, self.external_id))
        out += [(Kind.EXTERNAL_ID, x) for x in self.merged_external_ids]
        out += [(Kind.EMAIL, e) for e in self.emails]
        out += [(Kind.PHONE, p) for p in self.phones]
        return out

    def holds(self, kind: Kind, value: str) -> bool:
        """Whether the record holds the normalized identifier (the rule resolver._probe_py.holds reads from bytes)."""
        if kind == Kind.PHONE:  # ==, not `is`: a plain kind number must not fall through to external_id
            return value in self.phones
        if kind == Kind.EMAIL:
            return value in self.emails
        return self.external_id == value or value in self.merged_external_ids

    def add(self, kind: Kind, value: str, holder: str, us: int) -> bool:
        """`holder` holds the email or phone `value` (since `us`, unless it held it already); True when the
        value is new to the record's identifier set."""
        values = self.phones if kind == Kind.PHONE else self.emails
        holders = self.held.setdefault(held_key(kind, value), {})
        holders.setdefault(holder, us)
        if value in values:
            return False
        values.append(value)
        return True

    def release(self, kind: Kind, value: str, holder: str) -> bool:
        """`holder` lets `value` go; True when no holder is left and the value left the identifier set."""
        key = held_key(kind, value)
        holders = self.held.get(key)
        if holders is None:
            return False
        holders.pop(holder, None)
        if holders:
            return False
        del self.held[key]
        values = self.phones if kind == Kind.PHONE else self.emails
        if value in values:
            values.remove(value)
            return True
        return False

    def drop(self, kind: Kind, value: str) -> bool:
        """Remove `value` whoever holds it (an explicit removal); True when the record held it."""
        self.held.pop(held_key(kind, value), None)
        values = self.phones if kind == Kind.PHONE else self.emails
        if value in values:
            values.remove(value)
            return True
        return False

    def slot_value(self, kind: Kind, holder: str) -> str | None:
        """The value the slot `holder` holds (a slot holds at most one), or None."""
        values = self.phones if kind == Kind.PHONE else self.emails
        for value in values:
            if holder in self.held.get(held_key(kind, value), ()):
                return value
        return None

    def copy(self) -> Record:
        """A deep-enough copy to edit without touching the original (lists and dicts are copied)."""
        return Record(
            uuid=self.uuid,
            external_id=self.external_id,
            emails=list(self.emails),
            phones=list(self.phones),
            attributes=dict(self.attributes),
            version=self.version,
            created_us=self.created_us,
            updated_us=self.updated_us,
            field_us=dict(self.field_us),
            merged_external_ids=list(self.merged_external_ids),
            held={k: dict(v) for k, v in self.held.items()},
            slot_us=dict(self.slot_us),
        )

    def encode(self) -> bytes:
        return _dumps(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "external_id": self.external_id,
            "emails": self.emails,
            "phones": self.phones,
            "attributes": self.attributes,
            "version": self.version,
            "created_us": self.created_us,
            "updated_us": self.updated_us,
            "field_us": self.field_us,
            "merged_external_ids": self.merged_external_ids,
            "held": self.held,
            "slot_us": self.slot_us,
        }

    @classmethod
    def decode(cls, data: bytes) -> Record:
        return cls.from_json(_loads(data))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        """The record of `to_json`'s form; a record written before provenance existed gets every email and
        phone held by an Upsert without a source, since its creation."""
        held = d.get("held")
        if held is None:
            legacy = {upsert_holder(""): d["created_us"]}
            held = {held_key(kind, v): dict(legacy) for kind, name in ((Kind.EMAIL, "emails"), (Kind.PHONE, "phones"))
                    for v in d[name]}
        return cls(
            uuid=d["uuid"],
            external_id=d["external_id"],
            emails=d["emails"],
            phones=d["phones"],
            attributes=d["attributes"],
            version=d["version"],
            created_us=d["created_us"],
            updated_us=d["updated_us"],
            field_us=d.get("field_us", {}),
            merged_external_ids=d.get("merged_external_ids", []),
            held=held,
            slot_us=d.get("slot_us", {}),
        )


def held_key(kind: Kind, value: str) -> str:
    """The key of an email or phone in `Record.held`."""
    return ("phone:" if kind == Kind.PHONE else "email:") + value


def upsert_holder(source_system: str) -> str:
    """The holder of what an Upsert (or an import) from `source_system` added."""
    return "upsert:" + source_system


def slot_holder(source: str, crm_field: str, record_id: str) -> str:
    """The holder of a CRM slot: one field of one CRM record of one source (a merged customer carries the
    slots of every CRM record merged into it, each its own)."""
    return f"slot:{source}:{crm_field}:{record_id}"


def encode_json(value: Any) -> bytes:
    """Compact, key-sorted JSON bytes (ledger entries, change-log entries, fingerprints)."""
    return _dumps(value)


def decode_json(data: bytes) -> Any:
    return _loads(data)
