"""What an input file is: its format (from --format or its name), its size in lines and bytes, and the reader
and parser for its format."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

from resolver.config import Settings
from resolver.importer.csvrows import CsvReader
from resolver.importer.jsonl import Block, JsonParser, read_blocks
from resolver.importer.rows import Row
from resolver.upsert import UpsertInput

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def format_of(path: Path, given: str | None) -> str | None:
    """The format given on the command line, else the one the file's suffix names (None: cannot tell)."""
    return given or FORMATS.get(path.suffix.lower())


class Scan(NamedTuple):
    lines: int  # the progress bar's total
    size: int  # bytes: what an initial load's map size is checked against


def scan(path: Path) -> Scan:
    """The file's lines and size, in one sequential read."""
    lines = size = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            size += len(chunk)
            last = chunk[-1:]
    return Scan(lines + (last != b"\n"), size)


class Source(NamedTuple):
    rows: Iterator[Row] | Iterator[Block]  # CSV rows, or blocks of JSON lines (read and parsed by the workers)
    parse: Callable[[int, Any], UpsertInput]  # a row's payload -> UpsertInput
    header_lines: int  # lines before the first row


def open_source(path: Path, fmt: str, settings: Settings, stack: ExitStack) -> Source:
    """The rows of `path` read as `fmt`; the file stays open until `stack` closes. Raises FileProblem for an
    unusable CSV header."""
    if fmt == "csv":
        # surrogateescape: a row with bytes that are not UTF-8 is refused alone, not the whole file
        text = stack.enter_context(open(path, encoding="utf-8-sig", errors="surrogateescape", newline=""))
        reader = CsvReader(text, settings)
        return Source(reader.rows(), reader.parse, 1)
    return Source(read_blocks(stack.enter_context(open(path, "rb"))), JsonParser(), 0)
