"""Requests off the wire (resolver.api.wire) and the errors that answer them (resolver.api.status).

Every request type of the service round-trips through the Decoder and refuses undecodable bytes without echoing
them; each `[limits]` key holds at its value and is reported one past it, naming `limits.KEY`; non-finite
numbers are listed one by one; the small-message fast path never lets a violation through; plain_struct is
json_format's answer; and an error listing 100,000 violations still fits the metadata a client reads.
"""

from __future__ import annotations

import base64
import math
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from google.protobuf import json_format, message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.api.handlers import SERVICE
from resolver.api.status import MAX_DESCRIPTION, MAX_FIELD, MAX_VIOLATIONS, PUSHBACK, to_rpc_status, to_status
from resolver.api.wire import MAX_NAME_SHOWN, Decoder, Limits, plain_struct
from resolver.config import LimitSettings
from resolver.errors import FieldViolation, InboxFull, InvalidInput, NotFound, Overloaded, ResourceExhausted, StorageFull
from resolver.v1 import resolver_pb2 as pb
from tests.conftest import unpack_details
from tests.rawproto import varint as _varint

# One class per request type of the service, as resolver.api.handlers finds them (ResolveRequest serves two methods).
REQUEST_TYPES: list[type[Message]] = list({m.input_type.name: getattr(pb, m.input_type.name) for m in SERVICE.methods}.values())
TYPE_IDS = [cls.DESCRIPTOR.name for cls in REQUEST_TYPES]
DEFAULTS = LimitSettings()
_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_VALUE_TYPES = frozenset({_STRUCT, struct_pb2.Value.DESCRIPTOR.full_name, struct_pb2.ListValue.DESCRIPTOR.full_name})
# Hypothesis settings: a few seconds in all; no example database written into the work tree.
FAST = settings(max_examples=300, deadline=None, database=None)
SECRET = b"jane.doe+SECRET@example.com"


# --- shared helpers (the fuzz target, test_wire_fuzz.py, builds on them) ---------------------------------------


def outcome(msg_type: type[Message], data: bytes, limits: LimitSettings = DEFAULTS) -> Message | list[FieldViolation]:
    """What the Decoder makes of `data`: the message, or the violations of the InvalidInput it raised."""
    try:
        return Decoder(msg_type, Limits(limits))(data)
    except InvalidInput as exc:
        return exc.violations


def violations(msg: Message, limits: LimitSettings = DEFAULTS) -> list[FieldViolation]:
    """The violations the Decoder reports for `msg` sent as bytes (empty: it decoded, to an equal message)."""
    got = outcome(type(msg), msg.SerializeToString(), limits)
    if isinstance(got, list):
        assert got, "InvalidInput without a violation"
        return got
    assert got == msg
    return []


def struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def upsert(attributes: Mapping[str, Any]) -> pb.UpsertRequest:
    msg = pb.UpsertRequest(idempotency_key="k-1", identifiers=pb.Identifiers(external_id="crm-1"))
    msg.attributes.update(attributes)
    return msg


def _build(cls: type[Message], kwargs: dict[str, Any]) -> Message:
    """cls(**kwargs), with message values copied in by CopyFrom: the constructor copies a message by parsing it,
    which fails on a Struct nested past upb's depth limit (a request we want to send all the same)."""
    msg = cls(**{k: v for k, v in kwargs.items() if not isinstance(v, Message)})
    for k, v in kwargs.items():
        if isinstance(v, Message):
            getattr(msg, k).CopyFrom(v)
    return msg


def struct_values(text: st.SearchStrategy[str], leaves: st.SearchStrategy[Any], *, max_items: int,
                  max_leaves: int) -> st.SearchStrategy[dict[str, Any]]:
    """Plain dicts a Struct can hold: nested dicts and lists over `leaves`."""
    nested = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=max_items),
                                                          st.dictionaries(text, inner, max_size=max_items)),
                          max_leaves=max_leaves)
    return st.dictionaries(text, nested, max_size=max_items)


def _scalar(fd: FieldDescriptor, text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return text
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers decode too
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), st.integers(-(2**31), 2**31 - 1))
    bits = {FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
            FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
            FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
            FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
            FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1)}
    if t in bits:
        return st.integers(*bits[t])
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    raise TypeError(f"{fd.full_name}: no strategy for field type {t}; teach messages() about it")


