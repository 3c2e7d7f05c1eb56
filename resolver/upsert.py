"""Upsert (contract §4): validate and normalize -> build a command -> apply it in one write transaction.

`prepare` does everything that does not depend on stored state (and reads the clock and makes the new
uuid), so `apply` is deterministic: given the same command and the same store it does the same thing.
That is the shape the replicated log of contract §10 needs.
"""

from __future__ import annotations

import functools
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from resolver import ledger
from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.errors import (
    AlreadyExists,
    BlockedIdentifier,
    FailedPrecondition,
    FieldViolation,
    IdentifierError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    VersionMismatch,
)
from resolver.identifiers import Identifiers, RawIdentifiers, Skipped, normalize_identifiers
from resolver.normalize import Kind, Policy, check_region
from resolver.records import Record, upsert_holder
from resolver.store import Txn, uuid_bytes, uuid_text
from resolver.uuids import new_customer_uuid

MAX_DUPLICATES_REPORTED = 10


@dataclass(frozen=True, slots=True)
class UpsertInput:
    """An Upsert as the caller sent it (attributes: a partial update, None clears a field)."""

    idempotency_key: str
    identifiers: RawIdentifiers = RawIdentifiers()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    customer_uuid: str = ""
    source_system: str = ""
    expected_version: int = 0
    remove_identifiers: RawIdentifiers = RawIdentifiers()
    default_region: str = ""


@dataclass(frozen=True, slots=True)
class UpsertCommand:
    """A validated, normalized Upsert with its clock and new uuid fixed: the unit `apply` executes."""

    idempotency_key: str
    fingerprint: str
    customer_uuid: str | None
    add: Identifiers
    remove: Identifiers
    attributes: dict[str, Any]
    source_system: str
    expected_version: int
    skipped: tuple[Skipped, ...]
    new_uuid: str
    now_us: int
    expires_us: int


@dataclass(frozen=True, slots=True)
class UpsertResult:
    customer_uuid: str
    action: str  # CREATED | UPDATED | UNCHANGED
    version: int
    identifiers: Identifiers
    potential_duplicates: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_uuid": self.customer_uuid,
            "action": self.action,
            "version": self.version,
            "identifiers": self.identifiers.as_dict(),
            "potential_duplicates": list(self.potential_duplicates),
            "skipped": [[s.kind.value, s.masked, s.reason, s.detail] for s in self.skipped],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, replayed: bool) -> UpsertResult:
        ids = d["identifiers"]
        return cls(
            customer_uuid=d["customer_uuid"],
            action=d["action"],
            version=d["version"],
            identifiers=Identifiers(ids["external_id"], list(ids["emails"]), list(ids["phones"])),
            potential_duplicates=tuple(d["potential_duplicates"]),
            skipped=tuple(Skipped(Kind(k), m, r, t) for k, m, r, t in d["skipped"]),
            replayed=replayed,
        )


