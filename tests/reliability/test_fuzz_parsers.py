"""Fuzzing the parsers at scale (issue 18, item 7): the normalizers, the compiled modules against their twins, the
blueprint loader and the webhook parser. Request decoding has its own target (tests/unit/test_wire_fuzz.py).

Each target is one property, written once as a plain function (`*_property`) and driven two ways:

- hypothesis, with strategies aimed at each parser's rules (`EXAMPLES` per target: about a hundred in `make test`,
  a thousand in `make reliability`);
- atheris (coverage-guided, libFuzzer's engine bundled in its wheel: no compiler needed; pinned in the dev extra
  where it has wheels), in `make reliability`, `ATHERIS_SECONDS` per target, each in a subprocess of its own,
  since atheris.Fuzz() never returns: `python -m tests.reliability.test_fuzz_parsers TARGET [libFuzzer flags]
  [CORPUS_DIR]`. The pure-Python code each target steers (the twins, phonenumbers, the loader, the event format)
  is instrumented for coverage; the compiled modules are not (that takes a clang build), but every input they see
  is also what drove coverage in their twin. `make test` runs all targets in turn in one process for a few
  hundred inputs, so the harness itself cannot rot.

The properties: an answer or a documented error (IdentifierError, ConfigError, Unauthenticated, EventRejected),
never another exception; the compiled module answers exactly as its twin (the same value, or the same error; on
bytes that are no stored record, see probe_property); what a normalizer accepts normalizes to itself. What the
targets found is kept at the end (FOUND_*), checked on every run.
"""

from __future__ import annotations

import base64
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver import _email_c, _email_py, _keys_c, _keys_py, _phone_c, _phone_consts, _phone_py, _probe_c, _probe_py
from resolver import normalize as reference
from resolver._probe_types import Decision
from resolver.attributes import AttributeSchema
from resolver.bootstrap import build_service
from resolver.config import Settings, describe, load_settings
from resolver.errors import ConfigError, EventRejected, IdentifierError, InboxFull, Unauthenticated, UnknownSource
from resolver.events import dlq
from resolver.events.format import EVENT_TYPES, interpret
from resolver.events.inbox import Ingestor
from resolver.events.signatures import MAX_ID_LENGTH, sign, verify
from resolver.identifiers import RawIdentifiers, policy_from
from resolver.normalize import DEFAULT_POLICY, Policy
from resolver.records import Record
from resolver.service import Service
from resolver.upsert import UpsertInput
from resolver.v1 import resolver_pb2 as pb
from tests.conftest import TEST_BLUEPRINT, TEST_ENCRYPTION_KEY
from tests.reliability.report import FULL, scaled
from tests.unit.test_probe import FIELDS, _assert_same_decision, _layouts, records
from tests.unit.test_rwire import decoded, laid_out, requests
from tests.unit.test_wire_fuzz import DATETIMES, EMAILS, NUMBERS, PHONES, SHORT, TEXT
from tests.unit.test_wire_fuzz import REGIONS as REGION_TEXT

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = scaled(120, 1000)  # hypothesis examples per target
BLUEPRINT_EXAMPLES = scaled(40, 300)  # per blueprint strategy (a load validates the whole document: ~20-50 ms)
ATHERIS_SECONDS = 12  # per target, in `make reliability` (plus ~10 s to start and instrument)
ATHERIS_SMOKE_RUNS = 400  # in `make test`: all targets in turn, in one process (the harness check)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# What each property was given, by target: the report's counts.
TRIED: Counter[str] = Counter()

# --- the normalizers: compiled == pure twin == reference (phonenumbers), documented errors only, idempotent ----

POSSIBLE = Policy(phone_acceptance="possible")
BLOCKING = Policy(blocked_values=frozenset({"+16502530099", "noone@example.com"}),
                  blocked_patterns=(re.compile(r"\+1900\d+"), re.compile(r".*@test\.invalid")))
POLICIES = [DEFAULT_POLICY, POSSIBLE, Policy(default_region="GB"), Policy(phone_acceptance="possible", default_region="DE"),
            BLOCKING, Policy(phone_acceptance="possible", blocked_values=BLOCKING.blocked_values,
                             blocked_patterns=BLOCKING.blocked_patterns)]
REGIONS: list[str | None] = [None, "", "US", "GB", "DE", "FR", "IT", "AR", "MX", "BR", "IN", "CN", "JP", "RU", "KZ",
                             "AU", "CA", "GG", "PR", "SM", "VA", "gb", "XX", "001", "ZZ"]
Outcome = tuple[Any, ...]


def _outcome(fn: Callable[..., str], *args: Any) -> Outcome:
    """("ok", value) or (error class, reason, message): anything but an IdentifierError propagates (a failure)."""
    try:
        return ("ok", fn(*args))
    except IdentifierError as error:
        return (type(error).__name__, error.reason, error.message)


def phone_property(raw: str, region: str | None, policy: Policy) -> None:
    TRIED["phone"] += 1
    want = _outcome(reference.normalize_phone, raw, region, policy)
    assert _outcome(_phone_py.normalize_phone, raw, region, policy) == want, (raw, region, policy)
    assert _outcome(_phone_c.normalize_phone, raw, region, policy) == want, (raw, region, policy)
    if want[0] == "ok":
        e164 = want[1]
        # a calling code (1-3 digits) and a national number of up to phonenumbers' 17 digits: under "possible",
        # longer than E.164's 15 (FOUND_PHONE)
        assert re.fullmatch(rf"\+[1-9]\d{{1,{2 + _phone_consts.MAX_NSN}}}", e164), e164
        for fn in (reference.normalize_phone, _phone_c.normalize_phone):  # what is stored reads back as itself
            assert fn(e164, None, policy) == e164, (raw, region, e164)
            assert fn(e164, region, policy) == e164, (raw, region, e164)


