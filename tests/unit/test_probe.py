"""The probe loop: the compiled module (ext/_probe_c.pyx) answers exactly as its pure twin (resolver/_probe_py.py).

The compiled `holds` and `record_fields` scan the record's JSON instead of decoding it; they are compared with
the twin on records holding awkward text (quotes, backslashes, control characters, non-ASCII), on JSON laid out
differently from orjson's (whitespace: the scanner must fall back, never guess) and on damaged bytes. The
Prober is compared on a real LMDB store written through the Upsert path, with shared identifiers and fan-out.
"""

from __future__ import annotations

import gc
import json
import random
import uuid
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver import _probe_c, _probe_py
from resolver._probe_types import Decision, Fanned, Probed, ProbeRow
from resolver.bootstrap import build_service
from resolver.config import load_settings
from resolver.identifiers import RawIdentifiers
from resolver.normalize import Kind
from resolver.records import Record
from resolver.service import Service
from resolver.store import uuid_bytes, uuid_text
from resolver.upsert import UpsertInput

# compiled module against twin (and the reference library), both loaded here: the same test in either pass, run once
# (tests/unit/test_selection.py checks which one the switch picks)
pytestmark = pytest.mark.differential

text = st.text(st.characters(codec="utf-8"), max_size=12)
awkward = st.one_of(text, st.sampled_from(['a"b', "a\\b", "x\ny", "\u2028", "é@example.com", "+15550100", "", "]", ",\"x"]))
numbers = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.floats(allow_nan=False, allow_infinity=False),
                    st.booleans(), st.none())
values = st.recursive(st.one_of(awkward, numbers), lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                          st.dictionaries(awkward, inner, max_size=3)),
                      max_leaves=6)
records = st.builds(
    Record,
    uuid=st.uuids().map(str),
    external_id=st.one_of(st.none(), awkward),
    emails=st.lists(awkward, max_size=3),
    phones=st.lists(awkward, max_size=3),
    attributes=st.dictionaries(awkward, values, max_size=4),
    version=st.integers(0, 1 << 40),
    created_us=st.integers(0, 1 << 62),
    updated_us=st.integers(0, 1 << 62),
    field_us=st.dictionaries(awkward, st.integers(0, 1 << 62), max_size=3),
    merged_external_ids=st.lists(awkward, max_size=2),
)
FIELDS = ("uuid", "external_id", "emails", "phones", "attributes", "version", "created_us", "updated_us", "field_us",
          "merged_external_ids", "absent")


def _layouts(rec: Record) -> list[bytes]:
    """The record as we store it, and laid out in ways we never write (the scanner must still agree)."""
    stored = rec.encode()
    return [stored, json.dumps(rec.to_json(), indent=1).encode(), b" " + stored + b"\n",
            json.dumps(rec.to_json(), ensure_ascii=True, separators=(", ", ": ")).encode()]


@settings(max_examples=400, deadline=None)
@given(rec=records, other=awkward, data=st.data())
def test_holds_agrees_with_the_twin(rec: Record, other: str, data: st.DataObject) -> None:
    held = [(k, v) for k, v in rec.identifiers()]
    probes = held + [(k, other) for k in (1, 2, 3)]
    kind, value = data.draw(st.sampled_from(probes))
    for raw in _layouts(rec):
        want = _probe_py.holds(raw, kind, value)
        assert _probe_c.holds(raw, kind, value) == want
        assert want == rec.holds(Kind(kind), value) == rec.holds(kind, value)  # the twin is the record's own rule


@settings(max_examples=300, deadline=None)
@given(rec=records, names=st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True))
def test_record_fields_agree_with_the_twin(rec: Record, names: list[str]) -> None:
    for raw in _layouts(rec):
        got = _probe_c.record_fields(raw, tuple(names))
        want = _probe_py.record_fields(raw, tuple(names))
        assert got == want
        assert [type(x) for x in got] == [type(x) for x in want]


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"phones":["+2"', b'{"phones":"+1"}', b"{'phones':[]}", b"nonsense",
                                 b'{"emails":[1],"phones":["+1"]}', b'{"x":tru,"phones":["+1"]}'])
def test_bytes_that_are_not_a_record_are_never_guessed(raw: bytes) -> None:
    """What the scanner cannot read before it finds the identifier goes to the twin: same answer or same error.

    (After a match the scanner stops: LMDB stores a value whole, so the rest is the record we wrote.)"""
    for fn, args in ((_probe_py.holds, (3, "+1")), (_probe_py.record_fields, (("phones",),))):
        compiled = getattr(_probe_c, fn.__name__)
        try:
            want: object = fn(raw, *args)
        except Exception as exc:  # noqa: BLE001 - the exact exception is what is compared
            with pytest.raises(type(exc)):
                compiled(raw, *args)
        else:
            assert compiled(raw, *args) == want


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Service:
    """A small store written through Upsert: shared phones and emails, one phone past the fan-out limit."""
    data = Path(tmp_path_factory.mktemp("probe")) / "data"
    svc = build_service(load_settings(None, data_dir=str(data), default_region="US", max_fanout=4))
    rng = random.Random(5)
    for i in range(120):
        phones = [f"+1650253{rng.randrange(40):04d}"] + ([f"+1415555{i:04d}"] if i % 3 else [])
        emails = [f"user{rng.randrange(80)}@example.com"]
        if i < 6:
            phones.append("+12025550100")  # a switchboard: six holders, limit 4
        svc.upsert(UpsertInput(f"p-{i}", RawIdentifiers(f"EXT-{i}", tuple(emails), tuple(phones)),
                               {"name": f"n{i}"}))
    return svc


