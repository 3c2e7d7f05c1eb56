# LMDB's C API under py-lmdb's own transactions, for ext/_probe_c.pyx (which includes this file).
#
# Why: a probe through py-lmdb's Python methods pays, per lookup, three method calls, a bytes object for the uuid
# and another for the whole record, only for the scanner to read a few bytes of it; the lookups' own B-tree work is
# less than that (bench/README.md, "the batch loop"). Here the probe positions its own cursor and reads the record in
# place, inside the transaction py-lmdb opened, so readers, writers and their locks stay exactly py-lmdb's.
#
# py-lmdb has no C API. It exports each bundled LMDB engine's functions under a prefix (mdb09_, mdb10_) and keeps
# the MDB_txn and MDB_dbi in its objects; `_NativeTxn.bind` reads them through the layout of py-lmdb 3.0's
# lmdb/cpython.c (TransObject, DbObject), which it first checks: the object sizes, the engine the transaction runs
# on (its MdbApi starts with the engine's version), and that LMDB's own answer for the transaction's id equals
# py-lmdb's. Any mismatch (another py-lmdb build) and the Prober keeps py-lmdb's methods: same answers, slower.

from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flags)
    void* dlsym(void* handle, const char* symbol)
    int RTLD_NOW, RTLD_NOLOAD

cdef extern from *:
    """
    /* py-lmdb 3.0, lmdb/cpython.c, built without memsink: LmdbObject_HEAD and the fields read here. */
    typedef struct { void *prev; void *next; } resolver_lmdb_list;
    typedef struct {
        PyObject_HEAD
        resolver_lmdb_list siblings, children;
        int valid;
        PyObject *weaklist;
        void *env;
        void *parent;
        const int *libv;  /* MdbApi: int major, minor, patch first */
        void *txn;
        int flags;
        void *db;
        int mutations;
    } resolver_lmdb_txn;
    typedef struct {
        PyObject_HEAD
        resolver_lmdb_list siblings, children;
        int valid;
        void *env;
        unsigned int dbi;
        unsigned int flags;
    } resolver_lmdb_db;
    typedef struct { size_t mv_size; void *mv_data; } resolver_mdb_val;
    """
    ctypedef struct resolver_lmdb_txn:
        int valid
        const int* libv
        void* txn
    ctypedef struct resolver_lmdb_db:
        unsigned int dbi
    ctypedef struct resolver_mdb_val:
        size_t mv_size
        void* mv_data

ctypedef resolver_mdb_val MDB_val
ctypedef int (*_cursor_open_t)(void* txn, unsigned int dbi, void** cursor) noexcept nogil
ctypedef int (*_cursor_get_t)(void* cursor, MDB_val* key, MDB_val* data, int op) noexcept nogil
ctypedef int (*_cursor_count_t)(void* cursor, size_t* count) noexcept nogil
ctypedef void (*_cursor_close_t)(void* cursor) noexcept nogil
ctypedef int (*_get_t)(void* txn, unsigned int dbi, MDB_val* key, MDB_val* data) noexcept nogil
ctypedef size_t (*_txn_id_t)(void* txn) noexcept nogil

cdef enum:
    MDB_NEXT_DUP = 9  # lmdb.h's MDB_cursor_op, the same in both engines
    MDB_SET_KEY = 16
    MDB_NOTFOUND = -30798


cdef struct _Engine:
    int major, minor
    _cursor_open_t cursor_open
    _cursor_get_t cursor_get
    _cursor_count_t cursor_count
    _cursor_close_t cursor_close
    _get_t get
    _txn_id_t txn_id


cdef _Engine _engines[2]
cdef int _engine_count = 0
cdef int _layout = -1  # -1 not yet checked, 0 not py-lmdb 3.0's, 1 checked


cdef void* _sym(void* handle, str prefix, str name):
    cdef bytes full = (prefix + name).encode()
    return dlsym(handle, full)


