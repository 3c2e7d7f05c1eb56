# The JSON writer of ext/_load_c.pyx (included there): orjson's bytes, written without building the objects.
#
# resolver/_load_worker_py.py builds dicts and has orjson encode them with OPT_SORT_KEYS; this writes the same bytes
# straight into one growing buffer, each object's keys in the order orjson sorts them (by code point: the order of
# their UTF-8 bytes, and of Python's str comparison). Strings are escaped as orjson escapes them: '"' and '\\',
# \b \t \n \f \r, every other character below U+0020 as \u00xx (lower-case hex); everything else, U+007F and
# non-ASCII included, as its UTF-8 bytes. Integers that fit 64 bits are written in decimal; any other value (a
# float, a sealed attribute's object) is what orjson.dumps makes of it, so their formatting is orjson's own.
# tests/unit/test_import_fast.py holds the two to the same bytes.

from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.stdlib cimport realloc


cdef struct Buf:
    char* data
    Py_ssize_t size
    Py_ssize_t cap


cdef int _reserve(Buf* b, Py_ssize_t more) except -1:
    cdef Py_ssize_t cap = b.cap
    cdef char* data
    if b.size + more <= cap:
        return 0
    while cap < b.size + more:
        cap = cap * 2 if cap else 4096
    data = <char*>realloc(b.data, cap)
    if data == NULL:
        raise MemoryError()
    b.data, b.cap = data, cap
    return 0


cdef inline int _raw(Buf* b, const char* s, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.data + b.size, s, n)
    b.size += n
    return 0


cdef inline int _lit(Buf* b, bytes s) except -1:
    return _raw(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef inline int _char(Buf* b, char c) except -1:
    _reserve(b, 1)
    b.data[b.size] = c
    b.size += 1
    return 0


cdef const char* _SHORT_ESCAPE = b"btn_fr"  # \b \t \n (\v: none) \f \r for 8..13
cdef unsigned char _PLAIN[256]  # 1: the byte is written as it is
for _c in range(256):
    _PLAIN[_c] = _c >= 0x20 and _c != 0x22 and _c != 0x5c


cdef int _str(Buf* b, str s) except -1:
    """A JSON string, escaped as orjson escapes it."""
    cdef Py_ssize_t n, i = 0, start, at = 1
    cdef const unsigned char* p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &n)
    cdef unsigned char c
    _reserve(b, n * 6 + 2)  # every byte escaped as \u00xx at worst
    cdef char* out = b.data + b.size
    out[0] = b'"'
    while i < n:
        start = i
        while i < n and _PLAIN[p[i]]:
            i += 1
        memcpy(out + at, p + start, i - start)
        at += i - start
        if i == n:
            break
        c = p[i]
        i += 1
        out[at] = b'\\'
        if c == b'"' or c == b'\\':
            out[at + 1] = <char>c
            at += 2
        elif 8 <= c <= 13 and c != 11:
            out[at + 1] = _SHORT_ESCAPE[c - 8]
            at += 2
        else:
            out[at + 1] = b'u'
            out[at + 2] = b'0'
            out[at + 3] = b'0'
            out[at + 4] = _HEX[c >> 4]
            out[at + 5] = _HEX[c & 15]
            at += 6
    out[at] = b'"'
    b.size += at + 1
    return 0


cdef int _int(Buf* b, long long v) except -1:
    cdef char digits[24]
    cdef int n = 0
    cdef unsigned long long u = <unsigned long long>(-v) if v < 0 else <unsigned long long>v
    while True:
        digits[23 - n] = <char>(48 + u % 10)  # '0' + the digit
        n += 1
        u //= 10
        if u == 0:
            break
    if v < 0:
        digits[23 - n] = b'-'
        n += 1
    return _raw(b, digits + 24 - n, n)


cdef int _value(Buf* b, value) except -1:
    """Any JSON value as orjson writes it (sorted keys)."""
    cdef int overflow = 0
    cdef long long v
    kind = type(value)
    if kind is str:
        return _str(b, value)
    if value is None:
        return _raw(b, b"null", 4)
    if value is True:
        return _raw(b, b"true", 4)
    if value is False:
        return _raw(b, b"false", 5)
    if kind is int:
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if not overflow:
            return _int(b, v)
    return _lit(b, <bytes>_dumps(value, None, _SORTED))


cdef int _strings(Buf* b, list values) except -1:
    """A JSON array of strings."""
    cdef Py_ssize_t i
    _char(b, b'[')
    for i in range(len(values)):
        if i:
            _char(b, b',')
        _str(b, values[i])
    return _char(b, b']')


cdef int _object(Buf* b, list names, values, dict keys) except -1:
    """A JSON object of `names` (sorted) -> values[name] (`values` a dict), or -> `values` itself (not a dict).
    `keys` remembers each name's '"name":' (a file repeats its attribute names on every row)."""
    cdef Py_ssize_t i
    cdef bint each = type(values) is dict
    cdef Buf one
    _char(b, b'{')
    for i in range(len(names)):
        if i:
            _char(b, b',')
        name = names[i]
        key = keys.get(name)
        if key is None:
            one.data, one.size, one.cap = NULL, 0, 0
            try:
                _str(&one, name)
                _char(&one, b':')
                key = PyBytes_FromStringAndSize(one.data, one.size)
            finally:
                free(one.data)
            if len(keys) < 4096:
                keys[name] = key
        _lit(b, key)
        _value(b, (<dict>values)[name] if each else values)
    return _char(b, b'}')


cdef inline list _in_order(list values):
    """`values` sorted (a list of one is already)."""
    return sorted(values) if len(values) > 1 else values
