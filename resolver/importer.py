"""`resolver import FILE`: bulk-load customers from JSON lines (UpsertRequest, proto3 JSON) or CSV.

Each row is an Upsert, validated exactly as the API validates it (`resolver.upsert.prepare`). Accepted rows
are applied in batches: one durable write transaction per batch, each row in a nested transaction, so a row
that cannot be applied (NOT_FOUND, ALREADY_EXISTS, ...) is rolled back alone and the rest of its batch
commits. Rejected rows go to a rejects file with their reasons and their original text, to fix and re-import.

Validation and normalization need no stored state (contract §10), so on a large file they run in worker
processes, forked before the store is opened, while this process applies the prepared commands in file order.
JSON lines travel to the workers as raw blocks of the file; what comes back is compact (resolver.bulk). A row
that is a plain create (nothing in the store or earlier in its batch holds its key or identifiers) is written
from bytes the worker encoded, without a nested transaction; every other row goes through
`resolver.upsert.apply` (resolver.bulk says why both write the same bytes).

A row without an idempotency_key gets one derived from the file's digest, the row's line number and the
row's content (with the command-line defaults applied). So re-running the same file, after a crash or by
mistake, replays every committed row and creates nothing twice; and two rows that happen to be equal (a
value set, changed, then set back) are still two writes, never a replay of the first.

Exit codes: 0 every row was applied, 1 some were rejected, 2 the file, its header or an option is unusable.
"""

from __future__ import annotations

import argparse
import base64
import csv
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path
from typing import Any, TextIO

import lmdb
import orjson
from google.protobuf import json_format
from tqdm import tqdm

from resolver._hotpath import KeyHasher
from resolver.api.servicer import upsert_input
from resolver.api.status import to_status
from resolver.attributes import AttributeSchema
from resolver.bulk import BulkWriter, Planned, command_blob, command_from, plan
from resolver.config import Settings
from resolver.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdempotencyKeyReused,
    IdentifierError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ResolverError,
    VersionMismatch,
)
from resolver.identifiers import RawIdentifiers, policy_from
from resolver.normalize import check_region
from resolver.service import Service, now_us
from resolver.store import View, uuid_text
from resolver.upsert import UpsertCommand, UpsertInput, UpsertResult, apply, prepare
from resolver.v1 import resolver_pb2 as pb
from resolver.writer import apply_nested

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
KEY_PREFIX = "import:"
CHUNK_ROWS = 500  # CSV rows handed to a worker at a time
BLOCK_BYTES = 1 << 18  # JSON lines handed to a worker at a time: whole lines, about this many bytes
POOL_MIN_ROWS = 5000  # below this, forking workers costs more than it saves
MAX_WORKERS = 8

Original = str | dict[str, str]  # a JSON line as read, or a CSV row as {column: cell}
Payload = str | list[str]  # what a parser turns into an UpsertInput: the line, or the CSV cells
Reason = dict[str, str]
Prepared = tuple[bytes, Planned | None]  # resolver.bulk: the command's blob, its writes as a plain create
Outcome = Prepared | list[Reason]  # a prepared command, or why the row is refused
Row = tuple[int, Original, Outcome]  # line number, the original, the outcome


class FileProblem(Exception):
    """The input cannot be read as the format says (bad header, not UTF-8, ...): exit 2."""


class RowProblem(Exception):
    """A row that is no Upsert at all (not JSON, wrong shape): rejected with these reasons."""

    def __init__(self, reasons: list[Reason]) -> None:
        super().__init__(reasons[0]["description"])
        self.reasons = reasons


@dataclass(slots=True)
class Raw:
    """One row as read: its (first) line number, the original, and the payload to parse (None: refused)."""

    line: int
    original: Original
    payload: Payload | None
    reasons: list[Reason] | None = None


@dataclass(slots=True)
class Tally:
    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    replayed: int = 0
    rejected: int = 0


