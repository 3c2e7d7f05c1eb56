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
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from resolver._hotpath import KeyHasher
from resolver.api.status import to_status
from resolver.attributes import AttributeSchema
from resolver.bulk import command_blob, command_from, plan
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
from resolver.identifiers import policy_from
from resolver.importer.rows import Outcome, Payload, Prepared, Reason, Row, RowProblem, decided, reason
from resolver.service import now_us
from resolver.upsert import UpsertInput, prepare
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
    `Prepared` (or the reasons it is refused).

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

    def outcomes(self, lines: Sequence[int], payloads: Sequence[Payload]) -> list[Outcome]:
        """The outcome of each payload (`lines[i]` is the line number of `payloads[i]`)."""
        settings, schema, policy, parse, hasher = self.settings, self.schema, self.policy, self.parse, self.hasher
        complete, for_line, clock, sealer = self.defaults.complete, self.uuids.for_line, self.clock, self.sealer
        out: list[Outcome] = []
        for line, payload in zip(lines, payloads, strict=True):
            try:
                parsed = parse(line, payload)
                cmd = prepare(complete(parsed), settings, schema, policy, now_us=clock(), new_uuid=for_line(line))
            except RowProblem as exc:
                out.append(exc.reasons)
            except ResolverError as exc:
                out.append(reasons_for(exc))
            else:
                derived = not parsed.idempotency_key
                if derived:
                    cmd = replace(cmd, idempotency_key=derived_key(cmd.fingerprint))
                out.append(Prepared(command_blob(cmd), plan(cmd, hasher, sealer), derived))
        return out

    def rows(self, rows: list[Row]) -> list[Row]:
        """`rows` as read, each with its outcome."""
        lines = [r.line for r in rows if r.payload is not None]
        return decided(rows, self.outcomes(lines, [r.payload for r in rows if r.payload is not None]))


class Repeats:
    """The parent's side of derived keys: the n-th row of one import with the same content as an earlier one
    gets the key of occurrence n, so it is a write of its own and not a replay of the first (and a second
    import of the same file gives it the same key again).

    Remembers 8 bytes per keyless row seen, as an int (about 60 bytes of memory each).
    """

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._counts: dict[int, int] = {}  # contents seen more than once -> occurrences so far

    def settle(self, prepared: Prepared) -> Prepared:
        """`prepared` (a keyless row's) as it is to be applied: itself the first time its content is seen, else
        re-keyed for its occurrence, and left to `apply` (no plain create: it repeats an earlier row)."""
        planned = prepared.planned
        key = planned.ledger_key.decode("ascii") if planned is not None else command_from(prepared.blob).idempotency_key
        digest = int.from_bytes(base64.urlsafe_b64decode(key[len(KEY_PREFIX):])[:8], "big")
        if digest not in self._seen:
            self._seen.add(digest)
            return prepared
        occurrence = self._counts.get(digest, 1) + 1
        self._counts[digest] = occurrence
        cmd = command_from(prepared.blob)
        cmd = replace(cmd, idempotency_key=derived_key(cmd.fingerprint, occurrence))
        return Prepared(command_blob(cmd), None, True)
