"""The idempotency ledger (contract §4.2): one entry per key, checked and written in the caller's write
transaction, so concurrent duplicates execute exactly once.

An entry holds the fingerprint of the normalized request and the response it produced; it expires after
the configured retention (an expired entry counts as absent; the sweeper deletes it later).
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any

from resolver.errors import FieldViolation, IdempotencyKeyReused
from resolver.normalize import ASCII_CONTROL
from resolver.records import encode_json
from resolver.store import Txn

MAX_KEY_LENGTH = 255
# LMDB keys are at most 511 bytes, and a key is stored under prefixes (`pii_refs`: 17 bytes, interactions: 13 more):
# 255 characters of 4-byte UTF-8 would not fit, so the bytes are bounded too (an ASCII key never reaches this).
MAX_KEY_BYTES = 400


def check_key(key: str, field: str = "idempotency_key") -> FieldViolation | None:
    """The violation of a missing or malformed idempotency key (None: the key is fine); `field`: the request field
    that carries it (an interaction's key is its `interaction_id`)."""
    if not key:
        return FieldViolation(field, "required: retries must carry the same key", "REQUIRED")
    if len(key) > MAX_KEY_LENGTH or (ASCII_CONTROL.search(key) if key.isascii()
                                     else any(unicodedata.category(c) == "Cc" for c in key)
                                     or len(key.encode("utf-8")) > MAX_KEY_BYTES):
        return FieldViolation(field, f"1-{MAX_KEY_LENGTH} characters (at most {MAX_KEY_BYTES} bytes in UTF-8), "
                              "no control characters", "INVALID")
    return None


def fingerprint(normalized_request: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a normalized request: equal requests in any notation match."""
    return hashlib.sha256(encode_json(normalized_request)).hexdigest()


def replay(txn: Txn, key: str, fp: str, now_us: int) -> dict[str, Any] | None:
    """The stored response for `key` if this request ran before (None: run it).

    Raises IdempotencyKeyReused when the key was used for a different request and has not expired.
    """
    entry = txn.ledger_get(key)
    if entry is None or entry["exp_us"] <= now_us:
        return None
    if entry["fp"] != fp:
        raise IdempotencyKeyReused(
            "this idempotency key was already used for a different request; use a new key for a new request"
        )
    response: dict[str, Any] = entry["response"]
    return response


def record(txn: Txn, key: str, fp: str, expires_us: int, response: dict[str, Any]) -> None:
    """Store the response of a request that just ran, in the same transaction as its writes."""
    txn.ledger_put(key, entry(fp, expires_us, response))


def entry(fp: str, expires_us: int, response: dict[str, Any]) -> dict[str, Any]:
    """A ledger entry as stored (resolver.bulk encodes the same for its planned creates)."""
    return {"fp": fp, "exp_us": expires_us, "response": response}
