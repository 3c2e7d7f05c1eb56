"""Reading JSON lines (proto3 JSON UpsertRequest, one per line) and parsing a line into an UpsertInput.

The file travels in blocks of whole lines (`read_blocks`): a worker process splits and parses a block itself,
so the parent never touches a line. `JsonParser` builds the UpsertInput exactly as json_format.Parse +
resolver.api.servicer.upsert_input would; `simple_input` is its fast path for the plain rows a load nearly
always holds (bench/README.md, "Import: parsing JSON lines", has the measurements that keep it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, NamedTuple

import orjson
from google.protobuf import json_format

from resolver.api.servicer import upsert_input
from resolver.identifiers import RawIdentifiers
from resolver.importer.prepare import KeyMaker
from resolver.importer.rows import Row, RowProblem, reason
from resolver.upsert import UpsertInput
from resolver.v1 import resolver_pb2 as pb

BLOCK_BYTES = 1 << 18  # JSON lines handed to a worker at a time: whole lines, about this many bytes


class Block(NamedTuple):
    """Whole lines of a JSON-lines file, as bytes, and the number of the first of them."""

    first: int
    data: bytes


def read_blocks(f: BinaryIO, size: int = BLOCK_BYTES) -> Iterator[Block]:
    """The lines of a binary file in blocks of whole lines, about `size` bytes at a time."""
    number = 1
    while lines := f.readlines(size):
        yield Block(number, b"".join(lines))
        number += len(lines)


def block_rows(block: Block) -> list[Row]:
    """The non-blank lines of a block, as rows."""
    data = block.data
    if data.endswith(b"\n"):
        data = data[:-1]
    return list(read_jsonl(data.split(b"\n"), block.first))


def read_jsonl(raw: Iterable[bytes], first: int = 1) -> Iterator[Row]:
    """The non-blank lines of a JSON-lines file as rows (payload: the line as text); a line that is not
    UTF-8 is refused."""
    for number, data in enumerate(raw, first):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            original = data.decode("utf-8", "replace").rstrip("\r\n")
            yield Row(number, original, None, [reason("", "the line is not UTF-8", "INVALID_ENCODING")])
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")
        if line.isspace() or not line:
            continue
        line = line.rstrip("\r\n")
        yield Row(number, line, line)


class JsonParser:
    """A JSON line -> UpsertInput, as json_format.Parse + resolver.api.servicer.upsert_input build it, with
    the command-line defaults and an idempotency key filled in; raises RowProblem for a line that is no
    UpsertRequest (with json_format's wording)."""

    def __init__(self, keys: KeyMaker) -> None:
        self.keys = keys

    def __call__(self, line_number: int, line: str) -> UpsertInput:
        inp = simple_input(line)
        if inp is None:
            try:
                inp = upsert_input(json_format.Parse(line, pb.UpsertRequest()))
            except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
                raise RowProblem([reason("", f"not an UpsertRequest in proto3 JSON: {exc}", "INVALID_JSON")]) from None
        return self.keys.complete(inp, line_number)


# The fast path: orjson and a direct mapping for the plain shapes rows nearly always have. It builds the
# UpsertInput json_format.Parse + upsert_input would build; anything else (other spellings of numbers,
# nulls, nested attribute values, \u escapes, unknown or repeated fields) returns None and takes the
# official way, which also words the error.
_REQUEST_FIELDS = {f.json_name: f.name for f in pb.UpsertRequest.DESCRIPTOR.fields} | {
    f.name: f.name for f in pb.UpsertRequest.DESCRIPTOR.fields
}
_IDENTIFIER_FIELDS = {"externalId": "external_id", "external_id": "external_id", "emails": "emails", "phones": "phones"}
_TEXT_FIELDS = frozenset({"idempotency_key", "customer_uuid", "source_system", "default_region"})
_MAX_EXACT_INT = 2**53
_MAX_UINT64 = 2**64 - 1
_NO_IDS = RawIdentifiers()


class _Unusual(Exception):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Unusual  # json_format refuses a repeated key; let it say so
    return d


def _once(line: str, obj: dict[str, Any]) -> bool:
    """Whether each key of `obj` is written exactly once in `line` (a line without backslashes): then no key
    is repeated in that object. orjson keeps the last of repeated keys; json_format refuses them."""
    return not line or all(line.count(f'"{k}"') == 1 for k in obj)


def simple_input(line: str) -> UpsertInput | None:
    """The UpsertInput of a plain JSON line, exactly as the official parser would build it; None: not plain."""
    if "\\" in line:
        # escapes: a key could be spelled two ways, which _once cannot see; the standard parser counts keys
        if "\\u" in line:
            return None
        try:
            obj = json.loads(line, object_pairs_hook=_no_repeats)
        except (_Unusual, ValueError, RecursionError):
            return None
        line = ""  # repeats already refused: _once(line, ...) below is always true
    else:
        try:
            obj = orjson.loads(line)
        except (orjson.JSONDecodeError, RecursionError):
            return None
    if type(obj) is not dict or not _once(line, obj):
        return None
    fields: dict[str, Any] = {}
    for name, value in obj.items():
        field = _REQUEST_FIELDS.get(name)
        if field is None or field in fields or value is None:
            return None
        if field in _TEXT_FIELDS:
            if type(value) is not str:
                return None
        elif field == "expected_version":
            if type(value) is not int or not 0 <= value <= _MAX_UINT64:
                return None
        elif field == "attributes":
            value = _simple_attributes(value, line)
        elif field in ("identifiers", "remove_identifiers"):
            value = _simple_identifiers(value, line)
        else:
            return None  # a field this fast path does not know
        if value is None:
            return None
        fields[field] = value
    return UpsertInput(
        idempotency_key=fields.get("idempotency_key", ""),
        identifiers=fields.get("identifiers", _NO_IDS),
        attributes=fields.get("attributes", {}),
        customer_uuid=fields.get("customer_uuid", ""),
        source_system=fields.get("source_system", ""),
        expected_version=fields.get("expected_version", 0),
        remove_identifiers=fields.get("remove_identifiers", _NO_IDS),
        default_region=fields.get("default_region", ""),
    )


def _simple_identifiers(value: Any, line: str) -> RawIdentifiers | None:
    if type(value) is not dict or not _once(line, value):
        return None
    external_id = ""
    lists: dict[str, tuple[str, ...]] = {}
    for name, item in value.items():
        field = _IDENTIFIER_FIELDS.get(name)
        if field is None or field in lists or item is None:
            return None
        if field == "external_id":
            if type(item) is not str:
                return None
            external_id = item
            lists[field] = ()
        elif type(item) is list and all(type(v) is str for v in item):
            lists[field] = tuple(item)
        else:
            return None
    return RawIdentifiers(external_id, lists.get("emails", ()), lists.get("phones", ()))


def _simple_attributes(value: Any, line: str) -> dict[str, Any] | None:
    """A Struct's values as MessageToDict gives them back: every number a float (Struct holds doubles)."""
    if type(value) is not dict or not _once(line, value):
        return None
    out: dict[str, Any] = {}
    for name, item in value.items():
        kind = type(item)
        if kind is str or kind is bool or item is None:
            out[name] = item
        elif kind is int and -_MAX_EXACT_INT <= item <= _MAX_EXACT_INT:
            out[name] = float(item)
        elif kind is float and math.isfinite(item):
            out[name] = item
        else:
            return None  # lists, objects, huge or non-finite numbers
    return out
