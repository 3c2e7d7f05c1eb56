"""CRM activities (contract §5b): what a recorded interaction becomes in the CRM.

The blueprint's `[activity]` names the record type ("Task"), a subject template over the interaction's fields
("Inbound {channel} call - {queue} - {disposition}") and the owner: the CRM user `owners` maps the interaction's
agent_id to, else `default_owner`. `render` is a function of the interaction, its customer and those settings
alone, so every node renders the same activity (contract §10); resolver.interactions stores what it renders in
the INTERACTION_RECORDED change-log entry, which the outbox delivers as it is.

A template is a Python format string restricted to plain placeholders (`SUBJECT_FIELDS`): no attribute or index
access, conversion or format spec, so a blueprint cannot reach beyond the interaction's own fields. The blueprint
check refuses any other template (`subject_problems`).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resolver.config.tables import ActivitySettings

SUBJECT_FIELDS = ("channel", "queue", "disposition", "agent_id", "interaction_id", "occurred_at")
MAX_SUBJECT = 255  # characters: a CRM subject field's usual size (Salesforce Task.Subject); longer ones are clipped
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_utc(us: int) -> str:
    """An instant (µs since the epoch) as ISO 8601 in UTC, `Z`-suffixed: the form a date-time attribute is stored in
    (resolver.attributes)."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat().replace("+00:00", "Z")


@functools.lru_cache(maxsize=16)
def parse_subject(template: str) -> tuple[tuple[str, str | None], ...]:
    """The template as (literal text, placeholder or None) pieces; ValueError saying what is wrong with it."""
    pieces: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(f"malformed template ({exc}; write {{{{ and }}}} for literal braces)") from None
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append((literal, None))
            continue
        if name not in SUBJECT_FIELDS:
            raise ValueError(f"unknown placeholder {{{name}}} (known: {', '.join(SUBJECT_FIELDS)})")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}}: no conversion or format spec (write {{{name}}})")
        pieces.append((literal, name))
    return tuple(pieces)


def subject_problems(template: str) -> list[str]:
    """What is wrong with a subject template, for the blueprint check (empty: it renders)."""
    try:
        parse_subject(template)
    except ValueError as exc:
        return [str(exc)]
    return []


def render(interaction: Mapping[str, Any], activity: ActivitySettings, *, customer_uuid: str,
           external_id: str | None) -> dict[str, Any]:
    """The CRM activity of an interaction (`interaction`: interaction_id, channel, occurred_us, agent_id, queue,
    disposition) recorded against `customer_uuid` ("" when unassociated) holding `external_id` (None: none).
    Deterministic: the same inputs render the same dict."""
    occurred_at = iso_utc(interaction["occurred_us"])
    values = {name: interaction.get(name, "") for name in SUBJECT_FIELDS} | {"occurred_at": occurred_at}
    subject = "".join(literal + (values[name] if name is not None else "")
                      for literal, name in parse_subject(activity.subject))
    if len(subject) > MAX_SUBJECT:
        subject = subject[: MAX_SUBJECT - 3] + "..."
    return {
        "record_type": activity.record_type,
        "subject": subject,
        "owner": activity.owners.get(interaction.get("agent_id", ""), activity.default_owner),
        "customer_uuid": customer_uuid,
        "external_id": external_id,
        "occurred_at": occurred_at,
        "channel": interaction.get("channel", ""),
        "disposition": interaction.get("disposition", ""),
    }
