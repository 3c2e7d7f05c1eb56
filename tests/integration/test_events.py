"""CRM change events end to end: real server on 127.0.0.1:0 (gRPC + webhook HTTP), real LMDB, real HTTP.

Contract §5 and §6: signed webhooks, durable inbox, per-field last-writer-wins, dead-letter queue,
back-pressure, conservation, and exactly-once application across a kill -9.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from resolver.bootstrap import build_service
from resolver.cli import main as cli_main
from resolver.config import Settings, load_settings
from resolver.errors import InboxFull
from resolver.events import counters as event_counters
from resolver.events.process import PROCESS_NAME
from resolver.events.signatures import sign
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML, TEST_ENCRYPTION_KEY
from tests.integration.helpers import resolve_req, upsert_req

ROOT = Path(__file__).resolve().parents[2]
OLD_KEY = b"old-secret-\x00\x01\x02-from-salesforce"
NEW_KEY = b"new-raw-secret"
ENV = {"SF_SECRET_OLD": "whsec_" + base64.b64encode(OLD_KEY).decode(), "SF_SECRET_NEW": NEW_KEY.decode(),
       "RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY}
SEED_ID = "a1B2c3D4e5F6g7H8"
WAIT_S = 15.0

# The seed's example payload, byte for byte.
SEED_PAYLOAD = (Path(__file__).resolve().parents[1] / "fixtures" / "seed_event.json").read_bytes()


def blueprint(*, field_map: str = "", rate: int = 500, batch: int = 50, high_water: int = 1000,
              unknown_record_wait_s: float = 0.5) -> str:
    return SERVER_TOML + textwrap.dedent(
        """
        [attributes]
        name = { type = "string" }
        status = { type = "string", enum = ["Active", "Churned"], owner = "SALESFORCE" }
        credit_limit = { type = "number", minimum = 0, owner = "SALESFORCE" }
        tier = { type = "string" }
        segment = { type = "string" }
        balance = { type = "number", owner = "BILLING" }
        [sources.SALESFORCE]
        field_map = { Customer_Status__c = "status", Credit_Limit__c = "credit_limit", Tier__c = "tier", """
        """Balance__c = "balance"%s }
        secrets = [{ env = "SF_SECRET_OLD" }, { env = "SF_SECRET_NEW" }]
        [sources.BILLING]
        field_map = { Balance__c = "balance" }
        [events]
        http_listen = "127.0.0.1:0"
        rate_per_s = %d
        batch = %d
        high_water = %d
        unknown_record_wait_s = %g
        """
    ) % (field_map, rate, batch, high_water, unknown_record_wait_s)


def make_settings(tmp_path: Path, text: str, name: str = "events.toml") -> Settings:
    path = tmp_path / name
    path.write_text(text)
    return load_settings(path, environ=ENV, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0")


class Client:
    """One running server: HTTP webhook poster and gRPC stub."""

    def __init__(self, running: Any) -> None:
        self.running = running
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)
        self.http_port = running.http_port

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def start_server() -> Iterator[Callable[[Settings], Client]]:
    from resolver.bootstrap import build_server

    started: list[Client] = []

    def make(s: Settings) -> Client:
        c = Client(build_server(s, sweeper=False, applier=True))
        started.append(c)
        return c

    yield make
    for c in started:
        c.close()
        c.running.stop(grace=0)


@pytest.fixture
def srv(tmp_path: Path, start_server: Callable[[Settings], Client]) -> Client:
    return start_server(make_settings(tmp_path, blueprint()))


def signed(body: bytes, *, key: bytes = OLD_KEY, wid: str | None = None, ts: int | None = None) -> dict[str, str]:
    wid = wid or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": wid, "webhook-timestamp": str(ts), "webhook-signature": sign(key, wid, ts, body)}


def post(port: int, body: bytes, headers: dict[str, str], source: str = "SALESFORCE") -> tuple[int, dict[str, Any], Any]:
    """POST a webhook; (status, JSON body, response headers)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/webhooks/{source}", data=body, method="POST",
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), err.headers


def event(record_id: str, changes: dict[str, tuple[Any, Any] | Any], *, ts: str = "2024-01-01T00:00:00Z",
          event_type: str = "UPDATE", source: str = "SALESFORCE") -> bytes:
    cs = {f: ({"old_value": v[0], "new_value": v[1]} if isinstance(v, tuple) else {"new_value": v})
          for f, v in changes.items()}
    return json.dumps({"event_type": event_type, "source_system": source, "timestamp": ts, "record_id": record_id,
                       "object_type": "Account", "change_set": cs}).encode()


