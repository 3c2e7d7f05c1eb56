"""The fuzz target over request decoding: any bytes, as any request type of the service.

One property, over four sources of bytes (raw, mutated messages, structured messages, random wire records): the
Decoder returns a message of that type or raises InvalidInput, nothing else, and the error becomes a status;
what it lets through breaks no limit (checked again under tight limits, where the fast path matters); and a
decoded ResolveRequest or UpsertRequest goes through the request's own validation (resolve_input and
Resolver.prepare, upsert_input and upsert.prepare) raising nothing but ResolverError, under the defaults
(`resolver serve` without a blueprint: an open schema) and under examples/blueprint.toml (declared attributes:
enums, a pattern, dates, date-times, owners).

FUZZ_EXAMPLES sets the examples per source: 200 in `make test` (seconds), 20,000 in `make fuzz`. What the target
has found is kept at the end, as the bytes it found, and checked on every run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import phonenumbers
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.api.servicer import resolve_input, upsert_input
from resolver.api.status import to_rpc_status
from resolver.api.wire import Decoder, Limits
from resolver.attributes import AttributeSchema
from resolver.config import LimitSettings, load_settings
from resolver.errors import InvalidInput, ResolverError
from resolver.identifiers import policy_from
from resolver.resolve import Resolver
from resolver.upsert import prepare
from resolver.v1 import resolver_pb2 as pb
from tests.rawproto import varint as _varint
from tests.unit.test_wire import REQUEST_TYPES, messages, struct, struct_values

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROOT = Path(__file__).resolve().parents[2]

# --- the property ----------------------------------------------------------------------------------------------

DEFAULT_LIMITS = LimitSettings()
# Small enough that most small messages break one, so the fast path (Limits.always_within) is exercised.
TIGHT_LIMITS = LimitSettings(identifiers_per_request=2, attributes_per_request=2, items_per_list=3, string_chars=8,
                             struct_depth=2)
DECODERS = {limits: {cls: Decoder(cls, Limits(limits)) for cls in REQUEST_TYPES} for limits in (DEFAULT_LIMITS, TIGHT_LIMITS)}
# What a decoded request meets next, built as resolver.bootstrap.build_service builds it.
SETUPS = [(s, AttributeSchema(s), policy_from(s))
          for s in (load_settings(None), load_settings(ROOT / "examples" / "blueprint.toml"))]
RESOLVERS = [Resolver(None, s, schema, policy) for s, schema, policy in SETUPS]  # type: ignore[arg-type]  # prepare reads no store


def _answered(exc: ResolverError) -> None:
    """The error a caller would get: it must become a google.rpc.Status too."""
    assert to_rpc_status(exc).SerializeToString()


def _validated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except ResolverError as exc:
        _answered(exc)


def check(cls: type[Message], data: bytes, now_us: int) -> None:
    """The property, for one request type and any bytes."""
    try:
        parsed: Message | None = cls.FromString(data)
    except Exception:  # noqa: BLE001 - whatever upb raises, the Decoder must answer it as MALFORMED_REQUEST
        parsed = None
    for limits, decoders in DECODERS.items():
        try:
            msg = decoders[cls](data)
        except InvalidInput as exc:
            _answered(exc)
            if parsed is None:  # one violation, in the server's words: the bytes are never echoed
                assert [(v.field, v.reason) for v in exc.violations] == [("request", "MALFORMED_REQUEST")]
                said = exc.violations[0].description
                assert said.startswith(f"not a valid {cls.DESCRIPTOR.full_name} message: ") and len(said) < 200
                assert len(data) < 8 or data.decode("utf-8", "replace") not in said + exc.message
            else:  # refused for its limits: exactly those a full walk finds
                assert exc.violations and exc.violations == Limits(limits).violations(parsed)
            continue
        assert type(msg) is cls and parsed is not None and msg == parsed
        assert Limits(limits).violations(msg) == []  # the fast path skipped nothing
        if limits is not DEFAULT_LIMITS:
            continue
        if cls is pb.ResolveRequest:
            inp = resolve_input(msg)  # type: ignore[arg-type]
            for resolver in RESOLVERS:
                _validated(resolver.prepare, inp)
        elif cls is pb.UpsertRequest:
            up = upsert_input(msg)  # type: ignore[arg-type]
            for s, schema, policy in SETUPS:
                _validated(prepare, up, s, schema, policy, now_us=now_us)


NOW_US = st.integers()

# --- (1) raw bytes ---------------------------------------------------------------------------------------------


@FUZZ
@given(cls=st.sampled_from(REQUEST_TYPES), data=st.binary(max_size=2048), now_us=NOW_US)
def test_raw_bytes(cls: type[Message], data: bytes, now_us: int) -> None:
    check(cls, data, now_us)


# --- (2) structured messages: what a client can send, aimed at the rules behind the decoder ---------------------

CHARS = st.characters(codec="utf-8")  # any code point but the surrogates
TRICKY = st.sampled_from(["", " ", "\x00", "\t\n", "\x7f", "\x85", "\u00a0", "\u200b", "\u200d", "\u2028", "\ufeff",
                          "\u202e", "\U0001f600", "İ", "ı", "ß", "ﬁ", "e\u0301", "Å", "Ω", "𝟙", "١٢٣", "０１２", "\ufffd"])
SHORT = st.one_of(st.text(CHARS, max_size=12), TRICKY, st.lists(TRICKY, max_size=4).map("".join))
LONG = st.builds(lambda piece, n: (piece or "x") * n, st.text(CHARS, max_size=3), st.integers(1, 4400))
TEXT = st.one_of(SHORT, SHORT, SHORT, LONG)


def _repeated(items: st.SearchStrategy[Any], around: int) -> st.SearchStrategy[list[Any]]:
    """A few items, or about `around` of them (a limit's value), cheaply: drawn items repeated."""
    many = st.builds(lambda xs, n: (xs * n)[:n], st.lists(items, min_size=1, max_size=3), st.integers(around - 3, around + 3))
    few = st.lists(items, max_size=5)
    return st.one_of(few, few, few, many)


DOMAINS = st.one_of(
    st.sampled_from(["example.com", "EXAMPLE.com", "example.com.", "xn--bcher-kva.example", "bücher.example", "localhost",
                     "[127.0.0.1]", "a" * 63 + ".com", "a" * 64 + ".com", "-a.com", "a..com", "acme.example"]),
    st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True), SHORT)
