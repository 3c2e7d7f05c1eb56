# The worker's half of ext/_load_c.pyx (included there): JSON lines -> packed creates.
#
# Twin: resolver/_load_worker_py.py, the specification. The rules are the twin's PlanRules; where calling a rule
# per row would cost more than the row's own work, the common case is written out here (ext/_load_c.pyx lists
# which) and everything else is still asked of the rule. The JSON is written by ext/_load_json.pxi.

from cpython.dict cimport PyDict_Next
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.string cimport memchr

import hashlib
import os
import unicodedata

from resolver._load_worker_py import MEMO_SIZE, Request
from resolver.errors import BlockedIdentifier, IdentifierError, ResolverError
from resolver.normalize import MAX_EXTERNAL_ID_LENGTH
from resolver.uuids import LoadUuids

cdef object _loads = orjson.loads
cdef object _JSONDecodeError = orjson.JSONDecodeError
cdef object _nfc = unicodedata.normalize
cdef bytes _SEQ_AT = b',"source_system":'
cdef object _BAD = object()

# the request's fields (resolver.importer.jsonl.REQUEST_FIELDS' values), as bits
cdef enum:
    F_KEY = 1
    F_CUSTOMER = 2
    F_IDENTIFIERS = 4
    F_ATTRIBUTES = 8
    F_SOURCE = 16
    F_VERSION = 32
    F_REGION = 64
    F_OTHER = 128

cdef dict _FIELD_BITS = {"idempotency_key": F_KEY, "customer_uuid": F_CUSTOMER, "identifiers": F_IDENTIFIERS,
                         "attributes": F_ATTRIBUTES, "source_system": F_SOURCE, "expected_version": F_VERSION,
                         "default_region": F_REGION}
cdef dict _IDENTIFIER_BITS = {"external_id": 1, "emails": 2, "phones": 4}

# uuids.uuid7_int's layout
cdef uint64_t _TS_MASK = 0xFFFFFFFFFFFFULL


cdef bint _plain_ascii(str s, Py_ssize_t longest):
    """An ASCII text of at most `longest` characters without a control character (resolver.normalize's
    ASCII_CONTROL): what resolver.ledger.check_key and normalize_external_id accept without more ado."""
    cdef Py_ssize_t n, i
    cdef const unsigned char* p
    if not s.isascii():
        return False
    p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &n)
    if n > longest:
        return False
    for i in range(n):
        if p[i] < 0x20 or p[i] == 0x7f:
            return False
    return True



