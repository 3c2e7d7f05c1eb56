"""Reading a CSV file with a header, and parsing its cells into an UpsertInput.

Columns external_id, email(s) and phone(s) are identifiers; every other column is an attribute, its cells
coerced to the blueprint's declared type (kept as text in an open schema, so the schema says what is wrong).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.identifiers import RawIdentifiers
from resolver.importer.rows import FileProblem, Row, reason
from resolver.upsert import UpsertInput

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


class Column(NamedTuple):
    role: str  # "external_id", "emails", "phones" or "attribute"
    name: str  # the header's name (the attribute's name for an attribute column)
    coerce: Callable[[str], Any]  # a cell -> the attribute's value


class CsvReader:
    """A CSV file with a header; raises FileProblem when the header is unusable (every problem named)."""

    def __init__(self, text: Iterable[str], settings: Settings) -> None:
        self.reader = csv.reader(text)
        try:
            header = next(self.reader)
        except StopIteration:
            raise FileProblem("empty file: a CSV header is required") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise FileProblem(f"cannot read the CSV header: {exc}") from None
        self.header = [h.strip() for h in header]
        self.columns: list[Column] = []
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
            self.columns.append(Column(role, name, _COERCE.get(spec.type, _as_text) if spec else _as_text))
        if not any(c.role != "attribute" for c in self.columns):
            problems.append("no identifier column (external_id, email, emails, phone or phones)")
        attributes = [c.name for c in self.columns if c.role == "attribute" and c.name]
        _, bad = AttributeSchema(settings).normalize(dict.fromkeys(attributes))
        problems += [f"column {v.field.removeprefix('attributes.')!r}: {v.description}" for v in bad]
        if problems:
            raise FileProblem("bad CSV header: " + "; ".join(problems))

    def rows(self) -> Iterator[Row]:
        """The data rows (blank ones skipped; payload: the cells); a row with more or fewer cells than the
        header, or bytes that are not UTF-8, is refused. Raises FileProblem where the CSV cannot be read."""
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
                    yield Row(line, original, None, [reason("", "the row is not UTF-8", "INVALID_ENCODING")])
                    continue
                if len(cells) != width:
                    original |= {f"(extra {i})": c for i, c in enumerate(cells[width:], 1)}
                    why = reason("", f"the row has {len(cells)} cells, the header has {width}", "BAD_ROW_SHAPE")
                    yield Row(line, original, None, [why])
                    continue
                yield Row(line, original, cells)
        except csv.Error as exc:
            raise FileProblem(f"line {reader.line_num}: cannot read the CSV: {exc}") from None

    def parse(self, line: int, cells: list[str]) -> UpsertInput:
        """A row's cells -> UpsertInput (an empty cell is absent; no idempotency key: the Preparer derives one)."""
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
        return UpsertInput(idempotency_key="", identifiers=ids, attributes=attributes)


def _is_utf8(cells: list[str]) -> bool:
    try:
        "".join(cells).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: an undecodable byte, escaped
        return False
    return True
