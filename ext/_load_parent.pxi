# The parent's half of ext/_load_c.pyx (included there): the create queue, the Bloom filter of the load's keys,
# the batch sort.
#
# Twin: resolver/_load_parent_py.py, the specification. `KeyFilter` is a blocked Bloom filter of the keys claimed,
# not a set: a false "maybe" sends `take` to the store (one lookup), so the answer is the twin's; it costs 12 bits
# per expected key, where a set costs ~100 bytes. `drain` sorts with C comparisons (the order of list.sort()).

from libc.stdlib cimport calloc, malloc, qsort
from libc.string cimport memcmp

from resolver._load_parent_py import Drained

cdef bytes _LEDGER_REF = _layout.LEDGER_REF
cdef bytes _CHANGE_REF = _layout.CHANGE_REF


cdef inline uint64_t _hash(const unsigned char* p, Py_ssize_t n) noexcept:
    """FNV-1a over the key, then splitmix64's finalizer (an index key is already a hash; a ledger key is not)."""
    cdef uint64_t h = 0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 0x100000001b3ULL
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL
    return h ^ (h >> 31)


cdef bytes _change(const char* head, Py_ssize_t head_size, long long seq, const char* tail, Py_ssize_t tail_size):
    """head + b'"seq":%d,' % seq + tail: the change-log entry with its sequence number (resolver.bulk)."""
    cdef Buf b
    b.data, b.size, b.cap = NULL, 0, 0
    try:
        _raw(&b, head, head_size)
        _lit(&b, b'"seq":')
        _int(&b, seq)
        _char(&b, b',')
        _raw(&b, tail, tail_size)
        return PyBytes_FromStringAndSize(b.data, b.size)
    finally:
        free(b.data)


def entry_derived(bytes entry):
    """Whether a packed create's idempotency key was derived from its content (resolver/_load_py.py)."""
    return bool((<const unsigned char*>PyBytes_AS_STRING(entry))[8] & _DERIVED)


cdef struct Pair:
    const char* key
    Py_ssize_t key_size
    const char* value
    Py_ssize_t value_size
    PyObject* item


cdef inline int _bytes_cmp(const char* a, Py_ssize_t an, const char* b, Py_ssize_t bn) noexcept nogil:
    cdef int c = memcmp(a, b, an if an < bn else bn)
    if c:
        return c
    return -1 if an < bn else (1 if an > bn else 0)


cdef int _pair_cmp(const void* x, const void* y) noexcept nogil:
    cdef const Pair* a = <const Pair*>x
    cdef const Pair* b = <const Pair*>y
    cdef int c = _bytes_cmp(a.key, a.key_size, b.key, b.key_size)
    return c if c else _bytes_cmp(a.value, a.value_size, b.value, b.value_size)


cdef int _sort_pairs(list items) except -1:
    """Sort a list of (bytes, bytes) in place, as list.sort() orders them (bytes compare byte-wise, then by
    length), with C comparisons: Python's are most of what sorting a batch of index keys costs."""
    cdef Py_ssize_t n = len(items), i
    cdef Pair* pairs
    if n < 2:
        return 0
    pairs = <Pair*>malloc(n * sizeof(Pair))
    if pairs == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            item = <tuple>items[i]
            pairs[i].key = PyBytes_AS_STRING(<bytes>item[0])
            pairs[i].key_size = PyBytes_GET_SIZE(<bytes>item[0])
            pairs[i].value = PyBytes_AS_STRING(<bytes>item[1])
            pairs[i].value_size = PyBytes_GET_SIZE(<bytes>item[1])
            pairs[i].item = <PyObject*>item
        qsort(pairs, n, sizeof(Pair), _pair_cmp)
        items[:] = [<object>pairs[i].item for i in range(n)]
    finally:
        free(pairs)
    return 0


cdef enum:
    BITS_PER_KEY = 12
    PROBES = 6  # about 1% false "maybe" at the expected number of keys
    BLOCK_BITS = 512  # one cache line: a key's bits all sit in one, so a probe misses the cache once, not six times


