"""Forget (contract §8) end to end: a real server in this process (gRPC, the events applier, the outbound deliverer),
real LMDB, signed CRM webhooks, a real HTTP receiver for outbound messages, then `resolver compact` and
`resolver check` as an operator runs them.

What must hold after Forget + compaction: every former identifier and every erased uuid (the customer's and those
merged into it) answers NOT_FOUND, across a restart; no byte of any canary (identifiers, attribute values, interaction
details, the bodies of webhooks about the person, in the inbox or dead-lettered) is left in any file of the data
directory; `resolver check` passes; a retry of the Forget replays; the audit entry names who, when, why and counts; a
customer sharing nothing with the person keeps everything, its dead letters and pending events included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from resolver.bootstrap import build_server
from resolver.config import Settings, load_settings
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML, TEST_ENCRYPTION_KEY, status_details
from tests.integration.helpers import resolve_req, signed_headers, upsert_req

ROOT = Path(__file__).resolve().parents[2]
SF_KEY = b"salesforce-forget-test-key"
ENV = {"SF_SECRET": SF_KEY.decode(), "CRM_OUT_SECRET": "crm-outbound-forget-key",
       "RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY}
WAIT_S = 30.0
REASON = "erasure request 4411 (GDPR art. 17)"

# The person: customer A (created by a CRM CREATE) and customer B (an Upsert), merged into A.
EXT_A, EMAIL_A, PHONE_A, NATIONAL_A = "CANARY-EXT-Q7Z1", "canary.q7z1@forget-test.example", "+16502539871", "(650) 253-9871"
NAME_A = "Quintessa Canaryfeather"
EXT_B, EMAIL_B, PHONE_B = "CANARY-EXT-B2W8", "bertram.b2w8@forget-test.example", "+16502539872"
TIER_B = "canary-tier-b2w8"
NOTE = "CANARY-CALL-NOTE-55X"  # an interaction's details
DLQ_NOTE = "CANARY-DLQ-NOTE-31K"  # a dead-lettered webhook about A's record
ORPHAN = "CANARY-ORPHAN-REC-77"  # a dead-lettered CREATE of a record nobody holds, naming A's email
UNKNOWN = "CANARY-UNKNOWN-REC-88"  # an UPDATE of a record nobody holds, naming A's phone (dead-lettered at apply)
PENDING = "CANARY-PENDING-NAME-12"  # a webhook about A's record, still in the inbox when Forget runs
LATE = "CANARY-LATE-NOTE-64"  # a webhook about A's record arriving after the erasure
CANARIES = [EXT_A, EMAIL_A, PHONE_A, PHONE_A[2:], NATIONAL_A, NAME_A, EXT_B, EMAIL_B, PHONE_B, PHONE_B[2:], TIER_B,
            NOTE, DLQ_NOTE, ORPHAN, UNKNOWN, PENDING]

# The keeper: shares nothing with the person.
EXT_K, EMAIL_K, PHONE_K, NAME_K = "KEEPER-EXT-5501", "keeper.5501@keep-test.example", "+16502530123", "Kasimir Keeperton"
KEEPER_DLQ = "KEEPER-DLQ-NOTE-5501"
KEEPER_PENDING = "Kasimir Pendington"


def blueprint(url: str) -> str:
    return SERVER_TOML + textwrap.dedent(
        f"""
        [matching]
        default_region = "US"
        [attributes]
        name = {{ type = "string" }}
        status = {{ type = "string", enum = ["Active", "Churned"] }}
        tier = {{ type = "string" }}
        last_interaction_date = {{ type = "date-time" }}
        [sources.SALESFORCE]
        field_map = {{ Name__c = "name", Customer_Status__c = "status" }}
        identifiers = {{ Email = "email", Phone = "phone" }}
        secrets = [{{ env = "SF_SECRET" }}]
        [events]
        http_listen = ""
        rate_per_s = 500
        unknown_record_wait_s = 0  # the UNKNOWN record's UPDATE below is dead-lettered at once
        [activity]
        record_type = "Task"
        subject = "{{channel}} call - {{disposition}}"
        default_owner = "crm-queue-owner"
        [outbound.CRM]
        url = "{url}"
        secrets = [{{ env = "CRM_OUT_SECRET" }}]
        events = ["interaction.recorded", "customer.created", "customer.updated", "customer.merged",
                  "customer.deleted"]
        fields = ["name", "status", "tier"]
        concurrency = 4
        timeout_s = 2
        backoff_initial_s = 0.05
        backoff_max_s = 0.2
        """
    )


class Receiver:
    """The CRM's outbound endpoint on 127.0.0.1:0: it refuses (400: the message dies, kept as an outbound dead letter
    with its body) everything but customer.deleted, which it acknowledges."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                doc = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                with receiver.lock:
                    receiver.bodies.append(doc)
                self.send_response(200 if doc["type"] == "customer.deleted" else 400)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/crm"

    def deleted(self) -> list[dict[str, Any]]:
        with self.lock:
            return [d for d in self.bodies if d["type"] == "customer.deleted"]


