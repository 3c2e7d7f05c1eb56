"""The Resolve wire codec: the compiled module (ext/_rwire_c.pyx) answers as its twin (resolver/_rwire_py.py), and
both as protobuf.

Decoding is compared on requests serialized by protobuf, on requests laid out field by field (any order,
singular fields repeated, Identifiers split over several occurrences, unknown fields of every wire type at both
levels, strings that are not UTF-8) and on damaged bytes: the compiled answer is the twin's or None, and never
None for a well-formed request without a group. Encoding is compared on generated results, JSON attribute values
of every kind included, as parsed messages re-serialized deterministically (map order aside, byte for byte:
-0.0 and NaN payloads count); what the compiled encoder leaves to the twin raises the twin's exception.
"""

from __future__ import annotations

import decimal
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver import _rwire_c, _rwire_py
from resolver.identifiers import RawIdentifiers, Skipped
from resolver.normalize import Kind
from resolver.resolve import Candidate, Probe, ResolveInput, ResolveResult
from resolver.v1 import resolver_pb2 as pb
from tests.rawproto import varint

# compiled module against twin (and the reference library), both loaded here: the same test in either pass, run once
# (tests/unit/test_selection.py checks which one the switch picks)
pytestmark = pytest.mark.differential

FAST = settings(max_examples=400, deadline=None, database=None)
ANY_SIZE = 1 << 30  # a size bound no test input reaches
text = st.text(st.characters(codec="utf-8"), max_size=12)  # non-ASCII and astral-plane characters, "" too
texts = st.lists(text, max_size=4)


# -- decoding ----------------------------------------------------------------------------------------------------
def _ld(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def _protobuf(data: bytes) -> ResolveInput | None:
    """What protobuf makes of `data`, read field by field (None: it does not parse)."""
    try:
        req = pb.ResolveRequest.FromString(data)
    except DecodeError:
        return None
    ids = req.identifiers
    return ResolveInput(RawIdentifiers(ids.external_id, tuple(ids.emails), tuple(ids.phones)), req.default_region,
                        tuple(req.fields), req.view, req.explain, req.min_sequence)


def decoded(data: bytes, max_size: int = ANY_SIZE, *, must: bool) -> ResolveInput | None:
    """The twin's answer, after checking it against protobuf and the compiled answer against it.

    `must`: the compiled module answers too (a well-formed request without a group), not only None."""
    want = _rwire_py.decode_resolve(data, max_size)
    got = _rwire_c.decode_resolve(data, max_size)
    assert want == (_protobuf(data) if len(data) <= max_size else None)
    assert got is None or got == want, (data, got, want)
    if must and want is not None:
        assert got is not None, ("the compiled decoder gave up on a well-formed request", data)
    if got is not None:
        ids = got.identifiers
        assert all(type(t) is tuple for t in (ids.emails, ids.phones, got.fields)) and type(got.explain) is bool
        assert type(got.min_sequence) is int
    return want


requests = st.builds(
    pb.ResolveRequest,
    identifiers=st.one_of(st.none(), st.builds(pb.Identifiers, external_id=text, emails=texts, phones=texts)),
    default_region=text, fields=texts, view=text, explain=st.booleans(),
    min_sequence=st.one_of(st.integers(0, 300), st.integers(0, (1 << 64) - 1)),
)


@FAST
@given(req=requests)
def test_protobuf_serialized_requests(req: pb.ResolveRequest) -> None:
    data = req.SerializeToString()
    want = decoded(data, must=True)
    ids = req.identifiers
    assert want == ResolveInput(RawIdentifiers(ids.external_id, tuple(ids.emails), tuple(ids.phones)),
                                req.default_region, tuple(req.fields), req.view, req.explain, req.min_sequence)
    assert decoded(data, len(data), must=True) == want
    if data:
        assert decoded(data, len(data) - 1, must=True) is None


@st.composite
def unknown_fields(draw: st.DrawFn, known: dict[int, int]) -> bytes:
    """One field this message does not know: an unknown number, or a known one with another wire type
    (protobuf keeps both as unknown fields). `known`: field number -> its wire type."""
    field = draw(st.one_of(st.integers(1, 20), st.integers(1, (1 << 29) - 1)))
    wire_type = draw(st.sampled_from([0, 1, 2, 5]).filter(lambda w: known.get(field) != w))
    tag = varint(field << 3 | wire_type)
    if wire_type == 0:
        return tag + varint(draw(st.integers(0, (1 << 64) - 1)))
    if wire_type == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    return tag + varint(len(payload := draw(st.binary(max_size=12)))) + payload


def string_field(field: int, valid_only: bool) -> st.SearchStrategy[bytes]:
    """A string field; unless `valid_only`, now and then bytes that are not UTF-8 (a surrogate, an overlong)."""
    values = text.map(lambda t: t.encode())
    if not valid_only:
        values = st.one_of(values, st.binary(max_size=6),
                           st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"a\xf4\x90\x80\x80"]))
    return values.map(lambda v: _ld(field, v))


