# cython: language_level=3
"""Compiled twin of resolver/_keys_py.py: byte-identical index keys.

xxh3-128 runs in C over a stack buffer holding the kind byte and the value's UTF-8 (CPython caches it on the
str), with no Python call per key. The C function is the one the twin calls: XXH3_128bits exported by the
extension of the `xxhash` package (a pinned runtime dependency), found once at import. So the build needs no
xxHash header or system library, and both implementations run the very same xxHash code. Keyed BLAKE2b goes
through hashlib, as in the twin. Read resolver/_keys_py.py for the specification; this file must not add
behaviour of its own.
"""

import ctypes
import hashlib

import xxhash._xxhash

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


cdef extern from *:
    """
    #include <stdint.h>
    /* XXH128_hash_t and XXH3_128bits as xxhash.h declares them (the ABI of xxHash 0.8) */
    typedef struct { uint64_t low64; uint64_t high64; } resolver_xxh128_t;
    typedef resolver_xxh128_t (*resolver_xxh3_128_fn)(const void* data, size_t length);

    /* xxHash's canonical form of a 128-bit hash: high64 then low64, each big-endian */
    static inline void resolver_xxh128_canonical(unsigned char* out, resolver_xxh128_t h) {
        for (int i = 0; i < 8; i++) {
            out[i] = (unsigned char)(h.high64 >> (56 - 8 * i));
            out[8 + i] = (unsigned char)(h.low64 >> (56 - 8 * i));
        }
    }
    """
    ctypedef struct resolver_xxh128_t:
        pass
    ctypedef resolver_xxh128_t (*resolver_xxh3_128_fn)(const void* data, size_t length) noexcept nogil
    void resolver_xxh128_canonical(unsigned char* out, resolver_xxh128_t h) noexcept nogil


cdef resolver_xxh3_128_fn _xxh3_128 = NULL


cdef void _bind_xxh3() except *:
    """Point _xxh3_128 at the xxhash package's XXH3_128bits (ImportError in one sentence if it is not there)."""
    global _xxh3_128
    try:
        address = ctypes.cast(ctypes.CDLL(xxhash._xxhash.__file__).XXH3_128bits, ctypes.c_void_p).value
    except (OSError, AttributeError) as exc:
        raise ImportError(f"resolver._keys_c: the xxhash package's extension ({xxhash._xxhash.__file__}) does not "
                          f"export XXH3_128bits ({exc}); install the pinned xxhash wheel, or run the pure-Python "
                          f"modules with RESOLVER_NO_EXTENSIONS=1") from None
    _xxh3_128 = <resolver_xxh3_128_fn><size_t>address


_bind_xxh3()


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


from resolver._keys_py import ALGORITHMS, KEY_SIZE  # the specification's names, stated there once
cdef enum:
    STACK = 512  # bytes of key input hashed from the stack; longer values are copied to the heap

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
        cdef unsigned char out[16]
        if n + 1 > STACK:
            buf = <char*>malloc(n + 1)
            if buf == NULL:
                raise MemoryError()
        buf[0] = <char>kind
        memcpy(buf + 1, utf8, n)
        resolver_xxh128_canonical(out, _xxh3_128(buf, n + 1))
        if buf != stack:
            free(buf)
        return PyBytes_FromStringAndSize(<char*>out, 16)

    def keys(self, int kind, list values):
        """`key` for each value, in order."""
        return [self.key(kind, v) for v in values]