def email_property(raw: str, policy: Policy) -> None:
    TRIED["email"] += 1
    want = _outcome(reference.normalize_email, raw, policy)
    assert _outcome(_email_py.normalize_email, raw, policy) == want, raw
    assert _outcome(_email_c.normalize_email, raw, policy) == want, raw
    if want[0] == "ok":
        value = want[1]
        local, domain = value.split("@")  # exactly one '@'
        assert 0 < len(local) <= 64 and len(value) <= 254 and domain.isascii() and domain == domain.lower(), value
        assert reference.normalize_email(value, policy) == value and _email_c.normalize_email(value, policy) == value


def external_id_property(raw: str) -> None:
    TRIED["external_id"] += 1
    got = _outcome(reference.normalize_external_id, raw)
    if got[0] == "ok":
        assert 1 <= len(got[1]) <= 255 and reference.normalize_external_id(got[1]) == got[1], raw


@FUZZ
@given(raw=st.one_of(PHONES, st.text(max_size=40)), region=st.one_of(st.sampled_from(REGIONS), REGION_TEXT),
       policy=st.sampled_from(POLICIES))
def _fuzz_phone(raw: str, region: str | None, policy: Policy) -> None:
    phone_property(raw, region, policy)


@FUZZ
@given(raw=st.one_of(EMAILS, st.text(max_size=40)), policy=st.sampled_from(POLICIES))
def _fuzz_email(raw: str, policy: Policy) -> None:
    email_property(raw, policy)


@FUZZ
@given(raw=st.one_of(TEXT, st.text()))
def _fuzz_external_id(raw: str) -> None:
    external_id_property(raw)


def test_normalizers(reliability_report: Callable[..., None]) -> None:
    start = time.monotonic()
    _fuzz_phone()
    _fuzz_email()
    _fuzz_external_id()
    for raw, region, policy in FOUND_PHONE:
        phone_property(raw, region, policy)
    reliability_report(
        tried=f"hypothesis: {TRIED['phone']} phone inputs (any text, phone-like text, every form; regions valid and "
              f"not; 6 policies, phone_acceptance valid and possible, blocked values and patterns), "
              f"{TRIED['email']} emails, {TRIED['external_id']} external ids",
        held="no exception but IdentifierError; compiled == pure twin == reference (phonenumbers) on every input "
             "(value, or error class + reason + message); every accepted value normalizes to itself",
        figures=f"{time.monotonic() - start:.1f} s")


# --- the compiled modules against their twins ------------------------------------------------------------------


def _result(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """("ok", value) or ("raised", the exception's class): what a compiled module must share with its twin."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the exact class is what is compared
        return ("raised", type(exc))


def keys_property(algorithm: str, secret: bytes | None, kind: int, values: list[str]) -> None:
    """_keys_c == _keys_py: the same keys, or the same error (a bad algorithm or secret, text that is not UTF-8)."""
    TRIED["keys"] += 1
    made = _result(_keys_py.KeyHasher, algorithm, secret)
    assert _result(_keys_c.KeyHasher, algorithm, secret)[0] == made[0]
    if made[0] == "raised":
        assert made[1] is ValueError and _result(_keys_c.KeyHasher, algorithm, secret)[1] is ValueError
        return
    twin, compiled = _keys_py.KeyHasher(algorithm, secret), _keys_c.KeyHasher(algorithm, secret)
    for value in values:
        want = _result(twin.key, kind, value)
        assert _result(compiled.key, kind, value) == want, (algorithm, kind, value)
        if want[0] == "ok":
            assert len(want[1]) == _keys_py.KEY_SIZE
    assert _result(compiled.keys, kind, values) == _result(twin.keys, kind, values)


NOT_A_RECORD = (ValueError, LookupError, TypeError, AttributeError)  # what reading bytes that are no record raises


def _has_duplicate_keys(raw: bytes) -> bool:
    """Whether some JSON object in `raw` names a key twice (orjson keeps the last; resolver.records never writes one)."""
    seen_twice = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal seen_twice
        seen_twice |= len({k for k, _ in items}) != len(items)
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return False
    return seen_twice


def probe_property(raw: bytes, kind: int, value: str, names: tuple[str, ...]) -> None:
    """_probe_c.holds / record_fields (distinct names, as resolver.resolve asks) on any bytes: where the twin
    answers, the same answer. Two kinds of bytes are no record resolver.records writes, and there the scanner may
    differ. Where the twin raises (not JSON, or JSON that is not a record), an answer or an ordinary error
    (ValueError, LookupError, TypeError, AttributeError): the scanner does not validate what it skips, reports bad
    UTF-8 as UnicodeDecodeError where orjson says JSONDecodeError, and reads a missing list as empty where the twin
    raises KeyError. Where a key appears twice, the scanner takes the first (it stops at a match), orjson the last.
    The store only ever holds records as resolver.records writes them (orjson's output of a dict: every field
    present, each once), and `resolver check` reads every one."""
    TRIED["probe"] += 1
    for compiled, twin, args in ((_probe_c.holds, _probe_py.holds, (raw, kind, value)),
                                 (_probe_c.record_fields, _probe_py.record_fields, (raw, names))):
        got, want = _result(compiled, *args), _result(twin, *args)
        if want[0] == "raised":
            assert got[0] == "ok" or issubclass(got[1], NOT_A_RECORD), (twin.__name__, args, got)
            TRIED["probe: not a record"] += 1
            continue
        if got != want and _has_duplicate_keys(raw):
            TRIED["probe: a key twice, the scanner read the first"] += 1
            continue
        assert got == want, (twin.__name__, args)
        if got[0] == "ok" and isinstance(got[1], list):
            assert [type(x) for x in got[1]] == [type(x) for x in want[1]]


def rwire_property(data: bytes, max_size: int) -> None:
    """_rwire_c.decode_resolve on any bytes: protobuf's reading (the twin's) or None (left to the twin)."""
    TRIED["rwire"] += 1
    decoded(data, max_size, must=False)  # tests/unit/test_rwire.py: compiled vs twin vs protobuf


@dataclass(frozen=True)
class ProbeStore:
    """A small store written through Upsert: shared phones and emails, one phone past the fan-out limit."""

    service: Service
    idents: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]  # what it holds: external ids, emails, phones

    @classmethod
    def build(cls, data: Path) -> ProbeStore:
        svc = build_service(load_settings(None, data_dir=str(data), default_region="US", max_fanout=3, map_size_mb=64))
        exts, emails, phones = [], [], []
        for i in range(24):
            ext, email = f"EXT-{i}", f"user{i % 9}@example.com"
            phone = ["+16502530000", f"+1650253{i % 7:04d}", f"+1415555{i:04d}"][i % 3]
            svc.upsert(UpsertInput(f"probe-{i}", RawIdentifiers(ext, (email,), (phone,)), {"name": f"n{i}"}))
            exts.append(ext)
            emails.append(email)
            phones.append(phone)
        return cls(svc, (tuple(exts), tuple(sorted(set(emails))), tuple(sorted(set(phones)))))

    def decide_property(self, ext: str | None, emails: list[str], phones: list[str], limit: int, explain: bool) -> None:
        """The compiled Prober decides exactly as the twin, on any identifiers (held, near misses, junk)."""
        TRIED["decide"] += 1
        s = self.service.store
        with s.read() as view:
            args = (view.txn, (s.ix[1], s.ix[2], s.ix[3]), s.db["records"], s.hasher.key)
            twin, compiled = _probe_py.Prober(*args), _probe_c.Prober(*args)
            want = twin.decide(ext, emails, phones, limit, explain)
            got = compiled.decide(ext, emails, phones, limit, explain)
            assert type(want) is Decision
            _assert_same_decision(got, want)
            for uid in want.uuids:
                assert compiled.fields(uid, FIELDS) == twin.fields(uid, FIELDS)


PROBE_VALUES = st.one_of(SHORT, st.sampled_from(["+16502530000", "+16502530003", "user1@example.com", "EXT-3", "", "]",
                                                 '"', "\\", "\u2028"]))


@FUZZ
@given(algorithm=st.one_of(st.sampled_from(["xxh3-128", "blake2b"]), SHORT),
       secret=st.one_of(st.none(), st.binary(max_size=70)),
       kind=st.integers(0, 255),  # the kind byte: Kind values only ever (1..3), never from a request
       values=st.lists(st.one_of(TEXT, st.text()), max_size=4))
def _fuzz_keys(algorithm: str, secret: bytes | None, kind: int, values: list[str]) -> None:
    keys_property(algorithm, secret, kind, values)


@st.composite
def _record_bytes(draw: st.DrawFn) -> bytes:
    """A stored record (in each layout the scanner must read), damaged or not; or any bytes."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=200))
    buf = bytearray(draw(st.sampled_from(_layouts(draw(records)))))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and i < len(buf):
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[i:i] = draw(st.sampled_from([b'"', b"\\", b",", b"]", b"}", b"{", b"[", b":", b" ", b"\x00", b"\xff"]))
        elif op == "delete" and i < len(buf):
            del buf[i]
        elif op == "truncate":
            del buf[i:]
    return bytes(buf)