@st.composite
def laid_out(draw: st.DrawFn, valid_only: bool = True) -> bytes:
    """A ResolveRequest built field by field, in any order: singular fields repeated (the last one counts),
    Identifiers in several occurrences (merged), unknown fields at both levels."""
    chunks: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        inner = [draw(string_field(1, valid_only)) for _ in range(draw(st.integers(0, 2)))]
        inner += [draw(string_field(draw(st.sampled_from([2, 3])), valid_only)) for _ in range(draw(st.integers(0, 4)))]
        inner += [draw(unknown_fields({1: 2, 2: 2, 3: 2})) for _ in range(draw(st.integers(0, 2)))]
        chunks.append(_ld(1, b"".join(draw(st.permutations(inner)))))
    for field, most in ((2, 2), (3, 4), (4, 2)):
        chunks += [draw(string_field(field, valid_only)) for _ in range(draw(st.integers(0, most)))]
    for field in (5, 6):  # explain, min_sequence
        chunks += [varint(field << 3) + varint(draw(st.sampled_from([0, 1, 2, 255, 1 << 32, (1 << 64) - 1])))
                   for _ in range(draw(st.integers(0, 2)))]
    chunks += [draw(unknown_fields({1: 2, 2: 2, 3: 2, 4: 2, 5: 0, 6: 0})) for _ in range(draw(st.integers(0, 3)))]
    return b"".join(draw(st.permutations(chunks)))


@FAST
@given(data=laid_out())
def test_requests_laid_out_by_hand(data: bytes) -> None:
    assert decoded(data, must=True) is not None


@FAST
@given(data=laid_out(valid_only=False))
def test_strings_that_are_not_utf8_are_the_general_paths(data: bytes) -> None:
    decoded(data, must=True)


def test_invalid_utf8_is_none_at_each_string_field() -> None:
    for bad in (b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"ok\xe2\x82"):
        for data in (_ld(1, _ld(1, bad)), _ld(1, _ld(2, bad)), _ld(1, _ld(3, bad)), _ld(2, bad), _ld(3, bad),
                     _ld(4, bad)):
            assert decoded(data, must=True) is None


def test_repeated_fields_merge_and_overwrite() -> None:
    data = (_ld(1, _ld(1, b"A-1") + _ld(2, b"a@x")) + _ld(2, b"GB") + varint(5 << 3) + b"\x01"
            + _ld(1, _ld(2, b"b@x") + _ld(3, b"+1") + _ld(1, b"A-2")) + _ld(2, b"US") + _ld(3, b"f")
            + varint(5 << 3) + b"\x00" + _ld(1, _ld(3, b"+2")) + _ld(3, b"g"))
    assert decoded(data, must=True) == ResolveInput(RawIdentifiers("A-2", ("a@x", "b@x"), ("+1", "+2")), "US",
                                                    ("f", "g"), "", False)
    # min_sequence: the last occurrence counts, a 0 included
    assert decoded(varint(6 << 3) + varint(41) + varint(6 << 3) + varint(42), must=True) == ResolveInput(
        RawIdentifiers(), min_sequence=42)
    assert decoded(varint(6 << 3) + varint(41) + varint(6 << 3) + varint(0), must=True) == ResolveInput(RawIdentifiers())
    # an explicitly empty external_id later on still overwrites (proto3 reads no presence into it)
    assert decoded(_ld(1, _ld(1, b"A-1")) + _ld(1, _ld(1, b"")), must=True) == ResolveInput(RawIdentifiers())