LOCALS = st.one_of(st.sampled_from(["jane", "Jane.Doe", "j+tag", "noemail", "test+x", '"q q"', "a..b", ".a", "a" * 65]), SHORT)
EMAILS = st.one_of(st.emails(), TEXT, st.builds(lambda local, at, domain: f"{local}{at}{domain}", LOCALS,
                                                st.sampled_from(["@", "@@", " @ ", "\uff20", ""]), DOMAINS))
PHONE_CHARS = "0123456789+-() ./x#*;,\u00a0" + "٠١٢٣٤٥٦٧٨٩" + "０１２３４５６７８９" + "۰۱۲"
PHONES = st.one_of(
    st.text(st.sampled_from(PHONE_CHARS), max_size=30),
    st.builds(lambda prefix, digits: prefix + digits,
              st.sampled_from(["+1", "+44", "+800", "00", "011", "+", "", "tel:", "+1 (650) "]),
              st.text(st.sampled_from("0123456789 -"), max_size=18)),
    st.sampled_from(["anonymous", "Unknown Caller", "+16502530000", "(650) 253-0000", "+1 650 253 0000 ext. 1234",
                     "+18005550100", "+" + "9" * 250, "0" * 20]),
    st.text(st.characters(categories=["Nd"]), max_size=20), TEXT)
