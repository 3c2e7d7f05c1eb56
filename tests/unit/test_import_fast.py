"""The import's fast path (resolver/_load_py.py and its compiled twin ext/_load_c.pyx) against each other and against
the general path it short-cuts: for any JSON line, the compiled RowPlanner packs the very bytes its twin packs; a
line either of them packs is one the general path (JsonParser, Preparer: upsert.prepare, bulk.plan) prepares to the
same command and the same writes; the two CreateQueues queue the same writes; and a whole file imports to the same
store, byte for byte, by the compiled fast path, by its twin and with no fast path at all."""

from __future__ import annotations

import json
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from resolver import _load_c, _load_py, bulk, crypto
from resolver.config import Settings, load_settings
from resolver.importer import commit, prepare
from resolver.importer.jsonl import JsonParser, jsonl_row
from resolver.importer.rows import Prepared
from resolver.uuids import LoadUuids, text, uuid7_int
from tests.integration.test_import_bulk import deterministic, dump, run

NOW = 1_800_000_000_123_456
BLUEPRINT = textwrap.dedent("""
    version = 1
    [storage]
    map_size_mb = 256
    [encryption]
    keys = [{ id = "test", key = { env = "RESOLVER_ENCRYPTION_KEY" } }]
    [matching]
    default_region = "US"
    max_fanout = 3
    blocked_values = ["+16502530099", "blocked@example.com"]
    blocked_patterns = ['^test\\+.*@example\\.com$']
    [limits]
    identifiers_per_customer = 3
    [attributes]
    name = { type = "string", max_length = 12 }
    code = { type = "string", min_length = 2, max_length = 4 }
    status = { type = "string", enum = ["Active", "Churned"], owner = "SALESFORCE" }
    language = { type = "string", pattern = "^[a-z]{2}$" }
    score = { type = "number", minimum = 0 }
    count = { type = "integer" }
    vip = { type = "boolean" }
    birth_date = { type = "date", input_formats = ["%m/%d/%Y"], sensitive = true }
    seen = { type = "date-time" }
    """)


class CountingUuids(LoadUuids):
    """An import's uuids without their random bits: the same line gives the same uuid in every run."""

    def for_line(self, line: int) -> str:
        return text(uuid7_int(self.unix_ms, self.seed + line, 0))


@pytest.fixture(scope="module")
def blueprints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Settings]:
    path = tmp_path_factory.mktemp("blueprint") / "blueprint.toml"
    path.write_text(BLUEPRINT)
    return {"declared": load_settings(path, default_region="US"), "open": load_settings(None)}