@pytest.mark.parametrize("data", [
    b"",
    varint(5 << 3) + b"\x80" * 9 + b"\x02",  # explain: a 10-byte varint whose bits past 64 are dropped -> 0
    varint(5 << 3) + b"\x80" * 9 + b"\x7f",  # ... -> 1 << 63
    varint(5 << 3) + b"\x80\x00",  # a non-minimal 0
    varint(5 << 3) + varint(1 << 32),
    varint(6 << 3) + b"\xff" * 9 + b"\x01",  # min_sequence: the largest uint64
    varint(6 << 3) + b"\xff" * 9 + b"\x7f",  # ... bits past 64 dropped
    _ld(6, b"\x01") + varint(6 << 3 | 5) + bytes(4),  # min_sequence with another wire type: unknown
    _ld(5, b"\x01") + varint(5 << 3) + b"\x01" + _ld(5, b""),  # explain with another wire type: unknown
    varint(1 << 3) + varint(7) + _ld(1, _ld(1, b"x")),  # identifiers as a varint: unknown
    _ld(1, varint(2 << 3) + varint(1) + _ld(1, b"x")),  # emails as a varint, inside Identifiers
    b"\xa8\x80\x80\x80\x00" + varint(1),  # a tag in 5 bytes (non-minimal)
    b"\xa8\x80\x80\x80\x0f" + varint(1),  # a 5-byte tag of a large field number
    varint(((1 << 29) - 1) << 3 | 2) + varint(0),  # the largest field number
    varint(19000 << 3) + varint(1),  # a reserved number
    varint(2 << 3 | 2) + b"\x82\x80\x80\x80\x00" + b"ab",  # a length in 5 bytes (non-minimal)
    varint(9 << 3 | 1) + bytes(8) + varint(9 << 3 | 5) + bytes(4),
    _ld(2, b"\x00") + _ld(4, "\U0001f600é".encode()),  # NUL, astral plane
])
def test_edges_protobuf_accepts(data: bytes) -> None:
    assert decoded(data, must=True) is not None


@pytest.mark.parametrize("data", [
    varint(0 << 3) + varint(1),  # field 0
    varint(0 << 3 | 2) + varint(0),
    b"\xa8\x80\x80\x80\x10" + varint(1),  # a tag past 32 bits
    b"\xa8\x80\x80\x80\x80\x00" + varint(1),  # a tag in 6 bytes
    _ld(1, b"\x8a\x80\x80\x80\x80\x00" + varint(1) + b"a"),  # ... inside Identifiers
    varint(5 << 3) + b"\x80" * 10 + b"\x01",  # an 11-byte varint
    varint(9 << 3) + b"\x80" * 9 + b"\xff",  # a 10th byte that continues
    varint(2 << 3 | 2) + b"\x82\x80\x80\x80\x80\x00" + b"ab",  # a length in 6 bytes
    varint(2 << 3 | 2) + varint(5) + b"ab",  # a length past the end
    varint(1 << 3 | 2) + varint(3) + varint(1 << 3 | 2) + varint(3) + b"a" + b"bc",  # past the enclosing message
    varint(9 << 3 | 1) + bytes(7),  # a truncated fixed64
    varint(9 << 3 | 5) + bytes(3),
    varint(9 << 3 | 4),  # an end-group with no group
    _ld(1, varint(1 << 3 | 4)),
    varint(9 << 3 | 6), varint(9 << 3 | 7),  # no such wire type
    varint(9 << 3 | 3) + varint(8 << 3 | 4),  # a group ended by another number
    varint(5 << 3),  # a tag and no value
    varint(6 << 3) + b"\x80",  # a min_sequence cut short
    b"\x0a",
])
def test_edges_protobuf_refuses(data: bytes) -> None:
    assert decoded(data, must=True) is None