cdef _Engine* _engine(int major, int minor):
    """The functions of the LMDB engine `major.minor` in py-lmdb's module, NULL if it does not export them."""
    global _engine_count
    cdef int i
    cdef _Engine e
    for i in range(_engine_count):
        if _engines[i].major == major and _engines[i].minor == minor:
            return &_engines[i]
    if _engine_count == 2 or not 0 <= major <= 9 or not 0 <= minor <= 9:
        return NULL
    import lmdb.cpython
    handle = dlopen(lmdb.cpython.__file__.encode(), RTLD_NOW | RTLD_NOLOAD)  # already loaded: no second copy
    if handle == NULL:
        return NULL
    prefix = f"mdb{major}{minor}_"
    e.major, e.minor = major, minor
    e.cursor_open = <_cursor_open_t>_sym(handle, prefix, "cursor_open")
    e.cursor_get = <_cursor_get_t>_sym(handle, prefix, "cursor_get")
    e.cursor_count = <_cursor_count_t>_sym(handle, prefix, "cursor_count")
    e.cursor_close = <_cursor_close_t>_sym(handle, prefix, "cursor_close")
    e.get = <_get_t>_sym(handle, prefix, "get")
    e.txn_id = <_txn_id_t>_sym(handle, prefix, "txn_id")
    if (e.cursor_open == NULL or e.cursor_get == NULL or e.cursor_count == NULL or e.cursor_close == NULL
            or e.get == NULL or e.txn_id == NULL):
        return NULL
    _engines[_engine_count] = e
    _engine_count += 1
    return &_engines[_engine_count - 1]


cdef bint _layout_known(object txn, object db):
    """Whether `txn` and `db` are py-lmdb objects of the layout above (checked once per process)."""
    global _layout
    if _layout < 0:
        import lmdb
        _layout = int(type(txn) is lmdb.Transaction and type(db) is lmdb._Database
                      and lmdb.Transaction.__basicsize__ == sizeof(resolver_lmdb_txn)
                      and lmdb._Database.__basicsize__ == sizeof(resolver_lmdb_db))
    return _layout == 1 and type(txn) is _TXN_TYPE and type(db) is _DB_TYPE


import lmdb as _lmdb

_TXN_TYPE, _DB_TYPE = _lmdb.Transaction, _lmdb._Database


cdef class _NativeTxn:
    """One py-lmdb transaction seen from C: its MDB_txn, its engine, and the dbi of the records and the three
    indexes. `ok` is False when py-lmdb's objects are not what this file reads (then nothing else is set)."""

    cdef object owner  # the py-lmdb Transaction (kept alive, and asked whether it is still valid)
    cdef resolver_lmdb_txn* obj
    cdef _Engine* engine
    cdef unsigned int records
    cdef unsigned int indexes[3]
    cdef readonly bint ok

    @staticmethod
    cdef _NativeTxn bind(object txn, tuple indexes, object records):
        cdef _NativeTxn n = _NativeTxn.__new__(_NativeTxn)
        cdef resolver_lmdb_txn* t
        cdef int i
        n.ok = False
        if len(indexes) != 3 or not all(_layout_known(txn, db) for db in (records, *indexes)):
            return n
        t = <resolver_lmdb_txn*><PyObject*>txn
        if not t.valid or t.libv == NULL or t.txn == NULL:
            return n
        n.engine = _engine(t.libv[0], t.libv[1])
        if n.engine == NULL or n.engine.txn_id(t.txn) != txn.id():  # the MDB_txn read is the one py-lmdb runs
            return n
        n.owner, n.obj = txn, t
        n.records = (<resolver_lmdb_db*><PyObject*>records).dbi
        for i in range(3):
            n.indexes[i] = (<resolver_lmdb_db*><PyObject*>indexes[i]).dbi
        n.ok = True
        return n

    cdef inline bint live(self) noexcept:
        """Whether the transaction is still open (py-lmdb clears `valid` on commit, abort and reset)."""
        return self.obj.valid != 0


cdef class _Cursors:
    """The index cursors of one call (decide, decide_many, probe), closed when it ends: LMDB frees a write
    transaction's cursors with it, so none may outlive the call that opened it."""

    cdef _NativeTxn txn
    cdef void* cur[3]

    def __cinit__(self):
        self.cur[0] = self.cur[1] = self.cur[2] = NULL

    cdef void* get(self, int kind) except NULL:
        cdef void* c = self.cur[kind - 1]
        cdef int rc
        if c == NULL:
            rc = self.txn.engine.cursor_open(self.txn.obj.txn, self.txn.indexes[kind - 1], &c)
            if rc != 0:
                raise _lmdb_error(rc, "mdb_cursor_open")
            self.cur[kind - 1] = c
        return c

    cdef void close(self) noexcept:
        cdef int i
        for i in range(3):
            if self.cur[i] != NULL:
                self.txn.engine.cursor_close(self.cur[i])
                self.cur[i] = NULL


cdef object _lmdb_error(int rc, str where):
    """py-lmdb's exception for LMDB error `rc` (lmdb.Error with LMDB's message)."""
    return _lmdb.Error(f"{where}: LMDB error {rc}")
