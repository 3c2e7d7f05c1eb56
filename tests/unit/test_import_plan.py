"""resolver.bulk.plan writes a create out directly; it must encode exactly what the general rule does:
`resolver.upsert.planned_create` (the record, change and answer `apply` makes of a create), encoded the way
`Txn.put_record`, `Txn.append_change` and `ledger.record` encode them."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from resolver import ledger
from resolver._hotpath import KeyHasher
from resolver.attributes import AttributeSchema
from resolver.bulk import Planned, plan
from resolver.config import Settings, load_settings
from resolver.crypto import Sealer
from resolver.identifiers import RawIdentifiers, policy_from
from resolver.records import Record, decode_json, encode_json
from resolver.store import INDEX_NAMES, ledger_exp_key, uuid_bytes
from resolver.upsert import UpsertCommand, UpsertInput, planned_create, prepare
from resolver.uuids import LoadUuids

PHONES = ["+16502530001", "(650) 253-0002", "+44 20 7946 0018", "tel:+1-650-253-0003", "anonymous", "+16502530001"]
EMAILS = ["Ann@Example.com", "ann@example.com", "b.c@example.org", "noemail@example.com"]
SETTINGS = load_settings(None, default_region="US")
UUIDS = LoadUuids(1_800_000_000_000, 12345)


def reference(cmd: UpsertCommand, hasher: KeyHasher, sealer: Sealer) -> Planned | None:
    """What the bulk path queued before `plan` was written out: planned_create, encoded as apply encodes."""
    planned = planned_create(cmd)
    if planned is None:
        return None
    rec, change, result = planned
    keys = tuple((INDEX_NAMES[kind], hasher.key(kind, value)) for kind, value in rec.identifiers())
    encoded = encode_json(sealer.seal_change(change))
    cut = encoded.rindex(b',"source_system":') + 1
    lkey = cmd.idempotency_key.encode("utf-8")
    entry = ledger.entry(cmd.fingerprint, cmd.expires_us, result.to_json())
    return Planned(lkey, keys, uuid_bytes(rec.uuid), sealer.encode_record(rec), encoded[:cut], encoded[cut:],
                   encode_json(entry), ledger_exp_key(cmd.expires_us, lkey), tuple(rec.phones))


inputs = st.builds(
    lambda key, ext, emails, phones, attributes, source, line: (UpsertInput(
        key, RawIdentifiers(ext, tuple(emails), tuple(phones)), attributes, source_system=source), line),
    st.sampled_from(["k-1", "import:abc", "ключ"]),
    st.sampled_from(["", "CRM-1", " CRM-2 "]),
    st.lists(st.sampled_from(EMAILS), max_size=3),
    st.lists(st.sampled_from(PHONES), max_size=4),
    st.dictionaries(st.sampled_from(["name", "tier", "score", "vip", "gone"]),
                    st.one_of(st.none(), st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False),
                              st.booleans()), max_size=5),
    st.sampled_from(["", "SALESFORCE", "zendesk"]),
    st.integers(1, 10**6),
)


def command(inp: UpsertInput, line: int, blueprint: Settings) -> UpsertCommand | None:
    try:
        return prepare(inp, blueprint, AttributeSchema(blueprint), policy_from(blueprint), now_us=1_800_000_000_123_456,
                       new_uuid=UUIDS.for_line(line))
    except Exception:  # noqa: BLE001 - a request prepare refuses is no command to plan
        return None


@settings(max_examples=300, deadline=None)
@given(inputs)
def test_plan_encodes_what_planned_create_makes(case: tuple[UpsertInput, int]) -> None:
    cmd = command(*case, SETTINGS)
    if cmd is None:
        return
    hasher, sealer = KeyHasher("xxh3-128", None), Sealer.from_settings(SETTINGS)
    assert plan(cmd, hasher, sealer) == reference(cmd, hasher, sealer)


def test_commands_apply_decides_are_not_planned() -> None:
    hasher, sealer = KeyHasher("xxh3-128", None), Sealer.from_settings(SETTINGS)
    schema, policy = AttributeSchema(SETTINGS), policy_from(SETTINGS)
    for inp in (UpsertInput("k", RawIdentifiers("X-1"), expected_version=1),
                UpsertInput("k", customer_uuid="3f1c6f0e-1d3a-4a53-9a70-0c0a3ea52f00"),
                UpsertInput("k", RawIdentifiers("X-1"), remove_identifiers=RawIdentifiers(phones=("+16502530001",)))):
        cmd = prepare(inp, SETTINGS, schema, policy, now_us=1)
        assert plan(cmd, hasher, sealer) is None and reference(cmd, hasher, sealer) is None


def test_sensitive_values_are_sealed_in_the_record_and_the_change(tmp_path: Path) -> None:
    blueprint = tmp_path / "blueprint.toml"
    blueprint.write_text(textwrap.dedent("""
        version = 1
        [encryption]
        keys = [{ id = "test", key = { env = "RESOLVER_ENCRYPTION_KEY" } }]
        [attributes]
        name = { type = "string" }
        birth_date = { type = "date", sensitive = true }
        """))
    blueprint_settings = load_settings(blueprint)
    hasher, sealer = KeyHasher("xxh3-128", None), Sealer.from_settings(blueprint_settings)
    inp = UpsertInput("k", RawIdentifiers("X-1", phones=("+16502530001",)), {"name": "Ann", "birth_date": "1990-01-02"})
    cmd = command(inp, 7, blueprint_settings)
    assert cmd is not None
    got, want = plan(cmd, hasher, sealer), reference(cmd, hasher, sealer)
    assert got is not None and want is not None
    assert b"1990-01-02" not in got.record + got.change_head + got.change_tail  # sealed (random nonces: bytes differ)
    assert sealer.decode_record(got.record) == sealer.decode_record(want.record)
    assert Record.decode(got.record).attributes["birth_date"] != "1990-01-02"

    def opened(p: Planned) -> dict[str, Any]:
        change: dict[str, Any] = decode_json(p.change_head + b'"seq":1,' + p.change_tail)
        return {**change, "attributes": sealer.open_all(cmd.new_uuid, change["attributes"])}

    assert opened(got) == opened(want) and opened(got)["attributes"]["birth_date"] == "1990-01-02"
    assert got._replace(record=b"", change_head=b"", change_tail=b"") == want._replace(record=b"", change_head=b"",
                                                                                        change_tail=b"")
