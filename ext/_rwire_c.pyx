# cython: language_level=3
"""Compiled twin of resolver/_rwire_py.py: ResolveRequest bytes -> ResolveInput, ResolveResult -> ResolveResponse.

Read resolver/_rwire_py.py for the specification; this file must not add behaviour of its own. The twin goes
through protobuf message objects; here the protobuf wire format is read and written by hand, reading exactly
what upb reads (proto3: a later singular field overwrites, a repeated string appends, a repeated Identifiers
message merges, a known field with another wire type is an unknown field; strings must be valid UTF-8) and
writing what upb writes, map entries of a Struct aside, which come in the dict's order.

What the hand-written code does not cover goes to the twin instead of being guessed: a request holding a group
(wire types 3 and 4) decodes to None, the general path's answer; a result holding anything a JSON document does
not (a dict subclass, a Struct, a number of another type, a string with a lone surrogate, an int too large for a
double, a version out of range, nesting deeper than MAX_NESTING) is encoded by the twin, which then answers or
raises exactly as it always does.
"""

from cpython.bool cimport PyBool_Check
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_CheckExact
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_CheckExact
from cpython.long cimport PyLong_AsDouble, PyLong_AsUnsignedLongLong, PyLong_CheckExact
from cpython.tuple cimport PyTuple_CheckExact
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove

from resolver._rwire_py import OUTCOMES
from resolver._rwire_py import encode_resolve as _encode_general  # read at call time: tests replace it
from resolver.identifiers import RawIdentifiers
from resolver.resolve import ResolveInput


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


cdef enum WireType:
    VARINT = 0
    I64 = 1
    LEN = 2
    I32 = 5

cdef enum:
    TAG_BYTES = 5  # upb reads a tag or a length in at most 5 bytes, a value in at most 10
    VALUE_BYTES = 10
    MAX_ENUM = 0x7FFFFFFF
    MAX_UINT32 = 0xFFFFFFFF
    # Structs and lists nested deeper are the twin's: it recurses in Python (two or three frames a level) and
    # meets the interpreter's recursion limit somewhere past this, where it raises RecursionError.
    MAX_NESTING = 100


# -- decoding ----------------------------------------------------------------------------------------------------
cdef struct Reader:
    const unsigned char* p
    const unsigned char* end


cdef inline bint _varint(Reader* r, uint64_t* out, int max_bytes) noexcept nogil:
    """A base-128 varint of at most `max_bytes`; bits past the 64th are dropped, as upb drops them."""
    cdef uint64_t value = 0
    cdef unsigned char byte
    cdef int i
    for i in range(max_bytes):
        if r.p >= r.end:
            return False
        byte = r.p[0]
        r.p += 1
        value |= <uint64_t>(byte & 0x7F) << (7 * i)
        if byte < 0x80:
            out[0] = value
            return True
    return False


cdef inline bint _tag(Reader* r, uint64_t* field, int* wire_type) noexcept nogil:
    cdef uint64_t tag
    if not _varint(r, &tag, TAG_BYTES) or tag > MAX_UINT32 or tag >> 3 == 0:
        return False
    field[0] = tag >> 3
    wire_type[0] = <int>(tag & 7)
    return True


cdef inline bint _span(Reader* r, Reader* out) noexcept nogil:
    """The next length-delimited payload."""
    cdef uint64_t n
    if not _varint(r, &n, TAG_BYTES) or n > <uint64_t>(r.end - r.p):
        return False
    out.p = r.p
    out.end = r.p + n
    r.p += n
    return True


cdef bint _skip(Reader* r, int wire_type) noexcept nogil:
    """Past one unknown field; False for a group (the general path's) or anything corrupt."""
    cdef uint64_t n
    cdef Reader payload
    if wire_type == VARINT:
        return _varint(r, &n, VALUE_BYTES)
    if wire_type == LEN:
        return _span(r, &payload)
    if wire_type == I64:
        n = 8
    elif wire_type == I32:
        n = 4
    else:
        return False
    if n > <uint64_t>(r.end - r.p):
        return False
    r.p += n
    return True


cdef inline str _text(Reader* s):
    """A string field's payload; UnicodeDecodeError when it is not UTF-8 (protobuf refuses it too)."""
    return PyUnicode_DecodeUTF8(<char*>s.p, s.end - s.p, "strict")


