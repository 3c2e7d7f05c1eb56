# cython: language_level=3
"""Compiled twin of resolver/_load_py.py: the import's fast path for a JSON line, and the parent's create queue.

Read resolver/_load_py.py for the specification; this file must not add behaviour of its own, and
tests/unit/test_import_fast.py holds the two to the same bytes for any line. Like the twin, it has two halves,
included here so that they compile into this one module: ext/_load_worker.pxi (the worker's RowPlanner, twin
resolver/_load_worker_py.py) and ext/_load_parent.pxi (the parent's CreateQueue and KeyFilter, twin
resolver/_load_parent_py.py); this file holds what both read and write (the packed create's layout,
resolver/_load_consts.py) and ext/_load_json.pxi the JSON writer. The rules are the twin's PlanRules. Where
calling a rule per row would cost more than the row's own work, the common case is written out here and
everything else is still asked of the rule:

- an ASCII idempotency key of at most `max_key_length` characters without a control character is fine, and so is
  such an external_id once trimmed (resolver.ledger.check_key's and normalize_external_id's ASCII branches);
- an attribute is owned by another source when `owners` says so (AttributeSchema.owned_by_others);
- the attributes are read as jsonl.simple_attributes reads them (`simple_attributes`);
- the fingerprint is SHA-256 of the normalized request's sorted JSON (resolver.ledger.fingerprint), held-by keys
  are `held_key`'s prefix and the value (checked when the planner is made);
- the JSON is written by ext/_load_json.pxi (orjson's bytes, without building the objects), except for a create
  with a sensitive value, which the Sealer seals in the twin's dicts;
- the uuid of a row, when the import's uuids are a plain resolver.uuids.LoadUuids, is formatted here from its
  fields (`uuid7_int` and `text` of that module), its 32 random bits taken from os.urandom once per block; any
  other generator (a subclass, as tests use) is called as the twin calls it;
- `KeyFilter` is a blocked Bloom filter of the keys claimed, not a set: a false "maybe" sends `take` to the store
  (one lookup), so the answer is the twin's; it costs 12 bits per expected key, where a set costs ~100 bytes;
- `drain` sorts with C comparisons (the order of list.sort()).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy

import orjson

from resolver import _load_consts as _layout

__all__ = ["CreateQueue", "KeyFilter", "RowPlanner", "entry_derived"]

cdef object _dumps = orjson.dumps
cdef object _SORTED = orjson.OPT_SORT_KEYS
cdef int _DERIVED = _layout.DERIVED
cdef Py_ssize_t _KEY_SIZE = _layout.KEY_SIZE
cdef Py_ssize_t _HEADER = _layout.HEADER.size  # line, flags, now_us, expires_us, uuid, number of keys
cdef Py_ssize_t _KEY = _layout.KEY.size
cdef Py_ssize_t _KEY_LENGTH = _layout.KEY_LENGTH.size
cdef Py_ssize_t _LENGTH = _layout.LENGTH.size
cdef Py_ssize_t _FIELDS = len(_layout.FIELDS)
if _layout.HEADER.format != ">QBQQ16sH" or _FIELDS != 5:  # the offsets `take` and `_header` read and write
    raise ImportError("resolver._load_c: resolver/_load_consts.py changed the packed create; update "
                      "ext/_load_worker.pxi and ext/_load_parent.pxi")

# resolver.normalize.Kind
cdef enum:
    EXTERNAL_ID = 1
    EMAIL = 2
    PHONE = 3


cdef inline void _put_u64(char* p, uint64_t v) noexcept:
    cdef int i
    for i in range(8):
        p[i] = <char>((v >> (56 - 8 * i)) & 0xFF)


cdef inline uint32_t _get_u32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put_u32(char* p, uint32_t v) noexcept:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef const char* _HEX = b"0123456789abcdef"


include "_load_json.pxi"
include "_load_worker.pxi"
include "_load_parent.pxi"
