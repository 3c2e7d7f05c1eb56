"""The event format: the seed's payload validates and maps; schema, mapping and value failures say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.attributes import AttributeSchema
from resolver.config import settings_from_document
from resolver.errors import EventRejected
from resolver.events import envelope
from resolver.events.dlq import masked_payload
from resolver.events.format import interpret

SEED = (Path(__file__).resolve().parents[1] / "fixtures" / "seed_event.json").read_bytes()  # the seed's example, byte for byte

DOC = {
    "attributes": {"status": {"type": "string", "enum": ["Active", "Churned"]}, "credit_limit": {"type": "number"}},
    "sources": {"SALESFORCE": {"field_map": {"Customer_Status__c": "status", "Credit_Limit__c": "credit_limit"}}},
}


@pytest.fixture
def settings():  # noqa: ANN201
    return settings_from_document(DOC, {})


def test_seed_payload_maps(settings) -> None:  # noqa: ANN001
    ev = interpret("SALESFORCE", "w1", SEED, settings, AttributeSchema(settings))
    assert (ev.event_type, ev.external_id, ev.timestamp_us) == ("UPDATE", "a1B2c3D4e5F6g7H8", 1698417000 * 10**6)
    assert [(c.attribute, c.old, c.new) for c in ev.changes] == [("status", "Active", "Churned"), ("credit_limit", 5000, 0)]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "SCHEMA_INVALID"),
        (SEED.replace(b'"UPDATE"', b'"PATCH"'), "SCHEMA_INVALID"),
        (SEED.replace(b'"record_id"', b'"recordId"'), "SCHEMA_INVALID"),
        (SEED.replace(b"2023-10-27T14:30:00Z", b"2023-10-27T14:30:00"), "SCHEMA_INVALID"),
        (SEED.replace(b"Credit_Limit__c", b"Credit_Score__c"), "MAPPING_FAILED"),
        (SEED.replace(b'"source_system": "SALESFORCE"', b'"source_system": "HUBSPOT"'), "MAPPING_FAILED"),
        (SEED.replace(b'"Churned"', b'"Gone"'), "INVALID_VALUE"),
    ],
)
def test_rejections(settings, body: bytes, reason: str) -> None:  # noqa: ANN001
    with pytest.raises(EventRejected) as e:
        interpret("SALESFORCE", "w1", body, settings, AttributeSchema(settings))
    assert e.value.reason == reason


def test_envelope_keeps_bytes_and_masking_hides_values() -> None:
    meta, body = envelope.decode(envelope.encode({"a": "x\ny"}, SEED + b"\n\x00"))
    assert meta == {"a": "x\ny"} and body == SEED + b"\n\x00"
    shown = masked_payload(SEED)
    assert "a1B2c3D4e5F6g7H8" not in shown and "Churned" not in shown and "5000" not in shown
    assert "Customer_Status__c" in shown and "UPDATE" in shown


def test_dedupe_entries_are_swept_after_the_window(tmp_path) -> None:  # noqa: ANN001
    from resolver.config import load_settings
    from resolver.events.inbox import dedupe_key, remember, sweep_ids
    from resolver.store import Store

    store = Store(load_settings(None, data_dir=str(tmp_path / "d"), map_size_mb=64))
    try:
        with store.write() as view:
            for i in range(5):
                remember(view.txn, store.db, dedupe_key("S", f"w{i}"), {"status": 202, "at_us": 1000 + i})
        assert sweep_ids(store, 1003) == 3
        with store.read() as view:
            assert view.count("ev_ids") == 2 and view.count("ev_ids_exp") == 2
    finally:
        store.close()
