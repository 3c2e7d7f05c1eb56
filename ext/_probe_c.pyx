# cython: language_level=3
"""Compiled twin of resolver/_probe_py.py: the probe loop with no interpreter between the LMDB calls.

Read resolver/_probe_py.py for the specification; this file must not add behaviour of its own. What differs
is how a candidate is confirmed: instead of decoding the whole record, `holds` scans the record's JSON in C
for the one field it needs and compares the identifier's encoded bytes. That is exact because every record is
written by orjson (resolver.records), whose encoding of a string is canonical: the same text always gives the
same bytes (UTF-8, only '"', '\\' and control characters escaped). Whatever the bytes alone cannot settle (a
string escaped some other way, an escaped key, anything that is not a JSON object) sends the record through
the twin's decoding instead, so the answer never depends on the shortcut. (A record repeating a top-level key
is the one thing the scanner reads differently from a decoder; resolver never writes one.) The scanner is
ext/_probe_scan.pxi, included here so that it compiles into this module.

The other difference is how LMDB is read: inside py-lmdb's transaction, through LMDB's C functions (a cursor of
the probe's own, the record scanned where it lies in the map, bytes made only for what is confirmed), as
ext/_probe_lmdb.pxi explains; where py-lmdb's objects are not what that file expects, through py-lmdb's methods.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_AsTuple
from cpython.object cimport PyObject

from resolver import _probe_types as _vocab
from resolver._probe_py import holds as _holds_decoded
from resolver._probe_py import record_fields as _fields_decoded
from resolver._probe_types import Fanned, Probed, ProbeRow

# resolver/_probe_types.py's numbers, as C ints for the loop and the scanner.
cdef int EXTERNAL_ID = _vocab.EXTERNAL_ID, EMAIL = _vocab.EMAIL, PHONE = _vocab.PHONE
cdef int HIT = _vocab.HIT, MISS = _vocab.MISS, SHARED = _vocab.SHARED, FAN_OUT = _vocab.FAN_OUT
cdef int NOT_PROBED = _vocab.NOT_PROBED
cdef int NOT_FOUND = _vocab.NOT_FOUND, MATCHED = _vocab.MATCHED, AMBIGUOUS = _vocab.AMBIGUOUS


include "_probe_scan.pxi"
include "_probe_lmdb.pxi"


@cython.final
@cython.freelist(16)
@cython.no_gc
cdef class Decision:
    """resolver._probe_types.Decision as the compiled loop returns it: the same fields, read by name, and that
    NamedTuple's behaviour (equal to it, indexable, unpackable). A cdef class because every Resolve builds one:
    a NamedTuple instance is allocated and freed outside any free list, which a Resolve measurably pays; this
    one comes from a free list, its fields set in C, and is not tracked by the cyclic collector (its fields are
    tuples of bytes, ints and strings: it can be in no reference cycle)."""

    cdef readonly int outcome, kind
    cdef readonly tuple uuids, conflicts, fanned, probes

    cdef tuple _tuple(self):
        return (self.outcome, self.kind, self.uuids, self.conflicts, self.fanned, self.probes)

    def __eq__(self, other):
        if isinstance(other, (tuple, Decision)):
            return self._tuple() == tuple(other)
        return NotImplemented

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return self._tuple()[index]

    def __iter__(self):
        return iter(self._tuple())

    def __repr__(self):
        return "Decision(outcome=%r, kind=%r, uuids=%r, conflicts=%r, fanned=%r, probes=%r)" % self._tuple()


cdef bint _holds(object raw, int kind, str value, bytes want):
    cdef int found
    if type(raw) is not bytes:
        raw = bytes(raw)
    found = _scan(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), kind,
                  PyBytes_AS_STRING(want), PyBytes_GET_SIZE(want))
    if found < 0:
        return _holds_decoded(raw, kind, value)
    return found == 1


def holds(raw, int kind, str value):
    """Whether a stored record (its JSON, resolver.records) holds the normalized identifier `value`."""
    return _holds(raw, kind, value, _encoded(value))


cdef dict _names = {}  # field-name tuples, encoded once


def record_fields(raw, tuple names):
    """The values of the top-level fields `names` of a stored record (None for an absent field).

    Only those fields are decoded (the scanner finds them; orjson decodes each one's bytes).
    """
    if type(raw) is not bytes:
        raw = bytes(raw)
    encoded = _names.get(names)
    if encoded is None:
        encoded = _names[names] = tuple([name.encode() for name in names])
    out = _fields(raw, encoded)
    if out is None:
        return _fields_decoded(raw, names)
    return out


cdef class Prober:
    """Index probes inside one transaction `txn` (py-lmdb); never outlives it.

    `indexes` are the index databases by kind (external_id, email, phone); `records` the records database;
    `key(kind, value)` the index key function (resolver._hotpath.KeyHasher.key). Each call (probe, decide,
    decide_many) reads LMDB with cursors of its own, closed when it returns.
    """

    cdef readonly object txn, records, key
    cdef readonly tuple indexes
    cdef list _cursors
    cdef dict _confirmed
    cdef _NativeTxn _native

    def __init__(self, txn, tuple indexes, records, key):
        self.txn = txn
        self.indexes = indexes
        self.records = records
        self.key = key
        self._cursors = [None, None, None]
        self._confirmed = {}
        self._native = _NativeTxn.bind(txn, indexes, records)

    @property
    def native(self):
        """Whether LMDB is read through its C functions (ext/_probe_lmdb.pxi) rather than py-lmdb's methods."""
        return self._native.ok

    cpdef fields(self, bytes uid, tuple names):
        """`record_fields` of the record under `uid` (None: no such record). A record the last `decide` or
        `decide_many` confirmed is not read again. Read transactions only: a write since then is not seen."""
        raw = self._confirmed.get(uid)
        if raw is None:
            raw = self.txn.get(uid, None, self.records)
        return None if raw is None else record_fields(raw, names)

    cdef _Cursors _open(self):
        """The cursors of one call through LMDB's C functions, or None to use py-lmdb's (not bound, or the
        transaction has ended: py-lmdb's methods then raise its own error)."""
        cdef _Cursors cs
        if not self._native.ok or not self._native.live():
            return None
        cs = _Cursors.__new__(_Cursors)
        cs.txn = self._native
        return cs

    cdef object _cursor(self, int kind):
        cur = self._cursors[kind - 1]
        if cur is None:
            cur = self.txn.cursor(self.indexes[kind - 1])
            self._cursors[kind - 1] = cur
        return cur

    def probe(self, int kind, str value, Py_ssize_t limit):
        """Customers holding `value`: the entries under its key and the confirmed uuids, in key order.

        When more than `limit` entries share the key, no record is read and no uuid is returned.
        """
        cdef Py_ssize_t entries
        cdef _Cursors cs = self._open()
        try:
            uuids = self._probe(cs, kind, value, limit, &entries)
        finally:
            if cs is not None:
                cs.close()
        return Probed(entries, uuids if uuids is not None else [])

    cdef list _probe(self, _Cursors cs, int kind, str value, Py_ssize_t limit, Py_ssize_t* entries):
        """`probe`: the confirmed uuids (None for none: no list is made for a miss), the entries under the key
        in `entries`."""
        if cs is not None:
            return self._probe_native(cs, kind, value, limit, entries)
        cdef Py_ssize_t n
        cdef list uids, confirmed = None
        cdef bytes want
        cur = self._cursor(kind)
        entries[0] = 0
        if not cur.set_key(self.key(kind, value)):
            return None
        n = entries[0] = cur.count()
        if n > limit:
            return None
        uids = [cur.value()] if n == 1 else list(cur.iternext_dup())
        want = _encoded(value)
        get = self.txn.get
        for uid in uids:
            raw = get(uid, None, self.records)
            if raw is not None and _holds(raw, kind, value, want):
                if confirmed is None:
                    confirmed = []
                confirmed.append(uid)
                self._confirmed[uid] = raw
        return confirmed

    cdef list _probe_native(self, _Cursors cs, int kind, str value, Py_ssize_t limit, Py_ssize_t* entries):
        """`_probe` through LMDB's C functions: the same reads in the same order, the record scanned in place."""
        cdef _Engine* e = cs.txn.engine
        cdef void* cur = cs.get(kind)
        cdef void* txn = cs.txn.obj.txn
        cdef MDB_val k, v, rec
        cdef size_t count, i
        cdef int rc, found
        cdef list confirmed = None
        cdef bytes key = self.key(kind, value), want, uid
        entries[0] = 0
        k.mv_size, k.mv_data = PyBytes_GET_SIZE(key), PyBytes_AS_STRING(key)
        rc = e.cursor_get(cur, &k, &v, MDB_SET_KEY)
        if rc == MDB_NOTFOUND:
            return None
        if rc != 0 or e.cursor_count(cur, &count) != 0:
            raise _lmdb_error(rc, "mdb_cursor_get")
        entries[0] = <Py_ssize_t>count
        if entries[0] > limit:
            return None
        want = _encoded(value)
        for i in range(count):
            if i > 0:
                rc = e.cursor_get(cur, &k, &v, MDB_NEXT_DUP)
                if rc != 0:
                    raise _lmdb_error(rc, "mdb_cursor_get")
            rc = e.get(txn, cs.txn.records, &v, &rec)
            if rc == MDB_NOTFOUND:
                continue
            if rc != 0:
                raise _lmdb_error(rc, "mdb_get")
            raw = None  # the record's bytes, made only when the scan cannot tell or the record is confirmed
            found = _scan(<const unsigned char*>rec.mv_data, <Py_ssize_t>rec.mv_size, kind, PyBytes_AS_STRING(want),
                          PyBytes_GET_SIZE(want))
            if found != 0:
                raw = PyBytes_FromStringAndSize(<char*>rec.mv_data, <Py_ssize_t>rec.mv_size)
            if found < 0:
                found = _holds_decoded(raw, kind, value)
            if found:
                uid = PyBytes_FromStringAndSize(<char*>v.mv_data, <Py_ssize_t>v.mv_size)
                if confirmed is None:
                    confirmed = []
                confirmed.append(uid)
                self._confirmed[uid] = raw
        return confirmed

    def decide(self, external_id, list emails, list phones, Py_ssize_t limit, bint explain):
        cdef _Cursors cs = self._open()
        self._confirmed.clear()
        try:
            return self._decide(cs, external_id, emails, phones, limit, explain)
        finally:
            if cs is not None:
                cs.close()

    def decide_many(self, list sets, Py_ssize_t limit):
        """`decide` for each normalized (external_id, emails, phones, explain) set, in order: the batch loop.
        Every record it confirms stays at hand for `fields` until the next decide(_many)."""
        cdef list out = []
        cdef _Cursors cs = self._open()
        self._confirmed.clear()
        try:
            for external_id, emails, phones, explain in sets:
                out.append(self._decide(cs, external_id, emails, phones, limit, explain))
        finally:
            if cs is not None:
                cs.close()
        return out

    cdef Decision _decide(self, _Cursors cs, external_id, list emails, list phones, Py_ssize_t limit, bint explain):
        """Contract §3's decision for one normalized identifier set (see resolver/_probe_py.py). Lists are made
        only for what is found: a batch's misses and single matches leave little for the cyclic collector."""
        cdef int outcome = NOT_FOUND, decided = 0, kind, k
        cdef Py_ssize_t n, i, count, nhits
        cdef list winners = None, conflicts = None, fanned = None, probes = None, kind_hits, hits, values = None
        for kind in range(EXTERNAL_ID, PHONE + 1):
            kind_hits = None
            if kind == EXTERNAL_ID:
                count = external_id is not None
            else:
                values = emails if kind == EMAIL else phones
                count = len(values)
            for i in range(count):
                value = external_id if kind == EXTERNAL_ID else values[i]
                hits = self._probe(cs, kind, value, limit, &n)
                nhits = 0 if hits is None else len(hits)
                if n > limit:
                    if fanned is None:
                        fanned = []
                    fanned.append(Fanned(kind, value, n))
                    if explain:
                        probes = _row(probes, kind, value, FAN_OUT, n)
                    continue
                if explain:
                    probes = _row(probes, kind, value, HIT if nhits == 1 else SHARED if nhits else MISS, nhits)
                if not nhits:
                    continue
                if outcome == MATCHED:
                    if winners[0] not in hits:
                        if conflicts is None:
                            conflicts = []
                        for h in hits:
                            if h not in conflicts:
                                conflicts.append(h)
                    continue
                if kind_hits is None:
                    kind_hits = hits  # the probe's own list, made for this call
                else:
                    for h in hits:
                        if h not in kind_hits:
                            kind_hits.append(h)
            if outcome == MATCHED or kind_hits is None:
                continue
            decided, winners = kind, kind_hits
            if len(kind_hits) == 1:
                outcome = MATCHED
                continue
            outcome = AMBIGUOUS
            if explain:
                for k in range(kind + 1, PHONE + 1):
                    for v in (emails if k == EMAIL else phones):
                        probes = _row(probes, k, v, NOT_PROBED, 0)
            break
        cdef Decision decision = Decision.__new__(Decision)
        decision.outcome = outcome
        decision.kind = decided
        decision.uuids = _frozen(winners)
        decision.conflicts = _frozen(conflicts)
        decision.fanned = _frozen(fanned)
        decision.probes = _frozen(probes)
        return decision


cdef inline list _row(list probes, int kind, value, int state, Py_ssize_t hits):
    """`probes` (made on first use) with one more explained probe."""
    if probes is None:
        probes = []
    probes.append(ProbeRow(kind, value, state, hits))
    return probes


cdef inline tuple _frozen(list items):
    return () if items is None else PyList_AsTuple(items)
