# The record scanner of ext/_probe_c.pyx, which includes it (one C module: the probe loop inlines these).
#
# It reads a stored record's JSON bytes without decoding them: whether the record holds an identifier (`_scan`)
# and the values of a few top-level fields (`_fields`). Both give up, and the caller decodes instead, on
# anything that is not a record as resolver.records writes it (ext/_probe_c.pyx says why bytes are exact).
# Each scanning function takes the buffer, a position and the end, and returns the position after what it
# read, or -1 when the bytes are not what a record looks like.

import orjson

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)


cdef inline Py_ssize_t _ws(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (p[i] == 32 or p[i] == 9 or p[i] == 10 or p[i] == 13):
        i += 1
    return i


cdef inline Py_ssize_t _string(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """p[i] is an opening quote: the position after its closing quote."""
    cdef const unsigned char* q
    cdef Py_ssize_t j
    i += 1
    while i < n:
        q = <const unsigned char*>memchr(p + i, 34, n - i)  # the next quote (memchr is vectorized)
        if q == NULL:
            return -1
        j = q - p
        i = j
        while i > 0 and p[i - 1] == 92:  # an odd run of backslashes before it escapes it
            i -= 1
        if (j - i) % 2 == 0:
            return j + 1
        i = j + 1
    return -1


cdef Py_ssize_t _value(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Skip any JSON value starting at p[i]."""
    cdef int depth = 0
    cdef unsigned char c
    if i >= n:
        return -1
    c = p[i]
    if c == 34:
        return _string(p, i, n)
    if c == 123 or c == 91:  # { [
        while i < n:
            c = p[i]
            if c == 34:
                i = _string(p, i, n)
                if i < 0:
                    return -1
                continue
            if c == 123 or c == 91:
                depth += 1
            elif c == 125 or c == 93:  # } ]
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    if c == 116 and n - i >= 4 and memcmp(p + i, b"true", 4) == 0:
        return i + 4
    if c == 102 and n - i >= 5 and memcmp(p + i, b"false", 5) == 0:
        return i + 5
    if _is_null(p, i, n):
        return i + 4
    if not (c == 45 or 48 <= c <= 57):  # a number starts with - or a digit
        return -1
    i += 1
    while i < n and (48 <= p[i] <= 57 or p[i] == 46 or p[i] == 101 or p[i] == 69 or p[i] == 43 or p[i] == 45):
        i += 1
    return i


cdef inline bint _is_null(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    return n - i >= 4 and memcmp(p + i, b"null", 4) == 0


cdef inline bint _escaped(const unsigned char* p, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """Whether the string token p[start:end] holds an escape (so its bytes are not its text)."""
    cdef Py_ssize_t j
    for j in range(start + 1, end - 1):
        if p[j] == 92:
            return True
    return False


cdef inline bint _is(const unsigned char* p, Py_ssize_t start, Py_ssize_t end, const char* want,
                     Py_ssize_t size) noexcept nogil:
    """Whether the string token p[start:end] (quotes included) holds exactly the bytes `want` (a key's name,
    an identifier's encoding)."""
    return end - start == size + 2 and memcmp(p + start + 1, want, size) == 0


cdef enum:
    CLOSED = -2  # _next, _open: the record's object ended (and nothing follows it)


cdef inline Py_ssize_t _key(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* kend) noexcept nogil:
    """p[i] opens a member `"key": value`: the position of its value (`kend`: just after the key), or -1."""
    if i >= n or p[i] != 34:
        return -1
    kend[0] = _string(p, i, n)
    if kend[0] < 0 or _escaped(p, i, kend[0]):  # an escaped key is not a name compared by its bytes
        return -1
    i = _ws(p, kend[0], n)
    if i >= n or p[i] != 58:  # :
        return -1
    i = _ws(p, i + 1, n)
    return i if i < n else -1


cdef inline Py_ssize_t _next(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """After a member's value: the next member's position, CLOSED at the record's end, or -1."""
    i = _ws(p, i, n)
    if i < n and p[i] == 44:  # ,
        return _ws(p, i + 1, n)
    if i < n and p[i] == 125 and _ws(p, i + 1, n) == n:  # } and nothing after it
        return CLOSED
    return -1


cdef inline Py_ssize_t _open(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """The first member's position, CLOSED for `{}`, or -1 when the bytes are not an object."""
    cdef Py_ssize_t i = _ws(p, 0, n)
    if i >= n or p[i] != 123:  # {
        return -1
    i = _ws(p, i + 1, n)
    if i < n and p[i] == 125:
        return CLOSED
    return i


cdef inline int _match(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, const char* want, Py_ssize_t size,
                       Py_ssize_t* end) noexcept nogil:
    """p[i] should open a string: 1 if it encodes exactly `want`, 0 if not, 2 if not by its bytes but it holds
    an escape (its text might still be `want`), -1 if it is no string. `end`: just after it."""
    if i >= n or p[i] != 34:
        return -1
    end[0] = _string(p, i, n)
    if end[0] < 0:
        return -1
    if _is(p, i, end[0], want, size):
        return 1
    return 2 if _escaped(p, i, end[0]) else 0


cdef int _scan(const unsigned char* p, Py_ssize_t n, int kind, const char* want, Py_ssize_t size) noexcept nogil:
    """1 if the record holds the identifier, 0 if not, -1 if the bytes alone cannot tell (not a record as we
    write it, or a candidate string escaped differently from orjson). It stops at the first match: LMDB stores
    a value whole or not at all, so the bytes after it are the rest of a record we wrote."""
    cdef Py_ssize_t i = _open(p, n), kstart, kend
    cdef bint array_field, scalar_field, uncertain = False
    cdef int m
    while i >= 0:
        kstart = i
        i = _key(p, i, n, &kend)
        if i < 0:
            return -1
        if kind == PHONE:
            array_field, scalar_field = _is(p, kstart, kend, b"phones", 6), False
        elif kind == EMAIL:
            array_field, scalar_field = _is(p, kstart, kend, b"emails", 6), False
        else:
            array_field = _is(p, kstart, kend, b"merged_external_ids", 19)
            scalar_field = _is(p, kstart, kend, b"external_id", 11)
        if array_field and p[i] == 91:  # [ strings ]
            i = _ws(p, i + 1, n)
            if i < n and p[i] == 93:
                i += 1
            else:
                while True:
                    m = _match(p, i, n, want, size, &i)
                    if m == 1 or m < 0:
                        return m
                    uncertain = uncertain or m == 2
                    i = _ws(p, i, n)
                    if i < n and p[i] == 44:
                        i = _ws(p, i + 1, n)
                    elif i < n and p[i] == 93:
                        i += 1
                        break
                    else:
                        return -1
        elif scalar_field and p[i] == 34:
            m = _match(p, i, n, want, size, &i)
            if m == 1 or m < 0:
                return m
            uncertain = uncertain or m == 2
        elif array_field or (scalar_field and not _is_null(p, i, n)):
            return -1  # an identifier field of another type than we write
        else:
            i = _value(p, i, n)
            if i < 0:
                return -1
        i = _next(p, i, n)
    if i == CLOSED:
        return -1 if uncertain else 0
    return -1


cdef bytes _encoded(str value):
    """The bytes between the quotes of orjson's encoding of `value`."""
    cdef Py_ssize_t size, j
    cdef bytes quoted
    cdef const unsigned char* s = <const unsigned char*>PyUnicode_AsUTF8AndSize(value, &size)
    for j in range(size):
        if s[j] < 32 or s[j] == 34 or s[j] == 92:
            quoted = orjson.dumps(value)
            return quoted[1:len(quoted) - 1]
    return s[:size]


cdef object _NOT_SCALAR = object()


cdef object _scalar(const unsigned char* p, Py_ssize_t i, Py_ssize_t e):
    """A string without escapes or a small integer, decoded without orjson; _NOT_SCALAR for anything else."""
    cdef Py_ssize_t j
    cdef long long v = 0
    cdef bint negative
    if p[i] == 34:
        for j in range(i + 1, e - 1):
            if p[j] == 92:
                return _NOT_SCALAR
        return PyUnicode_DecodeUTF8(<const char*>p + i + 1, e - i - 2, NULL)
    negative = p[i] == 45  # -
    j = i + 1 if negative else i
    if j == e or e - j > 18 or (p[j] == 48 and e - j > 1):  # empty, may overflow, or a leading zero
        return _NOT_SCALAR
    while j < e:
        if p[j] < 48 or p[j] > 57:
            return _NOT_SCALAR
        v = v * 10 + (p[j] - 48)
        j += 1
    return -v if negative else v


cdef object _fields(bytes raw, tuple names):
    """The values of top-level `names` (bytes) in the record's JSON, or None when the scan gives up."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), i = _open(p, n), kstart, kend, e, j, found = 0, want = len(names)
    cdef bytes name
    cdef list out = [None] * want
    loads = orjson.loads
    while i >= 0:
        kstart = i
        i = _key(p, i, n, &kend)
        if i < 0:
            return None
        e = _value(p, i, n)
        if e < 0:
            return None
        for j in range(want):
            name = <bytes>names[j]
            if _is(p, kstart, kend, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)):
                out[j] = _scalar(p, i, e)
                if out[j] is _NOT_SCALAR:
                    out[j] = loads(raw[i:e])
                found += 1
                break
        if found == want:
            return out
        i = _next(p, e, n)
    return out if i == CLOSED else None