def counters(c: Client) -> pb.EventCounters:
    return c.stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)


def drained(c: Client, timeout: float = WAIT_S) -> pb.EventCounters:
    """Poll until the inbox is empty (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = counters(c)
        if snap.in_inbox == 0:
            return snap
        assert time.monotonic() < deadline, f"inbox not drained in {timeout}s: {snap}"
        time.sleep(0.05)


def attrs(c: Client, external_id: str) -> dict[str, Any]:
    r = c.stub.Resolve(resolve_req(external_id=external_id, fields=["status", "credit_limit", "tier", "segment"]),
                       timeout=5)
    assert r.outcome == pb.OUTCOME_MATCHED
    return dict(r.attributes)


def seed_customer(c: Client, external_id: str = SEED_ID, **attributes: Any) -> str:
    values = {"status": "Active", "credit_limit": 5000} | attributes
    r = c.stub.Upsert(upsert_req(external_id=external_id, attributes=values, source_system="SALESFORCE"), timeout=5)
    return r.customer_uuid


def changes_for(c: Client) -> list[dict[str, Any]]:
    with c.running.service.store.read() as view:
        return [ch for ch in view.iter_changes() if "event" in ch]


# -- authenticity --------------------------------------------------------------------------------------------

def test_seed_payload_signed_is_accepted_and_applied(srv: Client) -> None:
    seed_customer(srv)
    status, body, _ = post(srv.http_port, SEED_PAYLOAD, signed(SEED_PAYLOAD))
    assert status == 202 and body["status"] == "accepted"
    snap = drained(srv)
    assert attrs(srv, SEED_ID) == {"status": "Churned", "credit_limit": 0}
    assert snap.counters["accepted"] == snap.counters["applied"] == 1 and snap.conserved
    assert snap.counters["conflicts"] == 0


def test_bad_signatures_are_refused_and_nothing_applied(srv: Client) -> None:
    seed_customer(srv)
    now = int(time.time())
    good = signed(SEED_PAYLOAD)
    cases = {
        "tampered body": (SEED_PAYLOAD.replace(b"Churned", b"Active "), good),
        "wrong secret": (SEED_PAYLOAD, signed(SEED_PAYLOAD, key=b"not-the-secret")),
        "stale": (SEED_PAYLOAD, signed(SEED_PAYLOAD, ts=now - 330)),
        "future": (SEED_PAYLOAD, signed(SEED_PAYLOAD, ts=now + 330)),
        "no headers": (SEED_PAYLOAD, {}),
        **{f"no {h}": (SEED_PAYLOAD, {k: v for k, v in good.items() if k != h}) for h in good},
    }
    for name, (body, headers) in cases.items():
        status, answer, _ = post(srv.http_port, body, headers)
        assert (name, status, answer["error"]) == (name, 401, "INVALID_SIGNATURE")
    with pytest.raises(grpc.RpcError) as e:
        srv.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=SEED_PAYLOAD), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(0.3)  # give a (wrongly) admitted event time to apply
    snap = drained(srv)
    assert attrs(srv, SEED_ID) == {"status": "Active", "credit_limit": 5000}
    assert snap.counters["rejected_unsigned"] == len(cases) + 1
    assert snap.counters["accepted"] == 0 and snap.in_dlq == 0 and snap.conserved


def test_second_of_two_secrets_is_accepted(srv: Client) -> None:
    seed_customer(srv)
    status, _, _ = post(srv.http_port, SEED_PAYLOAD, signed(SEED_PAYLOAD, key=NEW_KEY))
    assert status == 202
    drained(srv)
    assert attrs(srv, SEED_ID)["status"] == "Churned"


def test_same_webhook_id_twice_is_applied_once(srv: Client) -> None:
    seed_customer(srv)
    headers = signed(SEED_PAYLOAD, wid="msg_dup")
    first = post(srv.http_port, SEED_PAYLOAD, headers)
    second = post(srv.http_port, SEED_PAYLOAD, headers)
    assert (first[0], first[1]["status"]) == (202, "accepted")
    assert (second[0], second[1]["status"]) == (202, "duplicate")
    dup = srv.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=SEED_PAYLOAD, headers=headers), timeout=5)
    assert dup.duplicate
    snap = drained(srv)
    assert snap.counters["accepted"] == 1 and snap.counters["applied"] == 1 and snap.counters["duplicates"] == 2
    assert [ch["event"]["webhook_id"] for ch in changes_for(srv)] == ["msg_dup"]


def test_grpc_ingest_is_the_same_path(srv: Client) -> None:
    seed_customer(srv)
    r = srv.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=SEED_PAYLOAD,
                                               headers=signed(SEED_PAYLOAD, wid="msg_grpc")), timeout=5)
    assert r.webhook_id == "msg_grpc" and not r.duplicate and r.inbox_sequence >= 1
    drained(srv)
    assert attrs(srv, SEED_ID)["status"] == "Churned"
    status, answer, _ = post(srv.http_port, SEED_PAYLOAD, signed(SEED_PAYLOAD), source="NOPE")
    assert (status, answer["error"]) == (404, "UNKNOWN_SOURCE")


# -- apply semantics ----------------------------------------------------------------------------------------

def test_out_of_order_events_newest_wins_with_one_conflict(srv: Client) -> None:
    seed_customer(srv, "ooo-1", tier="A")
    t1 = event("ooo-1", {"Tier__c": ("A", "B")}, ts="2024-05-01T10:00:00Z")
    t2 = event("ooo-1", {"Tier__c": ("B", "C")}, ts="2024-05-01T10:00:05Z")
    assert post(srv.http_port, t2, signed(t2))[0] == 202
    drained(srv)
    assert post(srv.http_port, t1, signed(t1))[0] == 202
    snap = drained(srv)
    assert attrs(srv, "ooo-1")["tier"] == "C"
    assert snap.counters["conflicts"] == 1 and snap.counters["stale_fields"] == 1 and snap.counters["applied"] == 2
    conflicts = [c for ch in changes_for(srv) for c in ch.get("conflicts", [])]
    assert conflicts == [{"field": "tier", "expected_old": "B", "stored": "A"}]


def test_create_delete_and_apply_failures(srv: Client) -> None:
    create = event("new-1", {"Customer_Status__c": "Active", "Tier__c": "gold"}, event_type="CREATE")
    unknown = event("nobody", {"Tier__c": ("A", "B")})
    owned = event("new-1", {"Balance__c": (0, 10)}, ts="2024-02-01T00:00:00Z")
    delete = event("new-1", {}, event_type="DELETE", ts="2024-03-01T00:00:00Z")
    for body in (create, unknown, owned, delete):
        assert post(srv.http_port, body, signed(body))[0] == 202
    snap = drained(srv)
    r = srv.stub.Resolve(resolve_req(external_id="new-1"), timeout=5)
    assert r.outcome == pb.OUTCOME_NOT_FOUND  # deleted: it stops resolving (tests/integration/test_events_sync.py)
    reasons = [d.reason for d in srv.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=5).dead_letters]
    assert sorted(reasons) == ["FIELD_OWNED_BY_OTHER_SOURCE", "UNKNOWN_RECORD"]
    assert snap.counters["applied"] == 2 and snap.counters["dead_lettered"] == 2 and snap.conserved
    assert snap.counters["requeued"] >= 1  # the unknown record's UPDATE waited for a CREATE before its dead letter
    deleted = [ch for ch in changes_for(srv) if ch["action"] == "DELETED"]
    assert len(deleted) == 1 and deleted[0]["erased_uuids"] == [deleted[0]["customer_uuid"]]


def test_an_update_that_overtook_its_create_waits_for_it_and_is_applied(tmp_path: Path,
                                                                        start_server: Callable[[Settings], Client]) -> None:
    """An UPDATE (and a DELETE) for a record nobody holds yet goes back to the inbox and is tried again; once the
    CREATE arrives, both apply in the events' own time order: nothing dead-lettered, every event applied once."""
    srv = start_server(make_settings(tmp_path, blueprint(unknown_record_wait_s=30)))
    update = event("late-1", {"Tier__c": "gold"}, ts="2024-01-02T00:00:00Z")
    assert post(srv.http_port, update, signed(update, wid="msg_update"))[0] == 202
    deadline = time.monotonic() + WAIT_S
    while counters(srv).counters["requeued"] < 2:  # tried, put back, tried again: it waits
        assert time.monotonic() < deadline, counters(srv)
        time.sleep(0.05)
    assert counters(srv).in_inbox == 1 and counters(srv).counters["dead_lettered"] == 0
    create = event("late-1", {"Customer_Status__c": "Active", "Tier__c": "bronze"}, event_type="CREATE")
    assert post(srv.http_port, create, signed(create, wid="msg_create"))[0] == 202
    snap = drained(srv)
    assert attrs(srv, "late-1")["tier"] == "gold"  # the UPDATE is newer than the CREATE: it wins
    assert snap.counters["applied"] == 2 and snap.counters["dead_lettered"] == 0 and snap.conserved
    assert not srv.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=5).dead_letters
    assert sorted(ch["event"]["webhook_id"] for ch in changes_for(srv)) == ["msg_create", "msg_update"]