@FUZZ
@given(raw=_record_bytes(), kind=st.one_of(st.integers(1, 3), st.integers(-2, 300)), value=PROBE_VALUES,
       names=st.lists(st.one_of(st.sampled_from(FIELDS), SHORT), min_size=1, max_size=4, unique=True).map(tuple))
def _fuzz_probe(raw: bytes, kind: int, value: str, names: tuple[str, ...]) -> None:
    probe_property(raw, kind, value, names)


@FUZZ
@given(data=st.one_of(laid_out(valid_only=False), requests.map(lambda r: r.SerializeToString()), st.binary(max_size=96)),
       cut=st.integers(-2, 2), truncate=st.booleans())
def _fuzz_rwire(data: bytes, cut: int, truncate: bool) -> None:
    if truncate and data:
        data = data[: len(data) // 2]
    rwire_property(data, 1 << 30)
    rwire_property(data, max(len(data) + cut, 0))  # at, under and over the size limit


def test_compiled_modules_against_their_twins(reliability_report: Callable[..., None]) -> None:
    start = time.monotonic()
    _fuzz_keys()
    _fuzz_probe()
    _fuzz_rwire()
    for raw in FOUND_PROBE:
        for kind, value in ((1, "EXT-1"), (3, "+16502530000"), (3, "+1650")):
            probe_property(raw, kind, value, FIELDS)
    reliability_report(
        tried=f"hypothesis: _keys_c {TRIED['keys']} hashers x values (any algorithm name, secret, kind, text); "
              f"_probe_c holds/record_fields on {TRIED['probe']} records (every layout, damaged) and random bytes; "
              f"_rwire_c decode_resolve on {TRIED['rwire']} requests (laid out by hand, not UTF-8, truncated, "
              "random, at/under/over the size limit)",
        held="the compiled module answers as its pure twin: same value, or the same exception class; "
             "decode_resolve equals protobuf's reading or gives up (None)",
        figures=f"{time.monotonic() - start:.1f} s")


IDENT_TEXT = st.one_of(PROBE_VALUES, st.sampled_from(["+16502530001", "+14155550004", "user8@example.com", "EXT-23"]))


def test_prober_decisions(tmp_path: Path, reliability_report: Callable[..., None]) -> None:
    probe_store = ProbeStore.build(tmp_path / "data")
    exts, emails, phones = probe_store.idents

    @FUZZ
    @given(ext=st.one_of(st.none(), st.sampled_from(exts), IDENT_TEXT),
           emails=st.lists(st.one_of(st.sampled_from(emails), IDENT_TEXT), max_size=4),
           phones=st.lists(st.one_of(st.sampled_from(phones), IDENT_TEXT), max_size=4),
           limit=st.sampled_from([1, 2, 3, 25]), explain=st.booleans())
    def fuzz(ext: str | None, emails: list[str], phones: list[str], limit: int, explain: bool) -> None:
        probe_store.decide_property(ext, emails, phones, limit, explain)

    start = time.monotonic()
    try:
        fuzz()
    finally:
        probe_store.service.close()
    reliability_report(
        tried=f"hypothesis: {TRIED['decide']} Prober.decide calls on a real LMDB store (24 customers written by "
              "Upsert, shared phones and emails, a phone past the fan-out limit): held identifiers, near misses, "
              "junk; fan-out limits 1-25; explain on and off",
        held="_probe_c.Prober decides exactly as _probe_py.Prober (outcome, kind, uuids, conflicts, fanned, probes) "
             "and reads the same fields",
        figures=f"{time.monotonic() - start:.1f} s")


# --- the blueprint loader: a Settings, or ConfigError with its sentences; what it accepts runs -------------------

ENV = {"RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY, "RESOLVER_SALESFORCE_SECRET": "s3cret-SALESFORCE-9f2d1c",
       "RESOLVER_BILLING_SECRET": "s3cret-BILLING-41aa07", "RESOLVER_BILLING_SECRET_PREVIOUS": "whsec_"
       + base64.b64encode(b"s3cret-BILLING-previous").decode(), "RESOLVER_INDEX_KEY": "s3cret-INDEX-77be30"}
EXAMPLE_BLUEPRINT = (ROOT / "examples" / "blueprint.toml").read_text()
BLUEPRINTS = [EXAMPLE_BLUEPRINT, TEST_BLUEPRINT]
SAMPLE_VALUES: list[Any] = [None, "", " x ", "Active", "gold", "2023-10-27", "10/27/2023", "2023-10-27T14:30:00Z", 0, -1,
                            2.5, 2**63, math.nan, True, "é" * 300]


def blueprint_property(text: bytes, directory: Path) -> None:
    """load_settings on any file: Settings, or ConfigError listing its problems as sentences, never another
    exception, never a secret's value; a blueprint it accepts builds what the server builds from it."""
    TRIED["blueprint"] += 1
    path = directory / "blueprint.toml"
    path.write_bytes(text)
    try:
        loaded = load_settings(path, environ=ENV)
    except ConfigError as exc:
        said = str(exc)
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems), exc.problems
        assert said.startswith("invalid configuration:") and "Traceback" not in said
        assert not any(secret in said for secret in ENV.values()), said
        return
    accepted_property(loaded)


