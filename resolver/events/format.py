"""The change-event format (the seed's webhook JSON) and its mapping onto attributes.

`interpret` is the one function that turns raw bytes into a `ChangeEvent` with the *current* configuration:
admission, the applier and a dead-letter replay all call it, so a fixed mapping takes effect on replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fastjsonschema
import orjson

from resolver._hotpath import normalize_email, normalize_phone
from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.errors import BlockedIdentifier, EventRejected, FieldViolation, IdentifierError
from resolver.identifiers import Skipped, policy_from
from resolver.normalize import Kind, Policy, mask, normalize_external_id

EVENT_TYPES = ("CREATE", "UPDATE", "DELETE")
_SCALAR = {"type": ["string", "number", "boolean", "null"]}

# The seed's example payload, as a JSON Schema. "signature" in the body is tolerated but never trusted:
# authenticity comes from the Standard Webhooks headers.
EVENT_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "additionalProperties": False,
    "required": ["event_type", "source_system", "timestamp", "record_id", "object_type", "change_set"],
    "properties": {
        "event_type": {"enum": list(EVENT_TYPES)},
        "source_system": {"type": "string", "minLength": 1, "maxLength": 64},
        "timestamp": {"type": "string", "format": "date-time", "maxLength": 64},
        "record_id": {"type": "string", "minLength": 1, "maxLength": 255},
        "object_type": {"type": "string", "minLength": 1, "maxLength": 64},
        "change_set": {
            "type": "object",
            "maxProperties": 256,
            "propertyNames": {"minLength": 1, "maxLength": 128},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["new_value"],
                "properties": {"old_value": _SCALAR, "new_value": _SCALAR},
            },
        },
        "signature": {"type": "string"},
    },
}
_validate = fastjsonschema.compile(EVENT_SCHEMA)


@dataclass(frozen=True, slots=True)
class FieldChange:
    attribute: str
    crm_field: str
    new: Any  # normalized; None clears
    old: Any  # normalized when it could be; compared with the stored value
    has_old: bool


@dataclass(frozen=True, slots=True)
class SlotChange:
    """A change of an identifier slot: `new` normalized (None empties the slot; a placeholder does too, and
    is reported in `ChangeEvent.skipped`); `old` normalized when it could be, else as sent."""

    crm_field: str
    kind: Kind
    new: str | None
    old: str | None
    has_old: bool


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """A validated, mapped, normalized event: what the applier executes."""

    source: str
    webhook_id: str
    event_type: str
    external_id: str
    object_type: str
    timestamp_us: int
    changes: tuple[FieldChange, ...]
    slots: tuple[SlotChange, ...] = ()
    skipped: tuple[Skipped, ...] = ()  # placeholder identifiers (contract §2): never indexed


def _micros(text: str) -> int:
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError("no time zone")
    return int(when.timestamp() * 1_000_000)


def interpret(source: str, webhook_id: str, body: bytes, settings: Settings, schema: AttributeSchema) -> ChangeEvent:
    """Validate `body` (schema), map its CRM fields (the source's field_map) and normalize the values.

    Raises EventRejected with reason SCHEMA_INVALID, MAPPING_FAILED or INVALID_VALUE, listing what is wrong.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventRejected(f"the body is not JSON: {exc.msg}", reason="SCHEMA_INVALID") from None
    try:
        _validate(doc)
    except fastjsonschema.JsonSchemaValueException as exc:
        where = exc.path[1:] if exc.path else []
        field = ".".join(str(x) for x in where) or "(body)"
        raise EventRejected(f"the event does not match the schema: {exc.message}", reason="SCHEMA_INVALID",
                            violations=[FieldViolation(field, exc.message, "SCHEMA_INVALID")]) from None
    try:
        timestamp_us = _micros(doc["timestamp"])
    except ValueError:
        raise EventRejected("timestamp must be ISO 8601 with a time zone", reason="SCHEMA_INVALID",
                            violations=[FieldViolation("timestamp", "ISO 8601 with a time zone", "SCHEMA_INVALID")]) from None

    spec = settings.sources.get(source)
    violations: list[FieldViolation] = []
    if doc["source_system"] != source:
        violations.append(FieldViolation("source_system", f"the event says {doc['source_system']!r}, the endpoint "
                                         f"is for {source!r}", "SOURCE_MISMATCH"))
    field_map = spec.field_map if spec is not None else {}
    id_map = spec.identifiers if spec is not None else {}
    unmapped = [f for f in doc["change_set"] if f not in field_map and f not in id_map]
    violations += [FieldViolation(f"change_set.{f}", f"no mapping for {f} in sources.{source}.field_map or "
                                  f"sources.{source}.identifiers", "UNMAPPED_FIELD")
                   for f in unmapped]
    if violations:
        raise EventRejected(f"the event cannot be mapped: {len(violations)} problem(s)", reason="MAPPING_FAILED",
                            violations=violations)

    try:
        external_id = normalize_external_id(doc["record_id"])
    except IdentifierError as exc:
        violations.append(FieldViolation("record_id", exc.message, exc.reason))
        external_id = ""
    attr_set = {f: v for f, v in doc["change_set"].items() if f in field_map}
    news = {field_map[f]: v["new_value"] for f, v in attr_set.items()}
    normalized, bad = schema.normalize(news, prefix="change_set")
    crm_of = {field_map[f]: f for f in attr_set}
    violations += [FieldViolation(f"change_set.{crm_of.get(v.field.split('.', 1)[1], v.field)}.new_value",
                                  v.description, v.reason) for v in bad]
    slots, skipped = _slot_changes(doc["change_set"], id_map, settings, spec.default_region if spec else None,
                                   violations)
    if violations:
        raise EventRejected(f"the event has {len(violations)} invalid value(s)", reason="INVALID_VALUE",
                            violations=violations)
    changes = []
    for crm, change in attr_set.items():
        attr = field_map[crm]
        has_old = "old_value" in change
        old = change.get("old_value")
        if has_old and old is not None:
            olds, bad_old = schema.normalize({attr: old})
            old = olds.get(attr, old) if not bad_old else old  # an unnormalizable old value is compared as sent
        changes.append(FieldChange(attr, crm, normalized[attr], old, has_old))
    return ChangeEvent(source, webhook_id, doc["event_type"], external_id, doc["object_type"], timestamp_us,
                       tuple(changes), slots, skipped)


_KINDS = {"phone": Kind.PHONE, "email": Kind.EMAIL}


def _slot_changes(change_set: dict[str, Any], id_map: Mapping[str, str], settings: Settings, region: str | None,
                  violations: list[FieldViolation]) -> tuple[tuple[SlotChange, ...], tuple[Skipped, ...]]:
    """The identifier slots an event changes, normalized exactly as an Upsert normalizes (the same policy):
    a value that cannot be normalized is a violation (the whole event is refused), a placeholder empties
    the slot and is reported as skipped."""
    policy = _policy(settings)
    slots: list[SlotChange] = []
    skipped: list[Skipped] = []
    for crm, change in change_set.items():
        kind = _KINDS.get(id_map.get(crm, ""))
        if kind is None:
            continue
        new = change["new_value"]
        if new is not None and not isinstance(new, str):
            violations.append(FieldViolation(f"change_set.{crm}.new_value", f"a {kind.name.lower()} is text",
                                             "INVALID_VALUE"))
            continue
        if new is not None:
            try:
                new = _normalize(kind, new, region, policy)
            except BlockedIdentifier as exc:
                skipped.append(Skipped(kind, mask(kind, new), exc.reason, exc.message))
                new = None
            except IdentifierError as exc:
                violations.append(FieldViolation(f"change_set.{crm}.new_value", exc.message, exc.reason))
                continue
        old = change.get("old_value")
        if isinstance(old, str):
            try:
                old = _normalize(kind, old, region, policy)
            except IdentifierError:
                pass  # compared as sent: it will differ from what the slot holds, a conflict
        elif old is not None:
            old = str(old)
        slots.append(SlotChange(crm, kind, new, old, "old_value" in change))
    return tuple(slots), tuple(skipped)


def _normalize(kind: Kind, value: str, region: str | None, policy: Policy) -> str:
    return normalize_phone(value, region, policy) if kind == Kind.PHONE else normalize_email(value, policy)


_last_policy: tuple[Settings, Policy] | None = None


def _policy(settings: Settings) -> Policy:
    """The Upsert path's normalization policy for these settings (built once: a process has one settings)."""
    global _last_policy
    if _last_policy is None or _last_policy[0] is not settings:
        _last_policy = (settings, policy_from(settings))
    return _last_policy[1]