@pytest.fixture(autouse=True)
def fixed_nonces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sealing takes fixed nonces, so that two paths sealing the same value write the same bytes."""
    monkeypatch.setattr(crypto, "os", types.SimpleNamespace(urandom=lambda n: bytes(n)))


def preparer(blueprint: Settings, region: str = "", source: str = "") -> prepare.Preparer:
    return prepare.Preparer(blueprint, JsonParser(), prepare.Defaults(region, source),
                            CountingUuids(1_700_000_000_000, 77), clock=lambda: NOW)


# -- lines: the shapes a load holds, and everything the fast path must hand on --------------------------------

# (valid ones, then those the general path refuses or treats apart)
PHONES = (["+16502530001", "(650) 253-0002", "650.253.0003", "+44 20 7946 0018", "tel:+1-650-253-0004",
           "sip:+16502530005@carrier.example;user=phone", "0049 30 901820", "٠٦٥٠٢٥٣٠٠٠٦", "anonymous",
           "+16502530099"],
          ["12345", "+1650253000", "", " ", "sip:nobody"])
EMAILS = (["Ann@Example.com", "ann@example.com", " b.c@example.org ", "ü@bücher.example", "x@EXAMPLE.COM",
           "noemail@example.com", "blocked@example.com", "test+1@example.com"],
          ["bad", "a@b", "a..b@example.com", ""])
EXTERNAL_IDS = (["CRM-1", " CRM-2 ", "ü-1", "x" * 255, "a\x7fb"], ["", "   ", "x" * 256, "a\x01b", "A\u2028B"])
KEYS = (["k-1", "import:abc", "ключ", "bench-load-7", "a b"], ["", " ", "a" * 256, "a\x1fb"])
SOURCES = (["", "SALESFORCE", "BILLING", "zendesk"], ["bad source!", "x" * 65])
REGIONS = (["", "US", "gb"], ["XX", "ıt"])
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["Ann", " Ann ", "e\u0301", "Ω", "😀", "a\x7f", "x" * 12]),
    "code": st.sampled_from(["ab", "abcd", " ab "]),
    "status": st.sampled_from(["Active", "Churned"]),
    "language": st.sampled_from(["en", "fr"]),
    "score": st.one_of(st.integers(0, 10**6), st.floats(0, 1e20), st.sampled_from([0.5, 1e16, 2**53])),
    "count": st.one_of(st.integers(-5, 5), st.sampled_from([3.0, 2**53])),
    "vip": st.booleans(),
    "birth_date": st.sampled_from(["1990-01-02", "01/02/1990"]),
    "seen": st.sampled_from(["2023-10-27T14:30:00Z", "2023-10-27T16:30:00+02:00"]),
}
BAD_VALUES = st.one_of(st.sampled_from(["x" * 13, "a", "Gone", "EN", "2023-10-27T14:30:00", "1990-13-01", ""]),
                       st.text(max_size=6), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.sampled_from([-1, 2**53 + 1, 2**63, 1.5]), st.booleans())
NAMES = st.sampled_from([*GOOD_VALUES, "unknown", "bad name", "_x"])


def pick(draw: st.DrawFn, choices: tuple[list[Any], list[Any]], good: bool) -> Any:
    """Mostly a valid value (when `good`), else anything, refused ones and arbitrary text included."""
    if good and draw(st.integers(0, 9)):
        return draw(st.sampled_from(choices[0]))
    return draw(st.one_of(st.sampled_from(choices[0] + choices[1]), st.text(max_size=5)))


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """An UpsertRequest in proto3 JSON: most valid and plain (what a load is made of), the rest anything."""
    good = draw(st.integers(0, 3)) > 0
    ids: dict[str, Any] = {}
    if draw(st.booleans()):
        ids[draw(st.sampled_from(["externalId", "external_id"]))] = pick(draw, EXTERNAL_IDS, good)
    most = 2 if good else 3  # (the blueprint's identifiers_per_customer is 3)
    if draw(st.booleans()):
        ids["emails"] = [pick(draw, EMAILS, good) for _ in range(draw(st.integers(0, most)))]
    if draw(st.integers(0, 3)):
        ids["phones"] = [pick(draw, PHONES, good) for _ in range(draw(st.integers(0, most)))]
    if good and not ids.get("phones") and not ids.get("external_id") and not ids.get("externalId"):
        ids["phones"] = [draw(st.sampled_from(PHONES[0][:8]))]  # something to find the customer by
    request: dict[str, Any] = {"identifiers": ids}
    if draw(st.integers(0, 3)):
        request[draw(st.sampled_from(["idempotencyKey", "idempotency_key"]))] = pick(draw, KEYS, good)
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(list(GOOD_VALUES)) if good else NAMES, max_size=4, unique=True))
        request["attributes"] = {n: draw(GOOD_VALUES[n]) if good and n in GOOD_VALUES and draw(st.integers(0, 5))
                                 else draw(st.one_of(st.none(), BAD_VALUES)) for n in names}
    if draw(st.booleans()):
        request["sourceSystem"] = pick(draw, SOURCES, good)
    if draw(st.booleans()):
        request["defaultRegion"] = pick(draw, REGIONS, good)
    unusual = draw(st.integers(0, 12))
    if unusual == 1:
        request["expectedVersion"] = draw(st.sampled_from([0, 3, "3", -1]))
    elif unusual == 2:
        request["customerUuid"] = draw(st.sampled_from(["", "3f1c6f0e-1d3a-4a53-9a70-0c0a3ea52f00", "nope"]))
    elif unusual == 3:
        request["removeIdentifiers"] = {"emails": ["ann@example.com"]}
    elif unusual == 4:
        request["unknownField"] = 1
    elif unusual == 5:
        request["identifiers"] = None
    return request


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    """A line of a JSON-lines file: a request as json.dumps writes it (with or without escapes), or broken."""
    request = draw(requests())
    line = json.dumps(request, ensure_ascii=draw(st.booleans()))
    damage = draw(st.integers(0, 30))
    if damage == 1:
        line = line.replace('"identifiers": {', '"identifiers": {"emails": [], ', 1)  # a key twice
    elif damage == 2:
        line = line[: len(line) // 2]
    elif damage == 3:
        line = "[" + line + "]"
    elif damage == 4:
        line = "\ufeff" + line
    elif damage == 5:
        line = line + "\r"
    elif damage == 6:
        return line.encode("utf-8")[:-2] + b"\xff}"
    return line.encode("utf-8")


# -- one line: compiled = twin = the general path -------------------------------------------------------------


def packed_by_general_path(p: prepare.Preparer, raw: bytes, number: int) -> tuple[Any, Any]:
    """What the general path makes of the line: (its outcome, its packed create or None)."""
    row = jsonl_row(number, raw)
    if row is None:
        return None, None
    outcome = p.rows([row])[0].outcome
    return outcome, (outcome.planned if type(outcome) is Prepared else None)


def boundary(**fields: Any) -> bytes:
    """A plain line with one phone and `fields`: the edges of what the fast path takes."""
    return json.dumps({"identifiers": {"phones": ["+16502530001"]}, **fields}).encode()


@pytest.mark.parametrize("name", ["declared", "open"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=lines(), number=st.integers(1, 10**6), defaults=st.sampled_from([("", ""), ("GB", "SALESFORCE")]))
@example(raw=boundary(attributes={"score": 2**53, "count": -(2**53)}), number=1, defaults=("", ""))
@example(raw=boundary(attributes={"score": 2**53 + 1}), number=1, defaults=("", ""))
@example(raw=boundary(attributes={"name": "x" * 12, "code": "ab"}), number=1, defaults=("", ""))
@example(raw=boundary(attributes={"name": "x" * 13}), number=1, defaults=("", ""))
@example(raw=boundary(idempotencyKey="k" * 255), number=1, defaults=("", ""))
@example(raw=boundary(idempotencyKey="k" * 256), number=1, defaults=("", ""))
@example(raw=boundary(identifiers={"externalId": "x" * 255}), number=1, defaults=("", ""))
@example(raw=boundary(identifiers={"externalId": " x" * 128}), number=1, defaults=("", ""))
@example(raw=boundary(expectedVersion=0, customerUuid=""), number=1, defaults=("", ""))
@example(raw=boundary(attributes={"birth_date": "01/02/1990", "seen": None}), number=1, defaults=("", ""))
def test_a_line_packs_to_the_general_paths_bytes(blueprints: dict[str, Settings], name: str, raw: bytes,
                                                 number: int, defaults: tuple[str, str]) -> None:
    p = preparer(blueprints[name], *defaults)
    rules = prepare.plan_rules(p)
    compiled = _load_c.RowPlanner(rules).line(raw, number)
    twin = _load_py.RowPlanner(rules).line(raw, number)
    assert compiled == twin
    assert _load_c.RowPlanner(rules).request(raw) == _load_py.RowPlanner(rules).request(raw)
    if twin is None:
        return
    outcome, planned = packed_by_general_path(p, raw, number)
    assert type(outcome) is Prepared and planned is not None, "the fast path packed a row the general path does not"
    fast, general = _load_py.unpack(twin), _load_py.unpack(planned)
    assert fast._replace(raw=b"") == general and fast.raw == raw
    # a packed create's command, rebuilt from its line (when it turns out to need apply), is the general path's
    assert p.command(fast) == bulk.command_from(outcome.blob)
    assert (p.planner.request(raw) is None) == (twin is None)


def test_the_plain_rows_of_a_load_take_the_fast_path(blueprints: dict[str, Settings]) -> None:
    p = preparer(blueprints["declared"])
    rules = prepare.plan_rules(p)
    rows = [{"idempotencyKey": "k-1", "identifiers": {"externalId": "CRM-1", "emails": ["Ann@Example.com"],
                                                      "phones": ["(650) 253-0001", "anonymous"]},
             "attributes": {"name": "Ann", "status": "Active", "vip": True, "birth_date": "01/02/1990"},
             "sourceSystem": "SALESFORCE"},
            {"identifiers": {"phones": ["+44 20 7946 0018"]}, "defaultRegion": "GB"},
            {"identifiers": {"external_id": "CRM-3"}, "attributes": {"score": 2, "count": 3.0, "seen": None}}]
    for number, row in enumerate(rows, 1):
        raw = json.dumps(row, ensure_ascii=False).encode()
        packed = _load_c.RowPlanner(rules).line(raw, number)
        assert packed is not None and packed == _load_py.RowPlanner(rules).line(raw, number)
        entry = _load_py.unpack(packed)
        assert entry.derived == ("idempotencyKey" not in row)
        outcome, planned = packed_by_general_path(p, raw, number)
        assert entry._replace(raw=b"") == _load_py.unpack(planned)
    assert b'"birth_date":{"enc":' in _load_py.unpack(_load_c.RowPlanner(rules).line(
        json.dumps(rows[0]).encode(), 1) or b"").record  # sealed (the fixed nonces make it the same bytes)


# -- the parent: the queue and the filter ---------------------------------------------------------------------


@st.composite
def entries(draw: st.DrawFn) -> list[bytes]:
    """Packed creates whose keys collide now and then (some held by the 'store' already)."""
    pool = [bytes([i]) * 16 for i in range(6)]
    out = []
    for line in range(1, draw(st.integers(1, 25)) + 1):
        keys = [(kind, draw(st.sampled_from(pool))) for kind in draw(st.lists(st.sampled_from([1, 2, 3]), max_size=4))]
        out.append(_load_py.pack(line, draw(st.booleans()), NOW + line, NOW + 10**9, line.to_bytes(16, "big"), keys,
                                 draw(st.sampled_from([b"k1", b"k2", b"k3", b"k%d" % line])), b'{"r":%d}' % line,
                                 b'{"h":1,', b'"t":2}', b'{"e":%d}' % line, b""))
    return out


@settings(max_examples=300, deadline=None)
@given(items=entries(), stored=st.sets(st.sampled_from([bytes([i]) * 16 for i in range(6)] + [b"k1"]), max_size=3),
       every=st.integers(1, 8), fresh=st.booleans())
def test_the_compiled_queue_queues_what_its_twin_queues(items: list[bytes], stored: set[bytes], every: int,
                                                        fresh: bool) -> None:
    names = {1: "ix_external", 2: "ix_email", 3: "ix_phone"}
    dbs = {n: n for n in ("records", "ledger", *names.values())}
    runs = []
    for mod in (_load_c, _load_py):
        got: list[Any] = []
        # an initial load starts on an empty store: what it holds, it claimed itself
        held = set() if fresh else set(stored)
        key_filter = mod.KeyFilter(100) if fresh else None
        queue = mod.CreateQueue(lambda key, default, db, held=held: b"x" if key in held else default, dbs, names,
                                key_filter, lambda: 41)
        for i, entry in enumerate(items):
            got.append(queue.take(entry))
            if i % every == every - 1:
                got.append(queue.drain())
                held.update(k for table in got[-1].tables.values() for k, _ in table)  # written to the store
        got.append(queue.drain())
        runs.append(got)
    assert runs[0] == runs[1]


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.binary(max_size=40), max_size=200), others=st.lists(st.binary(max_size=40), max_size=50))
def test_a_key_filter_never_forgets_a_key(keys: list[bytes], others: list[bytes]) -> None:
    compiled, twin = _load_c.KeyFilter(len(keys)), _load_py.KeyFilter(len(keys))
    for key in keys:
        compiled.add(key)
        twin.add(key)
    assert all(compiled.maybe(k) for k in keys) and all(twin.maybe(k) for k in keys)
    assert all(compiled.maybe(k) for k in others if twin.maybe(k))  # (a "maybe" of the compiled one may be false)


def test_a_key_filter_answers_no_for_nearly_every_key_it_never_saw() -> None:
    f = _load_c.KeyFilter(10_000)
    for i in range(10_000):
        f.add(b"seen-%d" % i)
    assert sum(f.maybe(b"other-%d" % i) for i in range(10_000)) < 200  # ~1% at the size it was made for


# -- a whole file: the same store by every path ---------------------------------------------------------------


class Declines:
    """A RowPlanner that packs nothing: every line takes the general path."""

    def __init__(self, rules: Any) -> None:
        pass

    def block(self, data: bytes, first: int, general: Any) -> list[Any]:
        if data.endswith(b"\n"):
            data = data[:-1]
        found = (general(n, raw) for n, raw in enumerate(data.split(b"\n"), first))
        return [item for item in found if item is not None]


def use(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Import by the compiled fast path, by its pure twin, or by no fast path."""
    impl = _load_py if how == "twin" else _load_c
    monkeypatch.setattr(prepare, "RowPlanner", Declines if how == "general" else impl.RowPlanner)
    monkeypatch.setattr(bulk, "CreateQueue", impl.CreateQueue)
    monkeypatch.setattr(commit, "KeyFilter", impl.KeyFilter)
    monkeypatch.setattr(commit, "entry_derived", impl.entry_derived)