def prepare(inp: UpsertInput, settings: Settings, schema: AttributeSchema, policy: Policy, *,
            now_us: int, new_uuid: str | None = None, deadline: float | None = None) -> UpsertCommand:
    """Validate and normalize everything; raise InvalidInput listing every bad field (or PermissionDenied).
    DeadlineExceeded when `deadline` (time.monotonic()) passes during normalization."""
    violations: list[FieldViolation] = []
    key = inp.idempotency_key
    if (bad_key := ledger.check_key(key)) is not None:
        violations.append(bad_key)
    customer_uuid = None
    if inp.customer_uuid:
        try:
            customer_uuid = str(uuidlib.UUID(inp.customer_uuid))
        except ValueError:
            violations.append(FieldViolation("customer_uuid", "not a UUID", "INVALID"))
    region = None
    try:
        region = check_region(inp.default_region)
    except IdentifierError as exc:
        violations.append(FieldViolation("default_region", exc.message, exc.reason))
    if not _source_ok(inp.source_system):
        violations.append(FieldViolation("source_system", "at most 64 letters, digits, '_', '.', '-'", "INVALID"))

    add, failures = normalize_identifiers(inp.identifiers, region, policy, "identifiers", deadline)
    skipped = []
    for f in failures:
        if isinstance(f.error, BlockedIdentifier):
            skipped.append(f.skipped())  # a CRM placeholder is not an error, it is just never indexed
        else:
            violations.append(FieldViolation(f.field, f.error.message, f.error.reason))
    remove, failures = (normalize_identifiers(inp.remove_identifiers, region, policy, "remove_identifiers", deadline)
                        if inp.remove_identifiers else (Identifiers(), []))
    violations += [
        FieldViolation(f.field, f.error.message, f.error.reason)
        for f in failures
        if not isinstance(f.error, BlockedIdentifier)
    ]
    if customer_uuid is None and not inp.customer_uuid and not (add.external_id or add.emails or add.phones):
        violations.append(
            FieldViolation("identifiers", "give customer_uuid or at least one usable identifier", "REQUIRED")
        )
    if len(add.emails) + len(add.phones) > settings.limits.identifiers_per_customer:
        violations.append(_over_customer_limit(settings))
    attributes, bad = schema.normalize(inp.attributes)
    violations += bad
    if violations:
        raise InvalidInput(violations)
    owned = schema.owned_by_others(list(attributes), inp.source_system)
    if owned:
        raise PermissionDenied(
            f"attribute(s) {', '.join(owned)} are owned by another source system", fields=owned
        )
    fingerprint = ledger.fingerprint(
        {
            "customer_uuid": customer_uuid,
            "add": add.as_dict(),
            "remove": remove.as_dict(),
            "attributes": attributes,
            "source_system": inp.source_system,
            "expected_version": inp.expected_version,
        }
    )
    return UpsertCommand(
        idempotency_key=key,
        fingerprint=fingerprint,
        customer_uuid=customer_uuid,
        add=add,
        remove=remove,
        attributes=attributes,
        source_system=inp.source_system,
        expected_version=inp.expected_version,
        skipped=tuple(skipped),
        new_uuid=new_uuid or new_customer_uuid(),
        now_us=now_us,
        expires_us=now_us + int(settings.reliability.idempotency_retention_s * 1_000_000),
    )


def _over_customer_limit(settings: Settings) -> FieldViolation:
    limit = settings.limits.identifiers_per_customer
    return FieldViolation("identifiers", f"the customer would hold more than {limit} emails and phones "
                          "(limits.identifiers_per_customer)", "LIMIT_EXCEEDED")


@functools.lru_cache(maxsize=256)
def _source_ok(source_system: str) -> bool:
    """A well-formed source_system (a file or a CRM sends the same few over and over: cached)."""
    return len(source_system) <= 64 and all(c.isalnum() or c in "_.-" for c in source_system)


def apply(txn: Txn, cmd: UpsertCommand, settings: Settings) -> UpsertResult:
    """Execute the command inside the caller's write transaction (ledger, record, indexes, change log).

    Raises a domain error before anything is written when the request cannot be applied; the caller's
    transaction then aborts, so the write is whole or nothing.
    """
    stored = ledger.replay(txn, cmd.idempotency_key, cmd.fingerprint, cmd.now_us)
    if stored is not None:
        return UpsertResult.from_json(stored, replayed=True)

    current = _target(txn, cmd, settings)
    ext = cmd.add.external_id
    if ext is not None:
        holders = txn.probe(Kind.EXTERNAL_ID, ext, limit=1 << 30).uuids
        others = [uuid_text(h) for h in holders if current is None or uuid_text(h) != current.uuid]
        if others:
            raise AlreadyExists(f"external_id is already held by customer {others[0]}", holder=others[0])
        if (
            current is not None
            and current.external_id not in (None, ext)
            and not current.holds(Kind.EXTERNAL_ID, ext)
            and cmd.remove.external_id != current.external_id
        ):
            raise FailedPrecondition(
                "the customer already has another external_id; remove it explicitly "
                "(remove_identifiers.external_id) to replace it",
                reason="EXTERNAL_ID_CHANGE",
            )
    if cmd.expected_version and (current is None or current.version != cmd.expected_version):
        have = current.version if current is not None else 0
        raise VersionMismatch(f"expected version {cmd.expected_version}, the customer is at {have}", current=have)

    updated, changes = _updated(current, cmd)
    held = len(updated.emails) + len(updated.phones)
    if held > settings.limits.identifiers_per_customer and (
            current is None or held > len(current.emails) + len(current.phones)):
        raise InvalidInput([_over_customer_limit(settings)])
    if current is None:
        action = "CREATED"
    elif changes:
        action = "UPDATED"
    else:
        action = "UNCHANGED"
    if action != "UNCHANGED":
        _reindex(txn, current, updated)
        txn.put_record(updated)
        txn.append_change(_change_entry(cmd, updated, action, changes))
    result = _result(cmd, updated, action, _potential_duplicates(txn, updated, settings))
    ledger.record(txn, cmd.idempotency_key, cmd.fingerprint, cmd.expires_us, result.to_json())
    return result


