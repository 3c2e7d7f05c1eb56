"""Standard Webhooks authenticity: HMAC-SHA256 over `id.timestamp.body`, several secrets, constant time.

https://www.standardwebhooks.com: headers `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature` ("v1,<base64>" entries separated by spaces, so a sender can sign with an old and a new
secret during rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from resolver.errors import Unauthenticated

MAX_ID_LENGTH = 255
SIGNATURE_HEADERS = ("webhook-signature",)


def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value ("v1,<base64>") for a body: for senders and tests."""
    mac = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def verify(headers: Mapping[str, str], body: bytes, secrets: Sequence[bytes], now_s: float,
           tolerance_s: float) -> str:
    """The webhook-id of a correctly signed, fresh request; Unauthenticated otherwise (header names lower-case)."""
    webhook_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    signature = headers.get("webhook-signature", "")
    missing = [h for h, v in (("webhook-id", webhook_id), ("webhook-timestamp", stamp),
                              ("webhook-signature", signature)) if not v]
    if missing:
        raise Unauthenticated(f"missing header(s): {', '.join(missing)}")
    if len(webhook_id) > MAX_ID_LENGTH or not webhook_id.isprintable():
        raise Unauthenticated("webhook-id: at most 255 printable characters")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise Unauthenticated("webhook-timestamp: not an integer number of seconds") from None
    if abs(now_s - timestamp) > tolerance_s:
        raise Unauthenticated(f"webhook-timestamp is more than {tolerance_s:g}s from the server's clock")
    if not secrets:
        raise Unauthenticated("no secret is configured for this source")
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = [base64.b64encode(hmac.new(s, signed, hashlib.sha256).digest()) for s in secrets]
    ok = False
    for entry in signature.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        candidate = value.encode("ascii", "replace")
        for exp in expected:  # no early exit: the time taken does not say which secret matched
            ok |= hmac.compare_digest(candidate, exp)
    if not ok:
        raise Unauthenticated("no valid signature")
    return webhook_id


def redact(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers to keep with a dead letter: signatures and credentials replaced by "[redacted]"."""
    secret_like = {*SIGNATURE_HEADERS, "authorization", "cookie", "x-api-key"}
    return {k: ("[redacted]" if k in secret_like else v) for k, v in headers.items()}