def accepted_property(s: Settings) -> None:
    """What resolver.bootstrap builds from accepted settings builds, and the attribute schema answers any value
    with a value or violations."""
    schema = AttributeSchema(s)
    policy_from(s)
    assert describe(s)
    for name in list(s.attributes)[:8] or ["name"]:
        for value in SAMPLE_VALUES:
            schema.normalize({name: value})


# A TOML document from structures: the blueprint's tables with values of any type, keys of any text.
_TOML_SCALARS = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), NUMBERS, SHORT, st.text(max_size=20),
                          st.dates(), st.datetimes(), st.times())
TOML_VALUES = st.recursive(_TOML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(SHORT, st.sampled_from(["type", "env", "file", "fields"])),
                                                  inner, max_size=4)), max_leaves=10)


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7f:
            out.append(f"\\u{ord(ch):04x}" if ch not in '"\\' else "\\" + ch)
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    """`value` as an inline TOML value (tables inline, so a whole document is `key = value` lines)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime | date | dtime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(doc: Mapping[str, Any]) -> str:
    return "".join(f"{_toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


@st.composite
def blueprint_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A known blueprint with 1-5 edits: a key set to any value (a known key or any), a key or table deleted, a
    table replaced by any value."""
    doc = tomllib.loads(draw(st.sampled_from(BLUEPRINTS)))
    for _ in range(draw(st.integers(1, 5))):
        table = draw(st.one_of(st.sampled_from(sorted(doc)), SHORT))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "replace"]))
        if op == "replace" or not isinstance(doc.get(table), dict):
            doc[table] = draw(TOML_VALUES) if op != "delete" else None
            if doc[table] is None:
                del doc[table]
            continue
        keys = sorted(doc[table])
        key = draw(st.one_of(st.sampled_from(keys), SHORT) if keys else SHORT)
        if op == "delete":
            doc[table].pop(key, None)
        else:
            doc[table][key] = draw(TOML_VALUES)
    return doc


