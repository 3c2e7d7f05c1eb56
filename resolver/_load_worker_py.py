"""The worker's half of the import's hot path (pure-Python twin of ext/_load_worker.pxi): a JSON line -> its packed
create (resolver/_load_consts.py).

`RowPlanner` answers for the rows an initial load is made of: a plain JSON object (the shapes
resolver.importer.jsonl.simple_input maps) asking to create a customer (no customer_uuid, expected_version or
removals) whose every field is valid. It answers exactly what the general path answers for such a row
(resolver.importer.jsonl.JsonParser, then resolver.importer.prepare.Preparer: `resolver.upsert.prepare`, the derived
key, `resolver.bulk.plan`): the same command and the same bytes. Any other line gets None, and the general path
prepares it. Every rule it applies is the general path's own function, passed in (`PlanRules`); what it saves is
the general path's intermediate objects (UpsertInput, UpsertCommand, Planned, dataclasses, NamedTuples) and its
generality.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import orjson

from resolver._load_consts import pack
from resolver.errors import BlockedIdentifier, IdentifierError, ResolverError
from resolver.uuids import LoadUuids

__all__ = ["MEMO_SIZE", "PlanRules", "Request", "RowPlanner"]

_EXTERNAL_ID, _EMAIL, _PHONE = 1, 2, 3  # resolver.normalize.Kind
_SORTED = orjson.OPT_SORT_KEYS
_SEQ_AT = b',"source_system":'  # resolver.bulk: the change-log entry is cut before this, after "seq" goes in
_BOM = b"\xef\xbb\xbf"
MEMO_SIZE = 1 << 16  # attribute values remembered (their normalized form, or that they are refused)
_BAD = object()  # a value the schema refuses, in the memo


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
    # resolver.importer.jsonl.simple_attributes: the attributes as a Struct carries them (numbers as floats) and
    # the strings the object holds, or None (a shape the fast path leaves to json_format)
    simple_attributes: Callable[[Any], tuple[dict[str, Any], int] | None]
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


def _fields(obj: dict[str, Any], names: Mapping[str, str]) -> Iterator[tuple[str, Any]]:
    """Each (field, value) of a decoded JSON object whose keys `names` maps to fields; declines at a key it does
    not map, a field named twice (a JSON name and a proto name of one field), or a null."""
    seen: set[str] = set()
    for name, value in obj.items():
        field = names.get(name)
        if field is None or field in seen or value is None:
            raise _Decline
        seen.add(field)
        yield field, value


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
        identifiers: Any = None
        attributes: Any = None
        for field, value in _fields(obj, r.request_fields):
            if field == "identifiers":
                identifiers = value
            elif field == "attributes":
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
        attrs_in: dict[str, Any] = {}
        if attributes is not None:
            found = r.simple_attributes(attributes)
            if found is None:
                raise _Decline
            attrs_in, n = found
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

    def _identifiers(self, value: Any) -> tuple[str, list[str], list[str], int]:
        """external_id, emails, phones as sent (`value`: the request's identifiers, None when it has none), and
        the strings they hold (simple_input's _simple_identifiers)."""
        if value is None:
            return "", [], [], 0
        if type(value) is not dict:
            raise _Decline
        ext = ""
        emails: list[str] = []
        phones: list[str] = []
        strings = len(value)
        for field, item in _fields(value, self.rules.identifier_fields):
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
