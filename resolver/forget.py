"""Forget (contract §8): erase a person on request, provably, in one write transaction (all or nothing).

`Forget(idempotency_key, customer_uuid, reason)` erases the customer the uuid resolves to (a merged-away uuid
resolves to its survivor: since the merge they are one person, and the whole person is erased), together with every
customer merged into it:

- what a CRM DELETE erases (resolver.erase): the record (identifiers, attributes), its index entries, the PII in the
  change-log entries and ledger answers that copy it (redacted in place), the merge journal, per-attribute event
  times, the interaction history, and the outbound messages (queued or dead) that copy its PII;
- the raw CRM webhooks that name it, pending in the event inbox or in the event dead-letter queue
  (resolver.forget_events says exactly what is matched and what cannot be found).

What stays, without PII: the uuids as aliases of a tombstone (source_system "forget": the erasure's time is the
deletion's, so older CRM events for the person's records are refused, RECORD_DELETED, and only a newer CREATE makes
a new customer), one DELETED change-log entry (uuids only: the change feed and the outbound `customer.deleted` tell
downstream systems to erase too), one audit entry (resolver.audit: who, when, reason, counts), and this request's
ledger answer (uuid, audit sequence, counts: a retry with the same key answers the same, replayed).

Every former identifier and every erased uuid then answers NOT_FOUND (GetCustomer: reason CUSTOMER_DELETED).
A uuid already erased (by a CRM DELETE or an earlier Forget) is erased again: what can still be found of it (webhooks
that arrived since, named by a tombstoned record id) goes, and a new audit entry says so. NotFound for a uuid the
store never knew. The freed pages still hold the old bytes until LMDB reuses them: `resolver compact` (server
stopped) leaves none (README, "Erasure").
"""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resolver import audit, erase, ledger
from resolver.config import Settings
from resolver.errors import DeadlineExceeded, FieldViolation, InvalidInput, NotFound
from resolver.forget_events import Marks, scrub
from resolver.normalize import Kind
from resolver.records import Record
from resolver.store import Txn, uuid_bytes, uuid_text

if TYPE_CHECKING:
    from resolver.service import Service

MAX_REASON = 512
SOURCE = "forget"  # the tombstone's and the DELETED change-log entry's source_system
ACTION = "FORGET"  # the audit entry's action


@dataclass(frozen=True, slots=True)
class ForgetCommand:
    idempotency_key: str
    fingerprint: str
    customer_uuid: str
    reason: str
    who: str  # the caller's token name ("" without [auth])
    now_us: int
    expires_us: int


@dataclass(frozen=True, slots=True)
class ForgetResult:
    customer_uuid: str  # the customer erased: the survivor the requested uuid resolved to
    audit_sequence: int
    removed: dict[str, int] = field(default_factory=dict)
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        # "forgotten_uuid", not "customer_uuid": the ledger keeps PII references for answers naming a customer
        # (resolver.pii_refs.pii_owners), and this answer holds none
        return {"forgotten_uuid": self.customer_uuid, "audit_sequence": self.audit_sequence, "removed": self.removed}

    @classmethod
    def from_json(cls, d: dict[str, Any], *, replayed: bool) -> ForgetResult:
        return cls(d["forgotten_uuid"], d["audit_sequence"], dict(d["removed"]), replayed)


