"""How an event is stored (inbox and dead letters): JSON metadata, a newline, then the body's original bytes.

orjson never writes a raw newline, so the first b"\n" ends the metadata and the body is kept byte-identical.
"""

from __future__ import annotations

from typing import Any

import orjson


def encode(meta: dict[str, Any], body: bytes) -> bytes:
    return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS) + b"\n" + body


def decode(raw: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, body = bytes(raw).partition(b"\n")
    meta: dict[str, Any] = orjson.loads(head)
    return meta, body