def decode_resolve(data, Py_ssize_t max_size):
    """See resolver/_rwire_py.py; None also for bytes holding a group, and for data that is not `bytes`."""
    if not PyBytes_CheckExact(data) or PyBytes_GET_SIZE(data) > max_size:
        return None
    cdef Reader r, ids, s
    r.p = <const unsigned char*>PyBytes_AS_STRING(data)
    r.end = r.p + PyBytes_GET_SIZE(data)
    cdef uint64_t field, n
    cdef int wire_type
    cdef str external_id = "", default_region = "", view = ""
    cdef list emails = None, phones = None, fields = None
    cdef bint explain = False
    cdef uint64_t min_sequence = 0
    try:
        while r.p < r.end:
            if not _tag(&r, &field, &wire_type):
                return None
            if wire_type == LEN and field == 1:  # identifiers: a repeated occurrence merges into the first
                if not _span(&r, &ids):
                    return None
                while ids.p < ids.end:
                    if not _tag(&ids, &field, &wire_type):
                        return None
                    if wire_type == LEN and 1 <= field <= 3:
                        if not _span(&ids, &s):
                            return None
                        if field == 1:
                            external_id = _text(&s)
                        elif field == 2:
                            if emails is None:
                                emails = []
                            emails.append(_text(&s))
                        else:
                            if phones is None:
                                phones = []
                            phones.append(_text(&s))
                    elif not _skip(&ids, wire_type):
                        return None
            elif wire_type == LEN and 2 <= field <= 4:
                if not _span(&r, &s):
                    return None
                if field == 2:
                    default_region = _text(&s)
                elif field == 3:
                    if fields is None:
                        fields = []
                    fields.append(_text(&s))
                else:
                    view = _text(&s)
            elif wire_type == VARINT and field == 5:
                if not _varint(&r, &n, VALUE_BYTES):
                    return None
                explain = n != 0
            elif wire_type == VARINT and field == 6:
                if not _varint(&r, &min_sequence, VALUE_BYTES):
                    return None
            elif not _skip(&r, wire_type):
                return None
    except UnicodeDecodeError:
        return None
    return ResolveInput(
        RawIdentifiers(external_id, tuple(emails) if emails else (), tuple(phones) if phones else ()),
        default_region, tuple(fields) if fields else (), view, explain, min_sequence)


# -- encoding ----------------------------------------------------------------------------------------------------
cdef struct Buffer:
    unsigned char* data
    Py_ssize_t size
    Py_ssize_t capacity


cdef union DoubleBits:
    double d
    uint64_t u