class PlannedCreate(NamedTuple):
    """What `apply` writes and answers for a plain create (`planned_create`)."""

    record: Record
    change: dict[str, Any]  # its change-log entry (`append_change` adds the sequence number)
    result: UpsertResult


def planned_create(cmd: UpsertCommand) -> PlannedCreate | None:
    """What `apply` writes and answers for `cmd` in a store where nothing holds its key or its identifiers
    (no ledger entry, no index entry under any identifier's key).

    None when the command is not a plain create (it names a customer_uuid, an expected_version or
    identifiers to remove): only `apply` decides those. The bulk importer uses this to write creates
    without probing, after checking those keys are absent (resolver.bulk).
    """
    if cmd.customer_uuid is not None or cmd.expected_version or cmd.remove.external_id is not None \
            or cmd.remove.emails or cmd.remove.phones:
        return None
    rec, changes = _updated(None, cmd)  # apply's own rule: with no target, `_updated(None, cmd)` is the create
    return PlannedCreate(record=rec, change=_change_entry(cmd, rec, "CREATED", changes),
                         result=_result(cmd, rec, "CREATED", ()))


def _change_entry(cmd: UpsertCommand, updated: Record, action: str, changes: dict[str, Any]) -> dict[str, Any]:
    return {
        "at_us": cmd.now_us,
        "customer_uuid": updated.uuid,
        "action": action,
        "version": updated.version,
        "source_system": cmd.source_system,
        **changes,
    }


def _result(cmd: UpsertCommand, updated: Record, action: str, duplicates: tuple[str, ...]) -> UpsertResult:
    return UpsertResult(
        customer_uuid=updated.uuid,
        action=action,
        version=updated.version,
        identifiers=Identifiers(updated.external_id, list(updated.emails), list(updated.phones)),
        potential_duplicates=duplicates,
        skipped=cmd.skipped,
    )


def _target(txn: Txn, cmd: UpsertCommand, settings: Settings) -> Record | None:
    """Contract §4.3: the uuid given; else whom the external_id or the email resolves to; else nobody (create).

    A phone alone never selects an existing customer (phones are shared). An email held by customers with
    another external_id than the one in the request does not select them: the external_id says it is
    someone else.
    """
    if cmd.customer_uuid is not None:
        rec = txn.record(txn.survivor(uuid_bytes(cmd.customer_uuid)))
        if rec is None:
            raise NotFound(f"no customer {cmd.customer_uuid}")
        return rec
    ext = cmd.add.external_id
    if ext is not None and "external_id" in settings.matching.write_keys:
        hits = txn.probe(Kind.EXTERNAL_ID, ext, limit=1 << 30).uuids
        if hits:
            return txn.record(hits[0])
    if "email" in settings.matching.write_keys:
        found: dict[bytes, Record] = {}
        for email in cmd.add.emails:
            hits = txn.probe(Kind.EMAIL, email, limit=settings.matching.max_fanout).uuids
            for uid in hits:
                rec = txn.record(uid)
                if rec is not None and (ext is None or rec.external_id in (None, ext)):
                    found[uid] = rec
        if len(found) > 1:
            candidates = sorted(r.uuid for r in found.values())
            raise FailedPrecondition(
                f"the email is shared by {len(candidates)} customers; name the customer_uuid to update",
                candidates=candidates,
            )
        if found:
            return next(iter(found.values()))
    return None