def _queries(rng: random.Random) -> list[tuple[str | None, list[str], list[str]]]:
    out = []
    for _ in range(300):
        ext = rng.choice([None, f"EXT-{rng.randrange(130)}"])
        emails = [f"user{rng.randrange(90)}@example.com" for _ in range(rng.randrange(3))]
        phones = [rng.choice([f"+1650253{rng.randrange(45):04d}", f"+1415555{rng.randrange(130):04d}", "+12025550100"])
                  for _ in range(rng.randrange(3))]
        out.append((ext, emails, phones))
    return out


@pytest.mark.parametrize("explain", [False, True])
def test_prober_decisions_agree(store: Service, explain: bool) -> None:
    s = store.store
    queries = _queries(random.Random(11))
    with s.read() as view:
        args = (view.txn, (s.ix[1], s.ix[2], s.ix[3]), s.db["records"], s.hasher.key)
        twin, compiled = _probe_py.Prober(*args), _probe_c.Prober(*args)
        assert compiled.native  # the pinned py-lmdb: LMDB read through its C functions (ext/_probe_lmdb.pxi)
        seen = set()
        for ext, emails, phones in queries:
            want = twin.decide(ext, emails, phones, 4, explain)
            got = compiled.decide(ext, emails, phones, 4, explain)
            assert got == want
            _assert_same_decision(got, want)
            seen.add(want.outcome)
            for kind, vals in ((1, [ext] if ext else []), (2, emails), (3, phones)):
                for v in vals:
                    probed = compiled.probe(kind, v, 4)
                    assert probed == twin.probe(kind, v, 4)
                    assert type(probed) is Probed
        sets = [(e, m, p, explain) for e, m, p in queries]
        assert compiled.decide_many(sets, 4) == twin.decide_many(sets, 4)
    assert seen == {_probe_py.NOT_FOUND, _probe_py.MATCHED, _probe_py.AMBIGUOUS}


class _NotPyLmdb:
    """A transaction that is not py-lmdb's own object: what another py-lmdb build looks like to the Prober."""

    def __init__(self, txn: Any) -> None:
        self._txn = txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def test_a_transaction_it_cannot_read_from_c_is_read_through_py_lmdb(store: Service) -> None:
    """Where py-lmdb's objects are not what ext/_probe_lmdb.pxi reads, the compiled Prober uses py-lmdb's
    methods and answers the same."""
    s = store.store
    queries = [(e, m, p, True) for e, m, p in _queries(random.Random(12))]
    with s.read() as view:
        args = ((s.ix[1], s.ix[2], s.ix[3]), s.db["records"], s.hasher.key)
        fallback = _probe_c.Prober(_NotPyLmdb(view.txn), *args)
        assert not fallback.native
        assert fallback.decide_many(queries, 4) == _probe_py.Prober(view.txn, *args).decide_many(queries, 4)


def test_a_prober_past_its_transaction_raises_py_lmdbs_error(store: Service) -> None:
    """A Prober used after its transaction ended (a misuse) gets py-lmdb's error, never a read of freed memory."""
    s = store.store
    with s.read() as view:
        prober = _probe_c.Prober(view.txn, (s.ix[1], s.ix[2], s.ix[3]), s.db["records"], s.hasher.key)
        assert prober.native and prober.decide(None, [], ["+12025550100"], 4, False).outcome is not None
    with pytest.raises(lmdb.Error):
        prober.decide(None, [], ["+12025550100"], 4, False)


def _assert_same_decision(got: Any, want: Decision) -> None:
    """The compiled Decision (a cdef class) has the twin's NamedTuple fields, and behaves as that NamedTuple."""
    assert type(want) is Decision and type(got) is _probe_c.Decision
    for name in Decision._fields:
        assert getattr(got, name) == getattr(want, name), name
    assert want == got and not got != want and tuple(got) == tuple(want) and len(got) == len(want)
    assert [got[i] for i in range(len(want))] == list(want) and repr(got) == repr(want)
    assert all(type(f) is Fanned for f in want.fanned + got.fanned)
    assert all(type(r) is ProbeRow for r in want.probes + got.probes)


