"""Preparing a row: payload -> UpsertInput -> validated UpsertCommand, encoded for the bulk path, or the
reasons it is refused. Nothing here reads the store (contract §10), so it runs the same in this process or
in a worker process: the clock, the new uuid and the idempotency key are fixed in the command here.

A row without an idempotency_key gets one derived from its NORMALIZED content: the request's fingerprint
(resolver.ledger.fingerprint: identifiers normalized, attributes canonical, source_system, customer_uuid,
expected_version), not the file or the line it sits on. So importing a file again, or an edited copy of it,
replays every row that did not change, and a phone-only row already imported never creates a second
customer (a phone never selects one). A row equal to an earlier row of the same import (a value set,
changed, then set back) is still a write of its own: `Repeats` (in the parent, which sees the rows in file
order) gives the n-th occurrence of the same content its own key, the same one every import of that file
gives it.

The new customer's uuid is the import's (resolver.uuids.LoadUuids): fixed by the row's line, increasing in
file order, so an import appends its records.

A JSON line takes the fast path first (`Preparer.items`: resolver._hotpath.RowPlanner, with this module's rules,
`plan_rules`), which packs what the general path below would for the plain creates a load is made of, and hands
every other line to it. Either way a line is prepared in file order, with one clock reading.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from resolver import ledger
from resolver._hotpath import KeyHasher, RowPlanner, normalize_email, normalize_phone
from resolver._load_py import Entry, PlanRules
from resolver.api.status import to_status
from resolver.attributes import _NAME as ATTRIBUTE_NAME
from resolver.attributes import OPEN_SCHEMA_MAX_TEXT, AttributeSchema
from resolver.bulk import command_blob, packed, plan
from resolver.config import Settings
from resolver.crypto import Sealer
from resolver.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdempotencyKeyReused,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ResolverError,
    VersionMismatch,
)
from resolver.identifiers import Identifiers, Skipped, policy_from
from resolver.importer.jsonl import IDENTIFIER_FIELDS, REQUEST_FIELDS, Block, jsonl_row, simple_attributes
from resolver.importer.rows import Outcome, Payload, Prepared, Reason, Row, RowProblem, decided, reason
from resolver.normalize import Kind, check_region, mask, normalize_external_id
from resolver.records import held_key, upsert_holder
from resolver.service import now_us
from resolver.store import uuid_text
from resolver.upsert import UpsertCommand, UpsertInput, prepare
from resolver.upsert import _source_ok as source_ok
from resolver.uuids import LoadUuids

KEY_PREFIX = "import:"
# What a keyless row carries through validation until its key is derived from the validated command: a valid
# key of a derived key's length (31 characters; `ledger.check_key` reads every one of them).
_PENDING_KEY = KEY_PREFIX + "-" * 24
_KEY_SALT = b"resolver-import-row\0"


def derived_key(fingerprint: str, occurrence: int = 1) -> str:
    """The idempotency key of a keyless row: its content's fingerprint and which occurrence of that content in
    the file it is (1: the first)."""
    h = hashlib.sha256(_KEY_SALT + fingerprint.encode("ascii"))
    if occurrence > 1:
        h.update(b"\0%d" % occurrence)
    return KEY_PREFIX + base64.urlsafe_b64encode(h.digest()[:18]).decode("ascii")


class Defaults:
    """Fills in what a row leaves empty: the command-line region and source system."""

    def __init__(self, region: str, source: str) -> None:
        self.region = region
        self.source = source

    def complete(self, inp: UpsertInput) -> UpsertInput:
        """`inp` with the defaults, and a placeholder key where it has none (`inp` itself when it lacks nothing)."""
        region = inp.default_region or self.region
        source = inp.source_system or self.source
        if inp.idempotency_key and region == inp.default_region and source == inp.source_system:
            return inp
        return UpsertInput(idempotency_key=inp.idempotency_key or _PENDING_KEY, identifiers=inp.identifiers,
                           attributes=inp.attributes, customer_uuid=inp.customer_uuid, source_system=source,
                           expected_version=inp.expected_version, remove_identifiers=inp.remove_identifiers,
                           default_region=region)


def reasons_for(exc: ResolverError) -> list[Reason]:
    """Why a row was refused, one entry per bad field where the error names fields."""
    code = to_status(exc).code.name
    if isinstance(exc, InvalidInput):
        return [reason(v.field, v.description, v.reason, code) for v in exc.violations]
    if isinstance(exc, PermissionDenied):
        return [reason(f"attributes.{f}", exc.message, exc.reason, code) for f in exc.fields]
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
    return [reason(field, exc.message, exc.reason, code)]


class Preparer:
    """Payload -> UpsertInput (`parse`, then the command-line `defaults`) -> validated UpsertCommand ->
    `Prepared` (or the reasons it is refused); for JSON lines, a block at a time with the fast path first
    (`items`).

    `uuids`: the import's (the same in every worker process); `clock`: microseconds since the epoch, read once
    per row (default: this module's `now_us`).
    """

    def __init__(self, settings: Settings, parse: Callable[[int, Any], UpsertInput], defaults: Defaults,
                 uuids: LoadUuids, clock: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.parse = parse
        self.defaults = defaults
        self.uuids = uuids
        self.clock = clock or now_us
        self.schema = AttributeSchema(settings)
        self.policy = policy_from(settings)
        self.hasher = KeyHasher(settings.index.hash, settings.index.secret)
        self.sealer = Sealer.from_settings(settings)
        self.planner = RowPlanner(plan_rules(self))

    def outcomes(self, lines: Sequence[int], payloads: Sequence[Payload]) -> list[Outcome]:
        """The outcome of each payload (`lines[i]` is the line number of `payloads[i]`)."""
        hasher, sealer, clock, for_line = self.hasher, self.sealer, self.clock, self.uuids.for_line
        out: list[Outcome] = []
        for line, payload in zip(lines, payloads, strict=True):
            try:
                parsed = self.parse(line, payload)
                cmd = self._command(parsed, clock(), for_line(line))
            except RowProblem as exc:
                out.append(exc.reasons)
            except ResolverError as exc:
                out.append(reasons_for(exc))
            else:
                derived = not parsed.idempotency_key
                planned = plan(cmd, hasher, sealer)
                out.append(Prepared(command_blob(cmd), None if planned is None else packed(planned, cmd, line, derived),
                                    derived))
        return out

    def _command(self, parsed: UpsertInput, now: int, new_uuid: str) -> UpsertCommand:
        """The validated command of a parsed row, its key derived from its content when it has none."""
        cmd = prepare(self.defaults.complete(parsed), self.settings, self.schema, self.policy, now_us=now,
                      new_uuid=new_uuid)
        if not parsed.idempotency_key:
            cmd = replace(cmd, idempotency_key=derived_key(cmd.fingerprint))
        return cmd

    def rows(self, rows: list[Row]) -> list[Row]:
        """`rows` as read, each with its outcome."""
        lines = [r.line for r in rows if r.payload is not None]
        return decided(rows, self.outcomes(lines, [r.payload for r in rows if r.payload is not None]))

    def items(self, block: Block) -> list[bytes | Row]:
        """The rows of a block of JSON lines in file order, blank lines left out: a row the fast path answers for
        as its packed create (resolver._load_py.RowPlanner), every other one as a `Row` with its outcome."""
        return self.planner.block(block.data, block.first, self._general)

    def _general(self, number: int, data: bytes) -> Row | None:
        row = jsonl_row(number, data)
        return None if row is None else self.rows([row])[0]

    def command(self, entry: Entry) -> UpsertCommand:
        """The command of a row the fast path packed (`entry`), as the general path prepares it: from its line,
        with the clock reading and the uuid the packed create was made with (the fast path's request, which
        tests/unit/test_import_fast.py holds to the general path's command)."""
        q = self.planner.request(entry.raw)
        if q is None:  # (never: the line was packed by this path) the general path, the same command
            line = entry.raw.decode("utf-8").rstrip("\r\n")
            return self._command(self.parse(entry.line, line), entry.now_us, uuid_text(entry.uuid))
        return UpsertCommand(
            idempotency_key=q.key, fingerprint=q.fingerprint, customer_uuid=None,
            add=Identifiers(q.ext, q.emails, q.phones), remove=Identifiers(), attributes=q.attributes,
            source_system=q.source, expected_version=0,
            skipped=tuple(Skipped(Kind(kind), masked, why, detail) for kind, masked, why, detail in q.skipped),
            new_uuid=uuid_text(entry.uuid), now_us=entry.now_us, expires_us=entry.expires_us)


def original(entry: Entry) -> str:
    """The line of a packed create as the rejects file shows it (what resolver.importer.jsonl.jsonl_row reads)."""
    return entry.raw.decode("utf-8").rstrip("\r\n")


def plan_rules(preparer: Preparer) -> PlanRules:
    """The general path's rules for the fast path (resolver._load_py.PlanRules), from a Preparer's settings."""
    settings, schema, sealer = preparer.settings, preparer.schema, preparer.sealer
    request_fields = {name: field for name, field in REQUEST_FIELDS.items() if field != "remove_identifiers"}
    return PlanRules(
        request_fields=request_fields, identifier_fields=dict(IDENTIFIER_FIELDS),
        default_region=preparer.defaults.region, default_source=preparer.defaults.source,
        check_key=ledger.check_key, max_key_length=ledger.MAX_KEY_LENGTH, check_region=check_region, source_ok=source_ok,
        normalize_external_id=normalize_external_id, normalize_email=normalize_email, normalize_phone=normalize_phone,
        policy=preparer.policy, mask=mask, max_identifiers=settings.limits.identifiers_per_customer,
        simple_attributes=simple_attributes,
        text_limits=text_limits(schema), attribute=_one_attribute(schema), owned_by_others=schema.owned_by_others,
        owners={name: spec.owner for name, spec in schema.specs.items() if spec.owner},
        fingerprint=ledger.fingerprint, derived_key=derived_key, held_key=held_key, holder=upsert_holder,
        key=preparer.hasher.key, sensitive=frozenset(sealer.names if sealer.active else ()), sealed=sealer.sealed,
        seal_change=sealer.seal_change, uuids=preparer.uuids, clock=preparer.clock,
        retention_us=int(settings.reliability.idempotency_retention_s * 1_000_000),
    )


class _OpenTextLimits(dict[str, tuple[int, int]]):
    """An open schema's text limits: any well-named attribute takes a text of up to OPEN_SCHEMA_MAX_TEXT
    characters (resolver.attributes.AttributeSchema._normalize_one)."""

    def __missing__(self, name: str) -> tuple[int, int] | None:
        limits = (0, OPEN_SCHEMA_MAX_TEXT) if ATTRIBUTE_NAME.fullmatch(name) else None
        if limits is not None:
            self[name] = limits
        return limits

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name]


def text_limits(schema: AttributeSchema) -> Mapping[str, tuple[int, int]]:
    """The attributes whose text value AttributeSchema.normalize only trims, NFCs and checks the length of
    (declared strings without enum or pattern; any well-named one in an open schema): (least, most)."""
    if schema.open:
        return _OpenTextLimits()
    return {name: (spec.min_length or 0, spec.max_length if spec.max_length is not None else 1 << 62)
            for name, spec in schema.specs.items() if spec.type == "string" and spec.enum is None
            and spec.pattern is None}


def _one_attribute(schema: AttributeSchema) -> Callable[[str, Any], Any]:
    def normalized(name: str, value: Any) -> Any:
        """One attribute value as AttributeSchema.normalize normalizes it (InvalidInput: it refuses it)."""
        out, bad = schema.normalize({name: value})
        if bad:
            raise InvalidInput(bad)
        return out[name]

    return normalized


class Repeats:
    """The parent's side of derived keys: the n-th row of one import with the same content as an earlier one
    gets the key of occurrence n, so it is a write of its own and not a replay of the first (and a second
    import of the same file gives it the same key again).

    Remembers 8 bytes per keyless row seen, as an int (about 60 bytes of memory each).
    """

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._counts: dict[int, int] = {}  # contents seen more than once -> occurrences so far

    def occurrence(self, ledger_key: bytes) -> int:
        """Which occurrence in this import the content of a keyless row with the derived `ledger_key` is (1: the
        first; another means the row is to be re-keyed with `derived_key(fingerprint, n)` and applied)."""
        digest = int.from_bytes(base64.urlsafe_b64decode(ledger_key[len(KEY_PREFIX):])[:8], "big")
        if digest not in self._seen:
            self._seen.add(digest)
            return 1
        occurrence = self._counts.get(digest, 1) + 1
        self._counts[digest] = occurrence
        return occurrence


def rekeyed(cmd: UpsertCommand, occurrence: int) -> Prepared:
    """A keyless row's command re-keyed for its `occurrence` of the same content, left to `apply` (it repeats an
    earlier row: no plain create)."""
    return Prepared(command_blob(replace(cmd, idempotency_key=derived_key(cmd.fingerprint, occurrence))), None, True)
