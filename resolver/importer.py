"""`resolver import FILE`: bulk-load customers from JSON lines (UpsertRequest, proto3 JSON) or CSV.

Each row is an Upsert, validated exactly as the API validates it (`resolver.upsert.prepare`). Accepted rows
are applied in batches: one durable write transaction per batch, each row in a nested transaction, so a row
that cannot be applied (NOT_FOUND, ALREADY_EXISTS, ...) is rolled back alone and the rest of its batch
commits. Rejected rows go to a rejects file with their reasons and their original text, to fix and re-import.

A row without an idempotency_key gets one derived from the file's digest, the row's line number and the
row's content (with the command-line defaults applied). So re-running the same file, after a crash or by
mistake, replays every committed row and creates nothing twice; and two rows that happen to be equal (a
value set, changed, then set back) are still two writes, never a replay of the first.

Exit codes: 0 every row was applied, 1 some were rejected, 2 the file, its header or an option is unusable.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import lmdb
from google.protobuf import json_format
from tqdm import tqdm

from resolver.api.servicer import upsert_input
from resolver.api.status import to_status
from resolver.attributes import AttributeSchema
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
from resolver.identifiers import RawIdentifiers
from resolver.normalize import check_region
from resolver.records import encode_json
from resolver.service import Service, now_us
from resolver.store import View
from resolver.upsert import UpsertCommand, UpsertInput, apply, prepare
from resolver.v1 import resolver_pb2 as pb

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
KEY_PREFIX = "import:"

Original = str | dict[str, str]
Reason = dict[str, str]


class FileProblem(Exception):
    """The input cannot be read as the format says (bad header, not UTF-8, ...): exit 2."""


@dataclass(slots=True)
class Row:
    """One input row: its (first) line number, the original as read, and the Upsert or why there is none."""

    line: int
    original: Original
    inp: UpsertInput | None = None
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

    lines, digest = _scan(path)
    defaults = (region, args.source_system)
    with open(path, "rb") as raw:
        text = None
        try:
            if fmt == "csv":
                text = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
                reader = CsvRows(text, AttributeSchema(settings), settings, digest, defaults)
                rows: Iterator[Row] = reader.rows()
                lines -= 1  # the header is no row
            else:
                rows = jsonl_rows(raw, digest, defaults)
        except FileProblem as exc:
            if text is not None:
                text.close()
            return _fail(f"{path}: {exc}")
        try:
            service = Service(settings)
            try:
                return Importer(service, rejects, progress=not args.no_progress).run(rows, lines, path)
            finally:
                service.close()
        finally:
            if text is not None:
                text.close()


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


def _key_salt(digest: bytes) -> Any:
    return hashlib.sha256(b"resolver-import\0" + digest)


# -- JSON lines ------------------------------------------------------------------------------------------


def jsonl_rows(raw: Any, digest: bytes, defaults: tuple[str, str]) -> Iterator[Row]:
    """Rows of a JSON-lines file of UpsertRequest (proto3 JSON); blank lines are skipped."""
    region, source = defaults
    salt = _key_salt(digest)
    parse = json_format.Parse
    request = pb.UpsertRequest
    for number, data in enumerate(raw, 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            yield Row(number, data.decode("utf-8", "replace").rstrip("\r\n"),
                      reasons=[_reason("", "the line is not UTF-8", "INVALID_ENCODING")])
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        line = line.rstrip("\r\n")
        try:
            msg = parse(line, request())
        except (json_format.ParseError, ValueError, RecursionError) as exc:
            yield Row(number, line, reasons=[_reason("", f"not an UpsertRequest in proto3 JSON: {exc}", "INVALID_JSON")])
            continue
        if not msg.default_region:
            msg.default_region = region
        if not msg.source_system:
            msg.source_system = source
        if not msg.idempotency_key:
            h = salt.copy()
            h.update(b"%d\0" % number)
            h.update(msg.SerializeToString(deterministic=True))
            msg.idempotency_key = KEY_PREFIX + h.hexdigest()
        yield Row(number, line, upsert_input(msg))


# -- CSV -------------------------------------------------------------------------------------------------

_IDENTIFIER_COLUMNS = {
    "external_id": "external_id",
    "email": "emails",
    "emails": "emails",
    "phone": "phones",
    "phones": "phones",
}
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


class CsvRows:
    """Rows of a CSV file with a header: external_id, email(s), phone(s); every other column an attribute."""

    def __init__(self, text: TextIO, schema: AttributeSchema, settings: Settings, digest: bytes,
                 defaults: tuple[str, str]) -> None:
        self.reader = csv.reader(text)
        self.salt = _key_salt(digest)
        self.region, self.source = defaults
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
            if not name:
                problems.append(f"column {i} has no name")
            elif (name.lower() if role != "attribute" else name) in seen:
                problems.append(f"column {name!r} appears twice")
            seen.add(name.lower() if role != "attribute" else name)
            spec = settings.attributes.get(name)
            self.columns.append((role, name, _COERCE.get(spec.type, _as_text) if spec else _as_text))
        if {"emails"} <= seen and "email" in seen:
            pass  # both spellings may be given: their values add up
        if not any(role != "attribute" for role, _, _ in self.columns):
            problems.append("no identifier column (external_id, email, emails, phone or phones)")
        attributes = [name for role, name, _ in self.columns if role == "attribute" and name]
        _, bad = schema.normalize(dict.fromkeys(attributes))
        problems += [f"column {v.field.removeprefix('attributes.')!r}: {v.description}" for v in bad]
        if problems:
            raise FileProblem("bad CSV header: " + "; ".join(problems))

    def rows(self) -> Iterator[Row]:
        reader = self.reader
        width = len(self.header)
        start = reader.line_num + 1
        try:
            for cells in reader:
                line, start = start, reader.line_num + 1
                original = dict(zip(self.header, cells, strict=False))
                if not any(c.strip() for c in cells):
                    continue  # a blank line
                if len(cells) != width:
                    original = {**original, **{f"(extra {i})": c for i, c in enumerate(cells[width:], 1)}}
                    yield Row(line, original, reasons=[_reason(
                        "", f"the row has {len(cells)} cells, the header has {width}", "BAD_ROW_SHAPE")])
                    continue
                yield Row(line, original, self._input(line, cells))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise FileProblem(f"line {reader.line_num + 1}: cannot read the CSV: {exc}") from None

    def _input(self, line: int, cells: list[str]) -> UpsertInput:
        external_id = ""
        emails: list[str] = []
        phones: list[str] = []
        attributes: dict[str, Any] = {}
        for (role, name, coerce), cell in zip(self.columns, cells, strict=True):
            if not cell or cell.isspace():
                continue
            if role == "phones":
                phones += split_phones(cell)
            elif role == "emails":
                emails += split_values(cell)
            elif role == "external_id":
                external_id = cell
            else:
                attributes[name] = coerce(cell)
        ids = RawIdentifiers(external_id, tuple(emails), tuple(phones))
        h = self.salt.copy()
        h.update(b"%d\0" % line)
        h.update(encode_json([external_id, emails, phones, attributes, self.region, self.source]))
        return UpsertInput(
            idempotency_key=KEY_PREFIX + h.hexdigest(),
            identifiers=ids,
            attributes=attributes,
            source_system=self.source,
            default_region=self.region,
        )


# -- applying --------------------------------------------------------------------------------------------


def _reason(field: str, description: str, reason: str, code: str = "INVALID_ARGUMENT") -> Reason:
    return {"field": field, "description": description, "reason": reason, "code": code}


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


class Importer:
    """Validates rows, applies the accepted ones in batches, writes the rejected ones, keeps the tally."""

    def __init__(self, service: Service, rejects: Path, *, batch_size: int = 2000, progress: bool = True) -> None:
        self.service = service
        self.store = service.store
        self.settings = service.settings
        self.rejects_path = rejects
        self.batch_size = batch_size
        self.progress = progress
        self.tally = Tally()
        self._rejects: TextIO | None = None
        self._last_line = 0  # every row up to here is committed or in the rejects file

    def run(self, rows: Iterator[Row], total: int, name: Path) -> int:
        started = time.monotonic()
        bar = tqdm(total=total, unit="rows", desc=f"import {name.name}", file=sys.stderr,
                   disable=True if not self.progress else None, mininterval=0.5, smoothing=0.1, dynamic_ncols=True)
        code = 0
        try:
            self._consume(rows, bar)
        except FileProblem as exc:
            code = _fail(f"{name}: {exc}; every row before it was committed or rejected")
        except KeyboardInterrupt:
            code = _fail(f"interrupted; rows up to line {self._last_line} are committed or rejected "
                         "(run the same import again to finish: committed rows replay)")
        except lmdb.Error as exc:
            code = _fail(f"storage error: {exc}; rows up to line {self._last_line} are committed or rejected")
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

    def _consume(self, rows: Iterator[Row], bar: tqdm) -> None:
        settings = self.settings
        schema = self.service.schema
        policy = self.service.policy
        batch: list[tuple[int, Original, UpsertCommand]] = []
        refused: list[tuple[int, Original, list[Reason]]] = []
        shown = 0
        line = 0
        for row in rows:
            line = row.line
            self.tally.rows += 1
            if row.inp is None:
                refused.append((line, row.original, row.reasons or []))
            else:
                try:
                    batch.append((line, row.original, prepare(row.inp, settings, schema, policy, now_us=now_us())))
                except ResolverError as exc:
                    refused.append((line, row.original, reasons_for(exc)))
            if len(batch) + len(refused) >= self.batch_size:
                self._commit(batch, refused, line)
                batch, refused = [], []
                bar.update(line - shown)
                shown = line
        self._commit(batch, refused, line)
        bar.update(max(bar.total - shown, 0) if bar.total else 0)

    def _commit(self, batch: list[tuple[int, Original, UpsertCommand]],
                refused: list[tuple[int, Original, list[Reason]]], line: int) -> None:
        """Apply one batch in one durable write transaction, each row in its own nested transaction."""
        counts = Tally()
        if batch:
            store, settings = self.store, self.settings
            begin = store.env.begin
            with store.write() as view:
                parent = view.txn
                for number, original, cmd in batch:
                    child = begin(write=True, parent=parent)
                    try:
                        # a fresh View per row: its record cache must never outlive an aborted child
                        result = apply(View(store, child), cmd, settings)
                    except ResolverError as exc:
                        child.abort()
                        refused.append((number, original, reasons_for(exc)))
                        continue
                    except BaseException:
                        child.abort()
                        raise
                    child.commit()
                    if result.replayed:
                        counts.replayed += 1
                    elif result.action == "CREATED":
                        counts.created += 1
                    elif result.action == "UPDATED":
                        counts.updated += 1
                    else:
                        counts.unchanged += 1
        # committed: now the counts and the rejects are true
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
        self._last_line = line

    def _rejects_file(self) -> TextIO:
        if self._rejects is None:
            self._rejects = open(self.rejects_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in run()
        return self._rejects
