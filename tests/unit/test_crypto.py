"""resolver.crypto: AES-256-GCM with key ids and associated data, and how the store's data is sealed with it."""

from __future__ import annotations

import base64

import orjson
import pytest

from resolver.config.tables import EncryptionKey
from resolver.crypto import SEALED, KeyRing, Sealer, attribute_aad, is_sealed, key_id_of, new_key, parse_token
from resolver.errors import DecryptionFailed
from resolver.events import envelope
from resolver.records import Record

K1 = EncryptionKey("k1", bytes(range(32)))
K2 = EncryptionKey("k2", bytes(range(32, 64)))
ALICE = "0190c3a5-0000-7000-8000-000000000001"
BOB = "0190c3a5-0000-7000-8000-000000000002"
SSN = "123-45-6789"


def sealer(*keys: EncryptionKey) -> Sealer:
    return Sealer(KeyRing(keys or (K1,)), ["ssn", "pin"])


@pytest.mark.parametrize("value", [SSN, "", "é✓", 0, -7, 2**63 - 1, 12.5, True, False])
def test_a_value_comes_back_with_its_json_type(value: object) -> None:
    s = sealer()
    stored = s.seal_value(ALICE, "ssn", value)
    assert is_sealed(stored) and list(stored) == [SEALED] and stored[SEALED].startswith("v1:k1:")
    back = s.open_value(ALICE, "ssn", stored)
    assert back == value and type(back) is type(value)


def test_the_plaintext_is_nowhere_in_the_stored_form() -> None:
    stored = orjson.dumps(sealer().seal_value(ALICE, "ssn", SSN))
    assert SSN.encode() not in stored and b"123" not in stored.replace(b"v1:k1:", b"")


def test_another_customer_or_attribute_fails_clearly() -> None:
    s = sealer()
    stored = s.seal_value(ALICE, "ssn", SSN)
    for uuid, name in ((BOB, "ssn"), (ALICE, "pin")):
        with pytest.raises(DecryptionFailed) as err:
            s.open_value(uuid, name, stored)
        assert err.value.reason == "DECRYPTION_FAILED"
        assert f"attribute {name} of customer {uuid}" in err.value.message and SSN not in err.value.message


def test_an_unknown_key_id_is_named_and_a_key_later_in_the_ring_still_decrypts() -> None:
    old = sealer(K1).seal_value(ALICE, "ssn", SSN)
    with pytest.raises(DecryptionFailed) as err:
        sealer(K2).open_value(ALICE, "ssn", old)
    assert err.value.reason == "ENCRYPTION_KEY_UNKNOWN" and "'k1'" in err.value.message
    assert "held: k2" in err.value.message and SSN not in err.value.message
    rotated = sealer(K2, K1)
    assert rotated.open_value(ALICE, "ssn", old) == SSN  # all keys decrypt ...
    assert key_id_of(rotated.seal_value(ALICE, "ssn", SSN)) == "k2"  # ... the first encrypts


def test_any_tampering_fails() -> None:
    s = sealer()
    token = s.seal_value(ALICE, "ssn", SSN)[SEALED]
    blob = bytearray(base64.b64decode(token.split(":", 2)[2]))
    for i in (0, 11, 12, len(blob) - 1):  # nonce, ciphertext, tag
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionFailed):
            s.open_value(ALICE, "ssn", {SEALED: "v1:k1:" + base64.b64encode(bytes(bad)).decode()})
    for malformed in ("v1:k1:not base64!", "v2:k1:" + token.split(":", 2)[2], "v1:k1:AAAA", 42, None):
        with pytest.raises(DecryptionFailed) as err:
            s.open_value(ALICE, "ssn", {SEALED: malformed})
        assert err.value.reason in ("CIPHERTEXT_MALFORMED", "DECRYPTION_FAILED")


def test_every_write_draws_a_fresh_nonce() -> None:
    s = sealer()
    tokens = [s.seal_value(ALICE, "ssn", SSN)[SEALED] for _ in range(200)]
    nonces = {parse_token(t, "x").blob[:12] for t in tokens}
    assert len(set(tokens)) == len(nonces) == 200


def test_key_ring_on_bytes() -> None:
    ring = KeyRing((K1,))
    ct = ring.seal(b"payload", attribute_aad(ALICE, "ssn"))
    assert ct.key_id == "k1" and len(ct.blob) == 12 + len(b"payload") + 16
    assert ring.open(ct, attribute_aad(ALICE, "ssn"), "x") == b"payload"
    with pytest.raises(DecryptionFailed):
        ring.open(ct, attribute_aad(ALICE, "ssnx"), "x")


def test_new_key_is_32_random_bytes_in_base64() -> None:
    keys = {new_key() for _ in range(10)}
    assert len(keys) == 10 and all(len(base64.b64decode(k, validate=True)) == 32 for k in keys)