@st.composite
def blueprint_texts(draw: st.DrawFn) -> bytes:
    """A known blueprint's text, damaged: lines dropped, duplicated, cut; bytes inserted; or any text."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
    lines = draw(st.sampled_from(BLUEPRINTS)).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "cut", "insert", "nest"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif op == "insert":
            lines.insert(i, draw(st.one_of(SHORT, st.sampled_from(["[", "]", "=", '"', "'''", "\\", "[[x]]\n", "\x00"]))))
        else:  # deep nesting: arrays or inline tables hundreds of levels deep
            depth = draw(st.integers(1, 1200))
            lines.insert(i, "deep = " + ("[" * depth + "]" * depth if draw(st.booleans()) else "{a=" * depth + "1"
                                         + "}" * depth) + "\n")
        if not lines:
            lines = ["\n"]
    return "".join(lines).encode("utf-8", "surrogatepass")


def test_blueprint_loader(tmp_path: Path, reliability_report: Callable[..., None]) -> None:
    @settings(FUZZ, max_examples=BLUEPRINT_EXAMPLES)
    @given(doc=blueprint_documents())
    def fuzz_documents(doc: dict[str, Any]) -> None:
        text = toml_document(doc)
        assert tomllib.loads(text).keys() == doc.keys()  # the emitter writes TOML
        blueprint_property(text.encode(), tmp_path)

    @settings(FUZZ, max_examples=BLUEPRINT_EXAMPLES)
    @given(text=blueprint_texts())
    def fuzz_texts(text: bytes) -> None:
        blueprint_property(text, tmp_path)

    start = time.monotonic()
    fuzz_documents()
    documents = TRIED["blueprint"]
    fuzz_texts()
    for text in FOUND_BLUEPRINTS:
        blueprint_property(text, tmp_path)
    reliability_report(
        tried=f"hypothesis: load_settings on {documents} blueprints built from structures (the example and test "
              f"blueprints, 1-5 keys or tables set to any TOML value: NaN, inf, dates, tables, huge integers) and "
              f"{TRIED['blueprint'] - documents} damaged or random texts (lines dropped, cut, duplicated, bytes "
              "inserted, nesting up to 1,200 deep, not UTF-8)",
        held="a Settings, or ConfigError listing its problems as sentences (never another exception, never a "
             "secret's value); every accepted blueprint builds its attribute schema, policy and summary, and the "
             "schema answers any value",
        figures=f"{time.monotonic() - start:.1f} s")


# --- the webhook parser: signatures.verify and format.interpret, and Ingestor.admit over them --------------------

EVENT_SETTINGS = load_settings(ROOT / "examples" / "blueprint.toml", environ=ENV)
EVENT_SCHEMA = AttributeSchema(EVENT_SETTINGS)
SECRETS = {name: spec.secrets for name, spec in EVENT_SETTINGS.sources.items()}
NOW_S = 1_760_000_000.0
TOLERANCE_S = 300.0
CRM_FIELDS = sorted({f for spec in EVENT_SETTINGS.sources.values() for f in (*spec.field_map, *spec.identifiers)})
WEBHOOK_ERRORS = (Unauthenticated, EventRejected)


def webhook_property(source: str, headers: Mapping[str, str], body: bytes) -> str:
    """verify, then interpret, as admission runs them: an id and a ChangeEvent, or Unauthenticated / EventRejected.
    A signature is only ever accepted when it is one of the source's secrets' over this id, time and body."""
    TRIED["webhook"] += 1
    assert isinstance(dlq.masked_payload(body), str)  # what `resolver dlq show` prints of any body
    try:
        webhook_id = verify(headers, body, SECRETS.get(source, ()), NOW_S, TOLERANCE_S)
    except Unauthenticated as exc:
        assert exc.message and exc.reason == "INVALID_SIGNATURE"
        return "unauthenticated"
    assert webhook_id == headers["webhook-id"] and len(webhook_id) <= MAX_ID_LENGTH and webhook_id.isprintable()
    stamp = int(headers["webhook-timestamp"])
    assert abs(NOW_S - stamp) <= TOLERANCE_S
    signed = {sign(secret, webhook_id, stamp, body) for secret in SECRETS[source]}
    assert signed & set(headers["webhook-signature"].split()), headers
    return interpret_property(source, webhook_id, body)


def interpret_property(source: str, webhook_id: str, body: bytes) -> str:
    TRIED["interpret"] += 1
    try:
        ev = interpret(source, webhook_id, body, EVENT_SETTINGS, EVENT_SCHEMA)
    except EventRejected as exc:
        assert exc.message and exc.reason in ("SCHEMA_INVALID", "MAPPING_FAILED", "INVALID_VALUE"), exc.reason
        return exc.reason
    assert ev.event_type in EVENT_TYPES and ev.source == source and ev.webhook_id == webhook_id
    return "interpreted"


def signed_headers(source: str, webhook_id: str, body: bytes, skew: int = 0) -> dict[str, str]:
    stamp = int(NOW_S) + skew
    secrets = SECRETS.get(source) or (b"not-a-secret",)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(stamp),
            "webhook-signature": " ".join(sign(s, webhook_id, stamp, body) for s in secrets)}


RARE = st.sampled_from([False] * 7 + [True])  # one draw in eight (drawn as an index: small ones come first)
CHANGE_VALUES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, PHONES, EMAILS, DATETIMES, st.lists(SHORT, max_size=2),
                          st.dictionaries(SHORT, SHORT, max_size=2))
# Values a CRM field of the example blueprint takes (and not): most events then get past the schema to the mapping.
PLAUSIBLE = {"Name": TEXT, "Customer_Status__c": st.sampled_from(["Active", "Churned", "Prospect", "Suspended", "active"]),
             "Last_Support_Interaction__c": DATETIMES, "Credit_Limit__c": NUMBERS, "Phone": PHONES, "MobilePhone": PHONES,
             "phone_number": PHONES, "Email": EMAILS, "email_address": EMAILS}
CHANGES = st.one_of(
    st.fixed_dictionaries({"new_value": CHANGE_VALUES}, optional={"old_value": CHANGE_VALUES}),
    st.dictionaries(st.sampled_from(["new_value", "old_value", "x"]), CHANGE_VALUES, max_size=3), CHANGE_VALUES)


@st.composite
def events(draw: st.DrawFn, source: str) -> dict[str, Any]:
    """The seed's event format: most often a plausible event for `source` (its own fields, values of their
    type or near), else any values in any field."""
    if not draw(RARE):
        fields = [f for f in CRM_FIELDS if f in PLAUSIBLE]
        change_set = {f: {"new_value": draw(PLAUSIBLE[f])} | ({"old_value": draw(PLAUSIBLE[f])} if draw(st.booleans())
                                                               else {})
                      for f in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True))}
        return {"event_type": draw(st.sampled_from(EVENT_TYPES)), "source_system": source,
                "timestamp": draw(DATETIMES) if draw(RARE) else "2023-10-27T14:30:00Z",
                "record_id": draw(st.one_of(st.sampled_from(["0015e00000XyZ", " r-1 "]), TEXT)),
                "object_type": "Account", "change_set": change_set}
    return draw(st.fixed_dictionaries(
        {"event_type": st.one_of(st.sampled_from(EVENT_TYPES), SHORT), "source_system": st.one_of(st.just(source), SHORT),
         "timestamp": DATETIMES, "record_id": TEXT, "object_type": st.one_of(st.just("Account"), SHORT),
         "change_set": st.one_of(st.dictionaries(st.one_of(st.sampled_from(CRM_FIELDS), SHORT), CHANGES, max_size=5),
                                 CHANGE_VALUES)},
        optional={"signature": SHORT, "extra": SHORT}))


@st.composite
def bodies(draw: st.DrawFn, source: str) -> bytes:
    """An event (orjson), sometimes damaged; or any bytes."""
    if draw(RARE):
        return draw(st.binary(max_size=200))
    body = bytearray(orjson.dumps(draw(events(source))))
    if draw(RARE):
        i = draw(st.integers(0, len(body)))
        body[i:i] = draw(st.sampled_from([b"\xff", b"\x00", b"{", b"}", b'"', b"\\u", b"\\ud800", b"[" * 600, b"1e400"]))
    return bytes(body)


HEADER_VALUES = st.one_of(SHORT, TEXT, st.integers().map(str), st.sampled_from(
    ["9" * 400, "-" + "9" * 400, "1_760_000_000", " 1760000000 ", "\u0661\u0667\u0666", "1760000000.5", "v1,", "v1,abc",
     "v2," + "A" * 44]))


@st.composite
def webhook_requests(draw: st.DrawFn, fresh_ids: bool = False) -> tuple[str, dict[str, str], bytes]:
    """(source, headers, body): correctly signed (seven in eight), or with headers changed, dropped or any value.
    `fresh_ids`: a new webhook-id each time (admission answers a repeated one as a duplicate, unread)."""
    source = draw(SHORT) if draw(RARE) else draw(st.sampled_from(["SALESFORCE", "SALESFORCE", "BILLING"]))
    body = draw(bodies(source))
    webhook_id = (draw(st.one_of(SHORT, st.sampled_from(["x" * 255, "x" * 256, "a\nb", ""]))) if draw(RARE)
                  else str(uuid.uuid4()) if fresh_ids else draw(st.uuids().map(str)))
    skew = draw(st.sampled_from([-300, 300, -301, 301, -10**6])) if draw(RARE) else 0
    headers = signed_headers(source, webhook_id, body, skew)
    if draw(RARE):
        for _ in range(draw(st.integers(1, 2))):
            name = draw(st.one_of(st.sampled_from(sorted(headers)), SHORT))
            if draw(st.booleans()):
                headers.pop(name, None)
            else:
                headers[name] = draw(HEADER_VALUES)
    return source, headers, body


def test_webhook_parser(reliability_report: Callable[..., None]) -> None:
    outcomes: Counter[str] = Counter()

    @FUZZ
    @given(request=webhook_requests())
    def fuzz(request: tuple[str, dict[str, str], bytes]) -> None:
        outcomes[webhook_property(*request)] += 1

    start = time.monotonic()
    fuzz()
    for headers, body in FOUND_WEBHOOKS:
        outcomes[webhook_property("SALESFORCE", headers, body)] += 1
    assert outcomes["interpreted"] and outcomes["unauthenticated"]  # both ends were reached
    reliability_report(
        tried=f"hypothesis: {TRIED['webhook']} webhooks (seed-format events with any values, damaged bodies, random "
              "bytes; signed correctly, or a header dropped or set to any value: 400-digit timestamps, Unicode "
              f"digits, other versions) through verify, {TRIED['interpret']} signed ones through interpret; "
              "masked_payload on every body",
        held="verify: the webhook-id of a fresh, correctly signed request, or Unauthenticated; interpret: a "
             "ChangeEvent, or EventRejected (SCHEMA_INVALID, MAPPING_FAILED, INVALID_VALUE); nothing else raised",
        figures=f"outcomes {dict(sorted(outcomes.items()))}; {time.monotonic() - start:.1f} s")


def test_webhook_admission(tmp_path: Path, reliability_report: Callable[..., None]) -> None:
    """Ingestor.admit, the entry point both transports call, over a real store: only its documented errors."""
    s = load_settings(ROOT / "examples" / "blueprint.toml", environ=ENV, data_dir=str(tmp_path / "data"), map_size_mb=64,
                      commit_window_ms=0)
    service = build_service(s)
    ingestor = Ingestor(service.store, s, service.schema, clock=lambda: NOW_S)
    outcomes: Counter[str] = Counter()
    documented = (UnknownSource, Unauthenticated, InboxFull, EventRejected)

    @settings(FUZZ, max_examples=scaled(100, 1000))
    @given(request=webhook_requests(fresh_ids=True))
    def fuzz(request: tuple[str, dict[str, str], bytes]) -> None:
        TRIED["admit"] += 1
        try:
            adm = ingestor.admit(*request)
        except documented as exc:
            outcomes[type(exc).__name__] += 1
            if isinstance(exc, EventRejected) and exc.reason != "TOO_LARGE":
                assert exc.dlq_id > 0  # a signed event that cannot be applied is dead-lettered, never lost
            return
        outcomes["admitted" if not adm.duplicate else "duplicate"] += 1
        assert adm.inbox_sequence > 0 or adm.duplicate

    start = time.monotonic()
    try:
        fuzz()
    finally:
        ingestor.close()
        service.close()
    reliability_report(
        tried=f"hypothesis: {TRIED['admit']} webhooks (as test_webhook_parser's, sources known and not) through "
              "Ingestor.admit into a real LMDB inbox",
        held="admitted (or a duplicate), or UnknownSource / Unauthenticated / InboxFull / EventRejected; every "
             "signed event that cannot be applied is dead-lettered",
        figures=f"outcomes {dict(sorted(outcomes.items()))}; {time.monotonic() - start:.1f} s")


# --- what the targets found: kept as found, checked on every run ------------------------------------------------

FOUND_PHONE: list[tuple[str, str | None, Policy]] = [
    # Vanity letters (e=3, t=8) make a 17-digit Indonesian national number that phonenumbers calls possible, not
    # valid: under phone_acceptance "possible" the answer is 19 digits, past E.164's 15. All three agree; the
    # property's length bound had assumed 15 (atheris).
    ("tel:+62-00080-00080eteete0a", "VA", POSSIBLE),
]
# Bytes that are no record, where the compiled module answers or fails otherwise than its twin (probe_property's
# docstring says why that is allowed; its answer must still never differ where the twin answers).
_RECORD = (b'{"attributes":{"n":[1,{"x":null}],"name":"A \\"q\\" \\\\"},"created_us":1,"emails":["a@example.com"],'
           b'"external_id":"EXT-1","field_us":{"name":2},"held":{},"merged_external_ids":["EXT-0"],')
FOUND_PROBE: list[bytes] = [
    b'":null},t]-s"',  # a JSON string: the twin raises AttributeError (atheris)
    _RECORD + b'"ated_us":2,"uuij":"x","version":3}',  # no "phones": the twin KeyError, the scanner False (atheris)
    _RECORD.replace(b'"EXT-1"', b'"EXT-\xcc\xdd\xd3\xdd') + b'"phones":[]}',  # not UTF-8: another ValueError (atheris)
    b'{"\x00attributes":{},"external_id":null,"phones":[],"uuid":"u"}',  # a control character: not JSON (hypothesis)
    # external_id twice: the scanner holds "EXT-1" (the first), orjson reads "" (the last) (atheris)
    b'{"attribus":["a@exm"],"external_id":"EXT-1","fi":["pl"],"external_id":"","fu":4}',
]
FOUND_BLUEPRINTS: list[bytes] = [
    # tomllib recurses once per nesting level: a deeply nested array or inline table raised RecursionError out of
    # load_settings (a traceback instead of the config error; `resolver blueprint check` crashed).
    b"deep = " + b"[" * 1200 + b"]" * 1200 + b"\n",
    b"deep = " + b"{a=" * 600 + b"1" + b"}" * 600 + b"\n",
]
FOUND_WEBHOOKS: list[tuple[dict[str, str], bytes]] = [
    # A webhook-timestamp of 309+ digits is a valid int that no float holds: the freshness check raised
    # OverflowError (INTERNAL on IngestEvents, 500 on the HTTP endpoint) instead of Unauthenticated.
    ({"webhook-id": "msg_1", "webhook-timestamp": "9" * 400, "webhook-signature": "v1,AAAA"}, b"{}"),
    ({"webhook-id": "msg_1", "webhook-timestamp": "-" + "9" * 400, "webhook-signature": "v1,AAAA"}, b"{}"),
]


# --- the coverage-guided targets (atheris) --------------------------------------------------------------------

def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _atheris_phone(data: bytes) -> None:
    head = data[0] if data else 0
    phone_property(_text(data[1:]), REGIONS[head % len(REGIONS)], POLICIES[head // len(REGIONS) % len(POLICIES)])


def _atheris_email(data: bytes) -> None:
    raw = _text(data[1:])
    email_property(raw, POLICIES[data[0] % len(POLICIES)] if data else DEFAULT_POLICY)
    external_id_property(raw)


def _atheris_keys(data: bytes) -> None:
    head = data[0] if data else 0
    secret_len = data[1] % 72 if len(data) > 1 else 0
    secret = data[2:2 + secret_len] or None
    algorithm = ["xxh3-128", "blake2b", "md5", ""][head & 3]
    keys_property(algorithm, secret, data[-1] if data else 1, _text(data[2 + secret_len:]).split("\x00"))


def _atheris_probe(data: bytes) -> None:
    for kind, value in ((1, "EXT-1"), (2, "a@example.com"), (3, "+16502530000"), (3, "")):
        probe_property(data, kind, value, FIELDS)


def _atheris_rwire(data: bytes) -> None:
    rwire_property(data, 1 << 30)
    rwire_property(data, max(len(data) - 1, 0))


def _atheris_blueprint(directory: Path) -> Callable[[bytes], None]:
    return lambda data: blueprint_property(data, directory)


def _atheris_webhook(data: bytes) -> None:
    """The body, correctly signed (so that the fuzzer reaches interpret); the first byte picks the source."""
    source = ["SALESFORCE", "BILLING", "NOPE"][data[0] % 3] if data else "SALESFORCE"
    body = data[1:]
    webhook_property(source, signed_headers(source, "msg_fuzz", body), body)


def _atheris_headers(data: bytes) -> None:
    """Headers from the input ("name: value" lines, then the body after a blank line), as sent."""
    head, _, body = data.partition(b"\n\n")
    headers = dict(line.partition(":")[::2] for line in _text(head).split("\n"))
    webhook_property("SALESFORCE", {k.strip().lower(): v.strip() for k, v in headers.items()}, body)


def _seed_requests() -> Iterator[bytes]:
    yield pb.ResolveRequest(identifiers=pb.Identifiers(external_id="EXT-1", emails=["a@example.com"],
                                                      phones=["+16502530000"]), default_region="US", fields=["name"],
                            view="default", explain=True).SerializeToString()


def _seed_records() -> Iterator[bytes]:
    rec = Record("018f0000-0000-7000-8000-000000000001", "EXT-1", ["a@example.com"], ["+16502530000"],
                 {"name": "A \"q\" \\", "n": [1, {"x": None}]}, 3, 1, 2, {"name": 2}, ["EXT-0"])
    yield rec.encode()


def _seed_events() -> Iterator[bytes]:
    event = {"event_type": "UPDATE", "source_system": "SALESFORCE", "timestamp": "2023-10-27T14:30:00Z",
             "record_id": "0015e00000XyZ", "object_type": "Account",
             "change_set": {"Name": {"old_value": "A", "new_value": "B"}, "Phone": {"new_value": "(650) 253-0000"},
                            "Email": {"new_value": "Jane@Example.com"}, "Customer_Status__c": {"new_value": "Active"},
                            "Last_Support_Interaction__c": {"new_value": "2023-10-27T14:30:00+02:00"}}}
    yield b"\x00" + orjson.dumps(event)


@dataclass(frozen=True)
class AtherisTarget:
    """A coverage-guided target: `make(scratch)` gives its `one_input(data)`; `covers`: the modules (name prefixes)
    instrumented for coverage, those whose branches the input steers; `seeds`: a starting corpus."""

    make: Callable[[Path], Callable[[bytes], None]]
    covers: tuple[str, ...]
    seeds: Callable[[], Iterator[bytes]] = lambda: iter(())


def _seed_headers() -> Iterator[bytes]:
    body = next(_seed_events())[1:]
    yield "".join(f"{k}: {v}\n" for k, v in signed_headers("SALESFORCE", "msg_1", body).items()).encode() + b"\n" + body


PHONENUMBERS = ("phonenumbers.phonenumberutil", "phonenumbers.util", "phonenumbers.re_util")
ATHERIS_TARGETS: dict[str, AtherisTarget] = {
    "phone": AtherisTarget(lambda _: _atheris_phone, ("resolver.normalize", "resolver._phone_py", *PHONENUMBERS),
                           lambda: iter([b"\x02+1 (650) 253-0000", b"\x03020 7946 0958", b"\x00tel:+1-650-253-0000;ext=1"])),
    "email": AtherisTarget(lambda _: _atheris_email, ("resolver.normalize", "resolver._email_py", "encodings.idna"),
                           lambda: iter([b"\x00 John.Doe+tag@Example.COM ", "\x01jöhn@exämple.com".encode()])),
    "keys": AtherisTarget(lambda _: _atheris_keys, ("resolver._keys_py",)),
    "probe": AtherisTarget(lambda _: _atheris_probe, ("resolver._probe_py",), _seed_records),
    "rwire": AtherisTarget(lambda _: _atheris_rwire, ("resolver._rwire_py",), _seed_requests),
    "blueprint": AtherisTarget(_atheris_blueprint, ("resolver.config", "resolver.attributes", "resolver.identifiers",
                                                    "tomllib"), lambda: (t.encode() for t in BLUEPRINTS)),
    "webhook": AtherisTarget(lambda _: _atheris_webhook, ("resolver.events", "resolver.attributes", "resolver.normalize"),
                             _seed_events),
    "webhook-headers": AtherisTarget(lambda _: _atheris_headers, ("resolver.events.signatures",), _seed_headers),
}
EACH_TARGET = list(ATHERIS_TARGETS.values())


def _every_target(scratch: Path) -> Callable[[bytes], None]:
    """All targets in one process, the first byte picking one: `make test`'s check that the harness runs."""
    inputs = [t.make(scratch) for t in EACH_TARGET]
    return lambda data: inputs[data[0] % len(inputs)](data[1:]) if data else None


