"""Preparing a row: payload -> UpsertInput -> validated UpsertCommand, encoded for the bulk path, or the
reasons it is refused. Nothing here reads the store (contract §10), so it runs the same in this process or
in a worker process.

A row without an idempotency_key gets one derived from the file's digest, the row's line number and the
row's content (with the command-line defaults applied). So re-running the same file, after a crash or by
mistake, replays every committed row and creates nothing twice; and two rows that happen to be equal (a
value set, changed, then set back) are still two writes, never a replay of the first.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from resolver._hotpath import KeyHasher
from resolver.api.status import to_status
from resolver.attributes import AttributeSchema
from resolver.bulk import command_blob, plan
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
from resolver.store import uuid_text
from resolver.upsert import UpsertInput, prepare

KEY_PREFIX = "import:"


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
        """`inp` with the defaults and a key where it has none (`inp` itself when it lacks nothing)."""
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
    """Payload -> UpsertInput (`parse`) -> validated UpsertCommand -> `Prepared` (or the reasons it is
    refused)."""

    def __init__(self, settings: Settings, parse: Callable[[int, Any], UpsertInput]) -> None:
        self.settings = settings
        self.parse = parse
        self.schema = AttributeSchema(settings)
        self.policy = policy_from(settings)
        self.hasher = KeyHasher(settings.index.hash, settings.index.secret)
        self.sealer = Sealer.from_settings(settings)
        self.new_uuid: Callable[[], str] = new_uuids().__next__

    def reseed(self) -> None:
        """A random stream of its own, for a forked process (two processes must never draw the same uuids)."""
        self.new_uuid = new_uuids().__next__

    def outcomes(self, lines: Sequence[int], payloads: Sequence[Payload]) -> list[Outcome]:
        """The outcome of each payload (`lines[i]` is the line number of `payloads[i]`)."""
        settings, schema, policy, parse, hasher = self.settings, self.schema, self.policy, self.parse, self.hasher
        out: list[Outcome] = []
        for line, payload in zip(lines, payloads, strict=True):
            try:
                cmd = prepare(parse(line, payload), settings, schema, policy, now_us=now_us(), new_uuid=self.new_uuid())
            except RowProblem as exc:
                out.append(exc.reasons)
            except ResolverError as exc:
                out.append(reasons_for(exc))
            else:
                out.append(Prepared(command_blob(cmd), plan(cmd, hasher, self.sealer)))
        return out

    def rows(self, rows: list[Row]) -> list[Row]:
        """`rows` as read, each with its outcome."""
        lines = [r.line for r in rows if r.payload is not None]
        return decided(rows, self.outcomes(lines, [r.payload for r in rows if r.payload is not None]))


def new_uuids(batch: int = 1024) -> Iterator[str]:
    """Random (version 4) uuids in canonical text, as str(uuid.uuid4()) makes them, at a fraction of its cost
    (one urandom call per `batch`, no UUID objects)."""
    while True:
        pool = bytearray(os.urandom(16 * batch))
        for i in range(0, 16 * batch, 16):
            pool[i + 6] = (pool[i + 6] & 0x0F) | 0x40  # version 4
            pool[i + 8] = (pool[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
            yield uuid_text(pool[i:i + 16])
