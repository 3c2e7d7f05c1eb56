"""Index keys: fixed-width hashes of normalized identifiers (pure-Python twin of ext/_keys_c.pyx).

This module is the readable specification; the compiled module must give byte-identical keys.
A key is the 16-byte digest of ``kind byte + UTF-8 value``: the kind byte keeps an email and an external_id
with the same text apart, so one keyed hash never correlates across kinds.

- ``xxh3-128`` (default): fast, unkeyed. Not a privacy measure: a phone's key is reversed by enumeration.
- ``blake2b``: BLAKE2b-128 keyed with a secret; the index file then reveals nothing without the key.
"""

from __future__ import annotations

import hashlib

import xxhash

KEY_SIZE = 16
ALGORITHMS = ("xxh3-128", "blake2b")


class KeyHasher:
    """Computes index keys with one algorithm (and, for blake2b, one secret)."""

    __slots__ = ("algorithm", "_secret")

    def __init__(self, algorithm: str = "xxh3-128", secret: bytes | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {ALGORITHMS}")
        if algorithm == "blake2b":
            if not secret or len(secret) > 64:
                raise ValueError("blake2b needs a secret key of 1-64 bytes")
        elif secret:
            raise ValueError("xxh3-128 is unkeyed: a secret is only used with blake2b")
        self.algorithm = algorithm
        self._secret = secret or b""

    def key(self, kind: int, value: str) -> bytes:
        """The 16-byte index key of a normalized identifier of `kind` (1..255)."""
        data = bytes((kind,)) + value.encode("utf-8")
        if self.algorithm == "xxh3-128":
            return xxhash.xxh3_128_digest(data)
        return hashlib.blake2b(data, digest_size=KEY_SIZE, key=self._secret).digest()

    def keys(self, kind: int, values: list[str]) -> list[bytes]:
        """`key` for each value, in order."""
        return [self.key(kind, v) for v in values]