def messages(desc: Descriptor, *, text: st.SearchStrategy[str], values: st.SearchStrategy[dict[str, Any]],
             max_items: int, overrides: Mapping[str, st.SearchStrategy[Any]] | None = None
             ) -> st.SearchStrategy[Message]:
    """Messages of any type, from its descriptor: each field absent or drawn (`overrides` by field full name)."""
    overrides = overrides or {}
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        if fd.full_name in overrides:
            fields[fd.name] = overrides[fd.full_name]
        elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            fields[fd.name] = st.dictionaries(_scalar(key, text), _scalar(value, text), max_size=max_items)
        elif fd.message_type is not None and fd.message_type.full_name == _STRUCT:
            fields[fd.name] = values.map(struct)
        elif fd.message_type is not None:
            if fd.message_type.full_name in _VALUE_TYPES or fd.message_type.full_name == desc.full_name:
                raise TypeError(f"{fd.full_name}: no strategy for {fd.message_type.full_name}; teach messages() about it")
            sub = messages(fd.message_type, text=text, values=values, max_items=max_items, overrides=overrides)
            fields[fd.name] = st.lists(sub, max_size=max_items) if fd.is_repeated else sub
        else:
            item = _scalar(fd, text)
            fields[fd.name] = st.lists(item, max_size=max_items) if fd.is_repeated else item
    cls = message_factory.GetMessageClass(desc)
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: _build(cls, kw))


def full_message(desc: Descriptor) -> Message:
    """A message of this type with every field set (strings non-ASCII, numbers at their extremes)."""
    msg = message_factory.GetMessageClass(desc)()
    for fd in desc.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            getattr(msg, fd.name).update({"webhook-id": "msg_é1", "x-😀": ""})
        elif fd.message_type is not None and fd.message_type.full_name == _STRUCT:
            getattr(msg, fd.name).update({"name": "Zoë 😀", "n": -1.5e300, "ok": True, "gone": None,
                                          "tags": ["a", 2.0, [False]], "address": {"city": "Kraków"}})
        elif fd.message_type is not None:
            sub = full_message(fd.message_type)
            (getattr(msg, fd.name).extend([sub, sub]) if fd.is_repeated else getattr(msg, fd.name).CopyFrom(sub))
        else:
            value = {FieldDescriptor.TYPE_STRING: "Zoë-😀-1", FieldDescriptor.TYPE_BYTES: b"\x00\xff{}",
                     FieldDescriptor.TYPE_BOOL: True, FieldDescriptor.TYPE_UINT64: 2**64 - 1,
                     FieldDescriptor.TYPE_UINT32: 2**32 - 1, FieldDescriptor.TYPE_DOUBLE: 0.5,
                     FieldDescriptor.TYPE_INT64: -(2**63), FieldDescriptor.TYPE_INT32: -(2**31)}.get(fd.type)
            if fd.type == FieldDescriptor.TYPE_ENUM:
                value = fd.enum_type.values[-1].number
            assert value is not None, f"{fd.full_name}: give full_message() a value for field type {fd.type}"
            (getattr(msg, fd.name).extend([value, value]) if fd.is_repeated else setattr(msg, fd.name, value))
    return msg


def test_the_service_has_the_request_types_we_test() -> None:
    names = set(TYPE_IDS)
    assert {"ResolveRequest", "UpsertRequest", "MergeRequest", "IngestRequest", "GetEventCountersRequest"} <= names
    assert len(names) == len({m.input_type.name for m in SERVICE.methods}) >= 10


# --- decoding --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", REQUEST_TYPES, ids=TYPE_IDS)
def test_a_valid_request_round_trips(cls: type[Message]) -> None:
    full = full_message(cls.DESCRIPTOR)
    for msg in (cls(), full):
        decoded = Decoder(cls, Limits(DEFAULTS))(msg.SerializeToString())
        assert type(decoded) is cls and decoded == msg
    assert full.ListFields() or not cls.DESCRIPTOR.fields


