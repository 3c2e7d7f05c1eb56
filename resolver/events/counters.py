"""Conservation counters, durable in LMDB (`ev_counters`), updated in the transactions that move events.

accepted = applied + dead_lettered + in inbox, where dead_lettered counts events whose fate is the DLQ
(still there, or discarded by an operator); a successful replay moves one from dead_lettered to applied.
`requeued` counts the times an event went back to the inbox to wait for its record's CREATE
(resolver.events.applier): it stays in the inbox, so it changes nothing above.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

NAMES = ("received", "rejected_unsigned", "rejected_other", "throttled", "duplicates", "accepted", "applied",
         "dead_lettered", "discarded", "conflicts", "stale_fields", "requeued")
_U64 = struct.Struct(">Q")


def add(txn: Any, db: Any, deltas: Mapping[str, int]) -> None:
    """Add `deltas` to the counters inside the caller's write transaction."""
    for name, delta in deltas.items():
        if not delta:
            continue
        key = name.encode()
        raw = txn.get(key, db=db)
        value = (_U64.unpack(raw)[0] if raw is not None else 0) + delta
        txn.put(key, _U64.pack(max(value, 0)), db=db)


def value(txn: Any, db: Any, name: str) -> int:
    """One counter (0 when it was never added to)."""
    raw = txn.get(name.encode(), db=db)
    return _U64.unpack(raw)[0] if raw is not None else 0


def read(txn: Any, db: Any) -> dict[str, int]:
    out = dict.fromkeys(NAMES, 0)
    with txn.cursor(db=db) as cur:
        for k, v in cur:
            out[bytes(k).decode()] = _U64.unpack(bytes(v))[0]
    return out


def snapshot(txn: Any, store: Any) -> dict[str, Any]:
    """Counters plus the inbox and DLQ sizes, and whether they conserve events (a store without events: zeros)."""
    if "ev_counters" not in store.db:
        return {"counters": dict.fromkeys(NAMES, 0), "in_inbox": 0, "in_dlq": 0, "conserved": True}
    counts = read(txn, store.db["ev_counters"])
    in_inbox = int(txn.stat(store.db["ev_inbox"])["entries"])
    in_dlq = int(txn.stat(store.db["ev_dlq"])["entries"])
    conserved = (counts["accepted"] == counts["applied"] + counts["dead_lettered"] + in_inbox
                 and counts["dead_lettered"] == in_dlq + counts["discarded"])
    return {"counters": counts, "in_inbox": in_inbox, "in_dlq": in_dlq, "conserved": conserved}