REGIONS = st.one_of(st.sampled_from(["", "US", "us", "GB", "ZZ", "001", "XK", "UN", "ıt", "İT", "DE ", "u\u0301s"]),
                    st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS)), SHORT)
UUIDS = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: u.hex.upper()), st.uuids().map(lambda u: "{" + str(u) + "}"),
                  st.uuids().map(lambda u: "urn:uuid:" + str(u)), st.sampled_from(["0_" * 15 + "00", "١" * 32]), TEXT)
SOURCES = st.one_of(st.sampled_from(["", "SALESFORCE", "BILLING", "crm.v2", "a" * 64, "a" * 65, "SALESFORCE "]), SHORT)
DECLARED = ["name", "status", "tier", "credit_limit", "preferred_language", "birth_date", "last_interaction_date"]
NAMES = st.one_of(st.sampled_from(DECLARED), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,70}", fullmatch=True), SHORT)

NUMBERS = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 2.0**53, 2.0**53 + 2, 2.0**63, -(2.0**63), 2.0**64, 1e308, 5e-324,
                                                  math.nan, math.inf, -math.inf]),
                    st.integers(-(2**64), 2**64).map(float))
OFFSETS = st.one_of(st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m))),
                    st.just(UTC), st.none())
# The calendar's first and last instants beside ordinary ones: offsets push them past either end.
INSTANTS = st.one_of(st.sampled_from([datetime.min, datetime.max, datetime(1970, 1, 1)]), st.datetimes())
ISO_DATETIMES = st.builds(lambda d, tz, sep: d.replace(tzinfo=tz).isoformat(sep), INSTANTS, OFFSETS, st.sampled_from(["T", " "]))
DATETIMES = st.one_of(
    ISO_DATETIMES, ISO_DATETIMES,
    st.builds(lambda d: d.replace(tzinfo=None).isoformat() + "Z", INSTANTS),
    st.sampled_from(["2023-10-27T14:30:00Z", "2023-10-27 14:30", "2023-10-27T14:30:00+24:00", "2023-W43-5T10:00Z", "T"]), SHORT)
DATES = st.one_of(st.dates().map(date.isoformat), st.dates().map(lambda d: f"{d.month:02d}/{d.day:02d}/{d.year:04d}"),
                  st.sampled_from(["0001-01-01", "9999-12-31", "02/29/2023", "2023-02-30", "13/01/2020", "20231027"]), SHORT)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)


def _deep(depth: int, leaf: Any, lists: bool) -> Any:
    for _ in range(depth - 1):
        leaf = [leaf] if lists else {"n": leaf}
    return leaf


VALUES = st.one_of(
    SCALARS, SCALARS, SCALARS,
    st.builds(_deep, st.integers(2, 60), SCALARS, st.booleans()),  # past struct_depth, and past upb's nesting limit
    st.builds(lambda v, n: [v] * n, SCALARS, st.integers(995, 1005)),  # about items_per_list
    struct_values(SHORT, SCALARS, max_items=4, max_leaves=10))
# The blueprint's attributes with values of their type (and not); dates and date-times, which have the most parsing
# behind them, twice as often.
DECLARED_VALUES = st.one_of(
    st.tuples(st.just("name"), TEXT), st.tuples(st.sampled_from(["status", "tier"]), st.one_of(st.sampled_from(
        ["Active", "Churned", "Prospect", "gold", "Gold", " gold "]), SHORT)),
    st.tuples(st.just("credit_limit"), st.one_of(NUMBERS, SHORT)),
    st.tuples(st.just("preferred_language"), st.one_of(st.from_regex(r"[a-z]{2}(-[A-Z]{2})?", fullmatch=True), SHORT)),
    *[st.tuples(st.just("birth_date"), DATES), st.tuples(st.just("last_interaction_date"), DATETIMES)] * 2)