def _undecodable(cls: type[Message]) -> Iterator[bytes]:
    """Bytes that are no message of this type, each carrying SECRET where it can."""
    yield b"\x0a" + bytes([len(SECRET) + 10]) + SECRET  # field 1, length-delimited, truncated
    yield b"\x1a\xff\xff\xff\xff\x0f" + SECRET  # a length of 4 GiB
    yield b"\x08\x80"  # a truncated varint
    yield b"\x00" + SECRET  # field number 0
    yield b"\x0f" + SECRET  # wire type 7
    yield b"\x0c"  # an END_GROUP that closes nothing
    yield b"\x0b" * 200 + SECRET  # groups nested past the depth limit
    for fd in cls.DESCRIPTOR.fields:  # invalid UTF-8 in each string field
        if fd.type == FieldDescriptor.TYPE_STRING:
            payload = SECRET + b"\xff\xfe"
            yield _varint(fd.number << 3 | 2) + _varint(len(payload)) + payload


@pytest.mark.parametrize("cls", REQUEST_TYPES, ids=TYPE_IDS)
def test_undecodable_bytes_are_malformed_request_and_never_echoed(cls: type[Message]) -> None:
    secret_texts = (SECRET.decode(), SECRET.decode()[:8], "SECRET", repr(SECRET)[2:12])
    for data in _undecodable(cls):
        with pytest.raises(InvalidInput) as caught:
            Decoder(cls, Limits(DEFAULTS))(data)
        exc = caught.value
        assert [(v.field, v.reason) for v in exc.violations] == [("request", "MALFORMED_REQUEST")], data
        shown = exc.violations[0].description + "\n" + exc.message
        assert cls.DESCRIPTOR.full_name in shown
        assert not any(s in shown for s in secret_texts), shown
        assert "\\x" not in shown and data.decode("latin-1") not in shown


# --- limits ----------------------------------------------------------------------------------------------------


def _ids(n: int) -> pb.Identifiers:
    """n identifiers in one set: an external_id, then emails and phones half and half."""
    emails = max(n - 1, 0) // 2
    return pb.Identifiers(external_id="crm-1" if n else "", emails=[f"user{i}@example.com" for i in range(emails)],
                          phones=[f"+1650253{i:04d}" for i in range(max(n - 1 - emails, 0))])


# (limit key, builder of a request holding n of what the limit counts, the field the violation names)
COUNT_CASES: list[tuple[str, str, Callable[[int], Message], str]] = [
    ("identifiers_per_request", "resolve", lambda n: pb.ResolveRequest(identifiers=_ids(n)), "identifiers"),
    ("identifiers_per_request", "resolve-emails-only",
     lambda n: pb.ResolveRequest(identifiers=pb.Identifiers(emails=[f"u{i}@example.com" for i in range(n)])), "identifiers"),
    ("identifiers_per_request", "resolve-phones-only",
     lambda n: pb.ResolveRequest(identifiers=pb.Identifiers(phones=[f"+4420794600{i:02d}" for i in range(n)])), "identifiers"),
    ("identifiers_per_request", "upsert", lambda n: pb.UpsertRequest(idempotency_key="k", identifiers=_ids(n)), "identifiers"),
    ("identifiers_per_request", "upsert-remove",
     lambda n: pb.UpsertRequest(idempotency_key="k", remove_identifiers=_ids(n)), "remove_identifiers"),
    ("attributes_per_request", "upsert-attributes", lambda n: upsert({f"a{i}": float(i) for i in range(n)}), "attributes"),
    ("attributes_per_request", "resolve-fields", lambda n: pb.ResolveRequest(fields=[f"f{i}" for i in range(n)]), "fields"),
    ("items_per_list", "merge-uuids",
     lambda n: pb.MergeRequest(survivor_uuid=str(uuid.UUID(int=0)), merged_uuids=[str(uuid.UUID(int=i + 1)) for i in range(n)]),
     "merged_uuids"),
    ("items_per_list", "ingest-headers", lambda n: pb.IngestRequest(source="S", headers={f"h{i}": "v" for i in range(n)}),
     "headers"),
    ("items_per_list", "list-value", lambda n: upsert({"tags": [float(i) for i in range(n)]}), "attributes.tags"),
    ("items_per_list", "nested-struct", lambda n: upsert({"address": {f"k{i}": "v" for i in range(n)}}), "attributes.address"),
    ("items_per_list", "list-in-list", lambda n: upsert({"m": [[0.0] * n]}), "attributes.m[0]"),
    ("items_per_list", "list-in-struct", lambda n: upsert({"m": {"xs": [None] * n}}), "attributes.m.xs"),
]