def test_a_hash_collision_never_returns_a_customer(store: Service) -> None:
    """An index entry whose record does not hold the value (what a collision looks like) is not a hit."""
    s = store.store
    stranger = uuid.uuid4().bytes
    view = s.write()  # aborted at the end: the store keeps no trace of the fake collision
    try:
        view.put_record(Record(str(uuid.UUID(bytes=stranger)), phones=["+15550100999"]))
        view.txn.put(s.hasher.key(3, "+16502530001"), stranger, db=s.ix[3], dupdata=False)
        for prober in (_probe_py.Prober, _probe_c.Prober):
            n, hits = prober(view.txn, (s.ix[1], s.ix[2], s.ix[3]), s.db["records"], s.hasher.key).probe(3, "+16502530001", 4)
            assert n >= 1
            assert stranger not in hits
    finally:
        view.txn.abort()


def test_fields_of_a_confirmed_record_match_the_decoded_record(store: Service) -> None:
    s = store.store
    with s.read() as view:
        uid = next(iter(view.iter_index(Kind.PHONE)))[1]
        rec = view.record(uid)
        assert rec is not None
        args = (view.txn, s.index_dbs, s.records_db, s.hasher.key)
        for prober in (_probe_py.Prober(*args), _probe_c.Prober(*args)):
            assert prober.fields(uid, ("uuid", "version", "attributes")) == [rec.uuid, rec.version, rec.attributes]
            decision = prober.decide(None, [], [rec.phones[0]], 4, False)
            assert uid in decision.uuids
            assert prober.fields(uid, ("phones", "absent")) == [rec.phones, None]  # from the confirmed bytes
            assert prober.fields(b"\0" * 16, ("uuid",)) is None


def test_decide_many_keeps_every_record_it_confirmed_for_fields(store: Service) -> None:
    """The batch loop's answers read the records its probes confirmed without reading them again: after
    decide_many, `fields` of any of its matches comes from the confirmed bytes (seen here through a write the
    Prober is documented not to see), until the next decide(_many)."""
    s = store.store
    view = s.write()  # aborted at the end
    try:
        held = [(uid, view.record(uid)) for _, uid in view.iter_index(Kind.PHONE)][:5]
        args = (view.txn, s.index_dbs, s.records_db, s.hasher.key)
        for prober in (_probe_py.Prober(*args), _probe_c.Prober(*args)):
            decisions = prober.decide_many([(None, [], [rec.phones[0]], False) for _, rec in held if rec], 4)
            assert all(uid in d.uuids for (uid, _), d in zip(held, decisions, strict=True))
            first_uid, first = held[0]
            assert first is not None
            view.txn.delete(first_uid, db=s.records_db)
            assert prober.fields(first_uid, ("uuid",)) == [first.uuid]  # the first decision's record, at hand
            prober.decide(None, [], [], 4, False)
            assert prober.fields(first_uid, ("uuid",)) is None  # a new decide: read again (the write is seen)
            view.txn.put(first_uid, first.encode(), db=s.records_db)
    finally:
        view.txn.abort()


def test_a_compiled_decision_is_not_tracked_by_the_cyclic_collector(store: Service) -> None:
    """A batch makes one Decision per request: it holds tuples of plain values, so the collector never needs to
    walk it (an empty field is the shared empty tuple)."""
    s = store.store
    with s.read() as view:
        uid, rec = next((uid, view.record(uid)) for _, uid in view.iter_index(Kind.PHONE))
        assert rec is not None
        prober = _probe_c.Prober(view.txn, s.index_dbs, s.records_db, s.hasher.key)
        for decision in prober.decide_many([(None, [], [rec.phones[0]], True), (None, [], ["+12025550100"], False)], 4):
            assert not gc.is_tracked(decision)
            assert all(type(getattr(decision, f)) is tuple for f in ("uuids", "conflicts", "fanned", "probes"))
        assert decision.outcome == _probe_py.NOT_FOUND and decision.probes == () and decision.uuids == ()


@settings(max_examples=300, deadline=None)
@given(u=st.uuids(), text=st.text(st.sampled_from("0123456789abcdefABCDEF- {}g"), min_size=30, max_size=40))
def test_uuid_conversions_equal_the_uuid_module(u: uuid.UUID, text: str) -> None:
    """store.uuid_bytes / uuid_text skip building uuid.UUID objects; they must answer exactly as it does."""
    assert uuid_text(u.bytes) == str(u)
    assert uuid_bytes(str(u)) == u.bytes
    assert uuid_bytes(str(u).upper()) == u.bytes
    for bad in (str(u)[:35] + "g", str(u)[:9] + " " + str(u)[10:], str(u)[:9] + "  " + str(u)[11:]):
        with pytest.raises(ValueError):
            uuid.UUID(bad)
        with pytest.raises(ValueError):
            uuid_bytes(bad)
    try:
        want = uuid.UUID(text).bytes
    except ValueError:
        with pytest.raises(ValueError):
            uuid_bytes(text)
    else:
        assert uuid_bytes(text) == want
