"""How an event is stored (inbox and dead letters): JSON metadata, a newline, then the body's original bytes.

orjson never writes a raw newline, so the first b"\n" ends the metadata and the body is kept byte-identical.

With `[encryption] keys` (a key ring given), the body is stored encrypted (resolver.crypto: a CRM body holds
identifiers and sensitive values in clear): the metadata then names the key (`sealed`), the body is nonce +
ciphertext + tag, and its associated data is the event's source and webhook id, so that `decode` gives back the
original bytes, and a body moved to another event fails. The outbound queue shares the format without a ring: its
messages never carry a sensitive value (resolver.outbound.messages).
"""

from __future__ import annotations

from typing import Any

import orjson

from resolver.crypto import Ciphertext, KeyRing, event_aad

SEALED_BY = "sealed"  # metadata key: the id of the key the body is encrypted with


def encode(meta: dict[str, Any], body: bytes, ring: KeyRing | None = None) -> bytes:
    """The stored form of an event; its body encrypted when `ring` has a key (`meta` names source and webhook_id)."""
    if ring is not None and ring.enabled:
        ct = ring.seal(body, event_aad(meta["source"], meta["webhook_id"]))
        meta, body = {**meta, SEALED_BY: ct.key_id}, ct.blob
    return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS) + b"\n" + body


def decode(raw: bytes, ring: KeyRing | None = None) -> tuple[dict[str, Any], bytes]:
    """The metadata and original body bytes of a stored event; DecryptionFailed when its body is encrypted under a
    key `ring` does not hold (or `ring` is None), or was altered or moved."""
    head, _, body = bytes(raw).partition(b"\n")
    meta: dict[str, Any] = orjson.loads(head)
    key_id = meta.pop(SEALED_BY, None)
    if key_id is not None:
        what = f"the body of event {meta.get('webhook_id', '')[:64]!r} from {meta.get('source', '')!r}"
        body = (ring or KeyRing(())).open(Ciphertext(key_id, body), event_aad(meta["source"], meta["webhook_id"]),
                                          what)
    return meta, body


def sealed_by(raw: bytes) -> str | None:
    """The id of the key a stored event's body is encrypted with (None: stored in clear)."""
    head = bytes(raw).partition(b"\n")[0]
    key_id = orjson.loads(head).get(SEALED_BY)
    return None if key_id is None else str(key_id)