@pytest.mark.parametrize("limit", [None, 1, 3], ids=["default", "one", "three"])
@pytest.mark.parametrize(("key", "build", "where"), [(k, b, w) for k, _, b, w in COUNT_CASES],
                         ids=[f"{k}-{label}" for k, label, _, _ in COUNT_CASES])
def test_each_count_limit_holds_at_its_value_and_is_named_one_past_it(
        key: str, build: Callable[[int], Message], where: str, limit: int | None) -> None:
    limits = DEFAULTS if limit is None else LimitSettings(**{key: limit})
    n = getattr(limits, key)
    assert violations(build(n), limits) == []
    bad = violations(build(n + 1), limits)
    assert [(v.field, v.reason) for v in bad] == [(where, "LIMIT_EXCEEDED")]
    assert f"{n} (limits.{key})" in bad[0].description


def test_emails_and_phones_count_as_identifiers_not_as_list_items() -> None:
    limits = LimitSettings(identifiers_per_request=50, items_per_list=10)
    assert violations(pb.ResolveRequest(identifiers=_ids(50)), limits) == []
    bad = violations(pb.UpsertRequest(identifiers=_ids(51), remove_identifiers=_ids(51)), limits)
    assert sorted((v.field, v.reason) for v in bad) == [("identifiers", "LIMIT_EXCEEDED"),
                                                        ("remove_identifiers", "LIMIT_EXCEEDED")]
    assert all("limits.identifiers_per_request" in v.description for v in bad)


def test_bytes_are_not_strings() -> None:
    assert violations(pb.IngestRequest(source="S", body=b"\xff" * (DEFAULTS.string_chars * 4))) == []