def stores(tmp: Path, monkeypatch: pytest.MonkeyPatch, source: Path, blueprint: Path | None) -> Iterator[Any]:
    """Per path: the store after an initial load of `source`, then a re-import of it (dumped), and the rejects."""
    for how in ("compiled", "twin", "general"):
        with monkeypatch.context() as m:
            use(m, how)
            deterministic(m)
            data = tmp / how
            blueprint_settings = load_settings(blueprint, data_dir=str(data), default_region="US")
            args = ("--batch-size", "7", "--rejects", str(tmp / f"{how}.rejected.jsonl"))
            codes = (run(blueprint_settings, source, *args), run(blueprint_settings, source, *args))
            rejects = tmp / f"{how}.rejected.jsonl"  # written only when a row is refused
            yield codes, dump(blueprint_settings), rejects.read_text() if rejects.exists() else None


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "open"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests_=st.lists(requests(), min_size=5, max_size=30))
@example(requests_=[{"identifiers": {"phones": ["+16502530001"]}}] * 4 + [{"identifiers": {"emails": ["Ann@Example.com"]}}])
def test_a_file_imports_to_the_same_store_by_every_path(tmp_path_factory: pytest.TempPathFactory,
                                                       monkeypatch: pytest.MonkeyPatch, declared: bool,
                                                       requests_: list[dict[str, Any]]) -> None:
    tmp = tmp_path_factory.mktemp("paths")
    blueprint = None
    if declared:
        blueprint = tmp / "blueprint.toml"
        blueprint.write_text(BLUEPRINT)
    # repeats: the same content again (a derived key's second occurrence), an external_id and an email again
    rows = requests_ + requests_[:3] + [{"identifiers": {"externalId": "CRM-1", "emails": ["ann@example.com"]},
                                         "attributes": {"name": "again"}}] * 2
    source = tmp / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = list(stores(tmp, monkeypatch, source, blueprint))
    assert results[0] == results[1] == results[2]