class Client:
    """A server running in this process, and its stub."""

    def __init__(self, settings: Settings, *, applier: bool) -> None:
        self.running = build_server(settings, sweeper=False, applier=applier, deliverer=True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=0)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def start() -> Iterator[Callable[..., Client]]:
    started: list[Client] = []

    def make(s: Settings, *, applier: bool = True) -> Client:
        c = Client(s, applier=applier)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()  # idempotent: the test stops its servers itself before compacting


def make_settings(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "forget.toml"
    path.write_text(text)
    return load_settings(path, environ=ENV, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0")


def wait_for(what: str, cond: Callable[[], Any], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`resolver ARGS --config ... --data-dir ...` in a process of its own, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "resolver", *args, "--config", str(s.blueprint_path), "--data-dir",
                           str(s.server.data_dir)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **ENV}, stdin=subprocess.DEVNULL, timeout=120)


def ingest(stub: Any, record_id: str, event_type: str, changes: dict[str, Any], ts: str = "2024-01-01T00:00:00Z"
           ) -> None:
    """A signed CRM webhook through IngestEvents; one that fails schema or mapping is dead-lettered at admission."""
    body = json.dumps({"event_type": event_type, "source_system": "SALESFORCE", "timestamp": ts,
                       "record_id": record_id, "object_type": "Account",
                       "change_set": {f: {"new_value": v} for f, v in changes.items()}}).encode()
    headers = signed_headers(SF_KEY, f"msg_{uuid.uuid4().hex}", body)
    try:
        stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=10)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err  # dead-lettered at admission


def event_counters(stub: Any) -> pb.EventCounters:
    return stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)


def outbound(stub: Any) -> pb.OutboundCounters:
    return stub.GetOutboundCounters(pb.GetOutboundCountersRequest(), timeout=5)


def dead_letters(stub: Any) -> list[pb.DeadLetter]:
    listed = stub.ListDeadLetters(pb.ListDeadLettersRequest(limit=100), timeout=5).dead_letters
    return [stub.GetDeadLetter(pb.GetDeadLetterRequest(id=d.id, include_body=True), timeout=5) for d in listed]


def outcome(stub: Any, **ids: Any) -> int:
    return int(stub.Resolve(resolve_req(**ids), timeout=5).outcome)


def get_code(stub: Any, customer_uuid: str) -> tuple[grpc.StatusCode, str]:
    """GetCustomer's status code and ErrorInfo reason (OK, "" when found)."""
    try:
        stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=customer_uuid), timeout=5)
    except grpc.RpcError as err:
        info, _ = status_details(err)
        return err.code(), info.reason if info is not None else ""
    return grpc.StatusCode.OK, ""


def forget(stub: Any, key: str, customer_uuid: str, reason: str = REASON) -> pb.ForgetResponse:
    return stub.Forget(pb.ForgetRequest(idempotency_key=key, customer_uuid=customer_uuid, reason=reason), timeout=10)


def person_identifiers() -> list[dict[str, Any]]:
    return [{"external_id": EXT_A}, {"emails": (EMAIL_A,)}, {"phones": (PHONE_A,)},
            {"external_id": EXT_B}, {"emails": (EMAIL_B,)}, {"phones": (PHONE_B,)}]


def canaries_in(data_dir: Path, needles: list[str]) -> dict[str, list[str]]:
    """Each needle found (case-insensitively) in some file under `data_dir`, with those files' names."""
    files = {p.relative_to(data_dir).as_posix(): p.read_bytes().lower() for p in sorted(data_dir.rglob("*"))
             if p.is_file()}
    hits = {n: [name for name, blob in files.items() if n.lower().encode() in blob] for n in needles}
    return {n: where for n, where in hits.items() if where}


