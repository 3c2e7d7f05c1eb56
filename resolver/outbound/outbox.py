"""The transactional outbox in LMDB: messages are queued in the write transaction of the change they announce,
and every later move of a message commits with its counters, so that at every commit

    committed = delivered + pending (in ob_queue) + dead (in ob_dlq) + discarded

| database | key | value |
| --- | --- | --- |
| ob_queue | message id (8, big-endian) | metadata JSON, a newline, the body (resolver.events.envelope) |
| ob_dlq | message id (8) | the same, with the reason it died and when |
| ob_state | b"n" + counter name | count (8, big-endian) |
| ob_state | b"i" | the last message id given (ids are never reused) |
| ob_state | b"c" + customer uuid (16) + message id (8) | empty: that message copies the customer's PII (erasure) |

`Outbox` is the change listener (resolver.store.Store.change_listeners) a writing process registers
(resolver.bootstrap.build_service): for each change, one message per destination that wants it
(resolver.outbound.messages). The deliverer then moves each message: `acknowledge` (2xx: gone, delivered +1),
`retry_later` (attempts, last error and the earliest next attempt kept with it), `kill` (to ob_dlq). Operators
`replay` (back into the queue under a new id, same webhook-id) and `discard`; erasure `forget_customer`.
Every function takes the caller's write transaction; none commits.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from resolver.config import Settings
from resolver.errors import DeadLetterNotFound
from resolver.events import envelope
from resolver.outbound.messages import Message, Route
from resolver.store import Store, Txn, uuid_bytes

_U64 = struct.Struct(">Q")
COUNTERS = ("committed", "delivered", "dead_lettered", "discarded", "replayed", "attempts", "retries", "throttled",
            "erased")
_COUNTER = b"n"
_LAST_ID = b"i"
_REF = b"c"


def key(message_id: int) -> bytes:
    return _U64.pack(message_id)


def _ref(uid: bytes, message_id: int) -> bytes:
    return _REF + uid + _U64.pack(message_id)


def add_counters(txn: Any, store: Store, deltas: Mapping[str, int]) -> None:
    """Add `deltas` to the outbound counters in the caller's write transaction."""
    db = store.db["ob_state"]
    for name, delta in deltas.items():
        if delta:
            k = _COUNTER + name.encode()
            raw = txn.get(k, db=db)
            txn.put(k, _U64.pack(max(0, (_U64.unpack(raw)[0] if raw is not None else 0) + delta)), db=db)


def _next_id(txn: Any, store: Store) -> int:
    db = store.db["ob_state"]
    raw = txn.get(_LAST_ID, db=db)
    nxt = (_U64.unpack(raw)[0] if raw is not None else 0) + 1
    txn.put(_LAST_ID, _U64.pack(nxt), db=db)
    return nxt


def _put_refs(txn: Any, store: Store, owners: Iterable[str], message_id: int) -> None:
    for owner in owners:
        txn.put(_ref(uuid_bytes(owner), message_id), b"", db=store.db["ob_state"])


def _drop_refs(txn: Any, store: Store, owners: Iterable[str], message_id: int) -> None:
    for owner in owners:
        txn.delete(_ref(uuid_bytes(owner), message_id), db=store.db["ob_state"])


class Outbox:
    """The change listener: queues, in the change's transaction, each message its change makes (one per
    destination that wants it). Deterministic: what it writes depends on the change and the store only."""

    def __init__(self, settings: Settings) -> None:
        self.routes = [Route(dest, settings) for dest in settings.outbound.values()]

    def __call__(self, view: Txn, seq: int, change: dict[str, Any]) -> None:
        routes = [r for r in self.routes if r.wants(change)]
        if not routes:
            return
        external_id = None
        if change.get("customer_uuid") and change.get("action") != "DELETED":
            rec = view.record(view.survivor(uuid_bytes(change["customer_uuid"])))
            external_id = rec.external_id if rec is not None else None
        for route in routes:
            msg = route.message(change, external_id)
            if msg is not None:
                enqueue(view.txn, view.store, msg, seq=seq, at_us=change["at_us"])