def run_import(settings: Settings, args: argparse.Namespace) -> int:
    """Import args.file into the store of `settings`; print a summary line; exit code 0, 1 or 2."""
    path = Path(args.file)
    fmt = args.format or FORMATS.get(path.suffix.lower())
    if fmt is None:
        return _fail(f"{path}: cannot tell the format from the name; give --format jsonl or --format csv")
    if args.batch_size < 1:
        return _fail("--batch-size must be at least 1")
    try:
        region = check_region(args.default_region) or ""
    except IdentifierError as exc:
        return _fail(f"--default-region {args.default_region!r}: {exc.message}")
    if not path.is_file():
        return _fail(f"{path}: no such file")
    rejects = Path(args.rejects) if args.rejects else path.with_name(path.name + ".rejected.jsonl")
    if rejects.resolve() == path.resolve():
        return _fail(f"{rejects}: the rejects file cannot be the input file")
    if not rejects.parent.is_dir():
        return _fail(f"{rejects}: no such directory for the rejects file")

    started = time.monotonic()
    lines, digest = _scan(path)
    keys = KeyMaker(digest, region, args.source_system)
    with ExitStack() as stack:
        raws: Iterator[Raw] | Iterator[tuple[int, bytes]]
        parse: Callable[[int, Any], UpsertInput]
        if fmt == "csv":
            # surrogateescape: a row with bytes that are not UTF-8 is refused alone, not the whole file
            text = stack.enter_context(open(path, encoding="utf-8-sig", errors="surrogateescape", newline=""))
            try:
                reader = CsvReader(text, settings, keys)
            except FileProblem as exc:
                return _fail(f"{path}: {exc}")
            raws, parse, header_lines = reader.rows(), reader.parse, 1
        else:
            raws, parse, header_lines = read_blocks(stack.enter_context(open(path, "rb"))), JsonParser(keys), 0
        preparer = Preparer(settings, parse)
        # Fork the workers first: an LMDB environment must never cross a fork.
        pool, workers = _start_pool(preparer, lines)
        if pool is not None:
            stack.callback(pool.join)
            stack.callback(pool.terminate)  # every result is in (or no longer wanted) by the time this runs
        service = Service(settings)
        stack.callback(service.close)
        importer = Importer(service, preparer, pool, workers, rejects, batch_size=args.batch_size,
                            progress=not args.no_progress)
        return importer.run(raws, total=lines - header_lines, skip=header_lines, name=path, started=started)
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow exceptions


def _fail(message: str) -> int:
    print(f"resolver import: {message}", file=sys.stderr)
    return 2


def _scan(path: Path) -> tuple[int, bytes]:
    """(lines in the file, its SHA-256) in one sequential read: the progress total and the key salt."""
    lines = 0
    last = b"\n"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            digest.update(chunk)
            last = chunk[-1:]
    return lines + (last != b"\n"), digest.digest()


class KeyMaker:
    """Fills in what a row leaves empty: the command-line region and source system, and an idempotency key.

    The key hashes the file's digest, the row's line number and the row's content with those defaults;
    31 characters (`ledger.check_key` reads every one of them).
    """

    def __init__(self, digest: bytes, region: str, source: str) -> None:
        self._salt = hashlib.sha256(b"resolver-import\0" + digest)
        self.region = region
        self.source = source

    def complete(self, inp: UpsertInput, line: int) -> UpsertInput:
        region = inp.default_region or self.region
        source = inp.source_system or self.source
        key = inp.idempotency_key
        if key and region == inp.default_region and source == inp.source_system:
            return inp
        ids, rm = inp.identifiers, inp.remove_identifiers
        if not key:
            h = self._salt.copy()
            h.update(b"%d\0" % line)
            # repr, a few times cheaper than canonical JSON; attributes sorted (a Struct's order is not defined)
            attributes = sorted(inp.attributes.items())
            h.update(repr((inp.customer_uuid, ids, attributes, source, inp.expected_version, rm, region)).encode())
            key = KEY_PREFIX + base64.urlsafe_b64encode(h.digest()[:18]).decode("ascii")
        return UpsertInput(idempotency_key=key, identifiers=ids, attributes=inp.attributes,
                           customer_uuid=inp.customer_uuid, source_system=source,
                           expected_version=inp.expected_version, remove_identifiers=rm, default_region=region)