def assert_person_gone(stub: Any, uuids: list[str]) -> None:
    for ids in person_identifiers():
        assert outcome(stub, **ids) == pb.OUTCOME_NOT_FOUND, ids
    for uid in uuids:
        assert get_code(stub, uid) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_DELETED"), uid


def assert_keeper_intact(stub: Any, keeper: str) -> None:
    for ids in ({"external_id": EXT_K}, {"emails": (EMAIL_K,)}, {"phones": (PHONE_K,)}):
        r = stub.Resolve(resolve_req(**ids), timeout=5)
        assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, keeper), ids
    c = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=keeper), timeout=5)
    assert (c.identifiers.external_id, list(c.identifiers.emails), list(c.identifiers.phones)) == \
        (EXT_K, [EMAIL_K], [PHONE_K])


@pytest.mark.process
def test_forget_then_compact_leaves_no_byte_of_the_person(tmp_path: Path, receiver: Receiver,
                                                           start: Callable[..., Client]) -> None:
    s = make_settings(tmp_path, blueprint(receiver.url))
    data = Path(s.server.data_dir)

    # -- phase 1: the person's life in the service (applier and deliverer running) -----------------------------
    c = start(s)
    ingest(c.stub, EXT_A, "CREATE", {"Email": EMAIL_A, "Phone": NATIONAL_A, "Name__c": NAME_A,
                                     "Customer_Status__c": "Active"})
    ingest(c.stub, EXT_K, "CREATE", {"Email": EMAIL_K, "Phone": PHONE_K, "Name__c": NAME_K})
    wait_for("both CRM records applied", lambda: event_counters(c.stub).counters["applied"] == 2)
    a = c.stub.Resolve(resolve_req(external_id=EXT_A), timeout=5).customer_uuid
    keeper = c.stub.Resolve(resolve_req(external_id=EXT_K), timeout=5).customer_uuid
    assert a and keeper and a != keeper
    b = c.stub.Upsert(upsert_req(external_id=EXT_B, emails=(EMAIL_B,), phones=(PHONE_B,),
                                 attributes={"tier": TIER_B}), timeout=5).customer_uuid
    merged = c.stub.Merge(pb.MergeRequest(idempotency_key=str(uuid.uuid4()), survivor_uuid=a, merged_uuids=[b]),
                          timeout=5)
    assert set(merged.identifiers.emails) == {EMAIL_A, EMAIL_B}
    call = pb.RecordInteractionRequest(interaction_id=f"call-{uuid.uuid4().hex}", customer_uuid=a, channel="voice",
                                       agent_id="agent-7", queue="billing", disposition="resolved")
    call.occurred_at.FromMicroseconds(time.time_ns() // 1000)
    call.details.update({"note": NOTE})
    c.stub.RecordInteraction(call, timeout=5)
    assert len(c.stub.ListInteractions(pb.ListInteractionsRequest(customer_uuid=a), timeout=5).interactions) == 1
    # webhooks that dead-letter: about A's record (unmapped field), a CREATE of a record nobody holds naming A's email
    # (another spelling of it), an UPDATE of a record nobody holds naming A's phone (refused when applied); the
    # keeper's own dead letter
    ingest(c.stub, EXT_A, "UPDATE", {"Secret_Notes__c": DLQ_NOTE})
    ingest(c.stub, ORPHAN, "CREATE", {"Email": EMAIL_A.upper(), "Unmapped__c": "x"})
    ingest(c.stub, UNKNOWN, "UPDATE", {"Phone": NATIONAL_A})
    ingest(c.stub, EXT_K, "UPDATE", {"Secret_Notes__c": KEEPER_DLQ})
    wait_for("four dead letters", lambda: event_counters(c.stub).in_dlq == 4 and event_counters(c.stub).in_inbox == 0)
    # every message to the CRM is refused (400) and kept as an outbound dead letter, with the PII it copies
    wait_for("outbound messages dead", lambda: (ob := outbound(c.stub)).pending == 0 and ob.dead >= 5
             and ob.dead == ob.counters["committed"])
    dead_before = outbound(c.stub).dead
    c.stop()

    # -- phase 2: a webhook about A waits in the inbox (no applier) when Forget runs -----------------------------
    c = start(s, applier=False)
    ingest(c.stub, EXT_A, "UPDATE", {"Name__c": PENDING}, ts="2024-02-01T00:00:00Z")
    ingest(c.stub, EXT_K, "UPDATE", {"Name__c": KEEPER_PENDING}, ts="2024-02-01T00:00:00Z")
    assert event_counters(c.stub).in_inbox == 2
    key = str(uuid.uuid4())
    r = forget(c.stub, key, a)
    assert (r.customer_uuid, r.replayed, r.audit_sequence) == (a, False, 1)
    assert dict(r.removed) == {"customers": 2, "identifiers": 6, "attributes": 4, "interactions": 1,
                               "changes_redacted": r.removed["changes_redacted"],
                               "ledger_redacted": r.removed["ledger_redacted"],
                               "outbound_messages": dead_before - 1,  # all but the keeper's customer.created
                               "inbox_events": 1, "event_dead_letters": 3}
    assert r.removed["changes_redacted"] >= 4 and r.removed["ledger_redacted"] >= 3  # upsert, merge, interaction
    again = forget(c.stub, key, a)
    assert (again.customer_uuid, again.replayed, again.audit_sequence, dict(again.removed)) == \
        (a, True, 1, dict(r.removed))

    assert_person_gone(c.stub, [a, b])
    assert_keeper_intact(c.stub, keeper)
    with pytest.raises(grpc.RpcError) as listed:
        c.stub.ListInteractions(pb.ListInteractionsRequest(customer_uuid=a), timeout=5)
    assert listed.value.code() == grpc.StatusCode.NOT_FOUND
    left = dead_letters(c.stub)
    assert [KEEPER_DLQ in d.body.decode() for d in left] == [True]  # only the keeper's dead letter stays
    ev = event_counters(c.stub)
    assert ev.in_inbox == 1 and ev.conserved  # the keeper's pending event stays; counters still add up
    ob = outbound(c.stub)
    assert ob.dead == 1 and ob.conserved  # the keeper's customer.created
    # downstream is told, with uuids only
    wait_for("customer.deleted delivered", lambda: receiver.deleted())
    told = receiver.deleted()[0]["data"]
    assert told["customer_uuid"] == a and sorted(told["erased_uuids"]) == sorted([a, b])
    assert not [n for n in CANARIES if n.lower() in json.dumps(told).lower()]
    c.stop()

    # -- compaction (server stopped): no byte of the person in any file; the keeper's bytes are still found -----
    compacted = cli(s, "compact")
    assert compacted.returncode == 0, compacted.stderr
    assert canaries_in(data, CANARIES) == {}
    # the scan finds what is there: the keeper's record (webhook bodies are stored encrypted: resolver.events.envelope)
    assert set(canaries_in(data, [EXT_K, EMAIL_K, NAME_K])) == {EXT_K, EMAIL_K, NAME_K}
    checked = cli(s, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    audited = cli(s, "audit", "list")
    assert audited.returncode == 0, audited.stderr
    line = audited.stdout.splitlines()[0]
    assert line.startswith("1\t") and f"FORGET\t{a}\tby -\t" in line and f"reason: {REASON}" in line
    assert "inbox_events 1" in line and "event_dead_letters 3" in line and "interactions 1" in line
    assert not [n for n in CANARIES if n.lower() in audited.stdout.lower()]

    # -- phase 3: restarted, the person stays gone; a late webhook about its record is erased by a second Forget --
    c = start(s)
    assert_person_gone(c.stub, [a, b])
    wait_for("the keeper's pending event applied", lambda: event_counters(c.stub).in_inbox == 0)
    assert_keeper_intact(c.stub, keeper)
    assert dict(c.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=keeper), timeout=5).attributes)["name"] == \
        KEEPER_PENDING
    ingest(c.stub, EXT_A, "UPDATE", {"Name__c": LATE}, ts="2030-01-01T00:00:00Z")
    wait_for("the late event refused", lambda: event_counters(c.stub).in_dlq == 2)
    assert any(d.reason == "RECORD_DELETED" and LATE in d.body.decode() for d in dead_letters(c.stub))
    second = forget(c.stub, str(uuid.uuid4()), b)  # the merged-away uuid leads to the same person
    assert (second.customer_uuid, second.replayed, second.audit_sequence) == (a, False, 2)
    assert {k: v for k, v in second.removed.items() if v} == {"event_dead_letters": 1}
    assert [KEEPER_DLQ in d.body.decode() for d in dead_letters(c.stub)] == [True]
    c.stop()
    assert cli(s, "compact").returncode == 0
    assert canaries_in(data, [*CANARIES, LATE]) == {}
    assert cli(s, "check").returncode == 0