FEW_ATTRIBUTES = st.lists(st.one_of(DECLARED_VALUES, DECLARED_VALUES, st.tuples(NAMES, VALUES)), min_size=1, max_size=6).map(dict)
ATTRIBUTES = st.one_of(
    FEW_ATTRIBUTES, FEW_ATTRIBUTES, FEW_ATTRIBUTES,
    st.builds(lambda n, v: {f"a{i}": v for i in range(n)}, st.integers(97, 103), SCALARS),  # about attributes_per_request
).map(struct)

OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    "resolver.v1.Identifiers.external_id": st.one_of(st.sampled_from(["crm-1", " crm-1 ", "x" * 255, "x" * 256]), TEXT),
    "resolver.v1.Identifiers.emails": _repeated(EMAILS, 100),
    "resolver.v1.Identifiers.phones": _repeated(PHONES, 100),
    "resolver.v1.ResolveRequest.default_region": REGIONS,
    "resolver.v1.ResolveRequest.fields": _repeated(NAMES, 100),
    "resolver.v1.ResolveRequest.view": st.one_of(st.sampled_from(["default", "billing", "Default", "nope"]), SHORT),
    "resolver.v1.UpsertRequest.idempotency_key": st.one_of(st.uuids().map(str), TEXT),
    "resolver.v1.UpsertRequest.customer_uuid": UUIDS,
    "resolver.v1.UpsertRequest.attributes": ATTRIBUTES,
    "resolver.v1.UpsertRequest.source_system": SOURCES,
    "resolver.v1.UpsertRequest.default_region": REGIONS,
    "resolver.v1.GetCustomerRequest.customer_uuid": UUIDS,
    "resolver.v1.MergeRequest.survivor_uuid": UUIDS,
    "resolver.v1.MergeRequest.merged_uuids": _repeated(UUIDS, 1000),
    "resolver.v1.MergeRequest.source_system": SOURCES,
    "resolver.v1.IngestRequest.source": SOURCES,
    "resolver.v1.IngestRequest.headers": st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "Webhook-Id"]), SHORT),
                        TEXT, max_size=5),
        st.builds(lambda n, v: {f"h{i}": v for i in range(n)}, st.integers(997, 1003), SHORT)),
}
_BY_TYPE = {cls: messages(cls.DESCRIPTOR, text=TEXT, values=VALUES.map(lambda v: {"v": v}), max_items=4, overrides=OVERRIDES)
            for cls in REQUEST_TYPES}
# Resolve and Upsert go furthest past the decoder: drawn three times as often as the others.
STRUCTURED = st.one_of([_BY_TYPE[pb.ResolveRequest], _BY_TYPE[pb.UpsertRequest]] * 3 + list(_BY_TYPE.values()))


@FUZZ
@given(msg=STRUCTURED, now_us=NOW_US)
def test_structured_messages(msg: Message, now_us: int) -> None:
    check(type(msg), msg.SerializeToString(), now_us)


# --- (3) mutations of valid messages ---------------------------------------------------------------------------


