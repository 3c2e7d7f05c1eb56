"""What a change-log entry becomes for one destination: a Standard Webhooks message (contract §5b).

Built once, inside the change's own write transaction (resolver.outbound.outbox), from the entry and the
customer's record as that transaction sees it. The body stored is the body sent on every attempt (only the
signature and its timestamp are made per attempt) and its webhook-id is derived from the destination and the
change's sequence, so a CRM that de-duplicates on webhook-id sees one message however often it is re-sent.
Nothing here reads a clock or draws a random id: the same change makes the same bytes.

Body: `{"type": EVENT, "timestamp": the change's commit time (ISO 8601, UTC), "data": {...}}`; every `data`
carries `customer_uuid`, `sequence` (the change's: increasing per customer), `version` and `source_system`.

| change | event | data beyond those |
| --- | --- | --- |
| CREATED | customer.created | external_id, identifiers, attributes |
| UPDATED | customer.updated | external_id, attributes (new values), previous (old values); identifiers_added, _removed (*) |
| MERGED | customer.merged | external_id, merged_uuids, attributes, previous, identifiers_added |
| UNMERGED | customer.unmerged | external_id, restored_uuid, restored_version, attributes, previous, identifiers_removed |
| DELETED | customer.deleted | erased_uuids (no PII) |
| INTERACTION_RECORDED | interaction.recorded | external_id, interaction_id, activity, interaction, attributes |

(*) only for a destination that lists no `fields`. Attributes are the destination's `fields` (none listed: every
attribute), never a sensitive one (stored encrypted, it never leaves in a message); a customer.updated that changes
none of them is not sent. A change whose source_system is the destination's own (`[outbound.NAME] source_system`,
default NAME: the CRM's webhooks, its middleware's Upserts) is not echoed back.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from resolver.config import OutboundSpec, Settings
from resolver.events.dlq import mask_value
from resolver.normalize import Kind, mask
from resolver.redact import redact

EVENT_OF_ACTION = {"CREATED": "customer.created", "UPDATED": "customer.updated", "MERGED": "customer.merged",
                   "UNMERGED": "customer.unmerged", "DELETED": "customer.deleted",
                   "INTERACTION_RECORDED": "interaction.recorded"}
_KINDS = {Kind.EXTERNAL_ID.value: "external_ids", Kind.EMAIL.value: "emails", Kind.PHONE.value: "phones"}
# data keys whose values are never PII (uuids, numbers, names of things): shown as they are when masked
_PLAIN_KEYS = frozenset({"customer_uuid", "sequence", "version", "source_system", "merged_uuids", "restored_uuid",
                         "restored_version", "erased_uuids", "interaction_id"})
_MASK_KIND = {"external_id": Kind.EXTERNAL_ID, "external_ids": Kind.EXTERNAL_ID, "emails": Kind.EMAIL,
              "phones": Kind.PHONE}


def webhook_id(destination: str, seq: int) -> str:
    """The webhook-id of the message a change (sequence `seq`) makes for `destination`: the same on every attempt."""
    return f"msg_{destination}_{seq}"


def iso_time(us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC with a Z ("2026-01-01T00:00:00.000000Z")."""
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Message:
    """One message for one destination, as queued."""

    destination: str
    event_type: str
    customer_uuid: str
    owners: tuple[str, ...]  # customers whose PII the body copies: erasing one of them drops the message
    webhook_id: str
    body: bytes