@pytest.mark.parametrize("data", [
    varint(9 << 3 | 3) + varint(9 << 3 | 4),  # an unknown group, empty
    varint(9 << 3 | 3) + varint(1 << 3) + varint(3) + varint(9 << 3 | 4) + _ld(4, b"v"),  # holding a field
    _ld(1, varint(9 << 3 | 3) + varint(9 << 3 | 4) + _ld(1, b"x")),  # inside Identifiers
    varint(1 << 3 | 3) + varint(1 << 3 | 4),  # identifiers as a group: unknown to protobuf
])
def test_groups_are_left_to_the_general_path(data: bytes) -> None:
    assert decoded(data, must=False) is not None  # protobuf skips them; the compiled module may give up


@FAST
@given(data=st.one_of(laid_out(valid_only=False), requests.map(lambda r: r.SerializeToString())),
       edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 1 << 16),
                                st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_bytes(data: bytes, edits: list[tuple[str, int, int]]) -> None:
    buf = bytearray(data)
    for op, at, byte in edits:
        i = at % (len(buf) + 1)
        if op == "flip" and i < len(buf):
            buf[i] ^= byte or 0x80
        elif op == "insert":
            buf.insert(i, byte)
        elif op == "delete" and i < len(buf):
            del buf[i]
        elif op == "truncate":
            del buf[i:]
    decoded(bytes(buf), must=False)


@FAST
@given(data=st.binary(max_size=64))
def test_random_bytes(data: bytes) -> None:
    decoded(data, must=False)


def test_not_bytes_is_none() -> None:
    assert _rwire_c.decode_resolve(bytearray(b"\x22\x01v"), ANY_SIZE) is None  # type: ignore[arg-type]


# -- encoding ----------------------------------------------------------------------------------------------------
def _canonical(data: bytes) -> bytes:
    """The response as protobuf reads it, re-serialized with map entries in key order (NaN bits kept)."""
    return pb.ResolveResponse.FromString(data).SerializeToString(deterministic=True)


@contextmanager
def no_general_path() -> Iterator[None]:
    """Fail if the compiled encoder hands the result to the twin (the fast path must cover plain JSON)."""
    def refuse(r: ResolveResult) -> bytes:
        raise AssertionError("the compiled encoder fell back to the twin")

    general = _rwire_c._encode_general  # type: ignore[attr-defined]
    _rwire_c._encode_general = refuse  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _rwire_c._encode_general = general  # type: ignore[attr-defined]


def encoded(r: ResolveResult, *, fast: bool = True) -> bytes:
    """The twin's bytes, after checking them against resolve_response and the compiled bytes against them."""
    want = _rwire_py.encode_resolve(r)
    if fast:
        with no_general_path():
            got = _rwire_c.encode_resolve(r)
    else:
        got = _rwire_c.encode_resolve(r)
    assert _canonical(got) == _canonical(want) == _rwire_py.resolve_response(r).SerializeToString(deterministic=True)
    return want


def same_error(r: ResolveResult) -> type[BaseException]:
    """Both implementations raise, the same exception type; that type."""
    with pytest.raises(Exception) as twin:
        _rwire_py.encode_resolve(r)
    with pytest.raises(twin.type):
        _rwire_c.encode_resolve(r)
    return twin.type


numbers = st.one_of(st.integers(-(1 << 64), 1 << 64), st.integers(-(1 << 1023), 1 << 1023),
                    st.floats(), st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 2.0 ** 53 + 1]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), text, numbers),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.lists(inner, max_size=2).map(tuple),
                            st.dictionaries(text, inner, max_size=3)),
    max_leaves=10)