ATHERIS_TARGETS["all"] = AtherisTarget(
    _every_target, tuple(sorted({m for t in EACH_TARGET for m in t.covers})),
    lambda: (bytes([i]) + seed for i, t in enumerate(EACH_TARGET) for seed in t.seeds()))


def _instrument(covers: tuple[str, ...], instrument_func: Callable[[Any], Any]) -> int:
    """Instrument the functions of the modules `covers` names (atheris.instrument_all, every function loaded,
    takes minutes with hypothesis, pytest and grpc loaded)."""
    functions = [obj for obj in gc.get_objects() if isinstance(obj, types.FunctionType)
                 and str(getattr(obj, "__module__", "")).startswith(covers)]
    for fn in functions:
        instrument_func(fn)
    return len(functions)


def _atheris_main(argv: list[str]) -> None:
    """`python -m tests.reliability.test_fuzz_parsers TARGET [libFuzzer flags] [CORPUS_DIR...]`."""
    import atheris

    target = ATHERIS_TARGETS[argv[1]]
    with tempfile.TemporaryDirectory() as scratch:
        one_input = target.make(Path(scratch))
        _instrument(target.covers, atheris.instrument_func)
        atheris.Setup([argv[0], *argv[2:]], one_input)
        atheris.Fuzz()


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _pinned_platform() -> bool:
    """Where pyproject's dev extra installs atheris (its wheels: Linux x86-64, CPython 3.11-3.13)."""
    return sys.platform == "linux" and os.uname().machine == "x86_64" and (3, 11) <= sys.version_info[:2] <= (3, 13)