def _reason(field: str, description: str, reason: str, code: str = "INVALID_ARGUMENT") -> Reason:
    return {"field": field, "description": description, "reason": reason, "code": code}


# -- JSON lines ------------------------------------------------------------------------------------------


def read_blocks(f: Any, size: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of its first line, whole lines) of a binary file, about `size` bytes at a time."""
    number = 1
    while lines := f.readlines(size):
        yield number, b"".join(lines)
        number += len(lines)


def jsonl_block(first: int, block: bytes) -> Iterator[Raw]:
    """The non-blank lines of a block of a JSON-lines file (its first line numbered `first`), as text."""
    if block.endswith(b"\n"):
        block = block[:-1]
    return read_jsonl(block.split(b"\n"), first)


def read_jsonl(raw: Iterable[bytes], first: int = 1) -> Iterator[Raw]:
    """The non-blank lines of a JSON-lines file, as text."""
    for number, data in enumerate(raw, first):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            original = data.decode("utf-8", "replace").rstrip("\r\n")
            yield Raw(number, original, None, [_reason("", "the line is not UTF-8", "INVALID_ENCODING")])
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")
        if line.isspace() or not line:
            continue
        line = line.rstrip("\r\n")
        yield Raw(number, line, line)


class JsonParser:
    """A JSON line -> UpsertInput, as json_format.Parse + resolver.api.servicer.upsert_input build it."""

    def __init__(self, keys: KeyMaker) -> None:
        self.keys = keys

    def __call__(self, line_number: int, line: str) -> UpsertInput:
        inp = simple_input(line)
        if inp is None:
            try:
                inp = upsert_input(json_format.Parse(line, pb.UpsertRequest()))
            except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
                raise RowProblem([_reason("", f"not an UpsertRequest in proto3 JSON: {exc}", "INVALID_JSON")]) from None
        return self.keys.complete(inp, line_number)


# The fast path: json.loads and a direct mapping for the plain shapes rows nearly always have (a third of
# the cost of json_format). It builds the UpsertInput json_format.Parse + upsert_input would build; anything
# else (other spellings of numbers, nulls, nested attribute values, \u escapes, unknown or repeated fields)
# returns None and takes the official way, which also words the error.
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


# -- CSV -------------------------------------------------------------------------------------------------

_IDENTIFIER_COLUMNS = {"external_id": "external_id", "email": "emails", "emails": "emails", "phone": "phones", "phones": "phones"}
_MULTI = re.compile(r"[;|]")
_URI = re.compile(r"\s*(tel|sips?):", re.IGNORECASE | re.ASCII)
_URI_PARAM = re.compile(r"\s*[A-Za-z][A-Za-z0-9-]*(=.*)?", re.ASCII | re.DOTALL)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def split_values(cell: str) -> list[str]:
    """Several emails in one cell, separated by ';' or '|'."""
    return [v.strip() for v in _MULTI.split(cell) if v.strip()]


def split_phones(cell: str) -> list[str]:
    """Several phones in one cell, separated by ';' or '|' — except a tel:/sip: URI's own ';' parameters
    (``sip:+15550199888@carrier.example;user=phone``), which stay with their URI."""
    out: list[str] = []
    for piece in cell.split("|"):
        current: str | None = None
        for part in piece.split(";"):
            if current is not None and _URI.match(current) and _URI_PARAM.fullmatch(part):
                current += ";" + part
                continue
            if current is not None and current.strip():
                out.append(current.strip())
            current = part
        if current is not None and current.strip():
            out.append(current.strip())
    return out


def _as_integer(cell: str) -> Any:
    text = cell.strip()
    return int(text) if _INTEGER.fullmatch(text) else cell  # text: the schema then says what is wrong


def _as_number(cell: str) -> Any:
    text = cell.strip()
    if _INTEGER.fullmatch(text):
        return int(text)  # exact, however long
    return float(text) if _NUMBER.fullmatch(text) else cell


def _as_boolean(cell: str) -> Any:
    return _BOOLEANS.get(cell.strip().lower(), cell)


def _as_text(cell: str) -> Any:
    return cell


_COERCE: dict[str, Callable[[str], Any]] = {"integer": _as_integer, "number": _as_number, "boolean": _as_boolean}


class CsvReader:
    """A CSV file with a header: external_id, email(s), phone(s) columns; every other column is an attribute,
    its cells coerced to the blueprint's declared type (kept as text in an open schema)."""

    def __init__(self, text: Iterable[str], settings: Settings, keys: KeyMaker) -> None:
        self.reader = csv.reader(text)
        self.keys = keys
        try:
            header = next(self.reader)
        except StopIteration:
            raise FileProblem("empty file: a CSV header is required") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise FileProblem(f"cannot read the CSV header: {exc}") from None
        self.header = [h.strip() for h in header]
        self.columns: list[tuple[str, str, Callable[[str], Any]]] = []  # (role, attribute name, coercion)
        problems = []
        seen: set[str] = set()
        for i, name in enumerate(self.header, 1):
            role = _IDENTIFIER_COLUMNS.get(name.lower(), "attribute")
            unique = name.lower() if role != "attribute" else name
            if not name:
                problems.append(f"column {i} has no name")
            elif unique in seen:
                problems.append(f"column {name!r} appears twice")
            seen.add(unique)
            spec = settings.attributes.get(name)
            self.columns.append((role, name, _COERCE.get(spec.type, _as_text) if spec else _as_text))
        if not any(role != "attribute" for role, _, _ in self.columns):
            problems.append("no identifier column (external_id, email, emails, phone or phones)")
        attributes = [name for role, name, _ in self.columns if role == "attribute" and name]
        _, bad = AttributeSchema(settings).normalize(dict.fromkeys(attributes))
        problems += [f"column {v.field.removeprefix('attributes.')!r}: {v.description}" for v in bad]
        if problems:
            raise FileProblem("bad CSV header: " + "; ".join(problems))

    def rows(self) -> Iterator[Raw]:
        """The data rows (blank ones skipped); a row with more or fewer cells than the header is refused."""
        reader = self.reader
        width = len(self.header)
        start = reader.line_num + 1
        try:
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not any(c and not c.isspace() for c in cells):
                    continue
                original = dict(zip(self.header, cells, strict=False))
                if not _is_utf8(cells):
                    cells = [c.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for c in cells]
                    original = dict(zip(self.header, cells, strict=False))
                    yield Raw(line, original, None, [_reason("", "the row is not UTF-8", "INVALID_ENCODING")])
                    continue
                if len(cells) != width:
                    original |= {f"(extra {i})": c for i, c in enumerate(cells[width:], 1)}
                    reason = _reason("", f"the row has {len(cells)} cells, the header has {width}", "BAD_ROW_SHAPE")
                    yield Raw(line, original, None, [reason])
                    continue
                yield Raw(line, original, cells)
        except csv.Error as exc:
            raise FileProblem(f"line {reader.line_num}: cannot read the CSV: {exc}") from None

    def parse(self, line: int, cells: list[str]) -> UpsertInput:
        external_id = ""
        emails: list[str] = []
        phones: list[str] = []
        attributes: dict[str, Any] = {}
        for (role, name, coerce), cell in zip(self.columns, cells, strict=True):
            if not cell or cell.isspace():
                continue  # an empty cell: absent
            if role == "phones":
                phones += split_phones(cell)
            elif role == "emails":
                emails += split_values(cell)
            elif role == "external_id":
                external_id = cell
            else:
                attributes[name] = coerce(cell)
        ids = RawIdentifiers(external_id, tuple(emails), tuple(phones))
        return self.keys.complete(UpsertInput(idempotency_key="", identifiers=ids, attributes=attributes), line)