# -- dead-letter queue ---------------------------------------------------------------------------------------

def test_schema_invalid_is_400_and_dead_lettered_byte_identical(srv: Client) -> None:
    body = SEED_PAYLOAD.replace(b'"UPDATE"', b'"UPSERT"') + b"\n  "
    status, answer, _ = post(srv.http_port, body, signed(body, wid="msg_bad"))
    assert (status, answer["error"]) == (400, "SCHEMA_INVALID") and answer["dead_letter_id"] >= 1
    d = srv.stub.GetDeadLetter(pb.GetDeadLetterRequest(id=answer["dead_letter_id"], include_body=True), timeout=5)
    assert d.body == body and d.source == "SALESFORCE" and d.webhook_id == "msg_bad" and d.reason == "SCHEMA_INVALID"
    assert d.headers["webhook-signature"] == "[redacted]" and d.dead_lettered_at.seconds > 0
    masked = srv.stub.GetDeadLetter(pb.GetDeadLetterRequest(id=answer["dead_letter_id"]), timeout=5)
    assert masked.body == b"" and SEED_ID not in masked.masked_payload and "Churned" not in masked.masked_payload
    # the same delivery again: acknowledged with the first answer, stored once
    assert post(srv.http_port, body, signed(body, wid="msg_bad"))[0] == 400
    snap = counters(srv)
    assert snap.in_dlq == 1 and snap.counters["accepted"] == 1 and snap.conserved


