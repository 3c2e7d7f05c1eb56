"""The dead-letter queue (contract §6): events that failed schema, mapping or apply, kept with their original
bytes, redacted headers, source, reason and time; listed, shown masked, replayed or discarded by operators.

`ring` is the store's key ring (`store.sealer.ring`): with a key, bodies are stored encrypted (resolver.events.envelope)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import orjson

from resolver.crypto import KeyRing
from resolver.errors import DeadLetterNotFound, EventRejected
from resolver.events import counters, envelope
from resolver.normalize import mask_value as normalize_mask_value
from resolver.redact import redact

_U64 = struct.Struct(">Q")
_LAST_ID = 2**64 - 1
ISSUED = "dead_letter_ids"  # the counter holding the last dead-letter id issued


def key(dlq_id: int) -> bytes:
    return _U64.pack(dlq_id)


def put(txn: Any, db: Any, meta: dict[str, Any], body: bytes, exc: EventRejected, *, origin: str,
        now_us: int, ring: KeyRing | None, counters_db: Any) -> int:
    """Store a dead letter in the caller's write transaction; its id (1, 2, ...).

    An id names one dead letter for good, even after it left the queue (replayed, discarded, erased by Forget):
    `ListDeadLetters(after_id)` is a cursor, and the webhook dedupe entry points at the id. So the last id issued is
    kept in the counters (`counters_db`, ISSUED), not read from the newest entry still queued."""
    with txn.cursor(db=db) as cur:
        newest = _U64.unpack(cur.key())[0] if cur.last() else 0
    issued = counters.value(txn, counters_db, ISSUED)
    dlq_id = max(newest, issued) + 1
    counters.add(txn, counters_db, {ISSUED: dlq_id - issued})
    entry = {**meta, "id": dlq_id, "reason": exc.reason, "detail": _detail(exc), "dead_lettered_us": now_us,
             "origin": origin, "attempts": meta.get("attempts", 0) + 1}
    txn.put(_U64.pack(dlq_id), envelope.encode(entry, body, ring), db=db, append=True)
    return dlq_id


def _detail(exc: EventRejected) -> str:
    parts = [exc.message] + [f"{v.field}: {v.description}" for v in exc.violations]
    return redact("; ".join(parts))  # a schema message may quote a key of the body


def get(txn: Any, db: Any, dlq_id: int, *, ring: KeyRing | None) -> tuple[dict[str, Any], bytes]:
    raw = txn.get(_U64.pack(dlq_id), db=db)
    if raw is None:
        raise DeadLetterNotFound(f"no dead letter {dlq_id} (never existed, replayed or discarded)")
    return envelope.decode(raw, ring)


def iterate(txn: Any, db: Any, after: int = 0, *, ring: KeyRing | None) -> Iterator[tuple[dict[str, Any], bytes]]:
    if after >= _LAST_ID:  # no id comes after the largest (uint64 after_id: any value a caller sends)
        return
    with txn.cursor(db=db) as cur:
        if cur.set_range(_U64.pack(after + 1)):
            for _, raw in cur:
                yield envelope.decode(raw, ring)


def discard(txn: Any, store: Any, dlq_id: int) -> None:
    if txn.get(_U64.pack(dlq_id), db=store.db["ev_dlq"]) is None:
        raise DeadLetterNotFound(f"no dead letter {dlq_id} (never existed, replayed or discarded)")
    txn.delete(_U64.pack(dlq_id), db=store.db["ev_dlq"])
    counters.add(txn, store.db["ev_counters"], {"discarded": 1})


def update(txn: Any, db: Any, dlq_id: int, meta: dict[str, Any], body: bytes, exc: EventRejected, now_us: int, *,
           ring: KeyRing | None) -> None:
    """A replay failed again: keep the entry with the new reason and one more attempt."""
    entry = {**meta, "reason": exc.reason, "detail": _detail(exc), "dead_lettered_us": now_us,
             "attempts": meta.get("attempts", 1) + 1}
    txn.put(_U64.pack(dlq_id), envelope.encode(entry, body, ring), db=db)


_PLAIN = ("event_type", "source_system", "timestamp", "object_type")


def masked_payload(body: bytes) -> str:
    """The payload with record_id and every value masked (never a raw identifier or attribute value)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"(not JSON: {len(body)} bytes)"
    if not isinstance(doc, dict):
        return f"(JSON {type(doc).__name__}: {len(body)} bytes)"
    # Names kept (keys, event type, source, time) still pass the choke point: the body may be one that failed its
    # schema, with anything in them.
    out = {redact(k): (redact(v) if k in _PLAIN and isinstance(v, str) else mask_value(v))
           for k, v in doc.items() if k != "change_set"}
    cs = doc.get("change_set")
    if isinstance(cs, dict):
        out["change_set"] = {redact(f): ({redact(k): mask_value(x) for k, x in v.items()} if isinstance(v, dict)
                                         else mask_value(v))
                             for f, v in cs.items()}
    elif cs is not None:
        out["change_set"] = mask_value(cs)
    return orjson.dumps(out).decode()


def mask_value(value: Any) -> Any:
    """One payload value, masked by the project's one rule (resolver.normalize.mask_value); None stays None."""
    return None if value is None else normalize_mask_value(value)