@cython.final
cdef class RowPlanner:
    """JSON lines -> packed creates (resolver/_load_py.py: RowPlanner)."""

    cdef readonly object rules
    cdef dict _fields, _identifier_fields, _regions, _sources, _holders, _memo
    cdef str _default_region, _default_source
    cdef object _check_key, _check_region, _source_ok, _normalize_external_id, _normalize_email, _normalize_phone
    cdef object _policy, _mask, _text_limits, _attribute, _derived_key
    cdef object _holder, _key, _sealed, _seal_change, _for_line, _clock
    cdef frozenset _sensitive
    cdef dict _owners
    cdef str _email_held, _phone_held  # resolver.records.held_key's prefixes
    cdef Buf _buf, _fp  # the packed create and the fingerprint's JSON, written here (reused)
    cdef dict _keys_json  # attribute name -> '"name":'
    cdef object _sha256  # an empty SHA-256, copied per row (cheaper than making one: OpenSSL looks it up by name)
    cdef Py_ssize_t _max_identifiers, _max_key_length
    cdef long long _retention_us
    cdef bint _own_uuids  # the import's uuids are a plain LoadUuids: made here
    cdef uint64_t _unix_ms, _seed
    cdef bytes _random
    cdef Py_ssize_t _random_at

    def __init__(self, rules):
        self.rules = rules
        # the request's JSON names -> bits of the fields they name
        self._fields = {name: _FIELD_BITS.get(field, F_OTHER) for name, field in rules.request_fields.items()}
        self._identifier_fields = {name: _IDENTIFIER_BITS[field] for name, field in rules.identifier_fields.items()}
        self._regions, self._sources, self._holders, self._memo = {}, {}, {}, {}
        self._default_region, self._default_source = rules.default_region, rules.default_source
        self._check_key, self._check_region, self._source_ok = rules.check_key, rules.check_region, rules.source_ok
        self._normalize_external_id = rules.normalize_external_id
        self._normalize_email, self._normalize_phone = rules.normalize_email, rules.normalize_phone
        self._policy, self._mask, self._max_identifiers = rules.policy, rules.mask, rules.max_identifiers
        self._text_limits, self._attribute = rules.text_limits, rules.attribute
        self._derived_key, self._holder, self._key = rules.derived_key, rules.holder, rules.key
        self._sensitive, self._sealed, self._seal_change = rules.sensitive, rules.sealed, rules.seal_change
        self._for_line, self._clock = rules.uuids.for_line, rules.clock
        self._retention_us = rules.retention_us
        self._own_uuids = type(rules.uuids) is LoadUuids
        if self._own_uuids:
            self._unix_ms, self._seed = rules.uuids.unix_ms, rules.uuids.seed
        self._random, self._random_at = b"", 0
        self._max_key_length = rules.max_key_length
        self._keys_json = {}
        self._sha256 = hashlib.sha256()
        self._owners = dict(rules.owners)
        self._email_held, self._phone_held = rules.held_key(EMAIL, ""), rules.held_key(PHONE, "")
        if rules.held_key(EMAIL, "x") != self._email_held + "x" or rules.held_key(PHONE, "x") != self._phone_held + "x":
            raise ValueError("resolver._load_c writes held keys as a prefix and the value: held_key is no longer that")
        if not self._email_held < self._phone_held or self._phone_held.startswith(self._email_held):
            raise ValueError("resolver._load_c writes a record's held emails before its phones: their keys sort so")

    def __dealloc__(self):
        free(self._buf.data)
        free(self._fp.data)

    def block(self, bytes data, first, general):
        """Each line of a block in file order: its packed create, or what `general(number, line)` makes of it
        (left out when None)."""
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t start = 0, end
        cdef const char* nl
        cdef long long number = first
        cdef list out = []
        if n and p[n - 1] == b"\n":
            n -= 1
        while True:
            nl = <const char*>memchr(p + start, b"\n", n - start) if start < n else NULL
            end = (nl - p) if nl != NULL else n
            raw = PyBytes_FromStringAndSize(p + start, end - start)
            item = self._plan(raw, number)
            if item is None:
                item = general(number, raw)
            if item is not None:
                out.append(item)
            if nl == NULL:
                break
            start = end + 1
            number += 1
        return out

    def line(self, bytes raw, number):
        """The packed create of the JSON line `raw`, or None: the general path prepares it."""
        return self._plan(raw, number)

    def request(self, bytes raw):
        """The twin's `request`: what a packed create's command is made of, or None."""
        parts = self._request(raw)
        return None if parts is None else Request._make(parts)

    cdef object _plan(self, bytes raw, long long number):
        parts = self._request(raw)
        if parts is None:
            return None
        key, derived, fingerprint, ext, emails, phones, attributes_n, source, skipped = <tuple>parts
        cdef char uid[16]
        if self._own_uuids:
            uid_text = self._uuid(number, uid)
        else:
            uid_text = self._for_line(number)
            memcpy(uid, PyBytes_AS_STRING(bytes.fromhex(uid_text.replace("-", ""))), 16)
        now = self._clock()
        expires = now + self._retention_us
        return self._encode(number, derived, now, expires, uid, uid_text, key, fingerprint, ext, emails, phones,
                            attributes_n, source, skipped, raw)

    cdef object _request(self, bytes raw):
        cdef const char* p = PyBytes_AS_STRING(raw)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), i, quotes = 0, strings
        cdef int seen = 0, bit
        cdef Py_ssize_t pos = 0
        cdef PyObject* k
        cdef PyObject* v
        cdef dict obj
        if memchr(p, b"\\", n) != NULL or (n >= 3 and p[0] == b"\xef" and p[1] == b"\xbb" and p[2] == b"\xbf"):
            return None  # escapes (simple_input counts keys then) and the first line's BOM: the general path
        try:
            decoded = _loads(raw)
        except _JSONDecodeError:
            return None
        if type(decoded) is not dict:
            return None
        obj = <dict>decoded
        strings = len(obj)
        key = source = region = ""
        identifiers = attributes = None
        while PyDict_Next(obj, &pos, &k, &v):
            bit = self._fields.get(<object>k, 0)
            value = <object>v
            if bit == 0 or bit & seen or value is None:
                return None
            seen |= bit
            if bit == F_IDENTIFIERS:
                if type(value) is not dict:
                    return None
                identifiers = value
            elif bit == F_ATTRIBUTES:
                if type(value) is not dict:
                    return None
                attributes = value
            elif bit == F_VERSION:
                if type(value) is not int or value != 0:
                    return None
            elif type(value) is not str:
                return None
            else:
                strings += 1
                if bit == F_KEY:
                    key = value
                elif bit == F_SOURCE:
                    source = value
                elif bit == F_REGION:
                    region = value
                elif bit == F_CUSTOMER:
                    if value:
                        return None
                else:
                    return None
        ext_raw = ""
        emails_raw = phones_raw = ()
        if identifiers is not None:
            strings += len(<dict>identifiers)
            seen = 0
            pos = 0
            while PyDict_Next(<dict>identifiers, &pos, &k, &v):
                bit = self._identifier_fields.get(<object>k, 0)
                item = <object>v
                if bit == 0 or bit & seen or item is None:
                    return None
                seen |= bit
                if bit == 1:
                    if type(item) is not str:
                        return None
                    ext_raw = item
                    strings += 1
                else:
                    if type(item) is not list:
                        return None
                    for x in <list>item:
                        if type(x) is not str:
                            return None
                    strings += len(<list>item)
                    if bit == 2:
                        emails_raw = item
                    else:
                        phones_raw = item
        attrs_in = {}
        if attributes is not None:
            strings += len(<dict>attributes)
            pos = 0
            while PyDict_Next(<dict>attributes, &pos, &k, &v):
                item = <object>v
                kind = type(item)
                if kind is str:
                    strings += 1
                elif kind is bool or item is None:
                    pass
                elif kind is int:
                    if not -(2 ** 53) <= item <= 2 ** 53:
                        return None
                    item = float(item)
                elif kind is float:
                    if item - item != 0:  # not finite
                        return None
                else:
                    return None
                attrs_in[<object>k] = item
        for i in range(n):
            if p[i] == b'"':
                quotes += 1
        if quotes != 2 * strings:
            return None  # a repeated key: orjson kept the last value, json_format refuses the line

        # Defaults.complete, then upsert.prepare: every check that could refuse the row declines instead
        if not region:
            region = self._default_region
        if not source:
            source = self._default_source
        if key and not _plain_ascii(key, self._max_key_length) and self._check_key(key) is not None:
            return None
        code = self._regions.get(region, _BAD)
        if code is _BAD:
            try:
                code = self._check_region(region)
            except IdentifierError:
                return None
            self._regions[region] = code
        ok = self._sources.get(source)
        if ok is None:
            ok = self._sources[source] = bool(self._source_ok(source))
        if not ok:
            return None
        skipped = []
        ext = None
        if ext_raw:
            ext = (<str>ext_raw).strip()
            if not ext or not _plain_ascii(ext, MAX_EXTERNAL_ID_LENGTH):
                try:
                    ext = self._normalize_external_id(ext_raw)
                except IdentifierError:
                    return None
        emails = self._normalized(EMAIL, emails_raw, code, skipped)
        if emails is None:
            return None
        phones = self._normalized(PHONE, phones_raw, code, skipped)
        if phones is None:
            return None
        if ext is None and not emails and not phones:
            return None
        if len(<list>emails) + len(<list>phones) > self._max_identifiers:
            return None
        attributes_n = {}
        for name, value in (<dict>attrs_in).items():
            got = self._attribute_of(name, value)
            if got is _BAD:
                return None
            attributes_n[name] = got
        if self._owners:
            for name in attributes_n:
                owner = self._owners.get(name)
                if owner and owner != source:
                    return None
        fingerprint = self._fingerprint_of(ext, emails, phones, attributes_n, source)
        derived = not key
        if derived:
            key = self._derived_key(fingerprint)
        return (key, derived, fingerprint, ext, emails, phones, attributes_n, source, skipped)

    cdef str _uuid(self, long long number, char* out):
        """resolver.uuids.LoadUuids.for_line, made here: its 16 bytes into `out`, and its text."""
        cdef uint64_t counter = self._seed + <uint64_t>number
        cdef const unsigned char* r = <const unsigned char*>PyBytes_AS_STRING(self._random) + self._random_at
        cdef uint64_t tail
        cdef uint64_t hi, lo
        cdef char text[36]
        cdef int i, j = 0
        if self._random_at + 4 > PyBytes_GET_SIZE(self._random):
            self._random, self._random_at = os.urandom(4096), 0
            r = <const unsigned char*>PyBytes_AS_STRING(self._random)
        tail = _get_u32(r)
        self._random_at += 4
        hi = ((self._unix_ms & _TS_MASK) << 16) | (<uint64_t>0x7 << 12) | ((counter >> 30) & 0xFFF)
        lo = (<uint64_t>0b10 << 62) | ((counter & 0x3FFFFFFFULL) << 32) | (tail & 0xFFFFFFFFULL)
        _put_u64(out, hi)
        _put_u64(out + 8, lo)
        for i in range(16):
            if i == 4 or i == 6 or i == 8 or i == 10:
                text[j] = b"-"
                j += 1
            text[j] = _HEX[(<unsigned char>out[i]) >> 4]
            text[j + 1] = _HEX[(<unsigned char>out[i]) & 15]
            j += 2
        return PyUnicode_DecodeASCII(text, 36, NULL)

    cdef object _normalized(self, int kind, values, code, list skipped):
        """The twin's `_normalized`; None where it declines."""
        cdef list out = []
        for value in values:
            try:
                if kind == EMAIL:
                    out.append(self._normalize_email(value, self._policy))
                else:
                    out.append(self._normalize_phone(value, code, self._policy))
            except BlockedIdentifier as exc:
                skipped.append([kind, self._mask(kind, value), exc.reason, exc.message])
            except IdentifierError:
                return None
        if len(out) > 1:
            return list(dict.fromkeys(out))
        return out

    cdef object _attribute_of(self, name, value):
        """The twin's `_attribute`; _BAD where it declines."""
        cdef Py_ssize_t size
        if type(value) is str:
            limits = self._text_limits.get(name)
            if limits is not None:
                text = (<str>value).strip()
                if not (<str>text).isascii():
                    text = _nfc("NFC", text)
                size = len(<str>text)
                if (<tuple>limits)[0] <= size <= (<tuple>limits)[1]:
                    return text
                return _BAD
        memo_key = (name, type(value), value)
        got = self._memo.get(memo_key, self._memo)
        if got is self._memo:
            try:
                got = self._attribute(name, value)
            except ResolverError:
                got = _BAD
            if len(self._memo) < MEMO_SIZE:
                self._memo[memo_key] = got
        return got

    cdef str _fingerprint_of(self, ext, list emails, list phones, dict attributes, source):
        """resolver.ledger.fingerprint of the normalized request: SHA-256 of its sorted JSON, in hex."""
        cdef Buf* b = &self._fp
        b.size = 0
        _lit(b, b'{"add":{"emails":')
        _strings(b, emails)
        _lit(b, b',"external_id":')
        _value(b, ext)
        _lit(b, b',"phones":')
        _strings(b, phones)
        _lit(b, b'},"attributes":')
        _object(b, _in_order(list(attributes)), attributes, self._keys_json)
        _lit(b, b',"customer_uuid":null,"expected_version":0,"remove":{"emails":[],"external_id":null,"phones":[]},'
                b'"source_system":')
        _value(b, source)
        _char(b, b'}')
        h = self._sha256.copy()
        h.update(PyBytes_FromStringAndSize(b.data, b.size))
        return h.hexdigest()

    cdef object _encode(self, long long number, bint derived, now, expires, const char* uid, str uid_text, str key,
                        fingerprint, ext, list emails, list phones, dict attributes, source, list skipped,
                        bytes raw):
        """The twin's `_encode`: resolver.bulk.plan's writes of the create, packed (the JSON written here)."""
        cdef list keys = []
        cdef list kinds = []
        cdef Py_ssize_t i, at, nkeys
        cdef long long t = now
        if ext is not None:
            keys.append(self._key(EXTERNAL_ID, ext))
            kinds.append(EXTERNAL_ID)
        for e in emails:
            keys.append(self._key(EMAIL, e))
            kinds.append(EMAIL)
        for ph in phones:
            keys.append(self._key(PHONE, ph))
            kinds.append(PHONE)
        nkeys = len(keys)
        for i in range(1, nkeys):
            for j in range(i):
                if kinds[i] == kinds[j] and keys[i] == keys[j]:
                    return None  # a hash collision between two identifiers of one kind: apply deals with it
        holder = self._holders.get(source)
        if holder is None:
            holder = self._holders[source] = self._holder(source)
        present = {}
        for name, value in attributes.items():
            if value is not None:
                present[name] = value
        if self._sensitive and not self._sensitive.isdisjoint(present):
            return self._encode_sealed(number, derived, now, expires, uid, uid_text, key, fingerprint, ext, emails,
                                       phones, present, source, skipped, raw, kinds, keys, holder)
        cdef list names = _in_order(list(present))
        cdef list emails_sorted = _in_order(emails), phones_sorted = _in_order(phones)
        cdef bytes ledger_key = key.encode("utf-8")
        cdef Buf* b = &self._buf
        b.size = 0
        _reserve(b, _HEADER + nkeys * _KEY + _KEY_LENGTH + PyBytes_GET_SIZE(ledger_key))
        _header(b.data, number, derived, now, expires, uid, nkeys)
        at = _HEADER
        for i in range(nkeys):
            b.data[at] = <char><int>kinds[i]
            memcpy(b.data + at + 1, PyBytes_AS_STRING(<bytes>keys[i]), _KEY_SIZE)
            at += _KEY
        b.data[at] = <char>(PyBytes_GET_SIZE(ledger_key) >> 8)
        b.data[at + 1] = <char>PyBytes_GET_SIZE(ledger_key)
        b.size = at + _KEY_LENGTH
        _lit(b, ledger_key)

        # the record (resolver.records.Record.to_json's keys, sorted)
        at = _field(b)
        _lit(b, b'{"attributes":')
        _object(b, names, present, self._keys_json)
        _lit(b, b',"created_us":')
        _int(b, t)
        _lit(b, b',"emails":')
        _strings(b, emails)
        _lit(b, b',"external_id":')
        _value(b, ext)
        _lit(b, b',"field_us":')
        _object(b, names, now, self._keys_json)
        _lit(b, b',"held":{')
        first = True
        for prefix, values in ((self._email_held, emails_sorted), (self._phone_held, phones_sorted)):
            for value in <list>values:  # prefix + value: resolver.records.held_key
                if not first:
                    _char(b, b',')
                first = False
                _str(b, prefix + value)
                _lit(b, b':{')
                _str(b, holder)
                _char(b, b':')
                _int(b, t)
                _char(b, b'}')
        _lit(b, b'},"merged_external_ids":[],"phones":')
        _strings(b, phones)
        _lit(b, b',"slot_us":{},"updated_us":')
        _int(b, t)
        _lit(b, b',"uuid":')
        _str(b, uid_text)
        _lit(b, b',"version":1}')
        _end_field(b, at)

        # the change-log entry, cut before "source_system" (the parent puts "seq" there)
        at = _field(b)
        _lit(b, b'{"action":"CREATED","added":[')
        if ext is not None:
            _lit(b, b'[1,')
            _str(b, ext)
            _char(b, b']')
        for kind, values in ((EMAIL, emails_sorted), (PHONE, phones_sorted)):
            for value in <list>values:
                if b.data[b.size - 1] != b'[':
                    _char(b, b',')
                _char(b, b'[')
                _int(b, kind)
                _char(b, b',')
                _str(b, value)
                _char(b, b']')
        _lit(b, b'],"at_us":')
        _int(b, t)
        _lit(b, b',"attributes":')
        _object(b, names, present, self._keys_json)
        _lit(b, b',"attributes_old":')
        _object(b, names, None, self._keys_json)
        _lit(b, b',"customer_uuid":')
        _str(b, uid_text)
        _lit(b, b',"removed":[],')
        _end_field(b, at)
        at = _field(b)
        _lit(b, b'"source_system":')
        _value(b, source)
        _lit(b, b',"version":1}')
        _end_field(b, at)

        # the ledger entry (resolver.ledger.entry of the answer resolver.upsert.apply gives a create)
        at = _field(b)
        _lit(b, b'{"exp_us":')
        _int(b, expires)
        _lit(b, b',"fp":')
        _str(b, fingerprint)
        _lit(b, b',"response":{"action":"CREATED","customer_uuid":')
        _str(b, uid_text)
        _lit(b, b',"identifiers":{"emails":')
        _strings(b, emails)
        _lit(b, b',"external_id":')
        _value(b, ext)
        _lit(b, b',"phones":')
        _strings(b, phones)
        _lit(b, b'},"potential_duplicates":[],"skipped":[')
        for i in range(len(skipped)):
            if i:
                _char(b, b',')
            _char(b, b'[')
            for j, part in enumerate(<list>skipped[i]):
                if j:
                    _char(b, b',')
                _value(b, part)
            _char(b, b']')
        _lit(b, b'],"version":1}}')
        _end_field(b, at)

        at = _field(b)
        _lit(b, raw)
        _end_field(b, at)
        return PyBytes_FromStringAndSize(b.data, b.size)

    cdef object _encode_sealed(self, long long number, bint derived, now, expires, const char* uid, str uid_text,
                               str key, fingerprint, ext, list emails, list phones, dict present, source,
                               list skipped, bytes raw, list kinds, list keys, holder):
        """A create with a sensitive value: the twin's dicts, sealed by the Sealer and encoded by orjson."""
        held = {}
        for e in emails:
            held[self._email_held + e] = {holder: now}
        for ph in phones:
            held[self._phone_held + ph] = {holder: now}
        added = [[EXTERNAL_ID, ext]] if ext is not None else []
        for e in emails:
            added.append([EMAIL, e])
        for ph in phones:
            added.append([PHONE, ph])
        added.sort()
        record = {"uuid": uid_text, "external_id": ext, "emails": emails, "phones": phones,
                  "attributes": self._sealed(uid_text, present), "version": 1,
                  "created_us": now, "updated_us": now, "field_us": dict.fromkeys(present, now),
                  "merged_external_ids": [], "held": held, "slot_us": {}}
        change = {"at_us": now, "customer_uuid": uid_text, "action": "CREATED", "version": 1,
                  "source_system": source, "added": added, "removed": [], "attributes": present,
                  "attributes_old": dict.fromkeys(present)}
        encoded = <bytes>_dumps(self._seal_change(change), None, _SORTED)
        cut = encoded.rindex(_SEQ_AT) + 1
        entry = {"fp": fingerprint, "exp_us": expires, "response": {
            "customer_uuid": uid_text, "action": "CREATED", "version": 1,
            "identifiers": {"external_id": ext, "emails": emails, "phones": phones}, "potential_duplicates": [],
            "skipped": skipped}}
        return _pack(number, derived, now, expires, uid, kinds, keys, key.encode("utf-8"),
                     <bytes>_dumps(record, None, _SORTED), encoded[:cut], encoded[cut:],
                     <bytes>_dumps(entry, None, _SORTED), raw)