class Route:
    """One destination's subscription, prepared once from the blueprint: `message(change, external_id)`."""

    def __init__(self, dest: OutboundSpec, settings: Settings) -> None:
        self.name = dest.name
        self.events = frozenset(dest.events)
        self.fields = frozenset(dest.fields) if dest.fields else None
        self.hidden = frozenset(n for n, spec in settings.attributes.items() if spec.sensitive)
        self.source_system = dest.source_system

    def wants(self, change: Mapping[str, Any]) -> str | None:
        """The event type this destination is sent for `change`, before looking at its content (None: none)."""
        event = EVENT_OF_ACTION.get(change.get("action", ""))
        if event is None or event not in self.events:
            return None
        if self.source_system and change.get("source_system") == self.source_system:
            return None  # it came from this destination's own system: never echoed back
        return event

    def attributes(self, values: Mapping[str, Any] | None) -> dict[str, Any]:
        """The attributes of `values` this destination is sent: never a sensitive one, even when listed (the change
        log holds it encrypted, and a message body at rest in the outbox must not hold it in clear)."""
        if not values:
            return {}
        if self.fields is not None:
            return {k: v for k, v in values.items() if k in self.fields and k not in self.hidden}
        return {k: v for k, v in values.items() if k not in self.hidden}

    def message(self, change: Mapping[str, Any], external_id: str | None) -> Message | None:
        """The message `change` makes for this destination (None: it is not sent one). `external_id`: the
        customer's, as the change's transaction sees its record (None: no record, or none held)."""
        event = self.wants(change)
        if event is None:
            return None
        uid = change.get("customer_uuid") or ""
        data: dict[str, Any] = {"customer_uuid": uid or None, "sequence": change["seq"],
                                "version": change.get("version"), "source_system": change.get("source_system") or None}
        owners: tuple[str, ...] = (uid,) if uid else ()
        if event != "customer.deleted":
            data["external_id"] = external_id
        attrs = self.attributes(change.get("attributes"))
        if event == "customer.created":
            data["identifiers"] = identifiers(change.get("added"))
            data["attributes"] = attrs
        elif event == "customer.updated":
            added, removed = change.get("added") or [], change.get("removed") or []
            if self.fields is None and (added or removed):
                data["identifiers_added"] = identifiers(added)
                data["identifiers_removed"] = identifiers(removed)
            elif not attrs:
                return None  # none of this destination's attributes changed
            data["attributes"] = attrs
            data["previous"] = self.attributes(change.get("attributes_old"))
        elif event == "customer.merged":
            data["merged_uuids"] = list(change.get("merged_uuids", ()))
            data["attributes"] = attrs
            data["previous"] = self.attributes(change.get("attributes_old"))
            data["identifiers_added"] = identifiers(change.get("added"))
            owners += tuple(data["merged_uuids"])
        elif event == "customer.unmerged":
            data["restored_uuid"] = change.get("restored_uuid")
            data["restored_version"] = change.get("restored_version")
            data["attributes"] = attrs
            data["previous"] = self.attributes(change.get("attributes_old"))
            data["identifiers_removed"] = identifiers(change.get("removed"))
            owners += (change["restored_uuid"],) if change.get("restored_uuid") else ()
        elif event == "customer.deleted":
            data["erased_uuids"] = list(change.get("erased_uuids", ()))
            owners = ()  # uuids only: erasure keeps it, and it is sent
        else:  # interaction.recorded: the CRM activity, and the interaction it records
            data["interaction_id"] = change.get("interaction_id")
            data["activity"] = change.get("activity") or {}
            data["interaction"] = change.get("interaction") or {}
            data["attributes"] = attrs  # what recording it changed (last_interaction_date), of this one's fields
        body = orjson.dumps({"type": event, "timestamp": iso_time(change["at_us"]), "data": data})
        return Message(self.name, event, uid, owners, webhook_id(self.name, change["seq"]), body)


def identifiers(pairs: Any) -> dict[str, list[str]]:
    """A change entry's [[kind, value], ...] as {"external_ids": [...], "emails": [...], "phones": [...]} (only the
    kinds present; a merge can move several external_ids)."""
    out: dict[str, list[str]] = {}
    for kind, value in pairs or ():
        name = _KINDS.get(kind)
        if name is not None:
            out.setdefault(name, []).append(value)
    return out


def masked_payload(body: bytes) -> str:
    """A message body for operators: event type, time, uuids and numbers kept; every identifier and value
    masked through resolver.normalize.mask (the project's one masking choke point)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"(not JSON: {len(body)} bytes)"
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        return f"(not a message: {len(body)} bytes)"
    # plain keys: uuids and numbers of ours, and source_system, which a caller names (so: through resolver.redact)
    data = {k: ((redact(v) if isinstance(v, str) else v) if k in _PLAIN_KEYS else _masked(k, v))
            for k, v in doc["data"].items()}
    return orjson.dumps({"type": doc.get("type"), "timestamp": doc.get("timestamp"), "data": data}).decode()


def _masked(key: str, value: Any) -> Any:
    """`value` with every leaf masked; identifiers by their kind (an email keeps its domain)."""
    if isinstance(value, dict):
        return {k: _masked(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(key, v) for v in value]
    if isinstance(value, str) and key in _MASK_KIND:
        return mask(_MASK_KIND[key], value)
    return mask_value(value)
