"""CRM activities (contract §5b): subject templates, owners, and the blueprint check of `[activity]` and
`[interactions]`."""

from __future__ import annotations

from typing import Any

import pytest

from resolver.activity import MAX_SUBJECT, iso_utc, parse_subject, render, subject_problems
from resolver.config import ActivitySettings, describe, settings_from_document
from resolver.errors import ConfigError

INTERACTION = {"interaction_id": "call-1", "channel": "voice", "occurred_us": 1_714_557_600_123_456,
               "agent_id": "agent-7", "queue": "billing", "disposition": "resolved"}
ACTIVITY = ActivitySettings(record_type="Task", subject="Inbound {channel} call - {queue} - {disposition}",
                            owners={"agent-7": "005A"}, default_owner="005Q")


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        settings_from_document(doc, {"SECRET": "s3cret"})
    return err.value.problems


def test_render_is_the_documented_dict_and_deterministic() -> None:
    got = render(INTERACTION, ACTIVITY, customer_uuid="u-1", external_id="CRM-1")
    assert got == {"record_type": "Task", "subject": "Inbound voice call - billing - resolved", "owner": "005A",
                   "customer_uuid": "u-1", "external_id": "CRM-1", "occurred_at": "2024-05-01T10:00:00.123456Z",
                   "channel": "voice", "disposition": "resolved"}
    assert render(dict(INTERACTION), ACTIVITY, customer_uuid="u-1", external_id="CRM-1") == got


def test_an_agent_outside_the_map_gets_the_default_owner() -> None:
    got = render({**INTERACTION, "agent_id": "agent-99"}, ACTIVITY, customer_uuid="", external_id=None)
    assert (got["owner"], got["customer_uuid"], got["external_id"]) == ("005Q", "", None)
    assert render({**INTERACTION, "agent_id": ""}, ACTIVITY, customer_uuid="", external_id=None)["owner"] == "005Q"


def test_every_placeholder_renders_and_braces_escape() -> None:
    subject = "{{x}} {interaction_id} {agent_id} {occurred_at} {channel}/{queue}/{disposition}"
    got = render(INTERACTION, ActivitySettings(subject=subject, default_owner="o"), customer_uuid="", external_id=None)
    assert got["subject"] == "{x} call-1 agent-7 2024-05-01T10:00:00.123456Z voice/billing/resolved"
    assert iso_utc(0) == "1970-01-01T00:00:00Z"


def test_a_long_subject_is_clipped() -> None:
    got = render({**INTERACTION, "queue": "q" * 400}, ACTIVITY, customer_uuid="", external_id=None)
    assert len(got["subject"]) == MAX_SUBJECT and got["subject"].endswith("...")


@pytest.mark.parametrize(("template", "says"), [
    ("{customer_name}", "unknown placeholder {customer_name}"),
    ("{channel.__class__}", "unknown placeholder"),
    ("{channel[0]}", "unknown placeholder"),
    ("{}", "unknown placeholder {}"),
    ("{channel!r}", "no conversion or format spec"),
    ("{queue:>20}", "no conversion or format spec"),
    ("Call {channel", "malformed template"),
    ("Call } here", "malformed template"),
])
def test_bad_templates_are_refused(template: str, says: str) -> None:
    assert says in subject_problems(template)[0]
    with pytest.raises(ValueError):
        parse_subject(template)
    found = problems({"activity": {"subject": template, "default_owner": "o"}})
    assert len(found) == 1 and found[0].startswith("activity.subject: ") and says in found[0]


def test_an_activity_needs_a_default_owner() -> None:
    found = problems({"activity": {"record_type": "Task", "owners": {"a": "b"}}})
    assert len(found) == 1 and found[0].startswith("activity.default_owner: required")
    assert problems({"activity": {"default_owner": "o", "bogus": 1}})[0].startswith("activity:")


def test_a_destination_sending_interactions_needs_an_activity() -> None:
    outbound = {"crm": {"url": "https://crm.example/hooks", "secrets": [{"env": "SECRET"}],
                        "events": ["interaction.recorded", "customer.updated"]}}
    found = problems({"outbound": outbound})
    assert len(found) == 1 and found[0].startswith("outbound.crm.events: sends interaction.recorded")
    ok = settings_from_document({"outbound": outbound, "activity": {"default_owner": "005Q"}}, {"SECRET": "s3cret"})
    assert ok.activity is not None and ok.activity.record_type == "Task"
    others = {"crm": {**outbound["crm"], "events": ["customer.updated"]}}
    assert settings_from_document({"outbound": others}, {"SECRET": "s3cret"}).activity is None


def test_the_last_interaction_attribute_is_checked() -> None:
    # not declared while attributes are: named explicitly, a problem; left to the default, not tracked
    declared = {"name": {"type": "string"}}
    assert problems({"attributes": declared, "interactions": {"last_interaction_attribute": "last_call"}})[0] \
        .startswith("interactions.last_interaction_attribute: 'last_call' is not a declared attribute")
    quiet = settings_from_document({"attributes": declared}, {})
    assert quiet.interactions.last_interaction_attribute == ""
    assert "last interaction not tracked" in describe(quiet)
    # declared: used by default; it must be a date or date-time, and no source's to own
    assert settings_from_document({"attributes": {"last_interaction_date": {"type": "date"}}}, {}) \
        .interactions.last_interaction_attribute == "last_interaction_date"
    assert "must be a date-time or a date" in problems({"attributes": {"last_interaction_date": {"type": "string"}}})[0]
    owned = {"last_interaction_date": {"type": "date-time", "owner": "SALESFORCE"}}
    assert "owned by SALESFORCE" in problems({"attributes": owned})[0]
    sealed = {"last_interaction_date": {"type": "date-time", "sensitive": True}}  # its value would sit in the ledger
    assert "is sensitive" in problems({"attributes": sealed, "server": {"insecure": True}})[0]
    assert settings_from_document({"attributes": owned, "interactions": {"last_interaction_attribute": ""}}, {}) \
        .interactions.last_interaction_attribute == ""
    # the open schema (no attributes declared) tracks the default
    assert settings_from_document({}, {}).interactions.last_interaction_attribute == "last_interaction_date"


def test_interactions_table_shape_and_summary() -> None:
    s = settings_from_document({"interactions": {"create_customer": True, "history": 20},
                                "activity": {"default_owner": "005Q", "owners": {"a-1": "005A"}}}, {})
    assert (s.interactions.create_customer, s.interactions.history) == (True, 20)
    text = describe(s)
    assert "interactions: 20 kept per customer" in text and "create a customer" in text
    assert 'activity: Task "{channel} interaction - {disposition}", owner from 1 agent(s), default 005Q' in text
    assert "activity: none" in describe(settings_from_document({}, {}))
    found = problems({"interactions": {"history": 0, "last_interaction_attribute": "1bad"}})
    assert {p.split(":")[0] for p in found} == {"interactions.history", "interactions.last_interaction_attribute"}