attributes = st.dictionaries(text, json_values, max_size=5)
kinds = st.sampled_from(list(Kind))
results = st.builds(
    ResolveResult,
    outcome=st.sampled_from(sorted(_rwire_py.OUTCOMES)),
    customer_uuid=st.one_of(st.just(""), st.uuids().map(str), text),
    matched_on=st.one_of(st.none(), kinds),
    version=st.one_of(st.integers(0, 3), st.integers(0, (1 << 64) - 1)),
    attributes=attributes,
    candidates=st.lists(st.builds(Candidate, customer_uuid=st.one_of(st.uuids().map(str), text),
                                  attributes=attributes), max_size=3),
    conflicts=texts,
    probes=st.lists(st.builds(Probe, kind=kinds, masked=text, result=st.one_of(st.integers(0, 5),
                                                                             st.integers(0, (1 << 31) - 1)),
                              hits=st.one_of(st.integers(0, 3), st.integers(0, (1 << 32) - 1))), max_size=3),
    skipped=st.lists(st.builds(Skipped, kind=kinds, masked=text, reason=text, detail=text), max_size=3),
)


@FAST
@given(r=results)
def test_generated_results(r: ResolveResult) -> None:
    encoded(r)


def _matched(attributes: dict[str, Any], **kw: Any) -> ResolveResult:
    return ResolveResult.matched(customer_uuid="2b1f6d9e-6f2a-4c39-9a53-2f4f5b1c7e01", matched_on=Kind.PHONE,
                                 version=7, attributes=attributes, conflicts=[], probes=[], skipped=[], **kw)


def test_what_each_attribute_value_becomes() -> None:
    data = encoded(_matched({"none": None, "t": True, "f": False, "s": "", "n": 0, "neg": -0.0, "big": 2 ** 53 + 1,
                             "l": [], "d": {}, "nested": {"a": [1, {"b": None}]}}))
    attrs = pb.ResolveResponse.FromString(data).attributes.fields
    assert attrs["none"].WhichOneof("kind") == "null_value"
    assert (attrs["t"].bool_value, attrs["f"].WhichOneof("kind")) == (True, "bool_value")
    assert attrs["s"].WhichOneof("kind") == "string_value"
    assert attrs["n"].WhichOneof("kind") == "number_value" and attrs["big"].number_value == float(2 ** 53 + 1)
    assert math.copysign(1, attrs["neg"].number_value) == -1
    assert (attrs["l"].WhichOneof("kind"), attrs["d"].WhichOneof("kind")) == ("list_value", "struct_value")


def test_nan_payloads_and_infinities_are_kept() -> None:
    signaling = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0]
    encoded(_matched({"nan": math.nan, "snan": signaling, "inf": math.inf, "-inf": -math.inf}))


def test_empty_attributes_are_no_field() -> None:
    r = ResolveResult.ambiguous(matched_on=Kind.EMAIL, candidates=[Candidate("u1", {}), Candidate("", {"a": 1})],
                                probes=[], skipped=[])
    msg = pb.ResolveResponse.FromString(encoded(r))
    assert not msg.HasField("attributes") and not msg.candidates[0].HasField("attributes")
    assert len(msg.candidates) == 2 and msg.candidates[1].attributes["a"] == 1
    assert not pb.ResolveResponse.FromString(encoded(_matched({}))).HasField("attributes")


