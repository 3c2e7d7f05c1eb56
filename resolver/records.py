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
        }

    @classmethod
    def decode(cls, data: bytes) -> Record:
        d = _loads(data)
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
        )


def encode_json(value: Any) -> bytes:
    """Compact, key-sorted JSON bytes (ledger entries, change-log entries, fingerprints)."""
    return _dumps(value)


def decode_json(data: bytes) -> Any:
    return _loads(data)