def _long(n: int) -> str:
    """n characters of 1, 2, 3 and 4 UTF-8 bytes (the limit counts characters, not bytes)."""
    return ("aé€😀" * (n // 4 + 1))[:n]


def _shown(key: str) -> str:
    return key if len(key) <= MAX_NAME_SHOWN else key[:MAX_NAME_SHOWN] + "..."


Slot = tuple[str, Callable[[str], dict[str, Any]], Callable[[str], str]]


def _string_slots(desc: Descriptor, prefix: str = "") -> Iterator[Slot]:
    """(label, kwargs holding text t, the field path of t) for every string a message of this type holds."""
    for fd in desc.fields:
        where = prefix + fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            if key.type == FieldDescriptor.TYPE_STRING:
                yield (f"{where}[key]", lambda t, name=fd.name: {name: {t: "v"}},
                       lambda t, where=where: f"{where}[{_shown(t)}]")
            if value.type == FieldDescriptor.TYPE_STRING:
                yield f"{where}[value]", lambda t, name=fd.name: {name: {"k": t}}, lambda t, where=where: f"{where}[k]"
        elif fd.type == FieldDescriptor.TYPE_STRING and fd.is_repeated:
            yield where, lambda t, name=fd.name: {name: ["x", t]}, lambda t, where=where: f"{where}[1]"
        elif fd.type == FieldDescriptor.TYPE_STRING:
            yield where, lambda t, name=fd.name: {name: t}, lambda t, where=where: where
        elif fd.message_type is not None and fd.message_type.full_name not in _VALUE_TYPES:
            for label, make, path in _string_slots(fd.message_type, where + "."):
                yield label, lambda t, name=fd.name, make=make: {name: make(t)}, path


STRING_SLOTS: list[tuple[str, Callable[[str], Message], Callable[[str], str]]] = [
    (f"{cls.DESCRIPTOR.name}.{label}", lambda t, cls=cls, make=make: cls(**make(t)), path)
    for cls in REQUEST_TYPES for label, make, path in _string_slots(cls.DESCRIPTOR)
] + [
    ("UpsertRequest.attributes.<value>", lambda t: upsert({"name": t}), lambda t: "attributes.name"),
    ("UpsertRequest.attributes.<key>", lambda t: upsert({t: 1.0}), lambda t: f"attributes.{_shown(t)}"),
    ("UpsertRequest.attributes.<list item>", lambda t: upsert({"tags": ["x", t]}), lambda t: "attributes.tags[1]"),
    ("UpsertRequest.attributes.<nested key>", lambda t: upsert({"ad": {t: "x"}}),
     lambda t: f"attributes.ad.{_shown(t)}"),
    ("UpsertRequest.attributes.<nested value>", lambda t: upsert({"ad": {"city": [t]}}),
     lambda t: "attributes.ad.city[0]"),
]


def test_every_string_of_every_request_type_is_a_slot() -> None:
    labels = {label for label, _, _ in STRING_SLOTS}
    assert {"ResolveRequest.identifiers.external_id", "ResolveRequest.identifiers.emails", "ResolveRequest.fields",
            "UpsertRequest.remove_identifiers.phones", "IngestRequest.headers[key]", "IngestRequest.headers[value]",
            "MergeRequest.merged_uuids", "GetCustomerRequest.customer_uuid"} <= labels


@pytest.mark.parametrize("limit", [None, 5, MAX_NAME_SHOWN + 1], ids=["default", "five", "clipped"])
@pytest.mark.parametrize(("build", "where"), [(b, w) for _, b, w in STRING_SLOTS], ids=[s[0] for s in STRING_SLOTS])
def test_string_chars_holds_at_its_value_and_is_named_one_past_it(
        build: Callable[[str], Message], where: Callable[[str], str], limit: int | None) -> None:
    limits = DEFAULTS if limit is None else LimitSettings(string_chars=limit)
    n = limits.string_chars
    assert violations(build(_long(n)), limits) == []
    text = _long(n + 1)
    bad = violations(build(text), limits)
    assert [(v.field, v.reason) for v in bad] == [(where(text), "LIMIT_EXCEEDED")]
    assert f"{n} (limits.string_chars)" in bad[0].description
    assert text not in bad[0].description
    if len(text) > MAX_NAME_SHOWN:  # a key in a path is clipped
        assert text not in bad[0].field


def _nested(depth: int, shape: str, inner: Any = 1.0) -> tuple[Any, list[str]]:
    """A value `depth` deep (a scalar is 1; each struct or list around it adds 1) and the path step of each."""
    value, steps = inner, []
    for level in range(depth - 1):
        as_list = shape == "list" or (shape == "mixed" and level % 2)
        value, steps = ([value], ["[0]", *steps]) if as_list else ({"n": value}, [".n", *steps])
    return value, steps


@pytest.mark.parametrize("shape", ["struct", "list", "mixed"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 9])
def test_struct_depth_counts_a_scalar_as_one(depth: int, shape: str) -> None:
    limit = DEFAULTS.struct_depth
    value, steps = _nested(depth, shape)
    bad = violations(upsert({"a": value, "flat": "x"}))
    if depth <= limit:
        assert bad == []
    else:  # the container at depth `limit` is reported; nothing under it is walked
        assert [(v.field, v.reason) for v in bad] == [("attributes.a" + "".join(steps[:limit - 1]), "LIMIT_EXCEEDED")]
        assert f"{limit} (limits.struct_depth)" in bad[0].description


@pytest.mark.parametrize("empty", [{}, []], ids=["struct", "list"])
def test_an_empty_container_is_a_level_too(empty: Any) -> None:
    limits = LimitSettings(struct_depth=3)
    assert violations(upsert({"a": {"b": empty}}), limits) == []  # depth 3: b at depth 2, what it would hold at 3
    bad = violations(upsert({"a": {"b": {"c": empty}}}), limits)
    assert [(v.field, v.reason) for v in bad] == [("attributes.a.b.c", "LIMIT_EXCEEDED")]


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=1)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=1)
    return 1


def _non_finite(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return sum(_non_finite(v) for v in value)
    return int(isinstance(value, float) and not math.isfinite(value))


NAME = st.text(st.characters(codec="utf-8"), max_size=4)
LEAVES = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=3))


@FAST
@given(attrs=struct_values(NAME, LEAVES, max_items=3, max_leaves=12), depth=st.integers(1, 6))
def test_depth_and_non_finite_numbers_agree_with_a_plain_walk(attrs: dict[str, Any], depth: int) -> None:
    limits = LimitSettings(struct_depth=depth)
    bad = violations(upsert(attrs), limits)
    too_deep = [v for v in bad if "limits.struct_depth" in v.description]
    assert bool(too_deep) == any(_depth(v) > depth for v in attrs.values())
    assert all(v.reason == "LIMIT_EXCEEDED" for v in too_deep)
    if not too_deep:  # every non-finite number is listed, once
        assert sum(v.reason == "NON_FINITE_NUMBER" for v in bad) == sum(_non_finite(v) for v in attrs.values())
    assert {v.reason for v in bad} <= {"LIMIT_EXCEEDED", "NON_FINITE_NUMBER"}