def _is_utf8(cells: list[str]) -> bool:
    try:
        "".join(cells).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: an undecodable byte, escaped
        return False
    return True


# -- preparing -------------------------------------------------------------------------------------------


def reasons_for(exc: ResolverError) -> list[Reason]:
    """Why a row was refused, one entry per bad field where the error names fields."""
    code = to_status(exc).code.name
    if isinstance(exc, InvalidInput):
        return [_reason(v.field, v.description, v.reason, code) for v in exc.violations]
    if isinstance(exc, PermissionDenied):
        return [_reason(f"attributes.{f}", exc.message, exc.reason, code) for f in exc.fields]
    field = ""
    if isinstance(exc, NotFound):
        field = "customer_uuid"
    elif isinstance(exc, AlreadyExists) or exc.reason == "EXTERNAL_ID_CHANGE":
        field = "identifiers.external_id"
    elif isinstance(exc, FailedPrecondition):
        field = "identifiers.emails"
    elif isinstance(exc, VersionMismatch):
        field = "expected_version"
    elif isinstance(exc, IdempotencyKeyReused):
        field = "idempotency_key"
    return [_reason(field, exc.message, exc.reason, code)]


class Preparer:
    """Payload -> UpsertInput -> validated UpsertCommand (or the reasons it is refused). No store access, so
    it runs the same here or in a worker process."""

    def __init__(self, settings: Settings, parse: Callable[[int, Any], UpsertInput]) -> None:
        self.settings = settings
        self.parse = parse
        self.schema = AttributeSchema(settings)
        self.policy = policy_from(settings)
        self.hasher = KeyHasher(settings.hash_algorithm, settings.hash_secret)
        self.new_uuid: Callable[[], str] = new_uuids().__next__

    def __call__(self, items: list[tuple[int, Payload]]) -> list[Outcome]:
        settings, schema, policy, parse, hasher = self.settings, self.schema, self.policy, self.parse, self.hasher
        out: list[Outcome] = []
        for line, payload in items:
            try:
                cmd = prepare(parse(line, payload), settings, schema, policy, now_us=now_us(), new_uuid=self.new_uuid())
            except RowProblem as exc:
                out.append(exc.reasons)
            except ResolverError as exc:
                out.append(reasons_for(exc))
            else:
                out.append((command_blob(cmd), plan(cmd, hasher)))
        return out

    def block(self, first: int, data: bytes) -> list[Row]:
        """Every non-blank row of a block of JSON lines with its outcome."""
        raws = list(jsonl_block(first, data))
        outcomes = iter(self([(r.line, r.payload) for r in raws if r.payload is not None]))
        return [(r.line, r.original, r.reasons or [] if r.payload is None else next(outcomes)) for r in raws]