def _updated(current: Record | None, cmd: UpsertCommand) -> tuple[Record, dict[str, Any]]:
    """The record after the command, and what changed (empty: nothing)."""
    if current is None:
        rec = Record(uuid=cmd.new_uuid, created_us=cmd.now_us)
    else:
        rec = current.copy()
    # removals first, so "remove X, add Y" replaces in one request
    if cmd.remove.external_id is not None and rec.external_id == cmd.remove.external_id:
        rec.external_id = None
    # an explicit removal takes the identifier away whoever holds it (contract §4.5)
    for email in cmd.remove.emails:
        rec.drop(Kind.EMAIL, email)
    for phone in cmd.remove.phones:
        rec.drop(Kind.PHONE, phone)
    if cmd.remove.external_id in rec.merged_external_ids:
        rec.merged_external_ids.remove(cmd.remove.external_id)
    if cmd.add.external_id is not None and not rec.holds(Kind.EXTERNAL_ID, cmd.add.external_id):
        rec.external_id = cmd.add.external_id
    # what an Upsert adds belongs to its source_system (provenance): a CRM slot letting the value go later
    # leaves it on the customer
    holder = upsert_holder(cmd.source_system)
    held_before = len(rec.held)
    holders_before = sum(map(len, rec.held.values()))
    for email in cmd.add.emails:
        rec.add(Kind.EMAIL, email, holder, cmd.now_us)
    for phone in cmd.add.phones:
        rec.add(Kind.PHONE, phone, holder, cmd.now_us)
    new_holder = len(rec.held) != held_before or sum(map(len, rec.held.values())) != holders_before
    changed_attrs: dict[str, Any] = {}
    old_attrs: dict[str, Any] = {}  # what each changed field held before (None: absent)
    for name, value in cmd.attributes.items():
        if value is None:
            if name in rec.attributes:
                old_attrs[name] = rec.attributes.pop(name)
                changed_attrs[name] = None
                rec.field_us[name] = cmd.now_us
        elif rec.attributes.get(name, _MISSING) != value or type(rec.attributes.get(name)) is not type(value):
            old_attrs[name] = rec.attributes.get(name)
            rec.attributes[name] = value
            changed_attrs[name] = value
            rec.field_us[name] = cmd.now_us

    before = set(current.identifiers()) if current is not None else set()
    after = set(rec.identifiers())
    changes: dict[str, Any] = {}
    if current is None or before != after or changed_attrs or new_holder:
        changes = {
            "added": sorted([k.value, v] for k, v in after - before),
            "removed": sorted([k.value, v] for k, v in before - after),
            "attributes": changed_attrs,
            "attributes_old": old_attrs,
        }
        if new_holder and before == after:
            changes["held_by"] = holder  # the same identifiers, now also held by this source
        rec.version += 1
        rec.updated_us = cmd.now_us
    return rec, changes


_MISSING = object()


def _reindex(txn: Txn, old: Record | None, new: Record) -> None:
    uid = uuid_bytes(new.uuid)
    before = set(old.identifiers()) if old is not None else set()
    after = set(new.identifiers())
    for kind, value in before - after:
        txn.index_remove(kind, value, uid)
    for kind, value in after - before:
        txn.index_add(kind, value, uid)


def _potential_duplicates(txn: Txn, rec: Record, settings: Settings) -> tuple[str, ...]:
    """Other customers sharing a phone or email with `rec` (bounded; fanned-out identifiers not expanded)."""
    me = uuid_bytes(rec.uuid)
    others: set[bytes] = set()
    for kind, value in rec.identifiers():
        if kind is Kind.EXTERNAL_ID:
            continue
        hits = txn.probe(kind, value, limit=settings.matching.max_fanout).uuids
        others.update(h for h in hits if h != me)
    return tuple(sorted(uuid_text(u) for u in others)[:MAX_DUPLICATES_REPORTED])