@cython.final
cdef class KeyFilter:
    """The keys one initial load has claimed (resolver/_load_py.py: KeyFilter), as a blocked Bloom filter sized
    for `expected` keys (more only raise its false "maybe"s)."""

    cdef unsigned char* _memory
    cdef uint64_t* _blocks  # 8 words per block, the first block on a 64-byte boundary
    cdef uint64_t _count

    def __cinit__(self, Py_ssize_t expected):
        self._count = (<uint64_t>max(expected, 1024) * BITS_PER_KEY + BLOCK_BITS - 1) // BLOCK_BITS
        self._memory = <unsigned char*>calloc(self._count * (BLOCK_BITS // 8) + 64, 1)
        if self._memory == NULL:
            raise MemoryError()
        self._blocks = <uint64_t*>(self._memory + (64 - (<size_t>self._memory) % 64))

    def __dealloc__(self):
        free(self._memory)

    cdef inline uint64_t* _block(self, uint64_t h) noexcept:
        return self._blocks + (((h >> 32) * self._count) >> 32) * (BLOCK_BITS // 64) if self._count < 0x100000000ULL \
            else self._blocks + ((h >> 32) % self._count) * (BLOCK_BITS // 64)

    cdef inline void _add(self, const unsigned char* p, Py_ssize_t n) noexcept:
        cdef uint64_t h = _hash(p, n)
        cdef uint64_t* block = self._block(h)
        cdef uint64_t bits = h * 0x9E3779B97F4A7C15ULL  # the in-block positions: 9 bits each
        cdef int i
        for i in range(PROBES):
            block[(bits >> 6) & 7] |= 1ULL << (bits & 63)
            bits >>= 9

    cdef inline bint _maybe(self, const unsigned char* p, Py_ssize_t n) noexcept:
        cdef uint64_t h = _hash(p, n)
        cdef uint64_t* block = self._block(h)
        cdef uint64_t bits = h * 0x9E3779B97F4A7C15ULL
        cdef int i
        for i in range(PROBES):
            if not block[(bits >> 6) & 7] & (1ULL << (bits & 63)):
                return False
            bits >>= 9
        return True

    def add(self, bytes key):
        self._add(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))

    def maybe(self, bytes key):
        """False: no row of this load claimed `key`. True: one may have."""
        return self._maybe(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))


@cython.final
cdef class CreateQueue:
    """Creates of one write transaction, queued (resolver/_load_py.py: CreateQueue)."""

    cdef object _get, _ledger_db, _last_seq
    cdef list _index_db, _names, _index  # by kind (1, 2, 3)
    cdef KeyFilter _filter
    cdef public long long seq
    cdef set _claimed, _claimed_keys
    cdef list _records, _ledger, _ledger_exp, _pii, _changes, _shared, _uuids

    def __init__(self, get, dict dbs, dict index_names, filter, last_seq):
        cdef int kind
        self._get = get
        self._ledger_db = dbs["ledger"]
        self._names = [None] + [index_names[kind] for kind in (EXTERNAL_ID, EMAIL, PHONE)]
        self._index_db = [None] + [dbs[name] for name in self._names[1:]]
        self._filter = filter
        self._last_seq = last_seq
        self.seq = -1
        self._claimed, self._claimed_keys = set(), set()
        self._new()

    cdef void _new(self):
        self._records, self._ledger, self._ledger_exp, self._pii = [], [], [], []
        self._changes, self._shared, self._uuids = [], [], []
        self._index = [None, [], [], []]

    def __len__(self):
        return len(self._uuids)

    cdef bint _held(self, const char* p, Py_ssize_t n, set claimed, db) except -1:
        """Whether the key at `p` is queued since the last drain or stored in `db` (the twin's `_held`)."""
        if self._filter is not None and not self._filter._maybe(<const unsigned char*>p, n):
            return False
        key = PyBytes_FromStringAndSize(p, n)
        return key in claimed or self._get(key, None, db) is not None

    cdef inline void _claim(self, bytes key) noexcept:
        if self._filter is not None:
            self._filter._add(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))

    def claim(self, bytes key):
        """`key` (a ledger or index key) is written by this load: an initial load's filter must know it."""
        self._claim(key)

    def take(self, bytes entry):
        """Queue the writes of the packed create `entry` if it is a create in this transaction; False: it needs
        apply."""
        cdef const char* c = PyBytes_AS_STRING(entry)
        cdef const unsigned char* p = <const unsigned char*>c
        cdef Py_ssize_t nkeys = (p[41] << 8) | p[42], i, at, size, lkey_at, lkey_size
        cdef Py_ssize_t fields_at[5]
        cdef Py_ssize_t fields_size[5]
        cdef int kind
        cdef bint shared = False
        at = _HEADER + nkeys * _KEY
        lkey_size = (p[at] << 8) | p[at + 1]
        lkey_at = at + _KEY_LENGTH
        if self._held(c + lkey_at, lkey_size, self._claimed_keys, self._ledger_db):
            return False
        at = _HEADER
        for i in range(nkeys):
            kind = p[at]
            if self._held(c + at + 1, _KEY_SIZE, self._claimed, self._index_db[kind]):
                if kind != PHONE:
                    return False
                shared = True
            at += _KEY
        at = lkey_at + lkey_size
        for i in range(_FIELDS - 1):  # record, change_head, change_tail, ledger_entry (not raw: not needed here)
            fields_size[i] = _get_u32(p + at)
            fields_at[i] = at + _LENGTH
            at = fields_at[i] + fields_size[i]

        uid = PyBytes_FromStringAndSize(c + 25, 16)
        at = _HEADER
        for i in range(nkeys):
            k = PyBytes_FromStringAndSize(c + at + 1, _KEY_SIZE)
            self._claim(k)
            self._claimed.add(k)
            (<list>self._index[p[at]]).append((k, uid))
            at += _KEY
        lkey = PyBytes_FromStringAndSize(c + lkey_at, lkey_size)
        self._claim(lkey)
        self._claimed_keys.add(lkey)
        position = len(self._uuids)
        self._uuids.append(uid)
        self._records.append((uid, PyBytes_FromStringAndSize(c + fields_at[0], fields_size[0])))
        if shared:
            self._shared.append((position, entry))
        else:
            self._ledger.append((lkey, PyBytes_FromStringAndSize(c + fields_at[3], fields_size[3])))
        cdef bytes expiry = PyBytes_FromStringAndSize(NULL, 8 + lkey_size)
        memcpy(PyBytes_AS_STRING(expiry), c + 17, 8)
        memcpy(PyBytes_AS_STRING(expiry) + 8, c + lkey_at, lkey_size)
        self._ledger_exp.append((expiry, b""))
        if self.seq < 0:
            self.seq = self._last_seq()
        self.seq += 1
        cdef bytes packed_seq = PyBytes_FromStringAndSize(NULL, 8)
        _put_u64(PyBytes_AS_STRING(packed_seq), <uint64_t>self.seq)
        self._changes.append((packed_seq, _change(c + fields_at[1], fields_size[1], self.seq,
                                                  c + fields_at[2], fields_size[2])))
        cdef bytes ref = PyBytes_FromStringAndSize(NULL, 17 + lkey_size)
        memcpy(PyBytes_AS_STRING(ref), c + 25, 16)
        PyBytes_AS_STRING(ref)[16] = PyBytes_AS_STRING(_LEDGER_REF)[0]
        memcpy(PyBytes_AS_STRING(ref) + 17, c + lkey_at, lkey_size)
        self._pii.append((ref, b""))
        ref = PyBytes_FromStringAndSize(NULL, 25)
        memcpy(PyBytes_AS_STRING(ref), c + 25, 16)
        PyBytes_AS_STRING(ref)[16] = PyBytes_AS_STRING(_CHANGE_REF)[0]
        memcpy(PyBytes_AS_STRING(ref) + 17, PyBytes_AS_STRING(packed_seq), 8)
        self._pii.append((ref, b""))
        return True

    def drain(self):
        """Everything queued since the last drain, each table's pairs in key order (the queue is empty
        afterwards)."""
        for items in (self._records, self._index[EXTERNAL_ID], self._index[EMAIL], self._index[PHONE], self._ledger,
                      self._ledger_exp, self._pii):
            _sort_pairs(items)
        tables = {"records": self._records, self._names[EXTERNAL_ID]: self._index[EXTERNAL_ID],
                  self._names[EMAIL]: self._index[EMAIL], self._names[PHONE]: self._index[PHONE],
                  "ledger": self._ledger, "ledger_exp": self._ledger_exp, "pii_refs": self._pii}
        out = Drained(tables, self._changes, self._shared, self._uuids)
        self._claimed.clear()
        self._claimed_keys.clear()
        self._new()
        return out
