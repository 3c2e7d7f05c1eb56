"""Interactions (contract §7, §5b): a call id recorded once against the customer it belongs to.

RecordInteraction is validate and normalize -> command -> apply in the writer's transaction -> reply, as Upsert:

1. `prepare` checks every field (all bad ones listed), normalizes the identifiers exactly as Upsert does
   (placeholders are reported as skipped) and fixes the clock, the fingerprint and the value the last-interaction
   attribute would take.
2. `apply`, in the writer's transaction: the interaction_id is the idempotency key, in the ledger under
   `ledger_key(interaction_id)` (a retry answers the stored response, replayed; the same id with other content is
   IdempotencyKeyReused), and once the ledger has forgotten it (retention) the interaction stored under that id
   (resolver.history) answers the same way, so a late retry cannot record a call twice either.
3. The customer: `customer_uuid` (aliases followed to the survivor; deleted: NotFound CUSTOMER_DELETED), else whom
   the identifiers resolve to, by Resolve's own decision (`Prober.decide`: external_id > email > phone): MATCHED,
   that customer; AMBIGUOUS, FailedPrecondition naming the candidates as Resolve ranks them; NOT_FOUND, nobody (the
   interaction is recorded unassociated) or, with `[interactions] create_customer`, a new customer holding the
   identifiers, created by `resolver.upsert.apply` in the same transaction.
4. `[interactions] last_interaction_attribute` is set to occurred_at, in the attribute's normalized form, only when
   that is later than the value stored (it never moves back, whatever order interactions arrive in); the record's
   version moves only then.
5. The interaction is stored (the history bounded), one INTERACTION_RECORDED change-log entry is appended (with the
   CRM activity, resolver.activity: the outbox and the change feed read it) and the ledger entry is written.

Interactions are stored in the `interactions` database by resolver.history (its key layout is documented there):
each customer's history, newest first, bounded. An interaction stays under the uuid it was recorded against: a
merge moves nothing, and ListInteractions reads the survivor and every customer merged into it (the merge journal).
Erasure forgets a deleted customer's interactions with it (`history.forget`, called by resolver.erase).
"""

from __future__ import annotations

import math
import unicodedata
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from resolver import activity, history, ledger, upsert
from resolver import erase as erasure
from resolver._probe_types import AMBIGUOUS, MATCHED
from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.errors import (
    BlockedIdentifier,
    FailedPrecondition,
    FieldViolation,
    IdempotencyKeyReused,
    IdentifierError,
    InvalidInput,
    NotFound,
)
from resolver.identifiers import Identifiers, RawIdentifiers, Skipped, normalize_identifiers
from resolver.normalize import ASCII_CONTROL, Kind, Policy, check_region
from resolver.records import Record, encode_json
from resolver.resolve import fanned_skipped
from resolver.store import Txn, uuid_bytes
from resolver.uuids import new_customer_uuid

# The ledger key of an interaction: NUL first, a character no caller's idempotency key may hold
# (ledger.check_key refuses control characters), so no Upsert, Merge or Unmerge key can ever collide with it.
LEDGER_PREFIX = "\x00interaction:"
SOURCE_SYSTEM = "interaction"  # the source_system of a customer an interaction creates
DEFAULT_LIST = 50
MAX_DETAILS_BYTES = 4096  # `details` as stored (compact JSON): it is copied into the change log and every webhook
MAX_AHEAD_US = 24 * 3600 * 1_000_000  # occurred_at at most this far past the server's clock (it would stick)
# the bounded texts of an interaction, and their lengths in characters
TEXT_FIELDS = (("channel", 64), ("agent_id", 255), ("queue", 255), ("disposition", 255))

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REUSED = ("this interaction_id was already recorded with other content; a new interaction needs a new "
           "interaction_id")


@dataclass(frozen=True, slots=True)
class InteractionInput:
    """A RecordInteraction as the caller sent it (occurred_us None: occurred_at not given)."""

    interaction_id: str
    occurred_us: int | None
    customer_uuid: str = ""
    identifiers: RawIdentifiers = RawIdentifiers()
    channel: str = ""
    agent_id: str = ""
    queue: str = ""
    disposition: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    default_region: str = ""