cdef inline Py_ssize_t _field(Buf* b) except -1:
    """Start a length-prefixed field; where its length goes (`_end_field`)."""
    cdef Py_ssize_t at = b.size
    _reserve(b, _LENGTH)
    b.size += _LENGTH
    return at


cdef inline void _end_field(Buf* b, Py_ssize_t at) noexcept:
    _put_u32(b.data + at, <uint32_t>(b.size - at - _LENGTH))


cdef void _header(char* p, long long number, bint derived, uint64_t now, uint64_t expires, const char* uid,
                  Py_ssize_t nkeys) noexcept:
    _put_u64(p, <uint64_t>number)
    p[8] = <char>(_DERIVED if derived else 0)
    _put_u64(p + 9, now)
    _put_u64(p + 17, expires)
    memcpy(p + 25, uid, 16)
    p[41] = <char>(nkeys >> 8)
    p[42] = <char>nkeys


cdef bytes _pack(long long number, bint derived, uint64_t now, uint64_t expires, const char* uid, list kinds,
                 list keys, bytes ledger_key, bytes record, bytes head, bytes tail, bytes entry, bytes raw):
    """resolver._load_py.pack, into one allocation."""
    cdef Py_ssize_t nkeys = len(keys), i, at
    cdef tuple fields = (record, head, tail, entry, raw)
    cdef Py_ssize_t size = _HEADER + nkeys * _KEY + _KEY_LENGTH + PyBytes_GET_SIZE(ledger_key)
    for f in fields:
        size += _LENGTH + PyBytes_GET_SIZE(<bytes>f)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    _header(p, number, derived, now, expires, uid, nkeys)
    at = _HEADER
    for i in range(nkeys):
        p[at] = <char><int>kinds[i]
        memcpy(p + at + 1, PyBytes_AS_STRING(<bytes>keys[i]), _KEY_SIZE)
        at += _KEY
    p[at] = <char>(PyBytes_GET_SIZE(ledger_key) >> 8)
    p[at + 1] = <char>PyBytes_GET_SIZE(ledger_key)
    memcpy(p + at + 2, PyBytes_AS_STRING(ledger_key), PyBytes_GET_SIZE(ledger_key))
    at += _KEY_LENGTH + PyBytes_GET_SIZE(ledger_key)
    for f in fields:
        _put_u32(p + at, <uint32_t>PyBytes_GET_SIZE(<bytes>f))
        memcpy(p + at + _LENGTH, PyBytes_AS_STRING(<bytes>f), PyBytes_GET_SIZE(<bytes>f))
        at += _LENGTH + PyBytes_GET_SIZE(<bytes>f)
    return out