def test_fixed_mapping_then_dlq_replay_applies(tmp_path: Path, start_server: Callable[[Settings], Client],
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    srv = start_server(make_settings(tmp_path, blueprint()))
    seed_customer(srv, "seg-1")
    body = event("seg-1", {"Segment__c": "enterprise", "Tier__c": "gold"})
    status, answer, _ = post(srv.http_port, body, signed(body))
    assert (status, answer["error"]) == (400, "MAPPING_FAILED")
    dlq_id = answer["dead_letter_id"]
    assert attrs(srv, "seg-1").get("segment") is None
    srv.close()
    srv.running.stop(grace=0)

    # the operator fixes the mapping in the blueprint, then replays from the CLI
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(blueprint(field_map=', Segment__c = "segment"'))
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    data = str(tmp_path / "data")
    assert cli_main(["dlq", "list", "--config", str(fixed), "--data-dir", data]) == 0
    assert cli_main(["dlq", "show", str(dlq_id), "--config", str(fixed), "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "MAPPING_FAILED" in out and "enterprise" not in out and "seg-1" not in out.replace("[redacted]", "")
    assert cli_main(["dlq", "replay", str(dlq_id), "--config", str(fixed), "--data-dir", data]) == 0
    assert cli_main(["dlq", "replay", str(dlq_id), "--config", str(fixed), "--data-dir", data]) == 1  # gone: no-op
    assert cli_main(["check", "--config", str(fixed), "--data-dir", data]) == 0
    assert "accepted 1 = applied 1 + dead-lettered 0 + in inbox 0" in capsys.readouterr().out

    srv2 = start_server(load_settings(fixed, environ=ENV, data_dir=data, listen="127.0.0.1:0"))
    assert attrs(srv2, "seg-1") == {"status": "Active", "credit_limit": 5000, "tier": "gold", "segment": "enterprise"}
    snap = counters(srv2)
    assert snap.in_dlq == 0 and snap.counters["applied"] == 1 and snap.conserved


def test_dlq_admin_rpcs(srv: Client) -> None:
    bodies = [event(f"x-{i}", {"Nope__c": i}) for i in range(3)]
    ids = [post(srv.http_port, b, signed(b))[1]["dead_letter_id"] for b in bodies]
    listed = srv.stub.ListDeadLetters(pb.ListDeadLettersRequest(after_id=ids[0], limit=5), timeout=5).dead_letters
    assert [d.id for d in listed] == ids[1:] and all(d.body == b"" for d in listed)
    srv.stub.DiscardDeadLetter(pb.DiscardDeadLetterRequest(id=ids[1]), timeout=5)
    r = srv.stub.ReplayDeadLetter(pb.ReplayDeadLetterRequest(id=ids[2]), timeout=5)
    assert not r.applied and r.reason == "MAPPING_FAILED"
    with pytest.raises(grpc.RpcError) as e:
        srv.stub.GetDeadLetter(pb.GetDeadLetterRequest(id=ids[1]), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    snap = counters(srv)
    assert snap.in_dlq == 2 and snap.counters["discarded"] == 1 and snap.conserved


# -- back-pressure -------------------------------------------------------------------------------------------

def test_back_pressure_429_and_nothing_lost(tmp_path: Path, start_server: Callable[[Settings], Client]) -> None:
    srv = start_server(make_settings(tmp_path, blueprint(rate=10, batch=2, high_water=8)))
    n_customers = 5
    for i in range(n_customers):
        seed_customer(srv, f"bp-{i}", credit_limit=0)
    accepted: dict[str, int] = {}
    statuses: list[int] = []
    retry_after: set[str] = set()
    for j in range(60):
        ext = f"bp-{j % n_customers}"
        body = event(ext, {"Credit_Limit__c": j}, ts=f"2024-01-01T00:00:{j:02d}Z")
        status, _, headers = post(srv.http_port, body, signed(body))
        statuses.append(status)
        if status == 202:
            accepted[ext] = j
        elif status == 429:
            retry_after.add(headers["Retry-After"])
    assert 429 in statuses and set(statuses) <= {202, 429}
    assert retry_after and all(int(x) >= 1 for x in retry_after)
    body = event("bp-0", {"Credit_Limit__c": 99})
    try:
        srv.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=signed(body)), timeout=5)
    except grpc.RpcError as err:  # still full: RESOURCE_EXHAUSTED with RetryInfo
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(err)
        assert status is not None
        infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(infos) == 1
    snap = drained(srv)
    assert snap.conserved and snap.counters["dead_lettered"] == 0
    assert snap.counters["throttled"] >= statuses.count(429)
    for ext, j in accepted.items():
        assert attrs(srv, ext)["credit_limit"] == j


def test_inbox_full_is_429_and_resource_exhausted_with_retry_info(tmp_path: Path) -> None:
    from resolver.bootstrap import build_server

    running = build_server(make_settings(tmp_path, blueprint(rate=5, batch=1, high_water=2)), sweeper=False, applier=False)
    c = Client(running)
    try:
        codes = []
        for i in range(3):
            body = event("full", {"Tier__c": str(i)})
            status, answer, headers = post(c.http_port, body, signed(body))
            codes.append(status)
        assert codes == [202, 202, 429]
        assert answer["error"] == "INBOX_FULL" and int(headers["Retry-After"]) >= 1
        body = event("full", {"Tier__c": "grpc"})
        with pytest.raises(grpc.RpcError) as e:
            c.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=signed(body)), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(e.value)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
        assert retry.retry_delay.seconds >= 1
        snap = counters(c)
        assert snap.in_inbox == 2 and snap.counters["throttled"] == 2 and snap.conserved
    finally:
        c.close()
        running.stop(grace=0)


@pytest.mark.parametrize("window_ms, together, commits", [(1000, True, 1), (0, False, 4)])
def test_admissions_within_the_commit_window_share_one_synced_transaction(
        tmp_path: Path, window_ms: int, together: bool, commits: int) -> None:
    """Four webhooks arriving together are written by one synced commit when a commit window is set; without
    one, admissions that do not overlap commit one by one. Real Ingestor and LMDB, no applier or HTTP endpoint,
    so the environment's transaction id counts exactly the admissions' commits."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from resolver.events.inbox import Ingestor

    text = blueprint().replace("[events]\n", f"[events]\ncommit_window_ms = {window_ms}\n")
    service = build_service(make_settings(tmp_path, text))
    ingestor = Ingestor(service.store, service.settings, service.schema)
    bodies = [event(f"win-{i}", {"Tier__c": str(i)}) for i in range(4)]
    gate = Barrier(4 if together else 1)

    def admit(body: bytes) -> int:
        gate.wait(WAIT_S)
        return ingestor.admit("SALESFORCE", signed(body), body).http_status

    try:
        before = service.store.env.info()["last_txnid"]
        if together:
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(admit, bodies))
        else:
            statuses = [admit(b) for b in bodies]
        assert statuses == [202] * 4
        assert service.store.env.info()["last_txnid"] - before == commits
        with service.store.read() as view:
            assert view.txn.stat(service.store.db["ev_inbox"])["entries"] == 4
    finally:
        ingestor.close()
        service.close()


def test_a_full_inbox_refuses_without_a_write_and_still_answers_duplicates(tmp_path: Path) -> None:
    """A sender hammering a full inbox (ignoring Retry-After) costs no write transaction per request: the 429s
    are counted in memory and written with the next flush. A re-delivery of an event already admitted is still
    answered as that duplicate, not refused."""
    from resolver.events.inbox import Ingestor

    service = build_service(make_settings(tmp_path, blueprint(rate=5, batch=1, high_water=2)))
    ingestor = Ingestor(service.store, service.settings, service.schema)
    first = event("hammer-0", {"Tier__c": "gold"})
    try:
        assert ingestor.admit("SALESFORCE", signed(first, wid="msg_hammer_0"), first).http_status == 202
        body = event("hammer-1", {"Tier__c": "gold"})
        assert ingestor.admit("SALESFORCE", signed(body), body).http_status == 202
        before = service.store.env.info()["last_txnid"]
        for i in range(20):
            body = event(f"hammer-{i + 2}", {"Tier__c": "gold"})
            with pytest.raises(InboxFull) as e:
                ingestor.admit("SALESFORCE", signed(body), body)
            assert e.value.retry_after_s >= 1
        assert service.store.env.info()["last_txnid"] == before
        again = ingestor.admit("SALESFORCE", signed(first, wid="msg_hammer_0"), first)
        assert (again.http_status, again.duplicate) == (202, True)
        ingestor.flush()
        with service.store.read() as view:
            snap = event_counters.snapshot(view.txn, service.store)
        assert snap["counters"]["throttled"] == 20 and snap["in_inbox"] == 2 and snap["conserved"]
    finally:
        ingestor.close()
        service.close()


def test_an_admission_whose_caller_stopped_waiting_is_not_written(tmp_path: Path) -> None:
    """`submit` returns a future (the HTTP transport awaits it). One cancelled while it still waits for the
    committer is skipped: not in the inbox, not remembered as seen, so the sender's retry is admitted as new;
    the one beside it in the same commit window is written as usual."""
    from resolver.events.inbox import Ingestor

    text = blueprint().replace("[events]\n", "[events]\ncommit_window_ms = 500\n")
    service = build_service(make_settings(tmp_path, text))
    ingestor = Ingestor(service.store, service.settings, service.schema)
    kept, dropped = event("cancel-kept", {"Tier__c": "gold"}), event("cancel-dropped", {"Tier__c": "gold"})
    try:
        first = ingestor.submit("SALESFORCE", signed(kept, wid="msg_cancel_kept"), kept)
        second = ingestor.submit("SALESFORCE", signed(dropped, wid="msg_cancel_dropped"), dropped)
        assert second.cancel()  # still queued: the committer waits out its window for more
        assert first.result(WAIT_S).http_status == 202
        with service.store.read() as view:
            assert view.txn.stat(service.store.db["ev_inbox"])["entries"] == 1
        retry = ingestor.admit("SALESFORCE", signed(dropped, wid="msg_cancel_dropped"), dropped)
        assert (retry.http_status, retry.duplicate) == (202, False)
    finally:
        ingestor.close()
        service.close()


def test_http_edge_cases(srv: Client) -> None:
    big = b"x" * (300 * 1024)
    assert post(srv.http_port, big, signed(big))[0] == 413
    junk = b"\xff\x00 not json"
    status, answer, _ = post(srv.http_port, junk, signed(junk))
    assert (status, answer["error"]) == (400, "SCHEMA_INVALID")
    d = srv.stub.GetDeadLetter(pb.GetDeadLetterRequest(id=answer["dead_letter_id"], include_body=True), timeout=5)
    assert d.body == junk


# -- crash safety --------------------------------------------------------------------------------------------

class ServerProcess:
    """`resolver serve` in a subprocess (its own session: kill -9 takes the whole process tree, as a host or
    container stop would); ports read from its "serving on" line; its log in DATA/../server.log."""

    LINE = re.compile(r"serving on 127\.0\.0\.1:(\d+) .*webhooks on http://127\.0\.0\.1:(\d+)")

    def __init__(self, config: Path, data: Path, workers: int = 1) -> None:
        env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
        with (data.parent / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir", str(data),
                 "--listen", "127.0.0.1:0", "--workers", str(workers)],
                stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(ROOT), start_new_session=True,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, "server did not start"
            if select.select([self.proc.stdout], [], [], left)[0]:
                line += self.proc.stdout.read1(4096)  # type: ignore[attr-defined]
        m = self.LINE.search(line.decode())
        assert m, line
        self.grpc_port, self.http_port = int(m.group(1)), int(m.group(2))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """SIGKILL: the whole process group at once; other signals: the serving parent only. Its exit code."""
        self.channel.close()
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def events_pid(self, other_than: int = 0, timeout: float = 20.0) -> int:
        """The pid of the events process (a child named resolver-events), once it is not `other_than`."""
        deadline = time.monotonic() + timeout
        while True:
            found = [pid for pid in _children(self.proc.pid) if _comm(pid) == PROCESS_NAME and pid != other_than]
            if len(found) == 1:
                return found[0]
            assert len(found) < 2, f"several events processes: {found}"
            assert time.monotonic() < deadline, f"no events process (other than {other_than}) under {self.proc.pid}"
            time.sleep(0.05)


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(name))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _nice(pid: int, tid: int | None = None) -> int:
    """Field 19 of /proc/PID[/task/TID]/stat: the nice value."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])


def post_retrying(port: int, body: bytes, headers: dict[str, str], timeout: float = WAIT_S) -> int:
    """POST a webhook, retrying while nothing listens (an events process restarting); the HTTP status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return post(port, body, headers)[0]
        except urllib.error.URLError:
            assert time.monotonic() < deadline, f"nothing listened on {port} for {timeout}s"
            time.sleep(0.1)


def wait_for(what: str, cond: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def stored_counters(config: Path, data: Path) -> tuple[dict[str, Any], list[str]]:
    """With the server stopped: the event counters snapshot and the webhook ids in the change log."""
    svc = build_service(load_settings(config, environ=ENV, data_dir=str(data)))
    try:
        with svc.store.read() as view:
            snap = event_counters.snapshot(view.txn, svc.store)
            ids = [ch["event"]["webhook_id"] for ch in view.iter_changes() if "event" in ch]
    finally:
        svc.close()
    return snap, ids


@pytest.mark.process
def test_serve_runs_webhooks_and_the_applier_in_an_idle_priority_events_process(tmp_path: Path) -> None:
    config = tmp_path / "ep.toml"
    config.write_text(blueprint().replace("[events]\n", "[events]\nprocess_nice = 7\n"))
    data = tmp_path / "data"
    srv = ServerProcess(config, data)
    try:
        child = srv.events_pid()
        assert child != srv.proc.pid
        base = _nice(srv.proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, child) == _nice(child) == min(19, base + 7)
        assert {_nice(child, int(t)) for t in os.listdir(f"/proc/{child}/task")} == {min(19, base + 7)}  # every thread
        assert {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{child}/task")} == {os.SCHED_IDLE}  # default
        assert os.sched_getscheduler(srv.proc.pid) == os.SCHED_OTHER  # the gRPC side keeps the normal policy
        seed_customer(srv)
        status, body, _ = post(srv.http_port, SEED_PAYLOAD, signed(SEED_PAYLOAD, wid="msg_seed"))
        assert (status, body["status"]) == (202, "accepted")
        wait_for("the seed event applied", lambda: attrs(srv, SEED_ID)["status"] == "Churned")
        wids = ["msg_seed"]
        for j in range(30):
            ext = f"ep-{j % 3}"
            if j < 3:
                seed_customer(srv, ext)
            b = event(ext, {"Credit_Limit__c": j + 1}, ts=f"2024-01-01T00:00:{j:02d}Z")
            wids.append(f"msg_ep_{j}")
            assert post(srv.http_port, b, signed(b, wid=wids[-1]))[0] == 202
        wait_for("the inbox drained", lambda: srv.stub.GetEventCounters(pb.GetEventCountersRequest(),
                                                                         timeout=5).in_inbox == 0)
        assert [attrs(srv, f"ep-{i}")["credit_limit"] for i in range(3)] == [28, 29, 30]
    except BaseException:
        srv.kill()
        raise
    assert srv.kill(signal.SIGTERM) == 0
    assert not Path(f"/proc/{child}").exists() or _comm(child) != PROCESS_NAME
    snap, ids = stored_counters(config, data)
    c = snap["counters"]
    assert snap["conserved"] and c["accepted"] == c["applied"] == len(wids) and snap["in_inbox"] == 0
    assert sorted(ids) == sorted(wids)  # each applied exactly once


@pytest.mark.process
def test_a_killed_events_process_is_restarted_and_later_events_apply(tmp_path: Path) -> None:
    config = tmp_path / "restart.toml"
    config.write_text(blueprint())
    data = tmp_path / "data"
    srv = ServerProcess(config, data)
    try:
        first = srv.events_pid()
        nice = _nice(first)
        assert nice == min(19, _nice(srv.proc.pid) + 10)  # the default process_nice
        seed_customer(srv)
        os.kill(first, signal.SIGKILL)
        second = srv.events_pid(other_than=first)
        assert _nice(second) == nice
        r = srv.stub.Resolve(resolve_req(external_id=SEED_ID), timeout=5)  # gRPC never stopped serving
        assert r.outcome == pb.OUTCOME_MATCHED
        assert post_retrying(srv.http_port, SEED_PAYLOAD, signed(SEED_PAYLOAD, wid="msg_after_restart")) == 202
        wait_for("the event applied", lambda: attrs(srv, SEED_ID)["status"] == "Churned")
        # the gRPC transport admits into the same inbox; the restarted applier applies it
        b = event(SEED_ID, {"Credit_Limit__c": 7}, ts="2030-01-01T00:00:00Z")
        srv.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=b, headers=signed(b)), timeout=5)
        wait_for("the gRPC event applied", lambda: attrs(srv, SEED_ID)["credit_limit"] == 7)
    except BaseException:
        srv.kill()
        raise
    assert srv.kill(signal.SIGTERM) == 0
    snap, ids = stored_counters(config, data)
    assert snap["conserved"] and snap["counters"]["applied"] == 2 and len(ids) == 2
    assert "died unexpectedly" in (tmp_path / "server.log").read_text()


@pytest.mark.process
def test_kill_9_mid_drain_applies_every_accepted_event_once(tmp_path: Path) -> None:
    config = tmp_path / "slow.toml"
    config.write_text(blueprint(rate=25, batch=5, high_water=100000))
    data = tmp_path / "data"
    first = ServerProcess(config, data)
    try:
        n_records, n_events = 10, 150
        expected: dict[str, int] = {}
        sent = 0
        for i in range(n_records):
            body = event(f"k-{i}", {"Credit_Limit__c": 0}, event_type="CREATE", ts="2024-01-01T00:00:00Z")
            assert post(first.http_port, body, signed(body))[0] == 202
            sent += 1
        for j in range(n_events):
            ext = f"k-{j % n_records}"
            body = event(ext, {"Credit_Limit__c": j + 1}, ts=f"2024-01-01T00:{(j + 1) // 60:02d}:{(j + 1) % 60:02d}Z")
            assert post(first.http_port, body, signed(body))[0] == 202
            expected[ext] = j + 1
            sent += 1
        snap = first.stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)
        assert snap.in_inbox > 0, "the inbox drained before the kill: slow the applier down"
    finally:
        first.kill()

    s = load_settings(config, environ=ENV, data_dir=str(data))
    second = ServerProcess(config, data)
    try:
        deadline = time.monotonic() + 60
        while (snap := second.stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)).in_inbox:
            assert time.monotonic() < deadline, snap
            time.sleep(0.1)
        c = snap.counters
        assert snap.conserved and c["accepted"] == sent and c["applied"] == sent and c["dead_lettered"] == 0
        for ext, value in expected.items():
            r = second.stub.Resolve(resolve_req(external_id=ext, fields=["credit_limit"]), timeout=5)
            assert r.outcome == pb.OUTCOME_MATCHED and r.attributes["credit_limit"] == value
    finally:
        second.kill(signal.SIGTERM)
    svc = build_service(s)
    try:
        with svc.store.read() as view:
            ids = [ch["event"]["webhook_id"] for ch in view.iter_changes() if "event" in ch]
    finally:
        svc.close()
    assert len(ids) == sent and len(set(ids)) == sent  # every event applied exactly once


@pytest.mark.process
@pytest.mark.slow
def test_multi_worker_server_serves_webhooks_on_one_port(tmp_path: Path) -> None:
    config = tmp_path / "mw.toml"
    config.write_text(blueprint().replace("workers = 1", "workers = 2"))
    srv = ServerProcess(config, tmp_path / "data", workers=2)
    try:
        srv.stub.Upsert(upsert_req(external_id=SEED_ID, attributes={"status": "Active"}, source_system="SALESFORCE"),
                        timeout=5)
        for _ in range(10):  # the events process serves the webhooks and applies them (one applier)
            assert post(srv.http_port, SEED_PAYLOAD, signed(SEED_PAYLOAD))[0] == 202
        deadline = time.monotonic() + WAIT_S
        while (snap := srv.stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)).counters["applied"] < 10:
            assert time.monotonic() < deadline, snap
            time.sleep(0.1)
        r = srv.stub.Resolve(resolve_req(external_id=SEED_ID, fields=["status"]), timeout=5)
        assert r.attributes["status"] == "Churned" and snap.conserved
    finally:
        srv.kill(signal.SIGTERM)


@pytest.mark.process
def test_serve_with_the_webhook_port_taken_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(blueprint().replace('http_listen = "127.0.0.1:0"', f'http_listen = "127.0.0.1:{port}"'))
        r = subprocess.run([sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir",
                            str(tmp_path / "data"), "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, **ENV}, timeout=60)
    assert r.returncode == 2 and f"cannot listen for webhooks on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
