"""The one row type every stage of an import passes on, and what a row can come to.

A reader (resolver.importer.jsonl, resolver.importer.csvrows) makes a `Row` with a payload to parse, or with
the reasons it is refused already; preparing (resolver.importer.prepare) replaces the payload by an outcome:
a `Prepared` command, or the reasons it is refused. Committing (resolver.importer.commit) reads the outcomes
and writes the refused rows' originals to the rejects file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from resolver.bulk import Planned

Original = str | dict[str, str]  # a JSON line as read, or a CSV row as {column: cell}
Payload = str | list[str]  # what a parser turns into an UpsertInput: the line, or the CSV cells
Reason = dict[str, str]  # one entry of a rejects-file row's "reasons": field, description, reason, code


class Prepared(NamedTuple):
    """A validated command, ready to apply: what a worker process sends back (cheap to pickle)."""

    blob: bytes  # the UpsertCommand, as resolver.bulk.command_blob encodes it
    planned: Planned | None  # its writes as a plain create (resolver.bulk.plan); None: only `apply` may write it
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


# Across the process boundary a row travels as plain tuples: unpickling the three named tuples of a prepared row
# (Row, Prepared, Planned) costs about five times as much as plain ones (17 against 3.5 µs a row, measured on
# bench/dataset.py's rows), and the parent, which unpickles every row, is the import's narrowest stage.
WireRow = tuple[int, Original, Payload | None, Any]


def to_wire(rows: Iterable[Row]) -> list[WireRow]:
    """`rows` as plain tuples, for `from_wire` in another process."""
    return [(r.line, r.original, r.payload, outcome_to_wire(r.outcome)) for r in rows]


def from_wire(items: Iterable[WireRow]) -> list[Row]:
    """The rows `to_wire` sent (named tuples made by tuple.__new__: their Python-level __new__ is the cost)."""
    new = tuple.__new__
    return [new(Row, (line, original, payload, outcome_from_wire(outcome)))
            for line, original, payload, outcome in items]


def outcome_to_wire(outcome: Outcome | None) -> Any:
    if type(outcome) is Prepared:
        planned = outcome.planned
        return (outcome.blob, None if planned is None else tuple(planned), outcome.derived)
    return outcome  # the reasons (a list), or None


def outcome_from_wire(item: Any) -> Any:
    if type(item) is tuple:
        new = tuple.__new__
        blob, planned, derived = item
        return new(Prepared, (blob, None if planned is None else new(Planned, planned), derived))
    return item
