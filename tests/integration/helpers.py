"""Small builders for requests (gRPC, and signed webhooks) used across the integration and reliability tests."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from resolver.auth import NewToken, new_token
from resolver.events.signatures import sign
from resolver.v1 import resolver_pb2 as pb


def phone(i: int) -> str:
    """A valid US number (Google's 650-253 range), distinct for each i < 10000."""
    return f"+1650253{i:04d}"


def upsert_req(key: str | None = None, *, external_id: str = "", emails: tuple[str, ...] = (),
               phones: tuple[str, ...] = (), attributes: dict[str, Any] | None = None, **kw: Any) -> pb.UpsertRequest:
    req = pb.UpsertRequest(
        idempotency_key=key if key is not None else str(uuid.uuid4()),
        identifiers=pb.Identifiers(external_id=external_id, emails=list(emails), phones=list(phones)),
        **kw,
    )
    if attributes is not None:
        s = struct_pb2.Struct()
        s.update(attributes)
        req.attributes.CopyFrom(s)
    return req


def resolve_req(*, external_id: str = "", emails: tuple[str, ...] = (), phones: tuple[str, ...] = (),
                **kw: Any) -> pb.ResolveRequest:
    return pb.ResolveRequest(
        identifiers=pb.Identifiers(external_id=external_id, emails=list(emails), phones=list(phones)), **kw
    )


def write_tokens(path: Path, scopes: Mapping[str, str]) -> dict[str, NewToken]:
    """One new token per entry of `scopes` (key -> "scope,scope"), named t-KEY, written to `path` as an [auth]
    tokens_file; the tokens by key."""
    made = {key: new_token(f"t-{key}", spec) for key, spec in scopes.items()}
    path.write_text("".join(t.line + "\n" for t in made.values()))
    return made


def with_tokens(blueprint: str, path: Path) -> str:
    """`blueprint` with `[auth] tokens_file = path`."""
    return blueprint + f'\n[auth]\ntokens_file = "{path}"\n'


def signed_headers(secret: bytes, webhook_id: str, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of `body` signed with `secret` now."""
    ts = int(time.time())
    return {"webhook-id": webhook_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, webhook_id, ts, body)}


@dataclass(frozen=True)
class WebhookAnswer:
    """What the webhook endpoint answered: the HTTP status and the body."""

    status: int
    body: bytes


def post_webhook(port: int, source: str, secret: bytes, webhook_id: str, body: bytes, *,
                 timeout: float) -> WebhookAnswer:
    """POST `body` (JSON), signed now with `secret`, to the webhook endpoint of `source` on 127.0.0.1:`port`."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/webhooks/{source}", data=body, method="POST",
        headers={"content-type": "application/json", **signed_headers(secret, webhook_id, body)})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return WebhookAnswer(answer.status, answer.read())
    except urllib.error.HTTPError as err:
        with err:
            return WebhookAnswer(err.code, err.read())
