"""Raw protobuf encoding for tests: what a hostile client can send that the protobuf library would not build."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """`n` (>= 0) as a base-128 varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
