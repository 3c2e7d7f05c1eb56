"""The operators' side of outbound delivery (contract §5b, §6), shared by `resolver outbound ...` and the RPCs:
list and show dead letters (payload masked), replay one (back into the queue, same webhook-id), discard one,
and the counters. Works while the server runs: LMDB serializes these writes with the server's.
"""

from __future__ import annotations

import time
from typing import Any

from resolver.outbound import outbox
from resolver.outbound.messages import masked_payload
from resolver.store import Store


def list_dead(store: Store, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Dead letters with an id above `after`, oldest first: metadata, masked payload and size (no body)."""
    out: list[dict[str, Any]] = []
    with store.read() as view:
        if "ob_dlq" not in store.db:
            return out
        for meta, body in outbox.iter_dead(view.txn, store, after):
            out.append({**meta, "masked_payload": masked_payload(body), "size": len(body)})
            if len(out) >= limit:
                break
    return out


def get_dead(store: Store, message_id: int) -> tuple[dict[str, Any], bytes]:
    """One dead letter's metadata (with its masked payload) and body; DeadLetterNotFound if there is none."""
    with store.read() as view:
        meta, body = outbox.dead_letter(view.txn, store, message_id)
    return {**meta, "masked_payload": masked_payload(body), "size": len(body)}, body


def replay(store: Store, message_id: int) -> int:
    """Requeue a dead letter (the deliverer sends it again, with the same webhook-id); its new message id."""
    with store.write() as view:
        return outbox.replay(view.txn, store, message_id, time.time_ns() // 1000)


def discard(store: Store, message_id: int) -> None:
    """Delete a dead letter for good (counted `discarded`)."""
    with store.write() as view:
        outbox.discard(view.txn, store, message_id)


def counters(store: Store) -> dict[str, Any]:
    """The conservation counters: committed = delivered + pending + dead + discarded (`conserved`)."""
    with store.read() as view:
        return outbox.snapshot(view.txn, store)