def forget(service: Service, key: str, customer_uuid: str, reason: str, who: str,
           deadline: float | None = None) -> ForgetResult:
    """Validate, then erase in one durable write transaction of the service's writer (the gRPC method and the
    CLI). `who`: the caller's token name; `deadline` (time.monotonic) as in Service.upsert."""
    cmd = prepare(key, customer_uuid, reason, who, service.settings, now_us=time.time_ns() // 1000)
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed before the erasure started; nothing was written")
    settings = service.settings
    return service.writer.submit(lambda view, c: apply(view, c, settings), cmd, deadline=deadline)


def prepare(key: str, customer_uuid: str, reason: str, who: str, settings: Settings, *, now_us: int) -> ForgetCommand:
    """Validate the request (every bad field listed) and fix its clock. The reason is required (the audit entry
    says why), printable, at most MAX_REASON characters."""
    violations: list[FieldViolation] = []
    if (bad_key := ledger.check_key(key)) is not None:
        violations.append(bad_key)
    try:
        canonical = str(uuidlib.UUID(customer_uuid))
    except ValueError:
        canonical = ""
        violations.append(FieldViolation("customer_uuid", "not a UUID" if customer_uuid else "required",
                                         "INVALID" if customer_uuid else "REQUIRED"))
    if not reason.strip():
        violations.append(FieldViolation("reason", "required: the audit entry says why", "REQUIRED"))
    elif len(reason) > MAX_REASON or not reason.isprintable():
        violations.append(FieldViolation("reason", f"1-{MAX_REASON} printable characters", "INVALID"))
    if violations:
        raise InvalidInput(violations)
    fp = ledger.fingerprint({"op": "forget", "customer_uuid": canonical, "reason": reason})
    return ForgetCommand(key, fp, canonical, reason, who, now_us,
                         now_us + int(settings.reliability.idempotency_retention_s * 1_000_000))


def apply(view: Txn, cmd: ForgetCommand, settings: Settings) -> ForgetResult:
    """Erase the person inside the caller's write transaction; NotFound before any write for an unknown uuid."""
    stored = ledger.replay(view, cmd.idempotency_key, cmd.fingerprint, cmd.now_us)
    if stored is not None:
        return ForgetResult.from_json(stored, replayed=True)
    target = view.survivor(uuid_bytes(cmd.customer_uuid))
    rec = view.record(target)
    if rec is None and erase.tombstone(view, target) is None:
        raise NotFound(f"no customer {cmd.customer_uuid}")
    marks = Marks.of(target, _identifiers(view, target, rec))  # before erase() redacts where they are written
    removed = dict.fromkeys(("customers", "identifiers", "attributes", "interactions", "changes_redacted",
                             "ledger_redacted", "outbound_messages", "inbox_events", "event_dead_letters"), 0)
    erased: tuple[str, ...] = (uuid_text(target),)
    if rec is not None:
        done = erase.erase(view, rec, source_system=SOURCE, deleted_us=cmd.now_us, now_us=cmd.now_us)
        erased = done.customer_uuids
        removed.update(customers=len(done.customer_uuids), identifiers=len(rec.identifiers()),
                       attributes=len(rec.attributes), interactions=done.interactions,
                       changes_redacted=done.changes_redacted, ledger_redacted=done.ledger_redacted,
                       outbound_messages=done.outbound)
    bodies = scrub(view, marks, settings)
    if not settings.cluster.nats:  # a cluster node's inbox is its own: the replicated audit and answer cannot count it
        removed.update(inbox_events=bodies.inbox, event_dead_letters=bodies.dead_letters)
    entry = audit.append(view, at_us=cmd.now_us, who=cmd.who, action=ACTION, customer_uuid=uuid_text(target),
                         reason=cmd.reason, erased_uuids=erased, removed=removed)
    out = ForgetResult(uuid_text(target), entry.seq, removed)
    ledger.record(view, cmd.idempotency_key, cmd.fingerprint, cmd.expires_us, out.to_json())
    return out


def _identifiers(view: Txn, target: bytes, rec: Record | None) -> list[tuple[Kind, str]]:
    """Every identifier the person is known to have held: the record's now, the records the merge journal keeps
    (before each merge into it), and those its change-log entries added or removed."""
    if rec is None:
        return []
    out = rec.identifiers()
    family = erase._family(view, target)
    texts = {uuid_text(member) for member in family}
    for member in family:
        for entry in view.journal(member):
            for snapshot in (entry["survivor_before"], *entry["merged"]):
                out += Record.from_json(snapshot).identifiers()
        for seq in view.pii_refs(member)[0]:
            change = view.change(seq)
            if change is None or change.get("customer_uuid") not in texts:
                continue  # an entry about another customer that copies this one's PII (an unmerge restoring it)
            # what an unmerge removed went back to the customer it restored: that one's, not this one's
            lists = ("added",) if change.get("action") == "UNMERGED" else ("added", "removed")
            out += [(Kind(kind), value) for name in lists for kind, value in change.get(name) or ()
                    if kind in _KIND_VALUES and isinstance(value, str)]
    return out


_KIND_VALUES = frozenset(k.value for k in Kind)
