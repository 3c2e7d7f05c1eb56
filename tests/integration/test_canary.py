"""The canary test (issue 16): a real `resolver serve` with TLS, tokens, keyed index hashes, encrypted sensitive
attributes, a CRM source and DEBUG JSON logs is driven through every kind of call, good and bad, with known canary
identifiers, tokens, secrets and sensitive values. Then:

- not one canary appears raw in any log line of any process (supervisor, workers, events process);
- not one appears in an error message or its details, nor in anything a `resolve`-only token was answered, except
  the identifiers GetCustomer returns by design (the customer's own record; sensitive values stay omitted);
- the data directory holds no sensitive value, token or secret in clear, and no identifier in clear in an index key;
- not one appears in what `GET /metrics` answers (issue 17: `[metrics]`, over HTTPS with a `metrics` token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import lmdb
import pytest
from google.protobuf import timestamp_pb2

from resolver.client import tls_credentials
from resolver.events.signatures import sign
from resolver.normalize import Kind, mask
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.certs import make_pki
from tests.conftest import SERVER_TOML
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.serve import serving

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

PHONES = (phone(8801), phone(8802))
EMAILS = ("canary.one@example.net", "canary.two@example.net")
EXTERNAL_IDS = ("CANARY-EXT-8801", "CANARY-EXT-8802")
SENSITIVE = ("Canary-SSN-551-88-0001", "Canary-SSN-551-88-0002", "Canary-SSN-from-CRM-0003")
ADMIN_TOKEN = "rsv_CanaryAdminTokenNeverShown0123456789"
READER_TOKEN = "rsv_CanaryReaderTokenNeverShown987654321"
UNKNOWN_TOKEN = "rsv_CanaryUnknownTokenNeverShown55555555"
METRICS_TOKEN = "rsv_CanaryMetricsTokenNeverShown24681357"
WEBHOOK_KEY = b"canary-webhook-key-0123456789abcdef"
INDEX_KEY = b"canary-index-key-0123456789abcdefghij"
ENCRYPTION_KEY = base64.b64encode(b"canary-encryption-key-32-bytes!!").decode()

IDENTIFIERS = (*PHONES, *(p[1:] for p in PHONES), *EMAILS, *EXTERNAL_IDS)
SECRETS = (ADMIN_TOKEN, READER_TOKEN, UNKNOWN_TOKEN, METRICS_TOKEN, WEBHOOK_KEY.decode(), INDEX_KEY.decode(),
           ENCRYPTION_KEY)
EVERY_CANARY = (*IDENTIFIERS, *SENSITIVE, *SECRETS)


def _blueprint(tmp: Path, cas: Any) -> str:
    (tmp / "webhook.key").write_bytes(WEBHOOK_KEY)
    (tmp / "index.key").write_bytes(INDEX_KEY)
    (tmp / "encryption.key").write_text(ENCRYPTION_KEY)
    (tmp / "tokens").write_text("".join(
        f"{name} {scopes} sha256:{hashlib.sha256(token.encode()).hexdigest()}\n"
        for name, scopes, token in (("ops", "resolve,write,events,admin,sensitive", ADMIN_TOKEN),
                                    ("screenpop", "resolve", READER_TOKEN), ("prometheus", "metrics", METRICS_TOKEN))))
    body = SERVER_TOML.replace('key = { env = "RESOLVER_ENCRYPTION_KEY" }', f'key = {{ file = "{tmp}/encryption.key" }}')
    assert f"{tmp}/encryption.key" in body
    return body + textwrap.dedent(
        f"""
        [tls]
        cert_file = "{cas.server_cert}"
        key_file = "{cas.server_key}"
        [auth]
        tokens_file = "{tmp}/tokens"
        [index]
        hash = "blake2b"
        key_id = "canary-1"
        secret = {{ file = "{tmp}/index.key" }}
        [logging]
        level = "DEBUG"
        format = "json"
        [attributes]
        name = {{ type = "string", max_length = 40 }}
        ssn = {{ type = "string", sensitive = true }}
        [sources.SALESFORCE]
        field_map = {{ SSN__c = "ssn", Name = "name" }}
        identifiers = {{ Phone = "phone", Email = "email" }}
        secrets = [{{ file = "{tmp}/webhook.key" }}]
        [events]
        http_listen = ""
        [metrics]
        listen = "127.0.0.1:0"
        """
    )


def _signed(body: bytes, wid: str) -> dict[str, str]:
    ts = int(time.time())
    return {"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": sign(WEBHOOK_KEY, wid, ts, body)}


def _event(record_id: str, changes: dict[str, Any], event_type: str = "UPDATE") -> bytes:
    return json.dumps({"event_type": event_type, "source_system": "SALESFORCE", "timestamp": "2026-01-01T00:00:00Z",
                       "record_id": record_id, "object_type": "Account",
                       "change_set": {f: {"new_value": v} for f, v in changes.items()}}).encode()


class Told:
    """Everything the server said to a client: responses (as text) and errors (message, details, trailers)."""

    def __init__(self) -> None:
        self.reader: list[str] = []  # what the resolve-only token was answered (GetCustomer apart)
        self.reader_customers: list[str] = []  # GetCustomer answers to the resolve-only token
        self.errors: list[str] = []

    def error(self, err: grpc.RpcError) -> grpc.StatusCode:
        trailers = "".join(f"{k}={v!r}" for k, v in err.trailing_metadata() or ())
        self.errors.append(f"{err.details()} {trailers}")
        return err.code()


def _admin_calls(stub: resolver_pb2_grpc.IdentityResolverStub, told: Told) -> list[str]:
    """Writes, events (one that dead-letters), interactions, a merge and bad calls, with the admin token; the uuids."""
    meta = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    uuids = []
    for i in range(2):
        r = stub.Upsert(upsert_req(external_id=EXTERNAL_IDS[i], emails=(EMAILS[i],), phones=(PHONES[i],),
                                   attributes={"name": f"Canary Person {i}", "ssn": SENSITIVE[i]}),
                        metadata=meta, timeout=10)
        uuids.append(r.customer_uuid)
    stub.RecordInteraction(pb.RecordInteractionRequest(
        interaction_id="canary-call-1", customer_uuid=uuids[0], channel="voice", disposition="resolved",
        occurred_at=timestamp_pb2.Timestamp(seconds=int(time.time()))),
        metadata=meta, timeout=10)
    good = _event(EXTERNAL_IDS[0], {"SSN__c": SENSITIVE[2], "Name": "Canary Renamed"})
    stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=good, headers=_signed(good, "msg_canary_1")),
                      metadata=meta, timeout=10)
    # a phone that cannot be normalized dead-letters the whole event, canaries and all
    bad = _event(EXTERNAL_IDS[1], {"Phone": PHONES[1][:-4], "SSN__c": SENSITIVE[1]})
    with pytest.raises(grpc.RpcError) as err:
        stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=bad, headers=_signed(bad, "msg_canary_2")),
                          metadata=meta, timeout=10)
    assert told.error(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    letters = stub.ListDeadLetters(pb.ListDeadLettersRequest(limit=10), metadata=meta, timeout=10)
    assert letters.dead_letters
    told.errors.append(str(letters))  # an operator's view: masked ...
    assert mask(Kind.EXTERNAL_ID, EXTERNAL_IDS[1]) in told.errors[-1]  # ... yet it shows the event (the scan sees data)
    # bad requests: invalid values, a bad token, a missing scope
    for req in (upsert_req(external_id=EXTERNAL_IDS[0], phones=(PHONES[0][:-4],), attributes={"ssn": 5}),
                upsert_req(emails=(EMAILS[0] + "@",), attributes={"name": SENSITIVE[0] * 3})):
        with pytest.raises(grpc.RpcError) as err:
            stub.Upsert(req, metadata=meta, timeout=10)
        assert told.error(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Resolve(resolve_req(phones=(PHONES[0],)), metadata=(("authorization", f"Bearer {UNKNOWN_TOKEN}"),),
                     timeout=10)
    assert told.error(err.value) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.Upsert(upsert_req(emails=(EMAILS[1],)), metadata=(("authorization", f"Bearer {READER_TOKEN}"),),
                    timeout=10)
    assert told.error(err.value) == grpc.StatusCode.PERMISSION_DENIED
    return uuids


def _reader_calls(stub: resolver_pb2_grpc.IdentityResolverStub, told: Told, uuids: list[str]) -> None:
    """Everything the resolve scope allows, with the resolve-only token; every answer kept."""
    meta = (("authorization", f"Bearer {READER_TOKEN}"),)
    for i in range(2):
        for req in (resolve_req(phones=(PHONES[i],), explain=True), resolve_req(emails=(EMAILS[i],), explain=True),
                    resolve_req(external_id=EXTERNAL_IDS[i], fields=["name", "ssn"], explain=True)):
            r = stub.Resolve(req, metadata=meta, timeout=10)
            assert r.outcome == pb.OUTCOME_MATCHED and "ssn" not in r.attributes  # omitted: no sensitive scope
            told.reader.append(str(r))
        customer = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuids[i]), metadata=meta, timeout=10)
        assert "ssn" not in customer.attributes
        told.reader_customers.append(str(customer))
    stream = stub.ResolveStream(iter([resolve_req(phones=(p,), explain=True) for p in PHONES]
                                     + [resolve_req(phones=(PHONES[0][:-4],), explain=True)]), metadata=meta, timeout=10)
    told.reader += [str(r) for r in stream]
    told.reader.append(str(stub.ListInteractions(pb.ListInteractionsRequest(customer_uuid=uuids[0]), metadata=meta,
                                                 timeout=10)))
    feed = stub.WatchChanges(pb.WatchRequest(from_sequence=1), metadata=meta, timeout=3)
    try:
        for change in feed:
            told.reader.append(str(change))
    except grpc.RpcError as err:  # the feed is live: it ends at the deadline
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert any("customer_uuid" in r or "uuid" in r for r in told.reader)


def test_no_canary_in_logs_errors_answers_or_data_files(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "blueprint.toml"
    config.write_text(_blueprint(tmp_path, pki))
    data = tmp_path / "data"
    err_path = tmp_path / "serve.stderr"
    told = Told()
    with serving(config, data, err_path, workers=2) as line:
        with grpc.secure_channel(f"127.0.0.1:{line.port}", tls_credentials(pki.ca_cert.pem)) as channel:
            stub = resolver_pb2_grpc.IdentityResolverStub(channel)
            uuids = _admin_calls(stub, told)
            meta = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
            deadline = time.monotonic() + 30  # the good event reaches the customer (the applier drains the inbox)
            while stub.GetEventCounters(pb.GetEventCountersRequest(), metadata=meta, timeout=10).in_inbox:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            full = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuids[0]), metadata=meta, timeout=10)
            assert full.attributes["ssn"] == SENSITIVE[2]  # the sensitive scope reads it, decrypted
            _reader_calls(stub, told, uuids)
        scrape = urllib.request.Request(line.after(", metrics on "), headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scrape.full_url.startswith("https://127.0.0.1:"), line
        with urllib.request.urlopen(scrape, timeout=10, context=ssl.create_default_context(
                cadata=pki.ca_cert.pem.decode())) as resp:
            metrics_text = resp.read().decode()
        assert 'resolver_resolve_outcomes_total{matched_on="PHONE",outcome="MATCHED"}' in metrics_text

    log = err_path.read_text()
    lines = [json.loads(raw) for raw in log.splitlines() if raw.strip()]
    assert len({entry["pid"] for entry in lines}) >= 3  # supervisor, workers, the events process
    assert sum(entry["logger"] == "resolver.access" for entry in lines) >= 20
    for canary in EVERY_CANARY:
        assert canary not in log, f"{canary!r} is in the server's log"
        assert canary not in metrics_text, f"{canary!r} is in the metrics"
        for text in told.errors:
            assert canary not in text, f"{canary!r} is in an error or an operator's view"
        for text in told.reader:
            assert canary not in text, f"{canary!r} was answered to a resolve-only token"
    for text in told.reader_customers:  # GetCustomer returns the customer's identifiers; nothing else
        for canary in (*SENSITIVE, *SECRETS):
            assert canary not in text, f"{canary!r} was answered to a resolve-only token"

    files = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
    for canary in (*SENSITIVE, *SECRETS):
        assert canary.encode() not in files, f"{canary!r} is in the data files in clear"
    env = lmdb.open(str(data), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as txn:
            for name in (b"ix_external", b"ix_email", b"ix_phone"):
                keys = b"".join(bytes(k) for k, _ in txn.cursor(db=env.open_db(name, txn=txn)))
                assert keys, name
                for canary in IDENTIFIERS:
                    assert canary.encode() not in keys, f"{canary!r} is in clear in an index key ({name!r})"
    finally:
        env.close()