def test_every_non_finite_number_is_listed_with_where_it_was() -> None:
    nan, inf = float("nan"), float("inf")
    attrs = {"a": nan, "b": inf, "c": -inf, "ok": 1.0, "l": [nan, 2.0, inf], "s": {"x": -inf, "y": "t", "z": [None]}}
    bad = violations(upsert(attrs))
    assert all(v.reason == "NON_FINITE_NUMBER" for v in bad)
    assert sorted(v.field for v in bad) == sorted(["attributes.a", "attributes.b", "attributes.c", "attributes.l[0]",
                                                   "attributes.l[2]", "attributes.s.x"])
    assert [v.field for v in violations(upsert({"x": nan}))] == ["attributes.x"]  # however small the message
    many = violations(upsert({"xs": [nan, -inf, inf, 1.0] * 250}))
    assert len(many) == 750 and {v.reason for v in many} == {"NON_FINITE_NUMBER"}


def test_violations_of_different_limits_are_all_listed() -> None:
    req = upsert({"x": float("nan"), "deep": _nested(6, "struct")[0], "tags": ["t"] * 1001, _long(5000): 1.0})
    req.identifiers.emails.extend(["e@example.com"] * 100)
    bad = violations(req)
    assert sorted(v.reason for v in bad) == ["LIMIT_EXCEEDED"] * 4 + ["NON_FINITE_NUMBER"]
    assert {v.description.split("(")[1].split(")")[0] for v in bad if v.reason == "LIMIT_EXCEEDED"} == {
        "limits.identifiers_per_request", "limits.struct_depth", "limits.items_per_list", "limits.string_chars"}


# --- the small-message fast path -------------------------------------------------------------------------------

SMALL_LIMITS = st.builds(LimitSettings, identifiers_per_request=st.integers(0, 4), attributes_per_request=st.integers(0, 4),
                         items_per_list=st.integers(0, 4), string_chars=st.integers(0, 8), struct_depth=st.integers(1, 4))
SMALL_TEXT = st.text(st.characters(codec="utf-8"), max_size=9)
SMALL_VALUES = struct_values(SMALL_TEXT, st.one_of(st.none(), st.booleans(), st.floats(), SMALL_TEXT), max_items=5, max_leaves=8)
SMALL_REQUESTS = st.one_of([messages(cls.DESCRIPTOR, text=SMALL_TEXT, values=SMALL_VALUES, max_items=6) for cls in REQUEST_TYPES])


@settings(FAST, max_examples=600)
@given(msg=SMALL_REQUESTS, limits=SMALL_LIMITS)
def test_the_fast_path_never_skips_a_message_with_a_violation(msg: Message, limits: LimitSettings) -> None:
    data = msg.SerializeToString()
    parsed = type(msg).FromString(data)
    want = Limits(limits).violations(parsed)
    got = outcome(type(msg), data, limits)
    assert got == (want or parsed)


@pytest.mark.parametrize("count", [0, 1, 2, 7])
def test_the_fast_path_bound_is_tight_and_right(count: int) -> None:
    """An entry of a list costs 2 bytes at least: count+1 empty ones are one byte past `always_within`."""
    for key, msg in (("items_per_list", pb.MergeRequest(merged_uuids=[""] * (count + 1))),
                     ("attributes_per_request", pb.ResolveRequest(fields=[""] * (count + 1)))):
        limits = LimitSettings(**{key: count})
        assert msg.ByteSize() == Limits(limits).always_within + 1
        assert [v.reason for v in violations(msg, limits)] == ["LIMIT_EXCEEDED"]


# --- plain_struct ----------------------------------------------------------------------------------------------