@pytest.mark.parametrize("size", [127, 128, 16383, 16384, (1 << 21) + 5])
def test_long_values_widen_their_lengths(size: int) -> None:
    """Every enclosing message's length grows past one byte (the encoder moves the payload to make room)."""
    encoded(_matched({"k": "x" * size, "l": [{"m": "é" * (size // 2)}]}))


def test_every_outcome() -> None:
    for r in (ResolveResult.not_found(probes=[Probe(Kind.EMAIL, "j***@x", 2, 0)], skipped=[]),
              _matched({"name": "Jane"}, ),
              ResolveResult.ambiguous(matched_on=Kind.PHONE, candidates=[Candidate("a", {"x": 1})], probes=[],
                                      skipped=[Skipped(Kind.PHONE, "+1***", "INVALID_PHONE", "too short")])):
        assert pb.ResolveResponse.FromString(encoded(r)).outcome == _rwire_py.OUTCOMES[r.outcome]


def _nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth - 1):
        value = {"a": value} if i % 2 else [value]
    return value


def test_deep_nesting_is_the_twins() -> None:
    """Compared as bytes: protobuf parses no message this deep (and one key per level leaves no order to differ)."""
    r = _matched({"deep": _nested(99)})
    with no_general_path():
        assert _rwire_c.encode_resolve(r) == _rwire_py.encode_resolve(r)
    r = _matched({"deep": _nested(150)})  # past MAX_NESTING: the twin encodes it
    assert _rwire_c.encode_resolve(r) == _rwire_py.encode_resolve(r)
    assert same_error(_matched({"deep": _nested(5000)})) is RecursionError


class Mapping(dict):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(("attrs", "error"), [
    ({"x": b"bytes"}, ValueError), ({"x": 1j}, ValueError), ({"x": {1, 2}}, ValueError),
    ({"x": decimal.Decimal(1)}, ValueError), ({"x": object()}, ValueError), ({"x": [object()]}, ValueError),
    ({"x": 10 ** 309}, OverflowError), ({"x": [-(2 ** 1024)]}, OverflowError),
    ({1: "x"}, TypeError), ({"x": {None: 1}}, TypeError),
    ({"\ud800": "x"}, UnicodeEncodeError), ({"x": "\udfff"}, UnicodeEncodeError),
])
def test_values_json_does_not_hold_raise_as_in_the_twin(attrs: dict[Any, Any], error: type[Exception]) -> None:
    assert same_error(_matched(attrs)) is error
    assert same_error(ResolveResult.ambiguous(matched_on=Kind.PHONE, candidates=[Candidate("u", attrs)], probes=[],
                                              skipped=[])) is error


@pytest.mark.parametrize("change", [
    lambda r: setattr(r, "outcome", "MAYBE"),
    lambda r: setattr(r, "version", -1),
    lambda r: setattr(r, "version", 1 << 64),
    lambda r: setattr(r, "customer_uuid", "\ud800"),
    lambda r: setattr(r, "customer_uuid", None),
    lambda r: setattr(r, "conflicts", ["a", 3]),
    lambda r: setattr(r, "probes", [Probe(Kind.EMAIL, "m", 2, 1 << 32)]),
    lambda r: setattr(r, "probes", [Probe(Kind.EMAIL, "m", 2, -1)]),
    lambda r: setattr(r, "probes", [Probe(Kind.EMAIL, "m", 1 << 31, 0)]),
    lambda r: setattr(r, "matched_on", 3),
    lambda r: setattr(r, "skipped", [Skipped(Kind.PHONE, "m", "R", b"detail")]),  # type: ignore[arg-type]
])
def test_odd_fields_answer_as_in_the_twin(change: Callable[[ResolveResult], None]) -> None:
    """Out of range or of another type: the twin's exception, or its answer where protobuf takes the value
    (None as an unset string, bytes as a string's UTF-8)."""
    r = _matched({"a": 1})
    change(r)
    try:
        _rwire_py.encode_resolve(r)
    except Exception:  # noqa: BLE001 - the type is what is compared
        same_error(r)
    else:
        encoded(r, fast=False)


def test_what_only_the_twin_encodes_is_the_twins() -> None:
    """Types JSON never gives (subclasses, a Struct) go to the twin instead of being guessed."""
    s = struct_pb2.Struct()
    s.update({"a": 1})
    for attrs in ({"m": Mapping(a=1)}, Mapping(a=1), {"s": s}, {"k": Kind.EMAIL}):
        encoded(_matched(attrs), fast=False)
    r = ResolveResult.not_found(probes=[Probe(Kind.EMAIL, "m", -1, 0)], skipped=[])  # a negative enum
    encoded(r, fast=False)
