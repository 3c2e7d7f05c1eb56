"""Sensitive attributes encrypted at rest (contract §8, issue 16 point 4): real servers on 127.0.0.1:0, real LMDB.

What is proved: no sensitive value written by Upsert, a merge or a CRM event reaches any file of the data directory
in clear; a ciphertext moved to another customer or attribute is refused (DATA_LOSS), never read as a value; a merge
moves values to the survivor and an unmerge back; `resolver rekey` re-encrypts everything under the new first key
while a server writes, after which the old key can be dropped; callers without the `sensitive` scope get the field
omitted: in process through resolver.api.caller (the use case, and the bytes the Resolve handler sends), and over
gRPC with `[auth]` tokens (the token interceptor sets the caller).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from resolver._rwire import encode_resolve
from resolver.api import caller
from resolver.cli import main as cli_main
from resolver.config import Settings, load_settings
from resolver.crypto import is_sealed, key_id_of
from resolver.events import envelope
from resolver.events.applier import drain_once
from resolver.events.signatures import sign
from resolver.identifiers import RawIdentifiers
from resolver.records import decode_json, encode_json
from resolver.rekey import rekey
from resolver.resolve import ResolveInput
from resolver.store import Store, uuid_bytes
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import status_details
from tests.integration.helpers import phone, upsert_req

ROOT = Path(__file__).resolve().parents[2]
SF_SECRET = b"encryption-test-webhook-secret"
ENV = {"ENC_KEY_OLD": base64.b64encode(bytes(range(100, 132))).decode(),
       "ENC_KEY_NEW": base64.b64encode(bytes(range(200, 232))).decode(),
       "ENC_SF_SECRET": "whsec_" + base64.b64encode(SF_SECRET).decode()}
OLD = '{ id = "old", key = { env = "ENC_KEY_OLD" } }'
NEW = '{ id = "new", key = { env = "ENC_KEY_NEW" } }'


def blueprint(keys: str = OLD, *, ssn_sensitive: bool = True, pin_sensitive: bool = True) -> str:
    return f"""
version = 1
[server]
workers = 1
threads = 8
grace_period_s = 1
[storage]
map_size_mb = 256
[encryption]
keys = [{keys}]
[attributes]
name = {{ type = "string" }}
tier = {{ type = "string" }}
ssn = {{ type = "string", sensitive = {str(ssn_sensitive).lower()} }}
pin = {{ type = "string", sensitive = {str(pin_sensitive).lower()} }}
[views.default]
fields = ["name", "ssn"]
[views.public]
fields = ["name", "tier"]
[sources.SALESFORCE]
field_map = {{ SSN__c = "ssn", Tier__c = "tier" }}
secrets = [{{ env = "ENC_SF_SECRET" }}]
[events]
http_listen = ""
unknown_record_wait_s = 0
"""


def settings_for(tmp_path: Path, text: str, name: str = "enc.toml") -> Settings:
    path = tmp_path / name
    path.write_text(text)
    return load_settings(path, environ=ENV, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0")


class Server:
    """A running server of `make_server` with its stub."""

    def __init__(self, running: Any, settings: Settings) -> None:
        self.running = running
        self.settings = settings
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)

    @property
    def store(self) -> Store:
        return self.running.service.store

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=0)

    def upsert(self, external_id: str, **attributes: Any) -> pb.UpsertResponse:
        return self.stub.Upsert(upsert_req(external_id=external_id, attributes=attributes), timeout=10)

    def attributes(self, customer_uuid: str) -> dict[str, Any]:
        return dict(self.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=customer_uuid), timeout=10).attributes)

    def ingest(self, record_id: str, changes: dict[str, Any]) -> None:
        """A signed CRM UPDATE event (gRPC IngestEvents: the webhook endpoint's code path)."""
        cs = {f: ({"old_value": v[0], "new_value": v[1]} if isinstance(v, tuple) else {"new_value": v})
              for f, v in changes.items()}
        body = json.dumps({"event_type": "UPDATE", "source_system": "SALESFORCE", "timestamp": "2024-01-01T00:00:00Z",
                           "record_id": record_id, "object_type": "Account", "change_set": cs}).encode()
        wid, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
        headers = {"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": sign(SF_SECRET, wid, ts, body)}
        try:
            self.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=10)
        except grpc.RpcError as exc:  # dead-lettered at admission: stored all the same
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc

    def drain(self) -> None:
        """Apply what the inbox holds (make_server runs no applier: events wait in the inbox until this)."""
        service = self.running.service
        while drain_once(service.store, self.settings, service.schema, 100):
            pass


