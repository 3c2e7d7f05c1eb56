"""resolver.nonces: the nonces of values sealed in a replicated command's apply are derived, so that every node
stores the same bytes, and never repeat for another value; what they seal opens with the ordinary Sealer."""

from __future__ import annotations

from pathlib import Path

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from resolver.config import settings_from_document
from resolver.config.tables import EncryptionKey
from resolver.crypto import SEALED, KeyRing, Sealer, attribute_aad, parse_token
from resolver.nonces import NONCE_BYTES, CommandNonces, command_identity, nonce_key
from resolver.records import Record
from resolver.store import Store

K1 = EncryptionKey("k1", bytes(range(32)))
K2 = EncryptionKey("k2", bytes(range(32, 64)))
ALICE = "0190c3a5-0000-7000-8000-000000000001"
BOB = "0190c3a5-0000-7000-8000-000000000002"
SSN = "123-45-6789"
AAD = attribute_aad(ALICE, "ssn")
CMD = command_identity("resolver", 7)


def nonces(identity: bytes = CMD, key: EncryptionKey = K1) -> CommandNonces:
    return CommandNonces({key.id: nonce_key(key.key)}, identity)


def first(identity: bytes = CMD, plaintext: bytes = b'"x"', aad: bytes = AAD, key: EncryptionKey = K1) -> bytes:
    return nonces(identity, key).derive(key.id, plaintext, aad)


def node_sealer() -> Sealer:
    """A node's sealer: its own key ring object, built from the blueprint every node shares."""
    return Sealer(KeyRing((K1,)), ["ssn", "pin"])


def token(stored: object) -> str:
    assert isinstance(stored, dict)
    return str(stored[SEALED])


def test_the_same_inputs_give_the_same_nonce() -> None:
    assert first() == first() and len(first()) == NONCE_BYTES
    a, b = nonces(), nonces()
    assert [a.derive("k1", b"v", AAD) for _ in range(3)] == [b.derive("k1", b"v", AAD) for _ in range(3)]


def test_any_input_changed_gives_another_nonce() -> None:
    base = first()
    changed = [
        first(identity=command_identity("resolver", 8)),  # another command
        first(identity=command_identity("other", 7)),  # another stream
        first(plaintext=b'"y"'),  # another value
        first(aad=attribute_aad(BOB, "ssn")),  # another customer
        first(aad=attribute_aad(ALICE, "pin")),  # another attribute
        first(key=EncryptionKey("k1", K2.key)),  # another key
    ]
    one = nonces()
    one.derive("k1", b'"x"', AAD)
    changed.append(one.derive("k1", b'"x"', AAD))  # the same value again in the same command
    assert len({base, *changed}) == len(changed) + 1


def test_the_derivation_input_is_unambiguous() -> None:
    """Where one part ends and the next begins is fixed, so shifting bytes between parts is another input."""
    assert command_identity("t1", 23) != command_identity("t12", 3)
    assert first(plaintext=b"bc", aad=b"a") != first(plaintext=b"c", aad=b"ab")


def test_the_nonce_key_is_derived_and_is_not_the_aes_key() -> None:
    assert nonce_key(K1.key) == nonce_key(K1.key) != K1.key
    assert nonce_key(K1.key) != nonce_key(K2.key) and len(nonce_key(K1.key)) == 32


def test_a_value_sealed_for_a_command_is_the_same_on_every_node_and_opens_with_the_normal_sealer() -> None:
    a = node_sealer().for_command(CMD).seal_value(ALICE, "ssn", SSN)
    b = node_sealer().for_command(CMD).seal_value(ALICE, "ssn", SSN)
    assert a == b
    assert node_sealer().open_value(ALICE, "ssn", a) == SSN
    blob = parse_token(token(a), "x").blob  # plain AES-GCM under the data key, with the derived nonce in front
    assert blob[:NONCE_BYTES] == first(plaintext=orjson.dumps(SSN))
    assert AESGCM(K1.key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], AAD) == orjson.dumps(SSN)


def test_each_value_sealed_in_one_command_gets_its_own_nonce() -> None:
    """The record and its change-log entry copy the same value under the same AAD: still two nonces."""
    s = node_sealer().for_command(CMD)
    rec = Record(uuid=ALICE, attributes={"ssn": SSN, "pin": "0000"})
    stored = Record.decode(s.encode_record(rec)).attributes
    change = s.seal_change({"customer_uuid": ALICE, "attributes": {"ssn": SSN, "pin": "0000"}})["attributes"]
    tokens = [token(v) for v in (*stored.values(), *change.values())]
    assert len({parse_token(t, "x").blob[:NONCE_BYTES] for t in tokens}) == 4
    again = node_sealer().for_command(CMD)  # another node applying the same command seals the same bytes
    assert Record.decode(again.encode_record(rec)).attributes == stored
    assert again.seal_change({"customer_uuid": ALICE, "attributes": {"ssn": SSN, "pin": "0000"}})["attributes"] == change
    assert node_sealer().decode_record(s.encode_record(rec)).attributes == {"ssn": SSN, "pin": "0000"}


def test_another_command_seals_the_same_value_with_another_nonce() -> None:
    a = node_sealer().for_command(command_identity("resolver", 7)).seal_value(ALICE, "ssn", SSN)
    b = node_sealer().for_command(command_identity("resolver", 8)).seal_value(ALICE, "ssn", SSN)
    assert a != b and node_sealer().open_value(ALICE, "ssn", b) == SSN


def test_outside_a_command_nonces_stay_random() -> None:
    s = node_sealer()
    assert s.nonces is None and s.seal_value(ALICE, "ssn", SSN) != s.seal_value(ALICE, "ssn", SSN)
    clear = Sealer(KeyRing(()), ["ssn"])
    assert clear.for_command(CMD) is clear  # nothing to seal: nothing to derive


def test_a_nested_transaction_seals_with_its_parents_sealer(tmp_path: Path) -> None:
    settings = settings_from_document({
        "version": 1, "server": {"data_dir": str(tmp_path / "data")}, "storage": {"map_size_mb": 16},
        "encryption": {"keys": [{"id": "k1", "key": {"env": "K"}}]},
        "attributes": {"ssn": {"type": "string", "sensitive": True}},
    }, {"K": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="})
    store = Store(settings)
    try:
        with store.write() as parent:
            assert parent.sealer is store.sealer
            parent.sealer = store.sealer.for_command(CMD)
            with store.nested(parent) as child:
                assert child.sealer is parent.sealer
                child.put_record(Record(uuid=ALICE, attributes={"ssn": SSN}))
        with store.read() as view:
            stored = view.stored_record(bytes.fromhex(ALICE.replace("-", "")))
            assert stored is not None
            assert stored.attributes["ssn"] == node_sealer().for_command(CMD).seal_value(ALICE, "ssn", SSN)
    finally:
        store.close()