@dataclass
class AtherisRun:
    target: str
    runs: int
    coverage: int
    seconds: float


def run_atheris(target: str, work: Path, *, runs: int = 0, seconds: int = 0) -> AtherisRun:
    """One target in a subprocess: libFuzzer's summary, or an AssertionError holding its output (the input that
    failed is in `work`)."""
    corpus = work / target
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(ATHERIS_TARGETS[target].seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    flags = [f"-artifact_prefix={work}/", "-timeout=60", "-rss_limit_mb=2048", "-print_final_stats=1"]
    flags += [f"-runs={runs}"] if runs else [f"-max_total_time={seconds}"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.test_fuzz_parsers", target, *flags, str(corpus)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=(seconds or 120) + 180, stdin=subprocess.DEVNULL)
    out = proc.stdout
    if proc.returncode != 0:  # the failing input's traceback comes before libFuzzer's summary: keep it whole
        failure = out.find("=== Uncaught Python exception")
        out = out[failure:] if failure >= 0 else out[-6000:]
    assert proc.returncode == 0, f"atheris target {target} failed (exit {proc.returncode}):\n{out[:8000]}"
    done = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    cov = re.findall(r"cov: (\d+)", out)
    assert done, out[-3000:]
    return AtherisRun(target, int(done.group(1)), int(cov[-1]) if cov else 0, time.monotonic() - started)


def test_coverage_guided_targets(tmp_path: Path, reliability_report: Callable[..., None]) -> None:
    if not atheris_available():
        # pyproject pins atheris only where it has wheels: elsewhere the hypothesis targets are the fuzzing.
        assert not _pinned_platform(), "atheris is pinned in the dev extra for this platform but not installed"
        reliability_report(tried="atheris: no wheel for this platform (Linux x86-64, CPython 3.11-3.13 only)",
                           held=f"the hypothesis targets above ran instead ({EXAMPLES} examples each)")
        return
    if FULL:
        results = [run_atheris(t, tmp_path, seconds=ATHERIS_SECONDS) for t in ATHERIS_TARGETS if t != "all"]
        scale = f"{ATHERIS_SECONDS} s each"
    else:
        results = [run_atheris("all", tmp_path, runs=ATHERIS_SMOKE_RUNS)]
        scale = "short: all in turn in one process, to check the harness (the full run gives each its own)"
    assert all(r.runs > 0 for r in results)
    reliability_report(
        tried=f"atheris 3.0.0 (coverage-guided libFuzzer), {len(results)} targets, {scale}: "
              + "; ".join(f"{r.target} {r.runs} inputs" for r in results),
        held="every target's property (as in the hypothesis tests) on every input the fuzzer made: no failure, no "
             "input over 60 s, RSS under 2 GB",
        figures="; ".join(f"{r.target}: coverage {r.coverage} edges, {r.runs / max(r.seconds, 1e-3):.0f}/s"
                          for r in results))


if __name__ == "__main__":
    _atheris_main(sys.argv)