FIELD_NUMBERS = st.one_of(st.integers(1, 12), st.integers(1, 2**29 - 1))
HUGE = st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1])
MUTATIONS = ["truncate", "flip", "set", "insert", "delete", "splice", "concat", "repeat", "huge-length", "wrap", "retype"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[type[Message], bytes]:
    """A valid message's bytes, damaged 1-4 times; read as its own type, or as any other."""
    msg = draw(STRUCTURED)
    data = bytearray(msg.SerializeToString())

    def at() -> int:
        return draw(st.integers(0, len(data)))

    for op in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4)):
        if op == "truncate":
            del data[at():]
        elif op in ("flip", "set") and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = data[i] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(st.integers(0, 255))
        elif op == "insert":
            i = at()
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            i = at()
            del data[i:i + draw(st.integers(1, 16))]
        elif op in ("splice", "concat"):
            other = draw(STRUCTURED).SerializeToString()
            data = data[:at()] + other[draw(st.integers(0, len(other))):] if op == "splice" else data + other
        elif op == "repeat":  # fields merge: repeated ones add up past the count limits
            data = data * min(draw(st.integers(2, 120)), max(2, 200_000 // max(len(data), 1)))
        elif op == "huge-length":
            i = at()
            length = draw(st.one_of(HUGE, st.just(len(data) - i + 1)))
            prefix = _varint(draw(FIELD_NUMBERS) << 3 | 2) + (b"\xff" * 10 + b"\x01" if draw(st.booleans()) else _varint(length))
            data[i:i] = prefix
        elif op == "wrap":  # the whole message as a sub-message of some field
            data = bytearray(_varint(draw(FIELD_NUMBERS) << 3 | 2) + _varint(len(data))) + data
        elif op == "retype" and data:  # a tag's wire type changed: the same field read as another kind
            data[0] = (data[0] & ~7) | draw(st.integers(0, 7))
    cls = draw(st.one_of(st.just(type(msg)), st.sampled_from(REQUEST_TYPES)))
    return cls, bytes(data)


@FUZZ
@given(case=mutated(), now_us=NOW_US)
def test_mutated_messages(case: tuple[type[Message], bytes], now_us: int) -> None:
    check(*case, now_us)


# --- (4) random wire records: valid framing, any field numbers and wire types, nested messages and groups -------

LEAF_RECORDS = st.one_of(
    st.builds(lambda f, v: _varint(f << 3 | 0) + _varint(v), FIELD_NUMBERS, st.integers(0, 2**64 - 1)),
    st.builds(lambda f, v: _varint(f << 3 | 1) + v, FIELD_NUMBERS, st.binary(min_size=8, max_size=8)),
    st.builds(lambda f, v: _varint(f << 3 | 5) + v, FIELD_NUMBERS, st.binary(min_size=4, max_size=4)),
    st.builds(lambda f, v: _varint(f << 3 | 2) + _varint(len(v)) + v, FIELD_NUMBERS,
              st.one_of(st.binary(max_size=24), SHORT.map(str.encode))),
    st.builds(_varint, st.integers(0, 2**35)),  # any tag alone: field 0, wire types 3, 4, 6, 7
)
RECORDS = st.recursive(LEAF_RECORDS, lambda inner: st.one_of(
    st.builds(lambda f, body: _varint(f << 3 | 2) + _varint(len(body)) + body, FIELD_NUMBERS,
              st.lists(inner, max_size=4).map(b"".join)),  # a sub-message
    st.builds(lambda f, body: _varint(f << 3 | 3) + body + _varint(f << 3 | 4), FIELD_NUMBERS,
              st.lists(inner, max_size=4).map(b"".join)),  # a group
), max_leaves=12)


@FUZZ
@given(cls=st.sampled_from(REQUEST_TYPES), data=st.lists(RECORDS, max_size=6).map(b"".join), now_us=NOW_US)
def test_wire_records(cls: type[Message], data: bytes, now_us: int) -> None:
    check(cls, data, now_us)


# --- what this target found: the inputs as they were found, checked on every run --------------------------------


def _upsert(attributes: dict[str, Any]) -> bytes:
    msg = pb.UpsertRequest()
    msg.attributes.update(attributes)
    return msg.SerializeToString()


FOUND = [
    # Under examples/blueprint.toml `last_interaction_date` is a date-time: an offset that moves the calendar's first
    # or last instant past either end makes upsert.prepare raise OverflowError (the astimezone call in
    # resolver.attributes._datetime), so the caller gets INTERNAL and a logged traceback, not INVALID_ARGUMENT.
    pytest.param(pb.UpsertRequest, _upsert({"last_interaction_date": "0001-01-01T00:00:00+00:01"}), id="datetime-before-1"),
    pytest.param(pb.UpsertRequest, _upsert({"last_interaction_date": "9999-12-31T23:59:59-00:01"}), id="datetime-past-9999"),
]


@pytest.mark.parametrize(("cls", "data"), FOUND)
def test_inputs_found_by_this_target(cls: type[Message], data: bytes) -> None:
    check(cls, data, 0)
