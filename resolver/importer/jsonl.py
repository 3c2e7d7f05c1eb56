"""Reading JSON lines (proto3 JSON UpsertRequest, one per line) and parsing a line into an UpsertInput.

The file travels in blocks of whole lines (`read_blocks`): a worker process reads, splits and parses a block
itself (resolver.importer.blockworkers, resolver.importer.prepare.Preparer.items), so the parent never touches a
line. `JsonParser` builds the UpsertInput exactly as json_format.Parse +
resolver.api.servicer.upsert_input would; `simple_input` is its fast path for the plain rows a load nearly
always holds (bench/README.md, "Import: parsing JSON lines", has the measurements that keep it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

import orjson
from google.protobuf import json_format

from resolver.api.servicer import upsert_input
from resolver.identifiers import RawIdentifiers
from resolver.importer.rows import Row, RowProblem, reason
from resolver.upsert import UpsertInput
from resolver.v1 import resolver_pb2 as pb

BLOCK_BYTES = 1 << 18  # JSON lines handed to a worker at a time: whole lines, about this many bytes


class Block(NamedTuple):
    """Whole lines of a JSON-lines file, as bytes, and the number of the first of them."""

    first: int
    data: bytes


def read_blocks(f: BinaryIO, size: int = BLOCK_BYTES) -> Iterator[Block]:
    """The lines of a binary file in blocks of whole lines, about `size` bytes at a time (read as raw bytes: the
    parent never makes an object per line)."""
    number = 1
    rest = b""
    while chunk := f.read(size):
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n") + 1
        if not cut:  # no line ends in it yet: read on
            rest = data
            continue
        block, rest = data[:cut], data[cut:]
        yield Block(number, block)
        number += block.count(b"\n")
    if rest:
        yield Block(number, rest)


def jsonl_row(number: int, data: bytes) -> Row | None:
    """Line `number` of a JSON-lines file as a row (payload: the line as text; a line that is not UTF-8 is
    refused), None for a blank line."""
    try:
        line = data.decode("utf-8")
    except UnicodeDecodeError:
        original = data.decode("utf-8", "replace").rstrip("\r\n")
        return Row(number, original, None, [reason("", "the line is not UTF-8", "INVALID_ENCODING")])
    if number == 1:
        line = line.removeprefix("\ufeff")
    if line.isspace() or not line:
        return None
    line = line.rstrip("\r\n")
    return Row(number, line, line)


class JsonParser:
    """A JSON line -> UpsertInput, as json_format.Parse + resolver.api.servicer.upsert_input build it (the
    command-line defaults and a missing key are the Preparer's: resolver.importer.prepare); raises RowProblem
    for a line that is no UpsertRequest (with json_format's wording)."""

    def __call__(self, line_number: int, line: str) -> UpsertInput:
        inp = simple_input(line)
        if inp is None:
            try:
                inp = upsert_input(json_format.Parse(line, pb.UpsertRequest()))
            except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
                raise RowProblem([reason("", f"not an UpsertRequest in proto3 JSON: {exc}", "INVALID_JSON")]) from None
        return inp


# The fast path: orjson and a direct mapping for the plain shapes rows nearly always have. It builds the
# UpsertInput json_format.Parse + upsert_input would build; anything else (other spellings of numbers,
# nulls, nested attribute values, \u escapes, unknown or repeated fields) returns None and takes the
# official way, which also words the error.
REQUEST_FIELDS = {f.json_name: f.name for f in pb.UpsertRequest.DESCRIPTOR.fields} | {
    f.name: f.name for f in pb.UpsertRequest.DESCRIPTOR.fields
}
IDENTIFIER_FIELDS = {"externalId": "external_id", "external_id": "external_id", "emails": "emails", "phones": "phones"}
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


def simple_input(line: str) -> UpsertInput | None:
    """The UpsertInput of a plain JSON line, exactly as the official parser would build it; None: not plain.

    A key written twice in one object is refused by json_format, while orjson keeps the last one. In a line
    without backslashes every '"' opens or closes a string, so the line holds twice as many quotes as strings;
    the strings of the objects decoded here (keys, text values, list items) are counted, and one fewer than the
    quotes say means a repeated key was dropped: the official parser then decides.
    """
    if "\\" in line:
        # escapes: a key could be spelled two ways, which counting quotes cannot see; the standard parser counts keys
        if "\\u" in line:
            return None
        try:
            obj = json.loads(line, object_pairs_hook=_no_repeats)
        except (_Unusual, ValueError, RecursionError):
            return None
        quotes = -1  # repeats already refused
    else:
        try:
            obj = orjson.loads(line)
        except (orjson.JSONDecodeError, RecursionError):
            return None
        quotes = line.count('"')
    if type(obj) is not dict:
        return None
    strings = len(obj)
    fields: dict[str, Any] = {}
    for name, value in obj.items():
        field = REQUEST_FIELDS.get(name)
        if field is None or field in fields or value is None:
            return None
        if field in _TEXT_FIELDS:
            if type(value) is not str:
                return None
            strings += 1
        elif field == "expected_version":
            if type(value) is not int or not 0 <= value <= _MAX_UINT64:
                return None
        elif field == "attributes":
            counted = simple_attributes(value)
            if counted is None:
                return None
            value, n = counted
            strings += n
        elif field in ("identifiers", "remove_identifiers"):
            found = _simple_identifiers(value)
            if found is None:
                return None
            value, n = found
            strings += n
        else:
            return None  # a field this fast path does not know
        fields[field] = value
    if quotes >= 0 and quotes != 2 * strings:
        return None  # a repeated key: orjson kept its last value, json_format refuses it
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


def _simple_identifiers(value: Any) -> tuple[RawIdentifiers, int] | None:
    """The identifiers of a plain object, and the strings it holds (keys and values)."""
    if type(value) is not dict:
        return None
    external_id = ""
    strings = len(value)
    lists: dict[str, tuple[str, ...]] = {}
    for name, item in value.items():
        field = IDENTIFIER_FIELDS.get(name)
        if field is None or field in lists or item is None:
            return None
        if field == "external_id":
            if type(item) is not str:
                return None
            external_id = item
            lists[field] = ()
            strings += 1
        elif type(item) is list and all(type(v) is str for v in item):
            lists[field] = tuple(item)
            strings += len(item)
        else:
            return None
    return RawIdentifiers(external_id, lists.get("emails", ()), lists.get("phones", ())), strings


def simple_attributes(value: Any) -> tuple[dict[str, Any], int] | None:
    """A Struct's values as MessageToDict gives them back (every number a float: Struct holds doubles), and the
    strings the object holds (keys and text values)."""
    if type(value) is not dict:
        return None
    out: dict[str, Any] = {}
    strings = len(value)
    for name, item in value.items():
        kind = type(item)
        if kind is str:
            out[name] = item
            strings += 1
        elif kind is bool or item is None:
            out[name] = item
        elif kind is int and -_MAX_EXACT_INT <= item <= _MAX_EXACT_INT:
            out[name] = float(item)
        elif kind is float and math.isfinite(item):
            out[name] = item
        else:
            return None  # lists, objects, huge or non-finite numbers
    return out, strings