@pytest.fixture
def start(make_server: Callable[[Settings], Any]) -> Iterator[Callable[[Settings], Server]]:
    started: list[Server] = []

    def make(s: Settings) -> Server:
        srv = Server(make_server(s), s)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.channel.close()


def files_holding(data_dir: str, needles: list[str]) -> dict[str, list[str]]:
    """{file name: the needles its bytes hold}, over every file of the data directory."""
    found: dict[str, list[str]] = {}
    for path in Path(data_dir).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [n for n in needles if n.encode() in data]
            if hits:
                found[str(path.relative_to(data_dir))] = hits
    return found


def key_ids(store: Store) -> Counter[str]:
    """How many stored sensitive values and event bodies are under each key id ("clear": a sensitive value or a body
    stored in clear)."""
    ids: Counter[str] = Counter()
    sensitive = set(store.sealer.names)

    def count(values: dict[str, Any] | None) -> None:
        for name, value in (values or {}).items():
            if is_sealed(value):
                ids[key_id_of(value)] += 1
            elif value is not None and name in sensitive:
                ids["clear"] += 1

    with store.read() as view:
        txn, db = view.txn, store.db
        for _, raw in txn.cursor(db=db["records"]):
            count(decode_json(raw)["attributes"])
        for _, raw in txn.cursor(db=db["changes"]):
            entry = decode_json(raw)
            count(entry.get("attributes"))
            count(entry.get("attributes_old"))
            for c in entry.get("conflicts") or ():
                count({c["field"]: c["expected_old"]})
                count({c["field"]: c["stored"]})
        for _, raw in txn.cursor(db=db["merges"]):
            entry = decode_json(raw)
            for rec in (entry["survivor_before"], *entry["merged"]):
                count(rec["attributes"])
        for name in ("ev_inbox", "ev_dlq"):
            for _, raw in txn.cursor(db=db[name]):
                ids[envelope.sealed_by(raw) or "clear"] += 1
    return ids


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`resolver ARGS` in a process of its own (LMDB opens an environment once per process: a server in this one)."""
    return subprocess.run([sys.executable, "-m", "resolver", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV}, cwd=ROOT, check=False)


def merge(srv: Server, survivor: str, merged: str) -> None:
    srv.stub.Merge(pb.MergeRequest(idempotency_key=str(uuid.uuid4()), survivor_uuid=survivor, merged_uuids=[merged]),
                   timeout=10)


# -- at rest -----------------------------------------------------------------------------------------------------------


def test_no_sensitive_value_reaches_a_data_file_in_clear(tmp_path: Path, start: Callable[[Settings], Server]) -> None:
    canaries = [f"CANARY-SSN-{i}-7f3a9" for i in range(7)]
    srv = start(settings_for(tmp_path, blueprint()))
    a = srv.upsert("ENC-A", name="Ann", ssn=canaries[0]).customer_uuid
    srv.upsert("ENC-A", ssn=canaries[1])  # the first value goes to the change log's attributes_old
    b = srv.upsert("ENC-B", name="Bob", ssn=canaries[2], pin=canaries[3]).customer_uuid
    merge(srv, a, b)  # the journal keeps both records; the survivor takes B's newer values
    # CRM events: an update whose old_value conflicts with the stored value, an unknown record (dead-lettered when
    # applied), an unmapped field (dead-lettered at admission); all bodies hold a canary
    srv.ingest("ENC-A", {"SSN__c": (canaries[4], canaries[5])})
    srv.ingest("ENC-NOBODY", {"SSN__c": canaries[6]})
    srv.ingest("ENC-A", {"Unmapped__c": canaries[6]})
    assert files_holding(srv.settings.server.data_dir, canaries) == {}  # the inbox holds the event bodies now
    srv.drain()
    srv.stub.Unmerge(pb.UnmergeRequest(idempotency_key=str(uuid.uuid4()), survivor_uuid=a, merged_uuid=b), timeout=10)

    assert srv.attributes(a) == {"name": "Ann", "ssn": canaries[5]}  # stored, and read back decrypted
    assert srv.attributes(b) == {"name": "Bob", "ssn": canaries[2], "pin": canaries[3]}
    with srv.store.read() as view:
        conflicts = [c for ch in view.iter_changes() for c in ch.get("conflicts", ())]
        dead = srv.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=10).dead_letters
    assert [c["field"] for c in conflicts] == ["ssn"] and is_sealed(conflicts[0]["stored"])
    assert sorted(d.reason for d in dead) == ["MAPPING_FAILED", "UNKNOWN_RECORD"]
    body = srv.stub.GetDeadLetter(pb.GetDeadLetterRequest(id=dead[0].id, include_body=True), timeout=10).body
    assert canaries[6].encode() in body  # the original bytes come back to an operator who asks for them
    assert set(key_ids(srv.store)) == {"old"}
    srv.stop()
    assert files_holding(srv.settings.server.data_dir, canaries) == {}


# -- integrity -----------------------------------------------------------------------------------------------------


def _move(srv: Server, source: str, target: str, name: str, into: str) -> None:
    """Copy the stored ciphertext of `source`'s attribute `name` into `target`'s attribute `into`, in LMDB itself."""
    with srv.store.write() as view:
        db = srv.store.db["records"]
        sealed = decode_json(view.txn.get(uuid_bytes(source), db=db))["attributes"][name]
        rec = decode_json(view.txn.get(uuid_bytes(target), db=db))
        rec["attributes"][into] = sealed
        view.txn.put(uuid_bytes(target), encode_json(rec), db=db)


def test_a_ciphertext_moved_to_another_customer_or_attribute_is_refused(tmp_path: Path,
                                                                        start: Callable[[Settings], Server]) -> None:
    srv = start(settings_for(tmp_path, blueprint()))
    a = srv.upsert("MOVE-A", name="Ann", ssn="SECRET-OF-ANN").customer_uuid
    b = srv.upsert("MOVE-B", name="Bob", tier="gold", ssn="SECRET-OF-BOB").customer_uuid
    _move(srv, a, b, "ssn", "ssn")
    _move(srv, a, a, "ssn", "pin")
    for uid, name in ((b, "ssn"), (a, "pin")):
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uid), timeout=10)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        info, _ = status_details(err.value)
        assert info is not None and info.reason == "DECRYPTION_FAILED"
        assert f"attribute {name} of customer {uid}" in err.value.details() and "SECRET" not in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id="MOVE-B"), fields=["ssn"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "SECRET" not in err.value.details()
    # a view that shows no sensitive attribute decrypts nothing: the damaged value does not stop it
    r = srv.stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id="MOVE-B"), view="public"), timeout=10)
    assert r.outcome == pb.OUTCOME_MATCHED and dict(r.attributes) == {"name": "Bob", "tier": "gold"}


def test_a_merge_moves_sensitive_values_to_the_survivor_and_unmerge_back(tmp_path: Path,
                                                                         start: Callable[[Settings], Server]) -> None:
    srv = start(settings_for(tmp_path, blueprint()))
    a = srv.upsert("MERGE-A", name="Ann").customer_uuid
    b = srv.upsert("MERGE-B", ssn="SSN-OF-B", pin="PIN-OF-B").customer_uuid
    merge(srv, a, b)
    assert srv.attributes(a) == {"name": "Ann", "ssn": "SSN-OF-B", "pin": "PIN-OF-B"}
    assert srv.attributes(b) == srv.attributes(a)  # the merged uuid answers with its survivor
    r = srv.stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id="MERGE-B")), timeout=10)
    assert r.customer_uuid == a and dict(r.attributes) == {"name": "Ann", "ssn": "SSN-OF-B"}  # the default view
    with srv.store.read() as view:  # sealed again under the survivor's uuid
        stored = decode_json(view.txn.get(uuid_bytes(a), db=srv.store.db["records"]))["attributes"]
    assert srv.store.sealer.open_value(a, "ssn", stored["ssn"]) == "SSN-OF-B"
    srv.stub.Unmerge(pb.UnmergeRequest(idempotency_key="u-1", survivor_uuid=a, merged_uuid=b), timeout=10)
    assert srv.attributes(a) == {"name": "Ann"}
    assert srv.attributes(b) == {"ssn": "SSN-OF-B", "pin": "PIN-OF-B"}


# -- rotation ----------------------------------------------------------------------------------------------------


@pytest.mark.process
def test_rekey_online_then_the_old_key_can_go(tmp_path: Path, start: Callable[[Settings], Server]) -> None:
    # before ssn was declared sensitive: stored in clear
    srv = start(settings_for(tmp_path, blueprint(ssn_sensitive=False), "v0.toml"))
    early = srv.upsert("ROT-0", ssn="CLEAR-BEFORE").customer_uuid
    srv.stop()
    srv = start(settings_for(tmp_path, blueprint(OLD), "v1.toml"))
    a = srv.upsert("ROT-A", name="Ann", ssn="SSN-A1").customer_uuid
    srv.upsert("ROT-A", ssn="SSN-A2")
    b = srv.upsert("ROT-B", pin="PIN-B").customer_uuid
    merge(srv, a, b)
    srv.ingest("ROT-NOBODY", {"SSN__c": "SSN-DEAD"})
    srv.drain()  # a dead letter
    srv.ingest("ROT-A", {"SSN__c": "SSN-EVENT"})  # left in the inbox
    versions = {u: srv.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=u), timeout=10).version for u in (a, early)}
    before = key_ids(srv.store)
    assert before["old"] >= 8 and before["clear"] == 2 and "new" not in before  # ROT-0's record and its change
    srv.stop()

    # the new key first, the old one still there to decrypt; rekey while the server takes writes
    rotated = settings_for(tmp_path, blueprint(f"{NEW}, {OLD}"), "v2.toml")
    srv = start(rotated)
    written: list[str] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(40):
                written.append(srv.upsert(f"ROT-W{i}", ssn=f"SSN-W{i}").customer_uuid)
        except BaseException as exc:  # reported below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    done = run_cli("rekey", "--config", str(tmp_path / "v2.toml"), "--data-dir", str(tmp_path / "data"), "--batch", "2")
    writer.join(timeout=60)
    assert not writer.is_alive() and not errors and len(written) == 40
    assert done.returncode == 0, done.stderr
    assert "rekey: records:" in done.stdout and "everything is under key 'new'" in done.stdout
    after = key_ids(srv.store)
    assert set(after) == {"new"} and after["new"] >= before["old"] + 2 + 40
    assert {u: srv.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=u), timeout=10).version
            for u in (a, early)} == versions  # no customer change
    again = rekey(srv.store)  # idempotent: nothing left to do
    assert sum(p.rewritten for p in again.parts.values()) == 0 and again.unreadable == 0
    srv.stop()

    # the old key dropped: every value still reads, the inbox event applies, the dead letter shows its body
    srv = start(settings_for(tmp_path, blueprint(NEW), "v3.toml"))
    srv.drain()
    assert srv.attributes(a) == {"name": "Ann", "ssn": "SSN-EVENT", "pin": "PIN-B"}
    assert srv.attributes(early) == {"ssn": "CLEAR-BEFORE"}
    assert srv.attributes(written[-1]) == {"ssn": "SSN-W39"}
    dead = srv.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=10).dead_letters
    assert b"SSN-DEAD" in srv.stub.GetDeadLetter(pb.GetDeadLetterRequest(id=dead[0].id, include_body=True),
                                                 timeout=10).body
    srv.stub.Unmerge(pb.UnmergeRequest(idempotency_key="rot-u", survivor_uuid=a, merged_uuid=b), timeout=10)
    assert srv.attributes(b) == {"pin": "PIN-B"}  # from the journal, re-encrypted by rekey
    srv.stop()

    # pin no longer sensitive: rekey stores its values in clear, as the blueprint now says
    (tmp_path / "v4.toml").write_text(blueprint(NEW, pin_sensitive=False))
    done = run_cli("rekey", "--config", str(tmp_path / "v4.toml"), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    srv = start(settings_for(tmp_path, blueprint(NEW, pin_sensitive=False), "v4.toml"))
    with srv.store.read() as view:
        assert decode_json(view.txn.get(uuid_bytes(b), db=srv.store.db["records"]))["attributes"]["pin"] == "PIN-B"
    r = srv.stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id="ROT-B"), fields=["pin"]), timeout=10)
    assert dict(r.attributes) == {"pin": "PIN-B"}
    assert set(key_ids(srv.store)) == {"new"}  # ssn's values stay encrypted


@pytest.mark.process
def test_rekey_reports_what_it_cannot_decrypt(tmp_path: Path, start: Callable[[Settings], Server],
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    srv = start(settings_for(tmp_path, blueprint(OLD)))
    srv.upsert("LOST-A", ssn="SSN-LOST")
    srv.stop()
    (tmp_path / "new-only.toml").write_text(blueprint(NEW))  # the old key dropped before rekey
    done = run_cli("rekey", "--config", str(tmp_path / "new-only.toml"), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 1
    lines = {line.split(":")[1].strip(): line for line in done.stdout.splitlines()}
    assert lines["records"].endswith("unreadable: 1 under 'old'")
    assert lines["change log"].endswith("unreadable: 1 under 'old'")
    assert "could not be decrypted" in done.stderr and "SSN-LOST" not in done.stdout + done.stderr
    assert cli_main(["key", "new"]) == 0
    assert len(base64.b64decode(capsys.readouterr().out.strip(), validate=True)) == 32


# -- who sees them -------------------------------------------------------------------------------------------------


def test_callers_without_the_sensitive_scope_get_the_field_omitted(tmp_path: Path,
                                                                   start: Callable[[Settings], Server]) -> None:
    srv = start(settings_for(tmp_path, blueprint()))
    a = srv.upsert("SCOPE-A", name="Ann", ssn="SSN-A").customer_uuid
    srv.stub.Upsert(upsert_req(external_id="SCOPE-B", phones=(phone(31),), attributes={"name": "Bob", "ssn": "SSN-B"}),
                    timeout=10)
    srv.stub.Upsert(upsert_req(customer_uuid=a, phones=(phone(31),)), timeout=10)  # a shared line: AMBIGUOUS
    service = srv.running.service
    by_ext = ResolveInput(RawIdentifiers(external_id="SCOPE-A"), fields=("name", "ssn"))
    by_view = ResolveInput(RawIdentifiers(external_id="SCOPE-A"))  # the default view: name, ssn
    shared = ResolveInput(RawIdentifiers(phones=(phone(31),)), fields=("name", "ssn"))

    def candidates() -> list[dict[str, Any]]:
        return sorted((c.attributes for c in service.resolve(shared).candidates), key=lambda d: d["name"])

    token = caller.enter(caller.Caller("agent-desktop", frozenset({"resolve"})))
    try:
        wire = pb.ResolveResponse.FromString(encode_resolve(service.resolve(by_ext)))  # what the Resolve handler sends
        assert dict(wire.attributes) == {"name": "Ann"}
        assert service.resolve(by_view).attributes == {"name": "Ann"}
        assert candidates() == [{"name": "Ann"}, {"name": "Bob"}]
        assert service.get_customer(a).attributes == {"name": "Ann"}
    finally:
        caller.leave(token)
    token = caller.enter(caller.Caller("fraud-desk", frozenset({"resolve", "sensitive"})))
    try:
        assert service.resolve(by_ext).attributes == {"name": "Ann", "ssn": "SSN-A"}
        assert candidates() == [{"name": "Ann", "ssn": "SSN-A"}, {"name": "Bob", "ssn": "SSN-B"}]
        assert service.get_customer(a).attributes == {"name": "Ann", "ssn": "SSN-A"}
    finally:
        caller.leave(token)
    # without [auth] every caller holds every scope: over gRPC the values are there
    r = srv.stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id="SCOPE-A")), timeout=10)
    assert dict(r.attributes) == {"name": "Ann", "ssn": "SSN-A"} and srv.attributes(a)["ssn"] == "SSN-A"


def test_over_grpc_a_token_without_the_sensitive_scope_gets_the_field_omitted(
        tmp_path: Path, start: Callable[[Settings], Server]) -> None:
    tokens = {"agent": ("resolve", "rsv_agent-desktop-token-0001"), "fraud": ("resolve,write,sensitive",
                                                                              "rsv_fraud-desk-token-0002")}
    (tmp_path / "tokens").write_text("".join(f"{name} {scopes} sha256:{hashlib.sha256(tok.encode()).hexdigest()}\n"
                                             for name, (scopes, tok) in tokens.items()))
    text = blueprint() + f'[auth]\ntokens_file = "{tmp_path / "tokens"}"\n'
    srv = start(settings_for(tmp_path, text))

    def bearer(name: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {tokens[name][1]}")]

    a = srv.stub.Upsert(upsert_req(external_id="TOK-A", attributes={"name": "Ann", "ssn": "SSN-TOK"}),
                        metadata=bearer("fraud"), timeout=10).customer_uuid
    req = pb.ResolveRequest(identifiers=pb.Identifiers(external_id="TOK-A"))  # the default view: name, ssn
    get = pb.GetCustomerRequest(customer_uuid=a)
    for name, shown in (("agent", {"name": "Ann"}), ("fraud", {"name": "Ann", "ssn": "SSN-TOK"})):
        assert dict(srv.stub.Resolve(req, metadata=bearer(name), timeout=10).attributes) == shown
        assert dict(srv.stub.GetCustomer(get, metadata=bearer(name), timeout=10).attributes) == shown
        streamed = list(srv.stub.ResolveStream(iter([req, req]), metadata=bearer(name), timeout=10))
        assert [dict(r.attributes) for r in streamed] == [shown, shown]