cdef int _grow(Buffer* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t capacity = b.capacity * 2 if b.capacity else 256
    cdef unsigned char* grown
    while capacity < b.size + extra:
        capacity *= 2
    grown = <unsigned char*>realloc(b.data, capacity)
    if grown == NULL:
        raise MemoryError()
    b.data = grown
    b.capacity = capacity
    return 0


cdef inline int _reserve(Buffer* b, Py_ssize_t extra) except -1:
    if b.size + extra > b.capacity:
        _grow(b, extra)
    return 0


cdef inline int _put_varint(Buffer* b, uint64_t value) except -1:
    _reserve(b, VALUE_BYTES)
    while value >= 0x80:
        b.data[b.size] = <unsigned char>(value | 0x80)
        b.size += 1
        value >>= 7
    b.data[b.size] = <unsigned char>value
    b.size += 1
    return 0


cdef inline int _put_string(Buffer* b, uint64_t field, object text, bint omit_empty) except -1:
    """A string field (omitted when empty and `omit_empty`: proto3's default); TypeError for a non-str."""
    cdef Py_ssize_t n
    cdef const char* utf8
    if not PyUnicode_CheckExact(text):
        raise TypeError("not a str")
    utf8 = PyUnicode_AsUTF8AndSize(text, &n)
    if n == 0 and omit_empty:
        return 0
    _put_varint(b, field << 3 | LEN)
    _put_varint(b, <uint64_t>n)
    _reserve(b, n)
    memcpy(b.data + b.size, utf8, n)
    b.size += n
    return 0


cdef inline int _put_uint(Buffer* b, uint64_t field, object number, uint64_t limit) except -1:
    """An unsigned varint field (enum, uint32, uint64), omitted when 0; an error past `limit` or for a non-int."""
    cdef uint64_t value
    if not PyLong_CheckExact(number):
        raise TypeError("not an int")
    value = PyLong_AsUnsignedLongLong(number)
    if value > limit:
        raise OverflowError("out of range")
    if value:
        _put_varint(b, field << 3 | VARINT)
        _put_varint(b, value)
    return 0


cdef inline Py_ssize_t _open(Buffer* b, uint64_t field) except -1:
    """Start a message field: its tag and a one-byte length, set by `_close`. Returns where its payload starts."""
    _put_varint(b, field << 3 | LEN)
    _reserve(b, 1)
    b.size += 1
    return b.size


cdef int _close(Buffer* b, Py_ssize_t start) except -1:
    """Write the length of the message field whose payload starts at `start`, widening it when it needs to."""
    cdef Py_ssize_t n = b.size - start
    cdef Py_ssize_t width = 1
    cdef uint64_t rest = <uint64_t>n
    if n < 0x80:
        b.data[start - 1] = <unsigned char>n
        return 0
    while rest >= 0x80:
        rest >>= 7
        width += 1
    _reserve(b, width - 1)
    memmove(b.data + start - 1 + width, b.data + start, n)
    b.size = start - 1
    _put_varint(b, <uint64_t>n)
    b.size += n
    return 0


cdef int _put_value(Buffer* b, object value, int depth) except -1:
    """The payload of a google.protobuf.Value, chosen as Struct.update chooses (bool before int)."""
    cdef DoubleBits bits
    cdef Py_ssize_t start
    cdef int i
    if value is None:
        _put_varint(b, 1 << 3 | VARINT)  # null_value: a oneof member, written although it is 0
        _put_varint(b, 0)
    elif PyBool_Check(value):
        _put_varint(b, 4 << 3 | VARINT)
        _put_varint(b, 1 if value else 0)
    elif PyUnicode_CheckExact(value):
        _put_string(b, 3, value, False)
    elif PyFloat_CheckExact(value) or PyLong_CheckExact(value):
        bits.d = PyFloat_AS_DOUBLE(value) if PyFloat_CheckExact(value) else PyLong_AsDouble(value)
        _put_varint(b, 2 << 3 | I64)
        _reserve(b, 8)
        for i in range(8):  # little-endian, whatever the machine's order
            b.data[b.size + i] = <unsigned char>(bits.u >> (8 * i))
        b.size += 8
    elif PyDict_CheckExact(value):
        start = _open(b, 5)
        _put_struct(b, value, depth + 1)
        _close(b, start)
    elif PyList_CheckExact(value) or PyTuple_CheckExact(value):
        start = _open(b, 6)
        _put_list(b, value, depth + 1)
        _close(b, start)
    else:
        raise TypeError("not a JSON value")
    return 0


cdef int _put_struct(Buffer* b, dict values, int depth) except -1:
    """The payload of a google.protobuf.Struct: one map entry {key = 1, value = 2} per item."""
    cdef Py_ssize_t entry, start
    if depth > MAX_NESTING:
        raise RecursionError("nested too deep")
    for key, value in values.items():
        entry = _open(b, 1)
        _put_string(b, 1, key, False)
        start = _open(b, 2)
        _put_value(b, value, depth)
        _close(b, start)
        _close(b, entry)
    return 0


cdef int _put_list(Buffer* b, object items, int depth) except -1:
    """The payload of a google.protobuf.ListValue: values = 1, one per item."""
    cdef Py_ssize_t start
    if depth > MAX_NESTING:
        raise RecursionError("nested too deep")
    for item in items:
        start = _open(b, 1)
        _put_value(b, item, depth)
        _close(b, start)
    return 0


cdef int _put_attributes(Buffer* b, uint64_t field, object values) except -1:
    """A Struct field, present only when there are attributes (the twin calls update only then)."""
    cdef Py_ssize_t start
    if values:
        if not PyDict_CheckExact(values):
            raise TypeError("not a dict")
        start = _open(b, field)
        _put_struct(b, values, 1)
        _close(b, start)
    return 0


cdef int _put_response(Buffer* b, object r) except -1:
    cdef Py_ssize_t start
    matched_on = r.matched_on
    _put_uint(b, 1, OUTCOMES[r.outcome], MAX_ENUM)
    _put_string(b, 2, r.customer_uuid, True)
    _put_uint(b, 3, 0 if matched_on is None else matched_on.value, MAX_ENUM)
    _put_uint(b, 4, r.version, <uint64_t>-1)
    _put_attributes(b, 5, r.attributes)
    for c in r.candidates:
        start = _open(b, 6)
        _put_string(b, 1, c.customer_uuid, True)
        _put_attributes(b, 2, c.attributes)
        _close(b, start)
    for text in r.conflicts:
        _put_string(b, 7, text, False)
    for p in r.probes:
        start = _open(b, 8)
        _put_uint(b, 1, p.kind.value, MAX_ENUM)
        _put_string(b, 2, p.masked, True)
        _put_uint(b, 3, p.result, MAX_ENUM)
        _put_uint(b, 4, p.hits, MAX_UINT32)
        _close(b, start)
    for s in r.skipped:
        start = _open(b, 9)
        _put_uint(b, 1, s.kind.value, MAX_ENUM)
        _put_string(b, 2, s.masked, True)
        _put_string(b, 3, s.reason, True)
        _put_string(b, 4, s.detail, True)
        _close(b, start)
    return 0


def encode_resolve(r):
    """See resolver/_rwire_py.py. Whatever this code does not cover is the twin's to encode or refuse."""
    cdef Buffer b
    b.data = NULL
    b.size = 0
    b.capacity = 0
    try:
        _put_response(&b, r)
        return PyBytes_FromStringAndSize(<char*>b.data, b.size)
    except Exception:
        return _encode_general(r)
    finally:
        free(b.data)