@dataclass(frozen=True, slots=True)
class InteractionCommand:
    """A validated, normalized RecordInteraction with its clock fixed: the unit `apply` executes."""

    interaction_id: str
    fingerprint: str
    customer_uuid: str | None
    identifiers: Identifiers
    skipped: tuple[Skipped, ...]
    channel: str
    occurred_us: int
    agent_id: str
    queue: str
    disposition: str
    details: dict[str, Any]
    last_value: Any  # what the last-interaction attribute takes for occurred_at (None: no attribute tracked)
    last_us: int  # ... as an instant (a date: its midnight, UTC)
    new_uuid: str  # the uuid of the customer `[interactions] create_customer` would create
    now_us: int
    expires_us: int

    def interaction_json(self) -> dict[str, Any]:
        """The interaction's fields, as the change-log entry and the stored interaction carry them."""
        return {"channel": self.channel, "occurred_us": self.occurred_us, "agent_id": self.agent_id,
                "queue": self.queue, "disposition": self.disposition, "details": self.details}


@dataclass(frozen=True, slots=True)
class InteractionResult:
    interaction_id: str
    customer_uuid: str  # "": recorded unassociated
    customer_created: bool
    last_interaction_us: int | None  # the customer's last interaction after this one (None: not tracked, nobody)
    skipped: tuple[Skipped, ...] = ()
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"interaction_id": self.interaction_id, "customer_uuid": self.customer_uuid,
                "customer_created": self.customer_created, "last_interaction_us": self.last_interaction_us,
                "skipped": [[s.kind.value, s.masked, s.reason, s.detail] for s in self.skipped]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, replayed: bool) -> InteractionResult:
        return cls(d["interaction_id"], d["customer_uuid"], d["customer_created"], d["last_interaction_us"],
                   tuple(Skipped(Kind(k), m, r, t) for k, m, r, t in d["skipped"]), replayed)


def ledger_key(interaction_id: str) -> str:
    """The idempotency ledger's key of an interaction."""
    return LEDGER_PREFIX + interaction_id


def prepare(inp: InteractionInput, settings: Settings, schema: AttributeSchema, policy: Policy, *, now_us: int,
            new_uuid: str | None = None, deadline: float | None = None) -> InteractionCommand:
    """Validate and normalize everything; InvalidInput listing every bad field. DeadlineExceeded when `deadline`
    (time.monotonic()) passes while the identifiers are normalized."""
    violations: list[FieldViolation] = []
    if (bad_id := ledger.check_key(inp.interaction_id, "interaction_id")) is not None:
        violations.append(bad_id)
    customer_uuid = None
    if inp.customer_uuid:
        try:
            customer_uuid = str(uuidlib.UUID(inp.customer_uuid))
        except ValueError:
            violations.append(FieldViolation("customer_uuid", "not a UUID", "INVALID"))
    occurred_us = inp.occurred_us
    if occurred_us is None:
        violations.append(FieldViolation("occurred_at", "required: when the interaction happened", "REQUIRED"))
    elif not 0 < occurred_us <= now_us + MAX_AHEAD_US:
        violations.append(FieldViolation("occurred_at", "after 1970 and at most 24 h past the server's clock (the last "
                                         "interaction date never moves back: a future one would stick)", "INVALID"))
    texts: dict[str, str] = {}
    for name, limit in TEXT_FIELDS:
        texts[name], problem = _text(getattr(inp, name), limit)
        if problem:
            violations.append(FieldViolation(name, problem, "INVALID"))
    details = _details(inp.details, violations)
    region = None
    try:
        region = check_region(inp.default_region)
    except IdentifierError as exc:
        violations.append(FieldViolation("default_region", exc.message, exc.reason))
    ids, failures = normalize_identifiers(inp.identifiers, region, policy, "identifiers", deadline)
    skipped = []
    for f in failures:
        if isinstance(f.error, BlockedIdentifier):
            skipped.append(f.skipped())  # a withheld number is no error: the call is recorded all the same
        else:
            violations.append(FieldViolation(f.field, f.error.message, f.error.reason))
    if not inp.customer_uuid and not inp.identifiers:
        violations.append(FieldViolation("identifiers", "give customer_uuid or identifiers", "REQUIRED"))
    if violations:
        raise InvalidInput(violations)
    assert occurred_us is not None
    last_value, last_us = _last_value(settings, schema, occurred_us)
    fingerprint = ledger.fingerprint({"op": "interaction", "customer_uuid": customer_uuid, "identifiers": ids.as_dict(),
                                      "occurred_us": occurred_us, "details": details, **texts})
    return InteractionCommand(
        interaction_id=inp.interaction_id, fingerprint=fingerprint, customer_uuid=customer_uuid, identifiers=ids,
        skipped=tuple(skipped), occurred_us=occurred_us, details=details, last_value=last_value, last_us=last_us,
        new_uuid=new_uuid or new_customer_uuid(), now_us=now_us,
        expires_us=now_us + int(settings.reliability.idempotency_retention_s * 1_000_000), **texts,
    )


