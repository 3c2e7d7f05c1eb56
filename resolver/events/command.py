"""One change event's application as a command (contract §10): what the events applier applies, on one machine
directly (resolver.events.applier), in a cluster through the replicated log (resolver.cluster.codec `event.v1`).

The command carries the event as it was admitted (source, webhook-id, body) and everything its apply would
otherwise read from the clock or draw at random: the application time and the uuid a CREATE gives a new customer.
Interpreting the body (resolver.events.format) depends on the blueprint alone, which every node shares, so every
node that applies the same command reaches the same state. Applying it again changes nothing: every field and
identifier slot keeps the event time that set it, and an event no newer than that is stale (resolver.events.apply).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.events.apply import Applied, apply_event
from resolver.events.format import interpret
from resolver.store import Txn
from resolver.uuids import new_customer_uuid


@dataclass(frozen=True, slots=True)
class EventCommand:
    """Apply the stored event (`source`, `webhook_id`, `body`) at `now_us`; a CREATE makes customer `new_uuid`.
    `replay`: "" when the event leaves the inbox; for an operator's replay of a dead letter, what makes that replay
    an application of its own (the node's dead-letter id and the replay's time)."""

    source: str
    webhook_id: str
    body: bytes
    now_us: int
    new_uuid: str
    replay: str = ""

    @property
    def key(self) -> str:
        """The event's identity (a CRM sends one webhook-id per event) and the replay: the log's message id derives
        from it, so the same event from two nodes' inboxes, or twice from one, is one command."""
        return f"{self.source}\0{self.webhook_id}\0{self.replay}"

    @property
    def fingerprint(self) -> str:
        """The body's hash: the same webhook-id with another body is another command, not a retry."""
        return hashlib.blake2b(self.body, digest_size=16).hexdigest()


def command_for(meta: dict[str, Any], body: bytes, now_us: int, replay: str = "") -> EventCommand:
    """The command applying the stored event (`meta`, `body`: resolver.events.envelope) at `now_us`."""
    return EventCommand(meta["source"], meta["webhook_id"], body, now_us, new_customer_uuid(), replay)


def apply(view: Txn, cmd: EventCommand, settings: Settings, schema: AttributeSchema) -> Applied:
    """Interpret and apply the event in the caller's transaction; EventRejected (nothing written) if it cannot be."""
    ev = interpret(cmd.source, cmd.webhook_id, cmd.body, settings, schema)
    return apply_event(view, ev, schema, now_us=cmd.now_us, new_uuid=cmd.new_uuid,
                       identifiers_per_customer=settings.limits.identifiers_per_customer,
                       max_fanout=settings.matching.max_fanout)


_schemas: dict[int, tuple[Settings, AttributeSchema]] = {}
_schemas_lock = threading.Lock()


def schema_of(settings: Settings) -> AttributeSchema:
    """The attribute schema of `settings`, compiled once per settings object (a replica's applier passes the same
    one to every command; compiling the validators per event would cost more than the apply)."""
    with _schemas_lock:
        held = _schemas.get(id(settings))
        if held is None or held[0] is not settings:
            held = _schemas[id(settings)] = (settings, AttributeSchema(settings))
        return held[1]


def replicated_apply(view: Txn, cmd: EventCommand, settings: Settings) -> Applied:
    """`apply` with the schema of `settings`: the replicated log's entry (resolver.cluster.codec)."""
    return apply(view, cmd, settings, schema_of(settings))
