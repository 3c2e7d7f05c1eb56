# cython: language_level=3
"""Compiled twin of resolver/_keys_py.py: byte-identical index keys, less interpreter overhead.

Read resolver/_keys_py.py for the specification; this file must not add behaviour of its own.
"""

import hashlib

from xxhash import xxh3_128_digest

KEY_SIZE = 16
ALGORITHMS = ("xxh3-128", "blake2b")

cdef enum Algorithm:
    XXH3_128 = 0
    BLAKE2B = 1


cdef class KeyHasher:
    """Computes index keys with one algorithm (and, for blake2b, one secret)."""

    cdef readonly str algorithm
    cdef Algorithm _alg
    cdef bytes _secret
    cdef object _xxh3
    cdef object _blake2b

    def __init__(self, str algorithm="xxh3-128", secret=None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {ALGORITHMS}")
        if algorithm == "blake2b":
            if not secret or len(secret) > 64:
                raise ValueError("blake2b needs a secret key of 1-64 bytes")
            self._alg = BLAKE2B
        else:
            if secret:
                raise ValueError("xxh3-128 is unkeyed: a secret is only used with blake2b")
            self._alg = XXH3_128
        self.algorithm = algorithm
        self._secret = bytes(secret or b"")
        self._xxh3 = xxh3_128_digest
        self._blake2b = hashlib.blake2b

    cpdef bytes key(self, int kind, str value):
        """The 16-byte index key of a normalized identifier of `kind` (1..255)."""
        cdef bytes data
        data = bytes((kind,)) + value.encode("utf-8")
        if self._alg == XXH3_128:
            return self._xxh3(data)
        return self._blake2b(data, digest_size=KEY_SIZE, key=self._secret).digest()

    def keys(self, int kind, list values):
        """`key` for each value, in order."""
        cdef str v
        return [self.key(kind, v) for v in values]
