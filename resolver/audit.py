"""The audit trail of erasures (contract §8): one entry per Forget, kept after the person is gone.

An entry says who erased whom, when and why, and how much was removed: sequence, time, the caller's token name
("" without `[auth]`), the customer uuid, the reason as the caller gave it, and counts. It never holds PII beyond
the uuid (the reason is the caller's text: the API asks for none in it). Stored in the LMDB database `audit`:
key the sequence (8 bytes, big-endian), value the entry JSON. Nothing sweeps it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from resolver.records import decode_json, encode_json
from resolver.store import Txn

_U64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One erasure, as the audit trail keeps it."""

    seq: int
    at_us: int
    who: str  # the caller's token name ("" without [auth])
    action: str  # FORGET
    customer_uuid: str
    reason: str
    erased_uuids: tuple[str, ...] = ()  # the customer and those merged into it
    removed: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at_us": self.at_us, "who": self.who, "action": self.action,
                "customer_uuid": self.customer_uuid, "reason": self.reason, "erased_uuids": list(self.erased_uuids),
                "removed": self.removed}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AuditEntry:
        return cls(d["seq"], d["at_us"], d["who"], d["action"], d["customer_uuid"], d["reason"],
                   tuple(d.get("erased_uuids", ())), dict(d.get("removed", {})))


def append(view: Txn, *, at_us: int, who: str, action: str, customer_uuid: str, reason: str,
           erased_uuids: tuple[str, ...], removed: dict[str, int]) -> AuditEntry:
    """Append an entry with the next sequence number (1, 2, ...) in the caller's write transaction."""
    db = view.store.db["audit"]
    with view.txn.cursor(db=db) as cur:
        seq = _U64.unpack(cur.key())[0] + 1 if cur.last() else 1
    entry = AuditEntry(seq, at_us, who, action, customer_uuid, reason, erased_uuids, dict(removed))
    view.txn.put(_U64.pack(seq), encode_json(entry.to_json()), db=db, append=True)
    return entry


def entries(view: Txn, after: int = 0, limit: int = 100) -> list[AuditEntry]:
    """Up to `limit` entries with a sequence above `after`, oldest first."""
    out: list[AuditEntry] = []
    db = view.store.db.get("audit")
    if db is None:  # a read-only open of a store written before the audit trail existed
        return out
    with view.txn.cursor(db=db) as cur:
        if cur.set_range(_U64.pack(after + 1)):
            for _, raw in cur:
                if len(out) >= limit:
                    break
                out.append(AuditEntry.from_json(decode_json(raw)))
    return out