def new_uuids(batch: int = 1024) -> Iterator[str]:
    """Random (version 4) uuids in canonical text, as str(uuid.uuid4()) makes them, at a fraction of its cost
    (one urandom call per `batch`, no UUID objects)."""
    while True:
        pool = bytearray(os.urandom(16 * batch))
        for i in range(0, 16 * batch, 16):
            pool[i + 6] = (pool[i + 6] & 0x0F) | 0x40  # version 4
            pool[i + 8] = (pool[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
            yield uuid_text(pool[i:i + 16])


_worker_preparer: Preparer | None = None


def _worker_init(preparer: Preparer) -> None:
    global _worker_preparer
    _worker_preparer = preparer
    preparer.new_uuid = new_uuids().__next__  # never share a random stream across a fork
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends the pool


def _worker_prepare(items: list[tuple[int, Payload]]) -> list[Outcome]:
    assert _worker_preparer is not None
    return _worker_preparer(items)


def _worker_block(first: int, data: bytes) -> list[Row]:
    assert _worker_preparer is not None
    return _worker_preparer.block(first, data)


def _start_pool(preparer: Preparer, lines: int) -> tuple[Pool | None, int]:
    """Worker processes for a large file on a machine with several CPUs, and how many (None, 0: prepare here)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < 2 or lines < POOL_MIN_ROWS:
        return None, 0
    workers = min(cpus, MAX_WORKERS)
    # fork: the preparer (parser, compiled schema) is inherited, not pickled; nothing here holds LMDB yet
    return multiprocessing.get_context("fork").Pool(workers, _worker_init, (preparer,)), workers


# -- applying --------------------------------------------------------------------------------------------


class Importer:
    """Prepares rows (here or in the pool), applies the accepted ones in batches, writes the refused ones."""

    def __init__(self, service: Service, preparer: Preparer, pool: Pool | None, workers: int, rejects: Path, *,
                 batch_size: int = 2000, progress: bool = True) -> None:
        self.store = service.store
        self.settings = service.settings
        self.preparer = preparer
        self.pool = pool
        self.window = 3 * workers  # chunks in flight
        self.rejects_path = rejects
        self.batch_size = batch_size
        self.progress = progress
        self.tally = Tally()
        self._rejects: TextIO | None = None
        self._done_line = 0  # every row up to this line is committed or in the rejects file

    def run(self, raws: Iterator[Raw] | Iterator[tuple[int, bytes]], *, total: int, skip: int, name: Path, started: float) -> int:
        """Import every row; print the summary; 0 (all applied), 1 (some refused) or 2 (stopped early).

        `total` rows are expected (the progress bar's end); `skip` lines precede the first (a CSV header).
        """
        bar = tqdm(total=total, unit="rows", desc=f"import {name.name}", file=sys.stderr,
                   disable=True if not self.progress else None, mininterval=0.5, smoothing=0.1, dynamic_ncols=True)
        code = 0
        try:
            self._consume(raws, bar, total, skip)
        except FileProblem as exc:
            code = _fail(f"{name}: {exc}; every row before it is committed or rejected")
        except KeyboardInterrupt:
            code = _fail(f"interrupted; rows up to line {self._done_line} are committed or rejected "
                         "(run the same import again to finish: committed rows replay)")
        except lmdb.Error as exc:
            code = _fail(f"storage error: {exc}; rows up to line {self._done_line} are committed or rejected")
        finally:
            bar.close()
            if self._rejects is not None:
                self._rejects.close()
        elapsed = time.monotonic() - started
        t = self.tally
        print(f"import: {t.rows} rows, {t.created} created, {t.updated} updated, {t.unchanged} unchanged, "
              f"{t.replayed} replayed, {t.rejected} rejected in {elapsed:.1f}s ({t.rows / max(elapsed, 1e-9):.0f} rows/s)",
              flush=True)
        if t.rejected:
            print(f"import: {t.rejected} row(s) rejected: see {self.rejects_path}", flush=True)
        return code or (1 if t.rejected else 0)

    def _consume(self, raws: Iterator[Raw] | Iterator[tuple[int, bytes]], bar: tqdm, total: int, skip: int) -> None:
        batch: list[tuple[int, Original, Prepared]] = []
        refused: list[tuple[int, Original, list[Reason]]] = []
        shown = 0
        line = 0
        try:
            for rows in self._prepared(raws):
                for line, original, outcome in rows:
                    self.tally.rows += 1
                    if type(outcome) is tuple:
                        batch.append((line, original, outcome))
                    else:
                        refused.append((line, original, outcome))  # type: ignore[arg-type]
                    if len(batch) + len(refused) >= self.batch_size:
                        self._commit(batch, refused, line)
                        batch, refused = [], []
                        bar.update(line - skip - shown)
                        shown = line - skip
        except FileProblem:
            self._commit(batch, refused, line)  # every row read before the unreadable part is applied
            raise
        self._commit(batch, refused, line)
        bar.update(max(total - shown, 0))

    def _prepared(self, raws: Iterator[Raw] | Iterator[tuple[int, bytes]]) -> Iterator[list[Row]]:
        """Rows with their outcomes, in file order, a chunk at a time; with a pool, a few chunks are in flight
        at a time (enough to keep every worker busy, never the whole file in memory). `raws` is either CSV
        rows (Raw) or blocks of JSON lines (first line number, bytes)."""
        pending: deque[tuple[list[Raw] | None, AsyncResult[Any]]] = deque()
        problem: FileProblem | None = None
        chunks = _chunks(raws, CHUNK_ROWS)  # type: ignore[arg-type]
        while True:
            try:
                chunk: Any = next(chunks)
            except StopIteration:
                break
            except FileProblem as exc:  # the rows read before it still go through
                problem = exc
                break
            if isinstance(chunk, tuple):  # a block of JSON lines
                if self.pool is None:
                    yield self.preparer.block(*chunk)
                    continue
                pending.append((None, self.pool.apply_async(_worker_block, chunk)))
            else:
                items = [(r.line, r.payload) for r in chunk if r.payload is not None]
                if self.pool is None:
                    yield _rows(chunk, self.preparer(items))
                    continue
                pending.append((chunk, self.pool.apply_async(_worker_prepare, (items,))))
            if len(pending) >= self.window:
                done, result = pending.popleft()
                yield result.get() if done is None else _rows(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield result.get() if done is None else _rows(done, result.get())
        if problem is not None:
            raise problem

    def _commit(self, batch: list[tuple[int, Original, Prepared]],
                refused: list[tuple[int, Original, list[Reason]]], line: int) -> None:
        """Apply one batch in one durable write transaction: plain creates from their pre-encoded writes,
        every other row through `apply` in its own nested transaction (resolver.bulk)."""
        counts = Tally()
        if batch:
            store, settings = self.store, self.settings
            run = functools.partial(_apply_row, settings)
            with store.write() as view:
                bulk = BulkWriter(view)
                for number, original, (blob, planned) in batch:
                    if planned is not None and bulk.try_create(planned):
                        counts.created += 1
                        continue
                    bulk.flush()  # apply must see every earlier row
                    cmd = command_from(blob)
                    try:
                        result = bulk.replay(cmd) or apply_nested(store, view, run, cmd)
                    except ResolverError as exc:
                        refused.append((number, original, reasons_for(exc)))
                        continue
                    finally:
                        bulk.touched()
                    if result.replayed:
                        counts.replayed += 1
                    elif result.action == "CREATED":
                        counts.created += 1
                    elif result.action == "UPDATED":
                        counts.updated += 1
                    else:
                        counts.unchanged += 1
                bulk.flush()
        # committed: the counts and the refusals are now true
        t = self.tally
        t.created += counts.created
        t.updated += counts.updated
        t.unchanged += counts.unchanged
        t.replayed += counts.replayed
        t.rejected += len(refused)
        if refused:
            out = self._rejects_file()
            for number, original, reasons in sorted(refused, key=lambda r: r[0]):
                out.write(json.dumps({"line": number, "reasons": reasons, "input": original}, ensure_ascii=False))
                out.write("\n")
            out.flush()
        self._done_line = line

    def _rejects_file(self) -> TextIO:
        if self._rejects is None:
            self._rejects = open(self.rejects_path, "w", encoding="utf-8")
        return self._rejects


def _apply_row(settings: Settings, view: View, cmd: UpsertCommand) -> UpsertResult:
    return apply(view, cmd, settings)


def _rows(chunk: list[Raw], outcomes: list[Outcome]) -> list[Row]:
    """CSV rows paired with the outcomes of those that had a payload."""
    it = iter(outcomes)
    return [(r.line, r.original, r.reasons or [] if r.payload is None else next(it)) for r in chunk]


def _chunks(items: Iterator[Any], size: int) -> Iterator[Any]:
    """Lists of `size` CSV rows (blocks of JSON lines pass through as they are); when reading fails, the
    partial list first, then the error."""
    chunk: list[Raw] = []
    try:
        for item in items:
            if isinstance(item, tuple):
                yield item
                continue
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except FileProblem:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk
