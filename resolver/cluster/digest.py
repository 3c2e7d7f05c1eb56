"""A digest of a store's contents, to compare replicas: nodes that applied the same log to the same position have
equal digests.

Every named database is hashed in key order, in one read transaction (a consistent snapshot), its name, every key
and every value; the stream position (`meta`) is part of it, so equal digests also mean equal positions.

Values are hashed as stored, sensitive attributes sealed: a replicated command's apply seals them with nonces
derived from the command (resolver.nonces), so every node stores the same ciphertext, and a digest also vouches for
the ciphertexts themselves. (A value sealed outside the log, with a random nonce, differs between nodes: one that
`resolver rekey` sealed again on one node, or one that an earlier version sealed while applying the log.)

What is not compared: the events inbox, its dead letters, its webhook-id dedupe and its counters are each node's own
(a webhook is admitted by the node it reached; resolver.events.applier.drain_through_log): not hashed. And each node
sweeps expired idempotency-ledger entries by its own clock (an expired entry answers nothing either way, so applies
agree): two current nodes may differ by such entries for up to one `sweep_interval_s`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from resolver.cluster.applier import POSITION_KEY
from resolver.store import Store

NODE_LOCAL = frozenset({"ev_inbox", "ev_dlq", "ev_ids", "ev_ids_exp", "ev_counters"})


@dataclass(frozen=True, slots=True)
class Digest:
    """A store's position in the stream (0: none applied) and the hex digest of its contents."""

    position: int
    hexdigest: str


def store_digest(store: Store) -> Digest:
    """The digest of `store` now (a read transaction; the store may be serving and applying meanwhile)."""
    h = hashlib.blake2b(digest_size=32)
    with store.read() as txn:
        raw = txn.txn.get(POSITION_KEY, db=store.db["meta"])
        position = int.from_bytes(raw, "big") if raw is not None else 0
        for name in sorted(store.db.keys() - NODE_LOCAL):
            h.update(b"\0db\0" + name.encode())
            with txn.txn.cursor(db=store.db[name]) as cursor:
                for key, value in cursor.iternext(keys=True, values=True):  # duplicates too (index databases)
                    h.update(len(key).to_bytes(4, "big") + key)
                    h.update(len(value).to_bytes(4, "big") + value)
    return Digest(position, h.hexdigest())

