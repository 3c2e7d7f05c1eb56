"""`resolver import`: what parsing a JSON line into an UpsertInput costs, per parser, beside json_format.

Rows: examples/demo_customers.jsonl and 1,000 customers from bench/dataset.py (what `make bench-import`
loads). Every round parses every row, so a figure divided by `extra_info["rows"]` is the cost of one row.

- `parse` group: the parser alone.
  - `json-format` (the baseline): json_format.Parse + resolver.api.servicer.upsert_input, the official way.
  - `orjson-parsedict`: orjson.loads, then json_format.ParseDict + upsert_input: the mapping and its checks
    left to protobuf, json_format only for what orjson refuses. A lower bound for any parser of that kind:
    it still lacks the repeated-key check it would need to refuse what json_format refuses.
  - `fast-path`: the importer's (resolver.importer.jsonl.simple_input, which maps orjson's dict to the
    UpsertInput itself, and json_format for the rows it declines).
- `prepare` group: a whole row as a worker prepares it (parse, validate, normalize, encode for the bulk
  path: resolver.importer.prepare.Preparer), with each parser: what parsing is worth per imported row.

Run: `.venv/bin/python -m pytest bench/test_import_parse.py -o testpaths=bench --benchmark-only
--benchmark-columns=min,median,mean,ops,rounds`. Figures: bench/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from google.protobuf import json_format

from bench.conftest import BLUEPRINT, ROOT
from resolver.api.servicer import upsert_input
from resolver.config import load_settings
from resolver.importer.jsonl import JsonParser, simple_input
from resolver.importer.prepare import Defaults, Preparer
from resolver.importer.rows import Prepared
from resolver.upsert import UpsertInput
from resolver.uuids import LoadUuids
from resolver.v1 import resolver_pb2 as pb

CUSTOMERS = 1000
PREPARE_ROWS = 200  # preparing a row costs far more than parsing it: fewer rows keep a round short


def official(line: str) -> UpsertInput:
    return upsert_input(json_format.Parse(line, pb.UpsertRequest()))


def orjson_parsedict(line: str) -> UpsertInput:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return official(line)
    return upsert_input(json_format.ParseDict(obj, pb.UpsertRequest()))


def fast_path(line: str) -> UpsertInput:
    return simple_input(line) or official(line)


PARSERS: dict[str, Callable[[str], UpsertInput]] = {
    "json-format": official, "orjson-parsedict": orjson_parsedict, "fast-path": fast_path,
}


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from bench.dataset import generate

    out = Path(tmp_path_factory.mktemp("parse"))
    generate(out, CUSTOMERS, queries=0, upserts=0)
    text = (ROOT / "examples" / "demo_customers.jsonl").read_text("utf-8") + (out / "customers.jsonl").read_text("utf-8")
    rows = [line for line in text.splitlines() if line.strip()]
    want = [canonical(official(line)) for line in rows]
    for name, parse in PARSERS.items():  # every parser builds exactly what json_format builds
        assert [canonical(parse(line)) for line in rows] == want, name
    return rows


def canonical(inp: UpsertInput) -> str:
    return repr(replace(inp, attributes=dict(sorted(inp.attributes.items()))))


@pytest.mark.benchmark(group="parse")
@pytest.mark.parametrize("parser", list(PARSERS))
def test_parse_json_line(benchmark, lines: list[str], parser: str) -> None:  # noqa: ANN001
    parse = PARSERS[parser]
    benchmark.extra_info["rows"] = len(lines)

    def run() -> None:
        for line in lines:
            parse(line)

    benchmark(run)


@pytest.mark.benchmark(group="prepare")
@pytest.mark.parametrize("parser", list(PARSERS))
def test_prepare_json_row(benchmark, lines: list[str], parser: str) -> None:  # noqa: ANN001
    if parser == "fast-path":
        parse: Callable[[int, str], UpsertInput] = JsonParser()  # the importer's own
    else:
        parse = lambda n, line, p=PARSERS[parser]: p(line)  # noqa: E731
    preparer = Preparer(load_settings(str(BLUEPRINT)), parse, Defaults("", ""), LoadUuids.start())
    rows = lines[:PREPARE_ROWS]
    numbers = list(range(1, len(rows) + 1))
    benchmark.extra_info["rows"] = len(rows)
    outcomes = benchmark(preparer.outcomes, numbers, rows)
    assert all(type(o) is Prepared for o in outcomes)