def enqueue(txn: Any, store: Store, msg: Message, *, seq: int, at_us: int) -> int:
    """Queue `msg` (made by change `seq`, committed at `at_us`); its message id."""
    message_id = _next_id(txn, store)
    meta = {"id": message_id, "destination": msg.destination, "webhook_id": msg.webhook_id,
            "event_type": msg.event_type, "customer_uuid": msg.customer_uuid, "owners": list(msg.owners),
            "change_seq": seq, "at_us": at_us, "queued_us": at_us, "attempts": 0, "last_error": "", "next_us": 0}
    txn.put(key(message_id), envelope.encode(meta, msg.body), db=store.db["ob_queue"], append=True)
    _put_refs(txn, store, msg.owners, message_id)
    add_counters(txn, store, {"committed": 1})
    return message_id


def pending(txn: Any, store: Store, message_id: int) -> tuple[dict[str, Any], bytes] | None:
    """A queued message's metadata and body (None: no longer queued: delivered, dead, or erased)."""
    raw = txn.get(key(message_id), db=store.db["ob_queue"])
    return envelope.decode(raw) if raw is not None else None


def iter_pending(txn: Any, store: Store, after: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """Queued messages with an id above `after`, in id order: (id, metadata)."""
    with txn.cursor(db=store.db["ob_queue"]) as cur:
        if cur.set_range(key(after + 1)):
            for k, raw in cur:
                yield _U64.unpack(k)[0], envelope.decode(raw)[0]


def acknowledge(txn: Any, store: Store, message_id: int, attempts: int) -> bool:
    """The destination answered 2xx: the message leaves the queue (delivered +1; `attempts` this session's tries
    of it, counted). False: it had left already (erased meanwhile): nothing is counted as delivered."""
    found = pending(txn, store, message_id)
    add_counters(txn, store, {"attempts": attempts})
    if found is None:
        return False
    txn.delete(key(message_id), db=store.db["ob_queue"])
    _drop_refs(txn, store, found[0]["owners"], message_id)
    add_counters(txn, store, {"delivered": 1})
    return True


def retry_later(txn: Any, store: Store, message_id: int, *, attempts: int, error: str, next_us: int,
                throttled: bool) -> bool:
    """An attempt failed and will be retried at `next_us`: kept with the message (a restarted deliverer waits as
    long). False: the message is no longer queued."""
    found = pending(txn, store, message_id)
    add_counters(txn, store, {"attempts": attempts, "retries": 1, "throttled": int(throttled)})
    if found is None:
        return False
    meta, body = found
    meta.update(attempts=meta["attempts"] + attempts, last_error=error[:500], next_us=next_us)
    txn.put(key(message_id), envelope.encode(meta, body), db=store.db["ob_queue"])
    return True


def kill(txn: Any, store: Store, message_id: int, *, attempts: int, error: str, reason: str, now_us: int) -> bool:
    """The message cannot be delivered (`reason`: REJECTED for a 4xx, EXPIRED past max_age_s, ...): it moves to
    the dead-letter list under the same id, with its last error. False: it was no longer queued."""
    found = pending(txn, store, message_id)
    add_counters(txn, store, {"attempts": attempts})
    if found is None:
        return False
    meta, body = found
    meta.update(attempts=meta["attempts"] + attempts, last_error=error[:500], reason=reason, dead_us=now_us)
    txn.delete(key(message_id), db=store.db["ob_queue"])
    txn.put(key(message_id), envelope.encode(meta, body), db=store.db["ob_dlq"])
    add_counters(txn, store, {"dead_lettered": 1})
    return True


def dead_letter(txn: Any, store: Store, message_id: int) -> tuple[dict[str, Any], bytes]:
    raw = txn.get(key(message_id), db=store.db["ob_dlq"])
    if raw is None:
        raise DeadLetterNotFound(f"no outbound dead letter {message_id} (never existed, replayed or discarded)")
    return envelope.decode(raw)


def iter_dead(txn: Any, store: Store, after: int = 0) -> Iterator[tuple[dict[str, Any], bytes]]:
    if after >= 2**64 - 1:  # no id comes after the largest (ListOutboundDeadLetters' uint64 after_id: any value)
        return
    with txn.cursor(db=store.db["ob_dlq"]) as cur:
        if cur.set_range(key(after + 1)):
            for _, raw in cur:
                yield envelope.decode(raw)


def replay(txn: Any, store: Store, message_id: int, now_us: int) -> int:
    """Move a dead letter back into the queue, behind what is queued now, under a new id (the deliverer reads
    new ids only), with the same webhook-id and body; its age counts from now. Its new id."""
    meta, body = dead_letter(txn, store, message_id)
    new_id = _next_id(txn, store)
    txn.delete(key(message_id), db=store.db["ob_dlq"])
    _drop_refs(txn, store, meta["owners"], message_id)
    for k in ("reason", "dead_us"):
        meta.pop(k, None)
    meta.update(id=new_id, replayed_from=message_id, queued_us=now_us, next_us=0)
    txn.put(key(new_id), envelope.encode(meta, body), db=store.db["ob_queue"], append=True)
    _put_refs(txn, store, meta["owners"], new_id)
    add_counters(txn, store, {"replayed": 1})
    return new_id


def discard(txn: Any, store: Store, message_id: int) -> None:
    """Delete a dead letter for good (discarded +1)."""
    meta, _ = dead_letter(txn, store, message_id)
    txn.delete(key(message_id), db=store.db["ob_dlq"])
    _drop_refs(txn, store, meta["owners"], message_id)
    add_counters(txn, store, {"discarded": 1})


def forget_customer(view: Txn, uid: bytes) -> int:
    """Erasure (resolver.erase): drop every queued or dead message that copies customer `uid`'s PII (each counted
    discarded, and erased). A customer.deleted message copies none: it stays, and is sent. How many went."""
    store, txn = view.store, view.txn
    if "ob_state" not in store.db:
        return 0
    ids: list[int] = []
    with txn.cursor(db=store.db["ob_state"]) as cur:
        prefix = _REF + uid
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                if not k.startswith(prefix):
                    break
                ids.append(_U64.unpack(k[len(prefix):])[0])
    dropped = 0
    for message_id in ids:
        for db in (store.db["ob_queue"], store.db["ob_dlq"]):
            raw = txn.get(key(message_id), db=db)
            if raw is not None:
                txn.delete(key(message_id), db=db)
                _drop_refs(txn, store, envelope.decode(raw)[0]["owners"], message_id)
                dropped += 1
                break
        else:  # a reference whose message is gone (cannot happen: refs leave with their message): drop it alone
            txn.delete(_ref(uid, message_id), db=store.db["ob_state"])
    add_counters(txn, store, {"discarded": dropped, "erased": dropped})
    return dropped


def snapshot(txn: Any, store: Store) -> dict[str, Any]:
    """The counters, the queue's and the dead-letter list's sizes, and whether they conserve messages."""
    counts = dict.fromkeys(COUNTERS, 0)
    if "ob_state" not in store.db:  # a read-only open of a store older than the outbox
        return {"counters": counts, "pending": 0, "dead": 0, "conserved": True}
    with txn.cursor(db=store.db["ob_state"]) as cur:
        if cur.set_range(_COUNTER):
            for k, v in cur:
                if not k.startswith(_COUNTER):
                    break
                counts[bytes(k[1:]).decode()] = _U64.unpack(v)[0]
    in_queue = int(txn.stat(store.db["ob_queue"])["entries"])
    in_dlq = int(txn.stat(store.db["ob_dlq"])["entries"])
    conserved = counts["committed"] == counts["delivered"] + in_queue + in_dlq + counts["discarded"]
    return {"counters": counts, "pending": in_queue, "dead": in_dlq, "conserved": conserved}