def test_records_are_sealed_on_encode_and_opened_on_decode() -> None:
    s = sealer()
    rec = Record(uuid=ALICE, attributes={"ssn": SSN, "name": "Ann", "pin": None}, version=3)
    raw = s.encode_record(rec)
    assert SSN.encode() not in raw and b'"name":"Ann"' in raw
    assert rec.attributes["ssn"] == SSN  # the caller's record is not touched
    stored = Record.decode(raw)
    assert is_sealed(stored.attributes["ssn"]) and stored.attributes["pin"] is None and stored.version == 3
    assert s.decode_record(raw).attributes == rec.attributes
    plain = Record(uuid=BOB, attributes={"name": "Bob"})
    assert s.encode_record(plain) == plain.encode()  # nothing sensitive: the bytes of before


def test_reveal_opens_for_the_allowed_and_omits_for_others() -> None:
    s = sealer()
    stored = {"ssn": s.seal_value(ALICE, "ssn", SSN), "name": "Ann"}
    assert s.reveal(ALICE, dict(stored), s.names, True) == {"ssn": SSN, "name": "Ann"}
    assert s.reveal(ALICE, dict(stored), s.names, False) == {"name": "Ann"}


def test_change_log_entries_seal_new_old_and_conflicting_values() -> None:
    s = sealer()
    change = {"customer_uuid": ALICE, "attributes": {"ssn": SSN, "name": "Ann"}, "attributes_old": {"ssn": "999"},
              "conflicts": [{"field": "ssn", "expected_old": "111", "stored": "999"},
                            {"field": "Phone", "expected_old": "+1***", "stored": None}]}
    sealed = s.seal_change(change)
    raw = orjson.dumps(sealed)
    assert all(v.encode() not in raw for v in (SSN, "999", "111")) and b"Ann" in raw
    assert change["attributes"]["ssn"] == SSN  # the caller's entry is not touched
    assert s.open_value(ALICE, "ssn", sealed["conflicts"][0]["stored"]) == "999"
    assert sealed["conflicts"][1] == change["conflicts"][1]
    assert s.seal_change(sealed) == sealed  # sealing is idempotent: a sealed value is kept as it is
    unrelated = {"customer_uuid": ALICE, "attributes": {"name": "Ann"}}
    assert s.seal_change(unrelated) is unrelated


def test_the_merge_journal_seals_each_record_under_its_own_uuid() -> None:
    s = sealer()
    entry = {"seq": 4, "survivor_before": Record(uuid=ALICE, attributes={"ssn": "A"}).to_json(),
             "merged": [Record(uuid=BOB, attributes={"ssn": "B"}).to_json()]}
    sealed = s.seal_journal(entry)
    assert s.open_value(ALICE, "ssn", sealed["survivor_before"]["attributes"]["ssn"]) == "A"
    assert s.open_value(BOB, "ssn", sealed["merged"][0]["attributes"]["ssn"]) == "B"
    with pytest.raises(DecryptionFailed):
        s.open_value(ALICE, "ssn", sealed["merged"][0]["attributes"]["ssn"])


def test_without_a_key_values_stay_in_clear() -> None:
    s = Sealer(KeyRing(()), ["ssn"])
    assert not s.active and s.seal_value(ALICE, "ssn", SSN) == SSN
    rec = Record(uuid=ALICE, attributes={"ssn": SSN})
    assert s.encode_record(rec) == rec.encode()
    with pytest.raises(DecryptionFailed):
        s.open_value(ALICE, "ssn", sealer().seal_value(ALICE, "ssn", SSN))


def test_event_bodies_are_sealed_under_their_source_and_webhook_id() -> None:
    ring = KeyRing((K1,))
    body = b'{"record_id":"001","change_set":{"SSN__c":{"new_value":"123-45-6789"}}}\n\x00'
    meta = {"source": "SF", "webhook_id": "msg_1", "received_us": 5}
    raw = envelope.encode(meta, body, ring)
    assert SSN.encode() not in raw and envelope.sealed_by(raw) == "k1"
    assert envelope.decode(raw, ring) == (meta, body)
    head, _, blob = raw.partition(b"\n")
    moved = orjson.dumps(orjson.loads(head) | {"webhook_id": "msg_2"}) + b"\n" + blob  # the body under another event
    with pytest.raises(DecryptionFailed):
        envelope.decode(moved, ring)
    with pytest.raises(DecryptionFailed):
        envelope.decode(raw, None)  # a sealed body is never handed out as is
    clear = envelope.encode(meta, body)
    assert envelope.sealed_by(clear) is None and envelope.decode(clear, ring) == (meta, body)
