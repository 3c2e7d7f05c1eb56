"""Record provenance (contract §5): an email or phone stays while any holder holds it; the encoding keeps it."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.normalize import Kind
from resolver.records import Record, held_key, slot_holder, upsert_holder

VALUES = {Kind.PHONE: ["+16502530001", "+16502530002", "+16502530003"],
          Kind.EMAIL: ["a@example.com", "b@example.com"]}
HOLDERS = [upsert_holder(""), upsert_holder("CCAAS"), slot_holder("SF", "Phone", "r1"),
           slot_holder("SF", "MobilePhone", "r1"), slot_holder("SF", "Email", "r1")]
op = st.tuples(st.sampled_from(["add", "release", "drop"]), st.sampled_from([Kind.PHONE, Kind.EMAIL]),
               st.integers(0, 2), st.sampled_from(HOLDERS))


@given(st.lists(op, max_size=40))
@settings(max_examples=300)
def test_an_identifier_is_held_exactly_while_some_holder_holds_it(ops: list) -> None:
    rec = Record(uuid="00000000-0000-4000-8000-000000000001")
    model: dict[tuple[Kind, str], set[str]] = {}  # the specification: who holds what
    for name, kind, i, holder in ops:
        value = VALUES[kind][i % len(VALUES[kind])]
        holders = model.setdefault((kind, value), set())
        if name == "add":
            new = rec.add(kind, value, holder, 1)
            assert new == (not holders)
            holders.add(holder)
        elif name == "release":
            was_held = bool(holders)
            gone = rec.release(kind, value, holder)
            holders.discard(holder)
            assert gone == (was_held and not holders)  # it leaves with its last holder, never before
            if not holders:
                model.pop((kind, value))
        else:
            assert rec.drop(kind, value) == bool(holders)
            model.pop((kind, value))
    held = {(k, v) for (k, v), h in model.items() if h}
    assert {(k, v) for k, v in rec.identifiers()} == held
    assert {key: set(h) for key, h in rec.held.items()} == {held_key(k, v): h for (k, v), h in model.items() if h}
    assert Record.decode(rec.encode()) == rec


def test_slot_value_is_what_the_slot_holds() -> None:
    rec = Record(uuid="00000000-0000-4000-8000-000000000001")
    slot = slot_holder("SF", "Phone", "r1")
    rec.add(Kind.PHONE, "+16502530001", upsert_holder(""), 1)
    assert rec.slot_value(Kind.PHONE, slot) is None
    rec.add(Kind.PHONE, "+16502530002", slot, 2)
    assert rec.slot_value(Kind.PHONE, slot) == "+16502530002" and rec.slot_value(Kind.EMAIL, slot) is None


def test_a_record_written_before_provenance_is_held_by_a_sourceless_upsert() -> None:
    legacy = {"uuid": "00000000-0000-4000-8000-000000000001", "external_id": "x", "emails": ["a@example.com"],
              "phones": ["+16502530001"], "attributes": {}, "version": 3, "created_us": 7, "updated_us": 9}
    rec = Record.decode(orjson.dumps(legacy))
    assert rec.held == {"email:a@example.com": {"upsert:": 7}, "phone:+16502530001": {"upsert:": 7}}
    assert rec.slot_us == {}
    assert rec.release(Kind.PHONE, "+16502530001", upsert_holder("")) and rec.phones == []
