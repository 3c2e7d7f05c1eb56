"""A digest of a store's contents, to compare replicas: nodes that applied the same log to the same position have
equal digests.

Every named database is hashed in key order, in one read transaction (a consistent snapshot), its name, every key
and every value; the stream position (`meta`) is part of it, so equal digests also mean equal positions.

One exception: a sensitive attribute is sealed with a fresh random nonce (resolver.crypto), so two replicas hold
different ciphertexts of the same value. Records are therefore hashed opened (their plaintext JSON), and, when the
store seals anything, the change log's and merge journal's values (which carry such ciphertexts) are hashed by
key only. The events inbox, its dead letters, its webhook-id dedupe and its counters are each node's own (a webhook
is admitted by the node it reached; resolver.events.applier.drain_through_log): not hashed. And each node sweeps
expired idempotency-ledger entries by its own clock (an expired entry answers nothing either way, so applies agree):
two current nodes may differ by such entries for up to one `sweep_interval_s`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from resolver.cluster.applier import POSITION_KEY
from resolver.records import encode_json
from resolver.store import Store

_SEALED_ELSEWHERE = ("changes", "merges")
NODE_LOCAL = frozenset({"ev_inbox", "ev_dlq", "ev_ids", "ev_ids_exp", "ev_counters"})


@dataclass(frozen=True, slots=True)
class Digest:
    """A store's position in the stream (0: none applied) and the hex digest of its contents."""

    position: int
    hexdigest: str


def store_digest(store: Store) -> Digest:
    """The digest of `store` now (a read transaction; the store may be serving and applying meanwhile)."""
    h = hashlib.blake2b(digest_size=32)
    sealing = store.sealer.active
    with store.read() as txn:
        raw = txn.txn.get(POSITION_KEY, db=store.db["meta"])
        position = int.from_bytes(raw, "big") if raw is not None else 0
        for name in sorted(store.db.keys() - NODE_LOCAL):
            h.update(b"\0db\0" + name.encode())
            keys_only = sealing and name in _SEALED_ELSEWHERE
            with txn.txn.cursor(db=store.db[name]) as cursor:
                for key, value in cursor.iternext(keys=True, values=True):  # duplicates too (index databases)
                    h.update(len(key).to_bytes(4, "big") + key)
                    if name == "records":
                        rec = txn.record(key)
                        value = encode_json(rec.to_json()) if rec is not None else b""
                    elif keys_only:
                        continue
                    h.update(len(value).to_bytes(4, "big") + value)
    return Digest(position, h.hexdigest())