def _typed(value: Any) -> Any:
    """A value with every leaf's type beside it (1.0 == True == 1 would otherwise hide a wrong type)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


FINITE = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                   st.text(st.characters(codec="utf-8"), max_size=8))


@settings(FAST, max_examples=200)
@given(values=struct_values(st.text(st.characters(codec="utf-8"), max_size=8), FINITE, max_items=4, max_leaves=12))
def test_plain_struct_is_message_to_dict(values: dict[str, Any]) -> None:
    s = struct(values)
    for msg in (s, struct_pb2.Struct.FromString(s.SerializeToString())):
        got = plain_struct(msg)
        assert _typed(got) == _typed(json_format.MessageToDict(msg))
        assert _typed(got) == _typed(values)  # floats stay floats, bools bools


def test_plain_struct_keeps_what_message_to_dict_refuses() -> None:
    s = struct({"n": float("nan"), "i": float("-inf"), "empty": {}, "l": []})
    s.fields["unset"].CopyFrom(struct_pb2.Value())  # a Value with no kind reads as null
    got = plain_struct(s)
    assert math.isnan(got["n"]) and got["i"] == float("-inf") and got["empty"] == {} and got["l"] == []
    assert got["unset"] is None
    with pytest.raises(ValueError):
        json_format.MessageToDict(s)


# --- status bounding -------------------------------------------------------------------------------------------


def _details(status: Any) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    info, bad = unpack_details(status)
    assert info is not None
    return info, bad


def test_a_status_listing_100000_huge_violations_stays_small() -> None:
    n = 100_000
    exc = InvalidInput([FieldViolation("f" * 10_000, "d" * 10_000, "R" * 10_000)] * n)  # one object, n times
    status = to_rpc_status(exc)
    info, bad = _details(status)
    assert status.code == code_pb2.INVALID_ARGUMENT and (info.reason, info.domain) == ("INVALID_ARGUMENT", "resolver.v1")
    assert bad is not None and len(bad.field_violations) <= MAX_VIOLATIONS + 1
    *listed, more = bad.field_violations
    assert len(listed) == MAX_VIOLATIONS
    assert all(len(v.field) <= MAX_FIELD and len(v.description) <= MAX_DESCRIPTION and len(v.reason) <= 64 for v in listed)
    assert more.reason == "MORE" and more.field == "" and str(n - MAX_VIOLATIONS) in more.description
    assert len(status.SerializeToString()) < 6000
    assert len(status.message) < 600


@pytest.mark.parametrize(("exc", "pushback"), [
    (Overloaded("busy", retry_after_s=0.05, limit="server.max_queue_wait_ms"), "50"),
    (InboxFull("full", retry_after_s=2), "2000"),
    (StorageFull("the map is full", reason="MAP_FULL", limit="storage.map_size_mb"), "-1"),
    (ResourceExhausted("too many watchers", reason="TOO_MANY_WATCHERS", limit="changes.max_watchers"), None),
    (NotFound("no such customer"), None),
])
def test_a_refusal_says_when_a_retry_policy_may_come_back(exc: Exception, pushback: str | None) -> None:
    """gRFC A6's pushback trailer: the retry delay of an overload or a full inbox, "never" (negative) for a full
    store, nothing for the rest; beside the status details, which stay as they were."""
    status = to_status(exc)
    metadata = dict(status.trailing_metadata)
    assert metadata.get(PUSHBACK) == pushback
    assert metadata["grpc-status-details-bin"] == to_rpc_status(exc).SerializeToString()


@pytest.mark.parametrize("n", [0, 1, MAX_VIOLATIONS, MAX_VIOLATIONS + 1])
def test_more_is_there_only_when_violations_were_left_out(n: int) -> None:
    _, bad = _details(to_rpc_status(InvalidInput([FieldViolation(f"f{i}", "bad", "INVALID") for i in range(n)])))
    assert bad is not None
    assert [v.field for v in bad.field_violations[:MAX_VIOLATIONS]] == [f"f{i}" for i in range(min(n, MAX_VIOLATIONS))]
    if n > MAX_VIOLATIONS:
        assert (bad.field_violations[-1].reason, bad.field_violations[-1].description) == (
            "MORE", f"and {n - MAX_VIOLATIONS} more violation(s) not listed")
    else:
        assert len(bad.field_violations) == n


def test_non_ascii_field_paths_still_fit_the_clients_metadata() -> None:
    """Field paths hold caller-chosen keys (4-byte characters: 4x the bytes per character clipped); descriptions
    are the server's own text. grpc-status-details-bin (base64) and grpc-message (percent-encoded) together stay
    within the 16 KiB of metadata a client accepts by default."""
    exc = InvalidInput([FieldViolation("attributes." + "😀" * 10_000, "d" * 10_000, "INVALID_ATTRIBUTE")] * 100_000)
    status = to_rpc_status(exc)
    details_bin = base64.b64encode(status.SerializeToString())
    message = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in status.message.encode())
    assert len(details_bin) + message < 16 * 1024