def _text(value: str, limit: int) -> tuple[str, str]:
    """A bounded text, trimmed and NFC-normalized, and what is wrong with it ("": nothing)."""
    text = unicodedata.normalize("NFC", value.strip())
    if len(text) > limit:
        return text, f"at most {limit} characters"
    if ASCII_CONTROL.search(text) if text.isascii() else any(unicodedata.category(c) == "Cc" for c in text):
        return text, "no control characters"
    return text, ""


def _details(values: Mapping[str, Any], violations: list[FieldViolation]) -> dict[str, Any]:
    """`details` as stored: integral numbers as integers (a Struct carries every number as a double), within
    MAX_DETAILS_BYTES; a NaN or an infinity is a violation. (Depth, lengths and counts: resolver.api.wire.)"""

    def plain(value: Any, where: str) -> Any:
        if isinstance(value, float):
            if not math.isfinite(value):
                violations.append(FieldViolation(where, "not a finite number", "NON_FINITE_NUMBER"))
            elif value.is_integer() and abs(value) < 2**53:
                return int(value)
        elif isinstance(value, dict):
            return {k: plain(v, f"{where}.{k[:32]}") for k, v in value.items()}
        elif isinstance(value, list):
            return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    details: dict[str, Any] = plain(dict(values), "details")
    if len(encode_json(details)) > MAX_DETAILS_BYTES:
        violations.append(FieldViolation("details", f"more than {MAX_DETAILS_BYTES} bytes as JSON", "LIMIT_EXCEEDED"))
    return details


def _last_value(settings: Settings, schema: AttributeSchema, occurred_us: int) -> tuple[Any, int]:
    """The value the last-interaction attribute takes for `occurred_us`, normalized as an Upsert would store it,
    and the instant it stands for (None, 0: no attribute is tracked)."""
    name = settings.interactions.last_interaction_attribute
    if not name:
        return None, 0
    spec = settings.attributes.get(name)
    if spec is not None and spec.type == "date":
        day = (_EPOCH + timedelta(microseconds=occurred_us)).date()
        text, instant = day.isoformat(), _instant_us(day.isoformat())
        assert instant is not None
    else:
        text, instant = activity.iso_utc(occurred_us), occurred_us
    values, bad = schema.normalize({name: text})
    if bad:  # the blueprint check accepts date and date-time attributes only: not expected
        raise InvalidInput([FieldViolation("occurred_at", f"cannot be stored in attributes.{name}: "
                                           f"{bad[0].description}", "INVALID")])
    return values[name], instant


def _instant_us(value: Any) -> int | None:
    """A stored date or date-time value as µs since the epoch (a date: its midnight, UTC; a date-time without an
    offset: UTC); None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            at = datetime(d.year, d.month, d.day, tzinfo=UTC)
        else:
            at = datetime.fromisoformat(value)
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
    except ValueError:
        return None
    return (at - _EPOCH) // timedelta(microseconds=1)


def apply(txn: Txn, cmd: InteractionCommand, settings: Settings) -> InteractionResult:
    """Record the interaction inside the caller's write transaction (see the module docstring). A domain error
    before any write when it cannot be recorded; the caller's transaction then aborts."""
    try:
        stored = ledger.replay(txn, ledger_key(cmd.interaction_id), cmd.fingerprint, cmd.now_us)
        if stored is None:
            stored = _recorded(txn, cmd)
    except IdempotencyKeyReused:
        raise IdempotencyKeyReused(_REUSED, field="interaction_id") from None
    if stored is not None:
        return InteractionResult.from_json(stored, replayed=True)

    rec, created, skipped = _customer(txn, cmd, settings)
    attr = settings.interactions.last_interaction_attribute
    changed: dict[str, Any] = {}
    changed_old: dict[str, Any] = {}
    last_us: int | None = None
    if rec is not None and attr:
        old = rec.attributes.get(attr)
        old_us = _instant_us(old)
        if old_us is None or cmd.last_us > old_us:  # an unreadable value is no date: replaced
            rec = rec.copy()
            rec.attributes[attr] = cmd.last_value
            rec.field_us[attr] = cmd.now_us
            rec.version += 1
            rec.updated_us = cmd.now_us
            txn.put_record(rec)
            changed[attr], changed_old[attr] = cmd.last_value, old
            last_us = cmd.last_us
        else:
            last_us = old_us
    customer_uuid = rec.uuid if rec is not None else ""
    interaction = cmd.interaction_json()
    change: dict[str, Any] = {
        "at_us": cmd.now_us, "customer_uuid": customer_uuid, "action": "INTERACTION_RECORDED",
        "version": rec.version if rec is not None else 0, "source_system": "", "interaction_id": cmd.interaction_id,
        "interaction": interaction,
        "activity": activity.render({"interaction_id": cmd.interaction_id, **interaction}, settings.activity,
                                    customer_uuid=customer_uuid,
                                    external_id=rec.external_id if rec is not None else None)
        if settings.activity is not None else None,
    }
    if changed:
        change["attributes"], change["attributes_old"] = changed, changed_old
    txn.append_change(change)
    result = InteractionResult(cmd.interaction_id, customer_uuid, created, last_us, cmd.skipped + tuple(skipped))
    history.put(txn, {"interaction_id": cmd.interaction_id, "customer_uuid": customer_uuid, **interaction,
                      "recorded_us": cmd.now_us, "fp": cmd.fingerprint, "response": result.to_json()},
                settings.interactions.history)
    ledger.record(txn, ledger_key(cmd.interaction_id), cmd.fingerprint, cmd.expires_us, result.to_json())
    return result


