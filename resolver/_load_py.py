"""The hot path of `resolver import` (pure-Python twin of ext/_load_c.pyx, and the readable specification of it).

Two halves, one on each side of the process boundary:

- `RowPlanner` (a worker process): a JSON line -> its packed create (resolver/_load_consts.py), for the rows an
  initial load is made of: a plain JSON object (the shapes resolver.importer.jsonl.simple_input maps) asking to
  create a customer (no customer_uuid, expected_version or removals) whose every field is valid. It answers
  exactly what the general path answers for such a row (resolver.importer.jsonl.JsonParser, then
  resolver.importer.prepare.Preparer: `resolver.upsert.prepare`, the derived key, `resolver.bulk.plan`):
  the same command and the same bytes. Any other line gets None, and the general path prepares it. Every rule
  it applies is the general path's own function, passed in (`PlanRules`); what it saves is the general path's
  intermediate objects (UpsertInput, UpsertCommand, Planned, dataclasses, NamedTuples) and its generality.
- `CreateQueue` (the parent): the plain creates of one write transaction: `take` proves that a packed create is
  still a create here (nothing holds its idempotency key, external_id or emails; its phones may be held: it is
  then `shared`) and queues its writes; resolver.bulk.BulkWriter writes them (`drain`). In an initial load
  (`fresh`: every database the load writes held no entry when it began), a key nobody in this load claimed
  cannot be held by anyone, so `take` asks the store only about keys the load did claim (`KeyFilter`).

Nothing here imports the store or the use cases (resolver._hotpath selects this module, and they import it).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson

from resolver._load_consts import CHANGE_REF, DERIVED, FIELDS, HEADER, KEY, KEY_LENGTH, LEDGER_REF, LENGTH, SEQ
from resolver.errors import BlockedIdentifier, IdentifierError, ResolverError
from resolver.uuids import LoadUuids

__all__ = ["CreateQueue", "Drained", "Entry", "KeyFilter", "PlanRules", "Request", "RowPlanner", "entry_derived", "entry_head",
           "pack", "unpack"]

_EXTERNAL_ID, _EMAIL, _PHONE = 1, 2, 3  # resolver.normalize.Kind
_SORTED = orjson.OPT_SORT_KEYS
_SEQ_AT = b',"source_system":'  # resolver.bulk: the change-log entry is cut before this, after "seq" goes in
_BOM = b"\xef\xbb\xbf"
MEMO_SIZE = 1 << 16  # attribute values remembered (their normalized form, or that they are refused)
_BAD = object()  # a value the schema refuses, in the memo


# -- the packed create --------------------------------------------------------------------------------------


class Entry(NamedTuple):
    """A packed create's fields (`unpack`): for the parent's rare paths (apply, a shared phone's answer)."""

    line: int
    derived: bool
    now_us: int
    expires_us: int
    uuid: bytes
    keys: tuple[tuple[int, bytes], ...]  # (kind, index key), in the order external_id, emails, phones
    ledger_key: bytes
    record: bytes
    change_head: bytes
    change_tail: bytes
    ledger_entry: bytes
    raw: bytes


def pack(line: int, derived: bool, now_us: int, expires_us: int, uid: bytes, keys: list[tuple[int, bytes]],
         ledger_key: bytes, record: bytes, change_head: bytes, change_tail: bytes, ledger_entry: bytes,
         raw: bytes) -> bytes:
    """One packed create (resolver/_load_consts.py)."""
    parts = [HEADER.pack(line, DERIVED if derived else 0, now_us, expires_us, uid, len(keys))]
    parts += [KEY.pack(kind, key) for kind, key in keys]
    parts += [KEY_LENGTH.pack(len(ledger_key)), ledger_key]
    for field in (record, change_head, change_tail, ledger_entry, raw):
        parts += [LENGTH.pack(len(field)), field]
    return b"".join(parts)


def entry_head(entry: bytes) -> tuple[int, bool]:
    """A packed create's line, and whether its idempotency key was derived from its content."""
    line, flags = HEADER.unpack_from(entry)[:2]
    return line, bool(flags & DERIVED)


def entry_derived(entry: bytes) -> bool:
    """Whether a packed create's idempotency key was derived from its content."""
    return bool(entry[8] & DERIVED)


def unpack(entry: bytes) -> Entry:
    """The fields of a packed create."""
    line, flags, now, expires, uid, n = HEADER.unpack_from(entry)
    at = HEADER.size
    keys = []
    for _ in range(n):
        keys.append(KEY.unpack_from(entry, at))
        at += KEY.size
    (size,) = KEY_LENGTH.unpack_from(entry, at)
    at += KEY_LENGTH.size
    fields = [entry[at:at + size]]
    at += size
    for _ in FIELDS:
        (size,) = LENGTH.unpack_from(entry, at)
        at += LENGTH.size
        fields.append(entry[at:at + size])
        at += size
    return Entry(line, bool(flags & DERIVED), now, expires, uid, tuple(keys), *fields)


# -- worker side: a JSON line -> its packed create ----------------------------------------------------------


class PlanRules(NamedTuple):
    """The general path's rules, as RowPlanner applies them (resolver.importer.prepare builds this)."""

    request_fields: dict[str, str]  # JSON name or proto name -> UpsertRequest field (resolver.importer.jsonl)
    identifier_fields: dict[str, str]  # ... -> Identifiers field
    default_region: str  # the command line's (resolver.importer.prepare.Defaults)
    default_source: str
    check_key: Callable[[str], object]  # resolver.ledger.check_key: None when the key is fine
    max_key_length: int  # resolver.ledger.MAX_KEY_LENGTH (the compiled twin checks an ASCII key itself)
    check_region: Callable[[str], str | None]  # resolver.normalize.check_region
    source_ok: Callable[[str], bool]  # resolver.upsert's check of source_system
    normalize_external_id: Callable[[str], str]
    normalize_email: Callable[[str, Any], str]  # resolver._hotpath's
    normalize_phone: Callable[[str, str | None, Any], str]
    policy: Any  # resolver.normalize.Policy
    mask: Callable[[Any, str], str]  # resolver.normalize.mask (a Kind, or its number)
    max_identifiers: int  # limits.identifiers_per_customer
    text_limits: Mapping[str, tuple[int, int]]  # attributes whose text is trimmed, NFC'd and length-checked alone
    attribute: Callable[[str, Any], Any]  # any other attribute value normalized (ResolverError: a violation)
    owned_by_others: Callable[[list[str], str], list[str]]  # resolver.attributes.AttributeSchema's
    owners: Mapping[str, str]  # the attributes a source system owns (the compiled twin's owned_by_others)
    fingerprint: Callable[[dict[str, Any]], str]  # resolver.ledger.fingerprint
    derived_key: Callable[[str], str]  # resolver.importer.prepare.derived_key (first occurrence)
    held_key: Callable[[Any, str], str]  # resolver.records.held_key (a Kind, or its number)
    holder: Callable[[str], str]  # resolver.records.upsert_holder
    key: Callable[[int, str], bytes]  # the store's index key (resolver._hotpath.KeyHasher.key)
    sensitive: frozenset[str]  # attributes stored sealed (empty: nothing is sealed)
    sealed: Callable[[str, dict[str, Any]], Any]  # resolver.crypto.Sealer.sealed
    seal_change: Callable[[dict[str, Any]], dict[str, Any]]  # resolver.crypto.Sealer.seal_change
    uuids: LoadUuids
    clock: Callable[[], int]  # microseconds since the epoch
    retention_us: int  # the ledger entry's lifetime


class Request(NamedTuple):
    """A line's request as the fast path validated and normalized it: what its command is made of."""

    key: str  # the idempotency key (derived from the content when the line has none)
    derived: bool
    fingerprint: str
    ext: str | None
    emails: list[str]
    phones: list[str]
    attributes: dict[str, Any]  # normalized (None: clear the field)
    source: str
    skipped: list[list[Any]]  # [kind, masked, reason, detail] of each blocked identifier


class _Decline(Exception):
    """The line is not one this path answers for: the general path prepares it."""


class RowPlanner:
    """JSON lines -> packed creates, for the rows the fast path answers for (see the module docstring)."""

    def __init__(self, rules: PlanRules) -> None:
        self.rules = rules
        self._regions: dict[str, str | None] = {}  # region as given -> as phonenumbers wants it (valid ones)
        self._sources: dict[str, bool] = {}
        self._holders: dict[str, str] = {}
        self._memo: dict[tuple[str, type, Any], Any] = {}

    def block(self, data: bytes, first: int, general: Callable[[int, bytes], Any]) -> list[Any]:
        """Each line of a block of whole lines (`first`: the first one's number), in file order: its packed
        create, or what `general(number, line)` makes of it (the general path), left out when that is None."""
        if data.endswith(b"\n"):
            data = data[:-1]
        out: list[Any] = []
        for number, raw in enumerate(data.split(b"\n"), first):
            item = self.line(raw, number)
            if item is None:
                item = general(number, raw)
                if item is None:
                    continue
            out.append(item)
        return out

    def line(self, raw: bytes, number: int) -> bytes | None:
        """The packed create of the JSON line `raw` (number `number`), or None: the general path prepares it."""
        try:
            return self._plan(raw, number)
        except _Decline:
            return None

    def request(self, raw: bytes) -> Request | None:
        """What the command of a line this path packs is made of (resolver.importer.prepare rebuilds the command
        of a packed create from it), or None: the general path prepares the line."""
        try:
            return self._request(raw)
        except _Decline:
            return None

    def _plan(self, raw: bytes, number: int) -> bytes:
        q = self._request(raw)
        r = self.rules
        uid_text = r.uuids.for_line(number)
        now = r.clock()
        return self._encode(number, q.derived, now, now + r.retention_us, uid_text, q.key, q.fingerprint, q.ext,
                            q.emails, q.phones, q.attributes, q.source, q.skipped, raw)

    def _request(self, raw: bytes) -> Request:
        r = self.rules
        if b"\\" in raw or raw.startswith(_BOM):
            raise _Decline  # escapes (simple_input counts keys then) and the first line's BOM: the general path
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Decline from None
        if type(obj) is not dict:
            raise _Decline
        # the request's fields, as simple_input maps them; `strings` counts the strings decoded, which a line
        # without backslashes holds twice as many quotes as (one fewer: orjson dropped a repeated key)
        strings = len(obj)
        key = source = region = ""
        identifiers: dict[str, Any] | None = None
        attributes: dict[str, Any] | None = None
        seen: set[str] = set()
        for name, value in obj.items():
            field = r.request_fields.get(name)
            if field is None or field in seen or value is None:
                raise _Decline
            seen.add(field)
            if field == "identifiers":
                if type(value) is not dict:
                    raise _Decline
                identifiers = value
            elif field == "attributes":
                if type(value) is not dict:
                    raise _Decline
                attributes = value
            elif field == "expected_version":
                if type(value) is not int or value != 0:
                    raise _Decline  # a version to check: apply decides
            elif type(value) is not str:
                raise _Decline
            else:
                strings += 1
                if field == "idempotency_key":
                    key = value
                elif field == "source_system":
                    source = value
                elif field == "default_region":
                    region = value
                elif value:  # a customer_uuid: apply decides
                    raise _Decline
        # remove_identifiers is never here: `request_fields` leaves it out (a removal: apply decides)
        ext_raw, emails_raw, phones_raw, n = self._identifiers(identifiers)
        strings += n
        attrs_in, n = self._attribute_values(attributes)
        strings += n
        if raw.count(b'"') != 2 * strings:
            raise _Decline  # a repeated key: orjson kept the last value, json_format refuses the line

        # Defaults.complete, then upsert.prepare: every check that could refuse the row declines instead
        region = region or r.default_region
        source = source or r.default_source
        if key and r.check_key(key) is not None:
            raise _Decline
        code = self._region(region)
        if not self._source_ok(source):
            raise _Decline
        skipped: list[list[Any]] = []
        ext = None
        if ext_raw:
            try:
                ext = r.normalize_external_id(ext_raw)
            except IdentifierError:
                raise _Decline from None
        emails = self._normalized(_EMAIL, emails_raw, code, skipped)
        phones = self._normalized(_PHONE, phones_raw, code, skipped)
        if ext is None and not emails and not phones:
            raise _Decline
        if len(emails) + len(phones) > r.max_identifiers:
            raise _Decline
        attributes_n = {name: self._attribute(name, value) for name, value in attrs_in.items()}
        if r.owned_by_others(list(attributes_n), source):
            raise _Decline
        fingerprint = r.fingerprint({
            "customer_uuid": None, "add": {"external_id": ext, "emails": emails, "phones": phones},
            "remove": {"external_id": None, "emails": [], "phones": []}, "attributes": attributes_n,
            "source_system": source, "expected_version": 0,
        })
        derived = not key
        return Request(r.derived_key(fingerprint) if derived else key, derived, fingerprint, ext, emails, phones,
                       attributes_n, source, skipped)

    def _identifiers(self, value: dict[str, Any] | None) -> tuple[str, list[str], list[str], int]:
        """external_id, emails, phones as sent, and the strings they hold (simple_input's _simple_identifiers)."""
        if value is None:
            return "", [], [], 0
        ext = ""
        emails: list[str] = []
        phones: list[str] = []
        strings = len(value)
        seen: set[str] = set()
        for name, item in value.items():
            field = self.rules.identifier_fields.get(name)
            if field is None or field in seen or item is None:
                raise _Decline
            seen.add(field)
            if field == "external_id":
                if type(item) is not str:
                    raise _Decline
                ext = item
                strings += 1
            elif type(item) is list and all(type(v) is str for v in item):
                if field == "emails":
                    emails = item
                else:
                    phones = item
                strings += len(item)
            else:
                raise _Decline
        return ext, emails, phones, strings

    @staticmethod
    def _attribute_values(value: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
        """The attributes as a Struct carries them (simple_input's _simple_attributes: numbers as floats), and the
        strings the object holds."""
        if value is None:
            return {}, 0
        out: dict[str, Any] = {}
        strings = len(value)
        for name, item in value.items():
            kind = type(item)
            if kind is str:
                out[name] = item
                strings += 1
            elif kind is bool or item is None:
                out[name] = item
            elif kind is int and -(2**53) <= item <= 2**53:
                out[name] = float(item)
            elif kind is float and item - item == 0:  # finite
                out[name] = item
            else:
                raise _Decline
        return out, strings

    def _attribute(self, name: str, value: Any) -> Any:
        """The normalized value (resolver.attributes.AttributeSchema.normalize of one value); declines when the
        schema refuses it. A text of an attribute in `text_limits` is checked here; any other value is asked of
        the schema once and remembered (a file repeats its tiers, statuses and languages row after row)."""
        r = self.rules
        if type(value) is str:
            limits = r.text_limits.get(name)
            if limits is not None:
                text = unicodedata.normalize("NFC", value.strip())
                if limits[0] <= len(text) <= limits[1]:
                    return text
                raise _Decline
        memo_key = (name, type(value), value)  # the type too: True == 1 == 1.0
        got = self._memo.get(memo_key, self._memo)
        if got is self._memo:
            try:
                got = r.attribute(name, value)
            except ResolverError:
                got = _BAD
            if len(self._memo) < MEMO_SIZE:
                self._memo[memo_key] = got
        if got is _BAD:
            raise _Decline
        return got

    def _region(self, region: str) -> str | None:
        try:
            return self._regions[region]
        except KeyError:
            pass
        try:
            code = self.rules.check_region(region)
        except IdentifierError:
            raise _Decline from None
        self._regions[region] = code
        return code

    def _source_ok(self, source: str) -> bool:
        ok = self._sources.get(source)
        if ok is None:
            ok = self._sources[source] = self.rules.source_ok(source)
        return ok

    def _normalized(self, kind: int, values: list[str], region: str | None, skipped: list[list[Any]]) -> list[str]:
        """The normalized values (first of each kept), a blocked one added to `skipped` (an invalid one declines)."""
        r = self.rules
        out: list[str] = []
        for value in values:
            try:
                out.append(r.normalize_email(value, r.policy) if kind == _EMAIL
                           else r.normalize_phone(value, region, r.policy))
            except BlockedIdentifier as exc:
                skipped.append([kind, r.mask(kind, value), exc.reason, exc.message])
            except IdentifierError:
                raise _Decline from None
        return list(dict.fromkeys(out)) if len(out) > 1 else out

    def _holder(self, source: str) -> str:
        holder = self._holders.get(source)
        if holder is None:
            holder = self._holders[source] = self.rules.holder(source)
        return holder

    def _encode(self, number: int, derived: bool, now: int, expires: int, uid_text: str, key: str, fingerprint: str,
                ext: str | None, emails: list[str], phones: list[str], attributes: dict[str, Any], source: str,
                skipped: list[list[Any]], raw: bytes) -> bytes:
        """resolver.bulk.plan's writes of the create, packed."""
        r = self.rules
        hkey = r.key
        keys = [(_EXTERNAL_ID, hkey(_EXTERNAL_ID, ext))] if ext is not None else []
        keys += [(_EMAIL, hkey(_EMAIL, e)) for e in emails]
        keys += [(_PHONE, hkey(_PHONE, p)) for p in phones]
        if len(set(keys)) != len(keys):
            raise _Decline  # a hash collision between two identifiers of one kind: apply deals with it
        holder = self._holder(source)
        held = {r.held_key(_EMAIL, e): {holder: now} for e in emails}
        held.update((r.held_key(_PHONE, p), {holder: now}) for p in phones)
        present = {name: value for name, value in attributes.items() if value is not None}
        added = [[_EXTERNAL_ID, ext]] if ext is not None else []
        added += [[_EMAIL, e] for e in emails]
        added += [[_PHONE, p] for p in phones]
        added.sort()
        # Sealer.sealed and seal_change change nothing where no sensitive value is present
        seal = not r.sensitive.isdisjoint(present)
        record = {"uuid": uid_text, "external_id": ext, "emails": emails, "phones": phones,
                  "attributes": r.sealed(uid_text, present) if seal else present, "version": 1,
                  "created_us": now, "updated_us": now, "field_us": dict.fromkeys(present, now),
                  "merged_external_ids": [], "held": held, "slot_us": {}}
        change = {"at_us": now, "customer_uuid": uid_text, "action": "CREATED", "version": 1,
                  "source_system": source, "added": added, "removed": [], "attributes": present,
                  "attributes_old": dict.fromkeys(present)}
        encoded = orjson.dumps(r.seal_change(change) if seal else change, option=_SORTED)
        cut = encoded.rindex(_SEQ_AT) + 1
        entry = {"fp": fingerprint, "exp_us": expires, "response": {
            "customer_uuid": uid_text, "action": "CREATED", "version": 1,
            "identifiers": {"external_id": ext, "emails": emails, "phones": phones}, "potential_duplicates": [],
            "skipped": skipped}}
        return pack(number, derived, now, expires, bytes.fromhex(uid_text.replace("-", "")), keys,
                    key.encode("utf-8"), orjson.dumps(record, option=_SORTED), encoded[:cut], encoded[cut:],
                    orjson.dumps(entry, option=_SORTED), raw)


# -- parent side: the queue of plain creates ----------------------------------------------------------------


class KeyFilter:
    """The ledger and index keys one initial load has claimed (queued or written): a key not in it is held by
    nobody. (The compiled twin keeps a Bloom filter instead: a false "maybe" costs one store lookup.)"""

    def __init__(self, expected: int) -> None:
        self._keys: set[bytes] = set()

    def add(self, key: bytes) -> None:
        self._keys.add(key)

    def maybe(self, key: bytes) -> bool:
        """False: no row of this load claimed `key`. True: one may have."""
        return key in self._keys


class Drained(NamedTuple):
    """What `CreateQueue.drain` hands over: each database's queued (key, value) pairs, in queue order."""

    tables: dict[str, list[tuple[bytes, bytes]]]  # records, ix_*, ledger, ledger_exp, pii_refs: sorted
    changes: list[tuple[bytes, bytes]]
    shared: list[tuple[int, bytes]]  # (position among the creates queued, packed create) of creates whose phones
    # others hold: their ledger entries are written at the flush (resolver.bulk.BulkWriter._answers)
    uuids: list[bytes]  # the creates' uuids, in queue order (a create's position is its index here)


class CreateQueue:
    """Creates of one write transaction, queued (see the module docstring).

    `get(key, default, db)` is the transaction's; `dbs` its handles by database name; `index_names` the index
    database of each Kind; `filter` a KeyFilter when the transaction is an initial load's (else None: every
    key is looked up); `last_seq()` reads the change log's last sequence number.
    """

    def __init__(self, get: Callable[..., Any], dbs: dict[str, Any], index_names: dict[int, str],
                 filter: KeyFilter | None, last_seq: Callable[[], int]) -> None:
        self._get = get
        self._ledger_db = dbs["ledger"]
        self._index_db = {kind: dbs[name] for kind, name in index_names.items()}
        self._names = dict(index_names)
        self._filter = filter
        self._last_seq = last_seq
        self.seq = -1  # the last change-log sequence number (-1: read it when needed)
        self._claimed: set[bytes] = set()  # index keys queued since the last drain
        self._claimed_keys: set[bytes] = set()  # ledger keys queued since the last drain
        self._new()

    def _new(self) -> None:
        self._tables: dict[str, list[tuple[bytes, bytes]]] = {
            name: [] for name in ("records", *self._names.values(), "ledger", "ledger_exp", "pii_refs")}
        self._changes: list[tuple[bytes, bytes]] = []
        self._shared: list[tuple[int, bytes]] = []
        self._uuids: list[bytes] = []

    def __len__(self) -> int:
        """Creates queued since the last drain."""
        return len(self._uuids)

    def _held(self, key: bytes, claimed: set[bytes], db: Any) -> bool:
        """Whether `key` is queued since the last drain or stored in `db`."""
        if self._filter is not None and not self._filter.maybe(key):
            return False
        return key in claimed or self._get(key, None, db) is not None

    def take(self, entry: bytes) -> bool:
        """Queue the writes of the packed create `entry` if it is a create in this transaction: nothing holds
        its key, its external_id or its emails (phones may be held: it is then shared). False: it needs apply."""
        e = unpack(entry)
        lkey, uid = e.ledger_key, e.uuid
        if self._held(lkey, self._claimed_keys, self._ledger_db):
            return False
        shared = False
        for kind, k in e.keys:
            if self._held(k, self._claimed, self._index_db[kind]):
                if kind != _PHONE:
                    return False
                shared = True
        tables, claimed, names = self._tables, self._claimed, self._names
        for kind, k in e.keys:
            self.claim(k)
            claimed.add(k)
            tables[names[kind]].append((k, uid))
        self.claim(lkey)
        self._claimed_keys.add(lkey)
        position = len(self._uuids)
        self._uuids.append(uid)
        tables["records"].append((uid, e.record))
        if shared:
            self._shared.append((position, entry))
        else:
            tables["ledger"].append((lkey, e.ledger_entry))
        tables["ledger_exp"].append((SEQ.pack(e.expires_us) + lkey, b""))
        if self.seq < 0:
            self.seq = self._last_seq()
        self.seq += 1
        packed_seq = SEQ.pack(self.seq)
        self._changes.append((packed_seq, b'%s"seq":%d,%s' % (e.change_head, self.seq, e.change_tail)))
        tables["pii_refs"] += [(uid + LEDGER_REF + lkey, b""), (uid + CHANGE_REF + packed_seq, b"")]
        return True

    def claim(self, key: bytes) -> None:
        """`key` (a ledger or index key) is written by this load: an initial load's filter must know it."""
        if self._filter is not None:
            self._filter.add(key)

    def drain(self) -> Drained:
        """Everything queued since the last drain, each table's pairs in key order (the queue is empty
        afterwards)."""
        for items in self._tables.values():
            items.sort()
        out = Drained(self._tables, self._changes, self._shared, self._uuids)
        self._claimed.clear()
        self._claimed_keys.clear()
        self._new()
        return out
