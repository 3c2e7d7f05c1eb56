"""Small builders for requests used across the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from resolver.auth import NewToken, new_token
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