def test_forget_answers_not_found_for_an_unknown_uuid_and_lists_bad_fields(tmp_path: Path, receiver: Receiver,
                                                                            start: Callable[..., Client]) -> None:
    c = start(make_settings(tmp_path, blueprint(receiver.url)))
    with pytest.raises(grpc.RpcError) as unknown:
        forget(c.stub, str(uuid.uuid4()), str(uuid.uuid4()))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        c.stub.Forget(pb.ForgetRequest(idempotency_key="", customer_uuid="not-a-uuid", reason=" "), timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(status_details(bad.value)[1]) == [("customer_uuid", "INVALID"), ("idempotency_key", "REQUIRED"),
                                                    ("reason", "REQUIRED")]
    uid = c.stub.Upsert(upsert_req(external_id="FORGET-ME-1", emails=("forget.me.1@example.com",)),
                        timeout=5).customer_uuid
    key = str(uuid.uuid4())
    assert forget(c.stub, key, uid).audit_sequence == 1
    with pytest.raises(grpc.RpcError) as reused:  # the same key for another request
        forget(c.stub, key, uid, reason="another reason")
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status_details(reused.value)[0].reason == "IDEMPOTENCY_KEY_REUSED"
    assert outcome(c.stub, external_id="FORGET-ME-1") == pb.OUTCOME_NOT_FOUND


@pytest.mark.process
def test_cli_forget_and_audit_list(tmp_path: Path, receiver: Receiver, start: Callable[..., Client]) -> None:
    s = make_settings(tmp_path, blueprint(receiver.url))
    c = start(s)
    uid = c.stub.Upsert(upsert_req(external_id="CLI-FORGET-1", phones=("+16502530777",),
                                   attributes={"name": "Cli Person"}), timeout=5).customer_uuid
    keeper = c.stub.Upsert(upsert_req(external_id="CLI-KEEP-1"), timeout=5).customer_uuid
    c.stop()
    done = cli(s, "forget", uid, "--reason", "customer asked by phone", "--idempotency-key", "cli-forget-1")
    assert done.returncode == 0, done.stderr
    assert f"customer {uid} erased, audit entry 1: " in done.stdout and "identifiers 2" in done.stdout
    replayed = cli(s, "forget", uid, "--reason", "customer asked by phone", "--idempotency-key", "cli-forget-1")
    assert replayed.returncode == 0 and f"customer {uid} erased (replayed), audit entry 1" in replayed.stdout
    missing = cli(s, "forget", str(uuid.uuid4()), "--reason", "typo")
    assert missing.returncode == 1 and "no customer" in missing.stderr
    listed = cli(s, "audit", "list").stdout
    assert listed.splitlines()[0].startswith("1\t") and f"\tFORGET\t{uid}\tby cli:" in listed
    assert "reason: customer asked by phone" in listed and listed.splitlines()[-1] == "audit: 1 entry"
    c = start(s)
    assert outcome(c.stub, external_id="CLI-FORGET-1") == pb.OUTCOME_NOT_FOUND
    assert outcome(c.stub, phones=("+16502530777",)) == pb.OUTCOME_NOT_FOUND
    assert c.stub.Resolve(resolve_req(external_id="CLI-KEEP-1"), timeout=5).customer_uuid == keeper



@pytest.mark.process
def test_the_audit_entry_names_the_callers_token_and_forget_needs_admin(tmp_path: Path, receiver: Receiver,
                                                                        start: Callable[..., Client]) -> None:
    from resolver.auth import new_token

    admin, agent = new_token("ops-admin", "admin,write,resolve"), new_token("agent-desk", "write,resolve")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{admin.line}\n{agent.line}\n")
    s = make_settings(tmp_path, blueprint(receiver.url) + f'[auth]\ntokens_file = "{tokens}"\n')
    c = start(s)

    def bearer(t: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {t}")]

    uid = c.stub.Upsert(upsert_req(external_id="AUDIT-ME-1"), timeout=5, metadata=bearer(agent.token)).customer_uuid
    request = pb.ForgetRequest(idempotency_key=str(uuid.uuid4()), customer_uuid=uid, reason="ticket 9")
    with pytest.raises(grpc.RpcError) as denied:
        c.stub.Forget(request, timeout=5, metadata=bearer(agent.token))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert c.stub.Forget(request, timeout=5, metadata=bearer(admin.token)).audit_sequence == 1
    c.stop()
    listed = cli(s, "audit", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"\tFORGET\t{uid}\tby ops-admin\t" in listed.stdout and "reason: ticket 9" in listed.stdout
