"""The one row type every stage of an import passes on, and what a row can come to.

A reader (resolver.importer.jsonl, resolver.importer.csvrows) makes a `Row` with a payload to parse, or with
the reasons it is refused already; preparing (resolver.importer.prepare) replaces the payload by an outcome:
a `Prepared` command, or the reasons it is refused. Committing (resolver.importer.commit) reads the outcomes
and writes the refused rows' originals to the rejects file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

Original = str | dict[str, str]  # a JSON line as read, or a CSV row as {column: cell}
Payload = str | list[str]  # what a parser turns into an UpsertInput: the line, or the CSV cells
Reason = dict[str, str]  # one entry of a rejects-file row's "reasons": field, description, reason, code


class Prepared(NamedTuple):
    """A validated command, ready to apply: what a worker process sends back (cheap to pickle)."""

    blob: bytes  # the UpsertCommand, as resolver.bulk.command_blob encodes it
    planned: bytes | None  # its writes as a plain create, packed (resolver.bulk.packed); None: only `apply` may write it
    derived: bool = False  # its idempotency key was derived from its content (resolver.importer.prepare.Repeats)


Outcome = Prepared | list[Reason]  # a command to apply, or why the row is refused


class Row(NamedTuple):
    """One row of the input (its first line number and its original text) at any stage.

    As read: `payload` is what the parser reads and `outcome` None, or (a row that cannot be read) `payload`
    is None and `outcome` the reasons. Once prepared: `outcome` is set (the payload is no longer needed).
    """

    line: int
    original: Original
    payload: Payload | None
    outcome: Outcome | None = None


Item = bytes | Row  # a prepared row: a packed create of the fast path (resolver._load_py.RowPlanner), or a Row


class FileProblem(Exception):
    """The input cannot be read as the format says (bad header, not UTF-8, ...): exit 2."""


class RowProblem(Exception):
    """A row that is no Upsert at all (not JSON, wrong shape): refused with these reasons."""

    def __init__(self, reasons: list[Reason]) -> None:
        super().__init__(reasons[0]["description"])
        self.reasons = reasons


def reason(field: str, description: str, why: str, code: str = "INVALID_ARGUMENT") -> Reason:
    """One reason as the rejects file spells it (`why` is the machine-readable reason, e.g. INVALID_JSON)."""
    return {"field": field, "description": description, "reason": why, "code": code}


def decided(rows: Iterable[Row], outcomes: Iterable[Outcome]) -> list[Row]:
    """`rows` with their outcomes: `outcomes` are those of the rows that had a payload, in order."""
    it = iter(outcomes)
    return [r if r.payload is None else Row(r.line, r.original, None, next(it)) for r in rows]


# Across the process boundary a row travels as plain tuples: unpickling the named tuples of a prepared row
# (Row, Prepared) costs several times as much as plain ones, and the parent, which unpickles every row, is the
# import's narrowest stage. (A row of the fast path travels as its packed create alone: one bytes object.)
WireRow = tuple[int, Original, Payload | None, Any]
WireItem = bytes | WireRow


def to_wire(items: Iterable[Item]) -> list[WireItem]:
    """`items` as bytes and plain tuples, for `from_wire` in another process."""
    return [r if type(r) is bytes else (r.line, r.original, r.payload, outcome_to_wire(r.outcome))  # type: ignore[union-attr]
            for r in items]


def from_wire(items: Iterable[WireItem]) -> list[Item]:
    """The items `to_wire` sent (named tuples made by tuple.__new__: their Python-level __new__ is the cost)."""
    new = tuple.__new__
    return [item if type(item) is bytes else new(Row, (*item[:3], outcome_from_wire(item[3])))  # type: ignore[index]
            for item in items]


def outcome_to_wire(outcome: Outcome | None) -> Any:
    if type(outcome) is Prepared:
        return tuple(outcome)
    return outcome  # the reasons (a list), or None


def outcome_from_wire(item: Any) -> Any:
    if type(item) is tuple:
        return tuple.__new__(Prepared, item)
    return item