def _recorded(txn: Txn, cmd: InteractionCommand) -> dict[str, Any] | None:
    """The response the interaction got when it was recorded, if it is still stored (None: it is not);
    IdempotencyKeyReused when it was recorded with other content."""
    entry = history.by_id(txn, cmd.interaction_id)
    if entry is None:
        return None
    if entry["fp"] != cmd.fingerprint:
        raise IdempotencyKeyReused(_REUSED, field="interaction_id")
    response: dict[str, Any] = entry["response"]
    return response


def _customer(txn: Txn, cmd: InteractionCommand, settings: Settings) -> tuple[Record | None, bool, list[Skipped]]:
    """Whom the interaction is recorded against (None: nobody), whether it was created for it, and the identifiers
    skipped for fan-out."""
    if cmd.customer_uuid is not None:
        uid = txn.survivor(uuid_bytes(cmd.customer_uuid))
        rec = txn.record(uid)
        if rec is None:
            if erasure.tombstone(txn, uid) is not None:
                raise NotFound(f"customer {cmd.customer_uuid} was deleted", reason="CUSTOMER_DELETED")
            raise NotFound(f"no customer {cmd.customer_uuid}")
        return rec, False, []
    ids, limit = cmd.identifiers, settings.matching.max_fanout
    decision = txn.prober.decide(ids.external_id, ids.emails, ids.phones, limit, False)  # Resolve's rule
    skipped = fanned_skipped(decision.fanned, limit) if decision.fanned else []
    if decision.outcome == MATCHED:
        return txn.record(decision.uuids[0]), False, skipped
    if decision.outcome == AMBIGUOUS:
        held = [r for u in decision.uuids if (r := txn.record(u)) is not None]
        ranked = sorted(held, key=lambda r: (-r.updated_us, r.uuid))[: settings.matching.max_candidates]  # as Resolve
        raise FailedPrecondition(f"the identifiers match {len(held)} customers (AMBIGUOUS); name the customer_uuid",
                                 candidates=[r.uuid for r in ranked])
    if not settings.interactions.create_customer or not (ids.external_id or ids.emails or ids.phones):
        return None, False, skipped
    made = upsert.apply(txn, upsert.UpsertCommand(
        idempotency_key=ledger_key(cmd.interaction_id),  # its ledger entry is replaced by the interaction's
        fingerprint=cmd.fingerprint, customer_uuid=None, add=ids, remove=Identifiers(), attributes={},
        source_system=SOURCE_SYSTEM, expected_version=0, skipped=cmd.skipped, new_uuid=cmd.new_uuid,
        now_us=cmd.now_us, expires_us=cmd.expires_us), settings)
    return txn.record(uuid_bytes(made.customer_uuid)), made.action == "CREATED", skipped


def list_interactions(view: Txn, customer_uuid: str, limit: int, settings: Settings) -> list[dict[str, Any]]:
    """A customer's most recent interactions (as stored), newest first: at most `limit` (0: DEFAULT_LIST), never
    more than the history kept. A merged-away uuid answers for its survivor, whose list holds the interactions of
    every customer merged into it. InvalidInput for a malformed uuid; NotFound (CUSTOMER_DELETED when deleted)."""
    try:
        uid = view.survivor(uuid_bytes(customer_uuid))
    except ValueError:
        raise InvalidInput([FieldViolation("customer_uuid", "not a UUID" if customer_uuid else "required",
                                           "INVALID" if customer_uuid else "REQUIRED")]) from None
    if view.record(uid) is None:
        if erasure.tombstone(view, uid) is not None:
            raise NotFound(f"customer {customer_uuid} was deleted", reason="CUSTOMER_DELETED")
        raise NotFound(f"no customer {customer_uuid}")
    family = erasure._family(view, uid)  # the survivor and whoever was merged into it (the merge journal)
    return history.newest(view, family, min(limit or DEFAULT_LIST, settings.interactions.history))
