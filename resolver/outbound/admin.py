"""The operators' side of outbound delivery (contract §5b, §6), shared by `resolver outbound ...` and the RPCs:
list and show dead letters (payload masked), replay one (back into the queue, same webhook-id), discard one,
and the counters. Works while the server runs: LMDB serializes these writes with the server's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from resolver.config import Settings
from resolver.outbound import outbox
from resolver.outbound.messages import masked_payload
from resolver.store import Store, Txn
from resolver.writer import Writer


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


@dataclass(frozen=True, slots=True)
class Requeue:
    """An operator's decision on dead letter `message_id`, as a command (contract §10: in a cluster every node's
    outbox applies it, resolver.cluster.codec): `replay` it (requeued at `now_us`) or `discard` it."""

    message_id: int
    action: Literal["replay", "discard"]
    now_us: int

    @property
    def key(self) -> str:
        return f"outbound-dead/{self.message_id}/{self.action}"

    @property
    def fingerprint(self) -> str:
        return str(self.now_us)


def apply(view: Txn, cmd: Requeue) -> int:
    """Apply the decision in the caller's transaction: the replayed message's new id (0 for a discard);
    DeadLetterNotFound if there is no such dead letter (any more)."""
    if cmd.action == "replay":
        return outbox.replay(view.txn, view.store, cmd.message_id, cmd.now_us)
    outbox.discard(view.txn, view.store, cmd.message_id)
    return 0


def replicated_apply(view: Txn, cmd: Requeue, _settings: Settings) -> int:
    """`apply`, as the replicated log's entry (resolver.cluster.codec)."""
    return apply(view, cmd)


def _decide(store: Store, cmd: Requeue, writer: Writer | None) -> int:
    if writer is not None:
        return writer.submit(apply, cmd)
    with store.write() as view:
        return apply(view, cmd)


def replay(store: Store, message_id: int, writer: Writer | None = None) -> int:
    """Requeue a dead letter (the deliverer sends it again, with the same webhook-id); its new message id.
    `writer`: the serving process's (a cluster node's: through the replicated log); None: a transaction here."""
    return _decide(store, Requeue(message_id, "replay", time.time_ns() // 1000), writer)


def discard(store: Store, message_id: int, writer: Writer | None = None) -> None:
    """Delete a dead letter for good (counted `discarded`); `writer` as for `replay`."""
    _decide(store, Requeue(message_id, "discard", time.time_ns() // 1000), writer)


def counters(store: Store) -> dict[str, Any]:
    """The conservation counters: committed = delivered + pending + dead + discarded (`conserved`)."""
    with store.read() as view:
        return outbox.snapshot(view.txn, store)
