# cython: language_level=3
"""Compiled twin of resolver/_keys_py.py: byte-identical index keys.

xxh3-128 runs in C (the xxHash library's header, inlined: XXH_INLINE_ALL), over a stack buffer holding the
kind byte and the value's UTF-8 (CPython caches it on the str), with no Python call per key. Keyed BLAKE2b
goes through hashlib, as in the twin. Read resolver/_keys_py.py for the specification; this file must not
add behaviour of its own.
"""

import hashlib

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include <xxhash.h>
    """
    ctypedef struct XXH128_hash_t:
        pass
    ctypedef struct XXH128_canonical_t:
        unsigned char digest[16]
    XXH128_hash_t XXH3_128bits(const void* data, size_t length) nogil
    void XXH128_canonicalFromHash(XXH128_canonical_t* dst, XXH128_hash_t hash) nogil


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


KEY_SIZE = 16
ALGORITHMS = ("xxh3-128", "blake2b")
DEF STACK = 512

cdef enum Algorithm:
    XXH3_128 = 0
    BLAKE2B = 1


cdef class KeyHasher:
    """Computes index keys with one algorithm (and, for blake2b, one secret)."""

    cdef readonly str algorithm
    cdef Algorithm _alg
    cdef bytes _secret
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
        self._blake2b = hashlib.blake2b

    cpdef bytes key(self, int kind, str value):
        """The 16-byte index key of a normalized identifier of `kind` (0..255)."""
        if kind < 0 or kind > 255:
            raise ValueError("bytes must be in range(0, 256)")
        if self._alg == BLAKE2B:
            return self._blake2b(bytes((kind,)) + value.encode("utf-8"), digest_size=KEY_SIZE, key=self._secret).digest()
        cdef Py_ssize_t n
        cdef const char* utf8 = PyUnicode_AsUTF8AndSize(value, &n)
        cdef char stack[STACK]
        cdef char* buf = stack
        cdef XXH128_canonical_t out
        if n + 1 > STACK:
            buf = <char*>malloc(n + 1)
            if buf == NULL:
                raise MemoryError()
        buf[0] = <char>kind
        memcpy(buf + 1, utf8, n)
        XXH128_canonicalFromHash(&out, XXH3_128bits(buf, n + 1))
        if buf != stack:
            free(buf)
        return PyBytes_FromStringAndSize(<char*>out.digest, 16)

    def keys(self, int kind, list values):
        """`key` for each value, in order."""
        return [self.key(kind, v) for v in values]
