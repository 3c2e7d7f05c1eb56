"""Outbound delivery to the CRM end to end (contract §5b): a real server (in this process, and `resolver serve` in a
subprocess), real LMDB, a real HTTP receiver on 127.0.0.1:0 that checks every Standard Webhooks signature with
its own copy of the secret, and answers as the test's plan says: 429 with Retry-After, 5xx, dropped connections,
answers too slow for the deliverer's timeout, 4xx, then 2xx.

What must hold: every committed message arrives; a customer's messages are attempted in order, each only after the
previous one was acknowledged or dead; a message is re-sent under the same webhook-id and body until acknowledged,
never under a new id; dead letters (a 4xx, max_age_s) can be shown masked, replayed and discarded; erasure drops a
customer's pending messages that copy its PII and still sends customer.deleted; the counters conserve
(committed = delivered + pending + dead + discarded); a kill -9 of the deliverer or of the whole server loses
nothing, and duplicates are only re-sends of the same webhook-id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from resolver.bootstrap import build_server, build_service
from resolver.config import Settings, load_settings
from resolver.events.signatures import sign
from resolver.outbound import outbox
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML, TEST_ENCRYPTION_KEY
from tests.integration.helpers import upsert_req

ROOT = Path(__file__).resolve().parents[2]
CRM_KEY = b"crm-outbound-\x00\x01-signing-key"
SF_KEY = b"salesforce-inbound-key"
ENV = {"CRM_OUT_SECRET": "whsec_" + base64.b64encode(CRM_KEY).decode(), "SF_IN_SECRET": SF_KEY.decode(),
       "RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY}
WAIT_S = 30.0
ALL_EVENTS = '["interaction.recorded", "customer.created", "customer.updated", "customer.merged", ' \
             '"customer.unmerged", "customer.deleted"]'
DROP = "drop"  # an answer of the plan: close the connection without answering


# -- the CRM's side: a webhook receiver ----------------------------------------------------------------------

@dataclass(frozen=True)
class Seen:
    """One request the receiver got, and what it answered."""

    webhook_id: str
    attempt: int  # 1, 2, ... for this webhook-id
    body: bytes
    doc: dict[str, Any]
    signed: bool  # the signature verified with the receiver's key, and the timestamp is fresh
    content_type: str
    answer: int | str  # the status sent, or DROP

    @property
    def seq(self) -> int:
        return int(self.doc["data"]["sequence"])

    @property
    def customer(self) -> str:
        return str(self.doc["data"]["customer_uuid"])


Answer = int | str | tuple[int, dict[str, str]] | tuple[str, float]  # status | DROP | (status, headers) | ("slow", s)


def signature_ok(key: bytes, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks, computed here independently of the server's code: v1 = base64(HMAC-SHA256(key,
    id.timestamp.body)); one of the space-separated signatures must match; the timestamp within 5 minutes."""
    wid, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not wid or not stamp.isdigit() or abs(time.time() - int(stamp)) > 300:
        return False
    mac = base64.b64encode(hmac.new(key, f"{wid}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(s, "v1," + mac) for s in headers.get("webhook-signature", "").split())


class Receiver:
    """A CRM webhook endpoint on 127.0.0.1:0 (HTTP/1.1 keep-alive, a thread per connection). `plan(webhook_id,
    attempt, doc)` decides each answer; it can be swapped while running."""

    def __init__(self, key: bytes = CRM_KEY, plan: Callable[[str, int, dict[str, Any]], Answer] | None = None) -> None:
        self.key = key
        self.plan = plan or (lambda wid, n, doc: 200)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                doc = json.loads(body)
                wid = headers.get("webhook-id", "")
                with receiver.lock:
                    attempt = 1 + sum(1 for s in receiver.seen if s.webhook_id == wid)
                    answer = receiver.plan(wid, attempt, doc)
                    status = answer if isinstance(answer, int | str) else answer[0]
                    receiver.seen.append(Seen(wid, attempt, body, doc, signature_ok(receiver.key, headers, body),
                                              headers.get("content-type", ""), status if status != "slow" else 200))
                if status == DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                extra: dict[str, str] = {}
                if isinstance(answer, tuple) and status == "slow":
                    time.sleep(float(answer[1]))  # type: ignore[arg-type]
                    status = 200
                elif isinstance(answer, tuple):
                    extra = answer[1]  # type: ignore[assignment]
                try:
                    self.send_response(int(status))
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    self.close_connection = True  # the deliverer gave up waiting (its timeout)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/crm/webhooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def acked(self) -> list[Seen]:
        return [s for s in self.snapshot() if isinstance(s.answer, int) and 200 <= s.answer < 300]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# -- the server's side ---------------------------------------------------------------------------------------

def blueprint(url: str, *, fields: str = '["status", "credit_limit", "tier"]', extra: str = "",
              max_age_s: float = 3600, concurrency: int = 4, rate: float = 0, timeout_s: float = 2.0) -> str:
    return SERVER_TOML + textwrap.dedent(
        f"""
        [attributes]
        name = {{ type = "string" }}
        status = {{ type = "string", enum = ["Active", "Churned"], owner = "SALESFORCE" }}
        credit_limit = {{ type = "number", minimum = 0 }}
        tier = {{ type = "string" }}
        ssn = {{ type = "string", sensitive = true }}
        [sources.SALESFORCE]
        field_map = {{ Customer_Status__c = "status", Credit_Limit__c = "credit_limit" }}
        identifiers = {{ Email = "email" }}
        secrets = [{{ env = "SF_IN_SECRET" }}]
        [events]
        http_listen = ""
        rate_per_s = 500
        [activity]
        record_type = "Task"
        subject = "{{channel}} call - {{disposition}}"
        owners = {{ agent-7 = "crm-user-7" }}
        default_owner = "crm-queue-owner"
        [outbound.CRM]
        url = "{url}"
        secrets = [{{ env = "CRM_OUT_SECRET" }}]
        events = {ALL_EVENTS}
        fields = {fields}
        rate_per_s = {rate:g}
        concurrency = {concurrency}
        max_age_s = {max_age_s:g}
        timeout_s = {timeout_s:g}
        backoff_initial_s = 0.05
        backoff_max_s = 0.2
        """
    ) + textwrap.dedent(extra)


def make_settings(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "outbound.toml"
    path.write_text(text)
    return load_settings(path, environ=ENV, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0")


class Client:
    """A server running in this process (gRPC, the events applier, the deliverer as threads) and its stub."""

    def __init__(self, settings: Settings) -> None:
        self.running = build_server(settings, sweeper=False, applier=True, deliverer=True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)
        self.store = self.running.service.store

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=0)


@pytest.fixture
def start() -> Iterator[Callable[[Settings], Client]]:
    started: list[Client] = []

    def make(s: Settings) -> Client:
        c = Client(s)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def wait_for(what: str, cond: Callable[[], Any], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def counters(stub: Any) -> pb.OutboundCounters:
    return stub.GetOutboundCounters(pb.GetOutboundCountersRequest(), timeout=5)


def delivered_all(stub: Any, committed: int | None = None) -> Callable[[], bool]:
    def check() -> bool:
        c = counters(stub)
        return c.pending == 0 and (committed is None or c.counters["committed"] >= committed)

    return check


def expected_ids(store: Any, destination: str = "CRM") -> dict[str, int]:
    """webhook-id -> change sequence, for every message the outbox queued (its history: the change log)."""
    from resolver.outbound.messages import webhook_id

    with store.read() as view:
        return {webhook_id(destination, ch["seq"]): ch["seq"] for ch in view.iter_changes()
                if ch["action"] in ("CREATED", "UPDATED", "MERGED", "UNMERGED", "DELETED", "INTERACTION_RECORDED")}


def cli(s: Settings, *args: str) -> str:
    """`resolver outbound ARGS` in a process of its own, beside the running server (py-lmdb opens an environment
    once per process); its stdout (exit code 0 asserted)."""
    r = subprocess.run([sys.executable, "-m", "resolver", "outbound", *args, "--config", str(s.blueprint_path),
                        "--data-dir", str(s.server.data_dir)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **ENV}, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def upsert(stub: Any, ext: str, source_system: str = "", **attributes: Any) -> pb.UpsertResponse:
    return stub.Upsert(upsert_req(external_id=ext, attributes=attributes or None, source_system=source_system,
                                  emails=(f"{ext.lower()}@example.com",)), timeout=10)


def assert_order_and_ids(seen: list[Seen], key: bytes = CRM_KEY) -> None:
    """Per customer, attempts never go back to an older change (each waits for the previous acknowledgement);
    each webhook-id always carries the same body; every request is correctly signed."""
    assert all(s.signed for s in seen), [s.webhook_id for s in seen if not s.signed]
    last: dict[str, int] = {}
    for s in seen:
        assert s.seq >= last.get(s.customer, 0), f"{s.webhook_id} attempted after a newer change of {s.customer}"
        last[s.customer] = s.seq
    bodies: dict[str, bytes] = {}
    for s in seen:
        assert bodies.setdefault(s.webhook_id, s.body) == s.body, f"{s.webhook_id} was re-sent with another body"
        assert s.webhook_id == f"msg_CRM_{s.seq}"


# -- delivery through failures -------------------------------------------------------------------------------

def test_every_message_arrives_in_order_through_429_500_drops_and_timeouts(
        tmp_path: Path, receiver: Receiver, start: Callable[[Settings], Client]) -> None:
    first_request = threading.Event()

    def plan(wid: str, attempt: int, doc: dict[str, Any]) -> Answer:
        if not first_request.is_set():  # the very first request: the whole destination waits Retry-After
            first_request.set()
            return 429, {"Retry-After": "1"}
        seq = doc["data"]["sequence"]
        script: list[Answer] = [500, DROP, 200] if seq % 3 == 0 else [503, 200] if seq % 3 == 1 else [("slow", 1.0), 200]
        return script[min(attempt, len(script)) - 1]

    receiver.plan = plan
    c = start(make_settings(tmp_path, blueprint(receiver.url, timeout_s=0.5, concurrency=3)))
    uuids = [upsert(c.stub, f"ORD-{i}", tier="bronze").customer_uuid for i in range(5)]
    for round_ in range(4):
        for i in range(5):
            upsert(c.stub, f"ORD-{i}", tier=f"t{round_}", credit_limit=round_ * 10 + i)
    upsert(c.stub, "ORD-0", name="only the name")  # a field this destination is not sent: no message
    expected = expected_ids(c.store)
    assert len(expected) == 26  # 5 created + 20 updated + the name-only update (in the log, not sent)
    wait_for("every message delivered", delivered_all(c.stub, 25))

    snap = counters(c.stub)
    seen = receiver.snapshot()
    acked = {s.webhook_id for s in receiver.acked()}
    sent = {w for w, seq in expected.items() if seq != max(expected.values())}
    assert acked == sent and len(acked) == 25  # every message arrived; the name-only change was never sent
    assert_order_and_ids(seen)
    assert {s.customer for s in seen} == set(uuids)
    c0 = snap.counters
    assert snap.conserved and snap.pending == snap.dead == 0
    assert c0["committed"] == c0["delivered"] == 25 and c0["discarded"] == 0
    assert c0["throttled"] == 1 and c0["retries"] >= 25  # every message failed at least once
    # the deliverer counts what it saw: a slow answer it stopped waiting for is a failed attempt to it
    assert c0["attempts"] == c0["delivered"] + c0["retries"] >= len(seen)
    assert seen[0].answer == 429 and seen[0].webhook_id in acked  # the throttled message was sent again


def test_message_shapes_fields_and_no_echo(tmp_path: Path, receiver: Receiver,
                                           start: Callable[[Settings], Client]) -> None:
    extra = f"""
        [outbound.ALL]
        url = "{receiver.url}"
        secrets = [{{ env = "CRM_OUT_SECRET" }}]
        events = ["customer.created", "customer.updated"]
        source_system = "SALESFORCE"
        backoff_initial_s = 0.05
        backoff_max_s = 0.2
        """
    c = start(make_settings(tmp_path, blueprint(receiver.url, extra=extra)))
    r = c.stub.Upsert(upsert_req(external_id="SHAPE-1", emails=("Ann.Lee@Example.com",), phones=("+16502530001",),
                                 attributes={"tier": "gold", "ssn": "123-45-6789", "name": "Ann"}), timeout=5)
    c.stub.Upsert(upsert_req(external_id="SHAPE-1", attributes={"name": "Ann Lee"}), timeout=5)  # CRM: not its field
    c.stub.Upsert(upsert_req(external_id="SHAPE-1", attributes={"credit_limit": 10}), timeout=5)
    # SALESFORCE's own change: echoed to CRM (another system), not to ALL (whose source_system it is)
    c.stub.Upsert(upsert_req(external_id="SHAPE-1", attributes={"status": "Churned"}, source_system="SALESFORCE"),
                  timeout=5)
    wait_for("delivered", delivered_all(c.stub, 6))
    by_dest: dict[str, list[dict[str, Any]]] = {}
    for s in receiver.acked():
        by_dest.setdefault(s.webhook_id.split("_")[1], []).append(s.doc)
    crm = sorted(by_dest["CRM"], key=lambda d: d["data"]["sequence"])
    assert [d["type"] for d in crm] == ["customer.created", "customer.updated", "customer.updated"]
    created = crm[0]["data"]
    assert created["customer_uuid"] == r.customer_uuid and created["external_id"] == "SHAPE-1"
    assert created["identifiers"] == {"external_ids": ["SHAPE-1"], "emails": ["ann.lee@example.com"],
                                      "phones": ["+16502530001"]}
    assert created["attributes"] == {"tier": "gold"}  # only its fields: no name, never the sensitive ssn
    assert crm[1]["data"]["attributes"] == {"credit_limit": 10} and crm[1]["data"]["previous"] == {"credit_limit": None}
    assert crm[2]["data"]["attributes"] == {"status": "Churned"} and crm[2]["data"]["source_system"] == "SALESFORCE"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", crm[0]["timestamp"])
    assert {s.content_type for s in receiver.snapshot()} == {"application/json"}
    everything = sorted(by_dest["ALL"], key=lambda d: d["data"]["sequence"])
    assert [d["type"] for d in everything] == ["customer.created", "customer.updated", "customer.updated"]
    assert everything[0]["data"]["attributes"] == {"tier": "gold", "name": "Ann"}  # no fields listed: all but ssn
    assert everything[1]["data"]["attributes"] == {"name": "Ann Lee"}
    assert counters(c.stub).conserved


def test_interactions_merges_and_unmerges_are_sent(tmp_path: Path, receiver: Receiver,
                                                   start: Callable[[Settings], Client]) -> None:
    fields = '["tier", "last_interaction_date"]'
    extra = "[interactions]\nlast_interaction_attribute = \"last_interaction_date\"\n"
    text = blueprint(receiver.url, fields=fields, extra=extra).replace(
        'tier = { type = "string" }', 'tier = { type = "string" }\nlast_interaction_date = { type = "date-time" }')
    c = start(make_settings(tmp_path, text))
    a = upsert(c.stub, "MRG-A", tier="gold").customer_uuid
    b = upsert(c.stub, "MRG-B", tier="silver").customer_uuid
    c.stub.Merge(pb.MergeRequest(idempotency_key="m1", survivor_uuid=a, merged_uuids=[b]), timeout=5)
    c.stub.Unmerge(pb.UnmergeRequest(idempotency_key="u1", survivor_uuid=a, merged_uuid=b), timeout=5)
    req = pb.RecordInteractionRequest(interaction_id="call-1", customer_uuid=a, channel="voice", agent_id="agent-7",
                                      queue="billing", disposition="resolved")
    req.occurred_at.FromMicroseconds(1_714_557_600_000_000)  # 2024-05-01T10:00:00Z
    # the platform retries the same call 20 times at once: recorded once, one message, one delivery
    answers: list[pb.RecordInteractionResponse] = []
    threads = [threading.Thread(target=lambda: answers.append(c.stub.RecordInteraction(req, timeout=10)))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 20 and sum(not r.replayed for r in answers) == 1
    wait_for("delivered", delivered_all(c.stub, 5))
    assert [s.doc["type"] for s in receiver.snapshot()].count("interaction.recorded") == 1  # one delivery attempt
    docs = sorted((s.doc for s in receiver.acked()), key=lambda d: d["data"]["sequence"])
    assert [d["type"] for d in docs] == ["customer.created", "customer.created", "customer.merged",
                                         "customer.unmerged", "interaction.recorded"]
    merged, unmerged, call = (d["data"] for d in docs[2:])
    assert merged["customer_uuid"] == a and merged["merged_uuids"] == [b]
    assert merged["identifiers_added"] == {"external_ids": ["MRG-B"], "emails": ["mrg-b@example.com"]}
    assert unmerged["restored_uuid"] == b
    assert unmerged["identifiers_removed"] == {"external_ids": ["MRG-B"], "emails": ["mrg-b@example.com"]}
    assert call["interaction_id"] == "call-1" and call["customer_uuid"] == a and call["external_id"] == "MRG-A"
    assert call["interaction"]["channel"] == "voice" and call["interaction"]["agent_id"] == "agent-7"
    assert call["activity"]["owner"] == "crm-user-7" and call["activity"]["subject"] == "voice call - resolved"
    assert call["attributes"] == {"last_interaction_date": "2024-05-01T10:00:00Z"}
    assert counters(c.stub).conserved


# -- dead letters ------------------------------------------------------------------------------------------

@pytest.mark.process
def test_a_4xx_is_dead_lettered_the_customer_goes_on_and_replay_delivers_the_same_message(
        tmp_path: Path, receiver: Receiver, start: Callable[[Settings], Client]) -> None:
    refuse: set[int] = set()

    receiver.plan = lambda wid, n, doc: 422 if doc["data"]["sequence"] in refuse else 200
    s = make_settings(tmp_path, blueprint(receiver.url))
    c = start(s)
    created = upsert(c.stub, "DEAD-1", tier="gold")
    wait_for("created delivered", delivered_all(c.stub, 1))
    with c.store.read() as view:
        refuse.add(view.last_change_seq() + 1)
    upsert(c.stub, "DEAD-1", tier="silver")  # refused: 422
    upsert(c.stub, "DEAD-1", tier="bronze")  # the same customer's next message still goes
    wait_for("all settled", delivered_all(c.stub, 3))
    snap = counters(c.stub)
    assert (snap.dead, snap.counters["delivered"], snap.conserved) == (1, 2, True)

    dead = c.stub.ListOutboundDeadLetters(pb.ListOutboundDeadLettersRequest(), timeout=5).messages
    assert len(dead) == 1
    d = dead[0]
    assert (d.destination, d.event_type, d.customer_uuid, d.last_error, d.attempts) == (
        "CRM", "customer.updated", created.customer_uuid, "HTTP 422", 1)
    assert d.webhook_id == f"msg_CRM_{d.change_sequence}" and not d.body
    assert "silver" not in d.masked_payload and "dead-1" not in d.masked_payload.lower()
    full = c.stub.GetOutboundDeadLetter(pb.GetOutboundDeadLetterRequest(id=d.id, include_body=True), timeout=5)
    assert json.loads(full.body)["data"]["attributes"] == {"tier": "silver"}

    # the CLI shows it masked, from the data directory, while the server runs
    listed, shown = cli(s, "list"), cli(s, "show", str(d.id))
    assert f"{d.id}\t" in listed and "HTTP 422" in shown and f"webhook-id: {d.webhook_id}" in shown
    for out in (listed, shown):
        assert "silver" not in out and "DEAD-1" not in out and "dead-1@" not in out

    refuse.clear()  # the CRM is fixed: replay sends the same message again
    assert c.stub.ReplayOutboundDeadLetter(pb.ReplayOutboundDeadLetterRequest(id=d.id), timeout=5).requeued
    wait_for("replayed and delivered", lambda: counters(c.stub).counters["delivered"] == 3)
    snap = counters(c.stub)
    assert snap.conserved and snap.dead == 0 and snap.counters["replayed"] == 1 and snap.counters["committed"] == 3
    attempts = [x for x in receiver.snapshot() if x.webhook_id == d.webhook_id]
    assert [x.answer for x in attempts] == [422, 200] and attempts[0].body == attempts[1].body
    with pytest.raises(grpc.RpcError) as err:
        c.stub.ReplayOutboundDeadLetter(pb.ReplayOutboundDeadLetterRequest(id=d.id), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.process
def test_past_max_age_is_dead_lettered_and_discard_keeps_the_counters(
        tmp_path: Path, receiver: Receiver, start: Callable[[Settings], Client]) -> None:
    receiver.plan = lambda wid, n, doc: 503  # the CRM is down for good
    s = make_settings(tmp_path, blueprint(receiver.url, max_age_s=1))
    c = start(s)
    for i in range(3):
        upsert(c.stub, f"OLD-{i}", tier="gold")
    wait_for("expired", lambda: counters(c.stub).dead == 3)
    dead = c.stub.ListOutboundDeadLetters(pb.ListOutboundDeadLettersRequest(), timeout=5).messages
    assert {d.last_error.split(";")[0] for d in dead} == {"older than max_age_s (1s)"}
    assert all("HTTP 503" in d.last_error and d.attempts >= 1 for d in dead)
    assert f"{dead[0].id} discarded" in cli(s, "discard", str(dead[0].id))
    c.stub.DiscardOutboundDeadLetter(pb.DiscardOutboundDeadLetterRequest(id=dead[1].id), timeout=5)
    snap = counters(c.stub)
    assert (snap.counters["committed"], snap.counters["discarded"], snap.dead, snap.pending) == (3, 2, 1, 0)
    assert snap.conserved
    assert "committed 3 = delivered 0 + pending 0 + dead 1 + discarded 2 (conserved)" in cli(s, "counters")


# -- erasure ----------------------------------------------------------------------------------------------

def sf_event(record_id: str, event_type: str, changes: dict[str, Any], ts: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"event_type": event_type, "source_system": "SALESFORCE", "timestamp": ts, "record_id": record_id,
                       "object_type": "Account",
                       "change_set": {f: {"new_value": v} for f, v in changes.items()}}).encode()
    wid, stamp = f"msg_{uuid.uuid4().hex}", int(time.time())
    return body, {"webhook-id": wid, "webhook-timestamp": str(stamp), "webhook-signature": sign(SF_KEY, wid, stamp, body)}


def test_erasure_drops_pending_pii_messages_and_still_sends_customer_deleted(
        tmp_path: Path, receiver: Receiver, start: Callable[[Settings], Client]) -> None:
    hold = threading.Event()
    hold.set()
    receiver.plan = lambda wid, n, doc: 503 if hold.is_set() else 200
    c = start(make_settings(tmp_path, blueprint(receiver.url)))
    body, headers = sf_event("ERASE-1", "CREATE", {"Customer_Status__c": "Active", "Email": "erase.me@example.com"},
                             "2024-01-01T00:00:00Z")
    c.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=5)
    wait_for("created", lambda: counters(c.stub).counters["committed"] >= 1)
    for i in range(3):
        body, headers = sf_event("ERASE-1", "UPDATE", {"Credit_Limit__c": i + 1}, f"2024-01-01T00:0{i + 1}:00Z")
        c.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=5)
    wait_for("four messages queued", lambda: counters(c.stub).counters["committed"] == 4)
    wait_for("the CRM refused one at least", lambda: receiver.snapshot())
    uid = receiver.snapshot()[0].customer
    body, headers = sf_event("ERASE-1", "DELETE", {}, "2024-01-02T00:00:00Z")
    c.stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=5)
    wait_for("erased", lambda: counters(c.stub).counters["erased"] == 4)
    erased_at = len(receiver.snapshot())
    hold.clear()  # the CRM is back
    wait_for("customer.deleted delivered", delivered_all(c.stub, 5))
    after = receiver.snapshot()[erased_at:]
    assert [s.doc["type"] for s in after if s.answer == 200] == ["customer.deleted"]
    deleted = next(s for s in after if s.answer == 200).doc
    assert deleted["data"]["customer_uuid"] == uid and deleted["data"]["erased_uuids"] == [uid]
    assert "erase.me" not in json.dumps(deleted) and "ERASE-1" not in json.dumps(deleted)  # nothing of the person
    snap = counters(c.stub)
    assert (snap.counters["committed"], snap.counters["delivered"], snap.counters["discarded"]) == (5, 1, 4)
    assert snap.conserved and snap.pending == snap.dead == 0
    with c.store.read() as view:  # no reference to the erased customer's messages is left behind
        assert not [k for k, _ in view.txn.cursor(db=c.store.db["ob_state"]) if k.startswith(b"c")]


# -- crash safety: `resolver serve` in a subprocess -------------------------------------------------------

class Serve:
    """`resolver serve` in a subprocess of its own session (kill -9 takes the whole tree, as a host stop would)."""

    LINE = re.compile(r"serving on 127\.0\.0\.1:(\d+)")

    def __init__(self, config: Path, data: Path) -> None:
        env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
        with (data.parent / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir", str(data),
                 "--listen", "127.0.0.1:0", "--workers", "1"],
                stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(ROOT), start_new_session=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, "server did not start"
            if select.select([self.proc.stdout], [], [], left)[0]:
                line += self.proc.stdout.read1(4096)  # type: ignore[attr-defined]
        m = self.LINE.search(line.decode())
        assert m, line
        self.channel = grpc.insecure_channel(f"127.0.0.1:{m.group(1)}")
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.channel.close()
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def outbox_pid(self, other_than: int = 0, timeout: float = 30.0) -> int:
        from resolver.outbound.process import PROCESS_NAME
        from tests.integration.test_events import _children, _comm

        deadline = time.monotonic() + timeout
        while True:
            found = [p for p in _children(self.proc.pid) if _comm(p) == PROCESS_NAME and p != other_than]
            if len(found) == 1:
                return found[0]
            assert time.monotonic() < deadline, f"no outbound process (other than {other_than})"
            time.sleep(0.05)


def load_messages(stub: Any, customers: int, rounds: int) -> None:
    for i in range(customers):
        upsert(stub, f"K9-{i}", tier="t0")
    for r in range(1, rounds):
        for i in range(customers):
            upsert(stub, f"K9-{i}", tier=f"t{r}")


def stored(config: Path, data: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """With the server stopped: the outbound counters and the webhook-ids the outbox made (from the change log)."""
    svc = build_service(load_settings(config, environ=ENV, data_dir=str(data)))
    try:
        with svc.store.read() as view:
            snap = outbox.snapshot(view.txn, svc.store)
        return snap, expected_ids(svc.store)
    finally:
        svc.close()


def assert_nothing_lost(receiver: Receiver, snap: dict[str, Any], expected: dict[str, int]) -> None:
    seen = receiver.snapshot()
    acked = [s.webhook_id for s in receiver.acked()]
    assert set(acked) == set(expected), f"lost: {sorted(set(expected) - set(acked))[:5]}"
    assert set(s.webhook_id for s in seen) <= set(expected)  # never an id the outbox did not make
    assert_order_and_ids(seen)
    c = snap["counters"]
    assert snap["conserved"] and snap["pending"] == snap["dead"] == 0
    assert c["committed"] == c["delivered"] == len(expected)


@pytest.mark.process
def test_kill_9_of_the_deliverer_mid_delivery_loses_nothing(tmp_path: Path, receiver: Receiver) -> None:
    config = tmp_path / "k9.toml"
    config.write_text(blueprint(receiver.url, rate=40, concurrency=4))
    data = tmp_path / "data"
    receiver.plan = lambda wid, n, doc: ("slow", 0.02)  # answered, a little slowly
    srv = Serve(config, data)
    try:
        first = srv.outbox_pid()
        assert os.sched_getscheduler(first) == os.SCHED_IDLE  # the server's background priority
        load_messages(srv.stub, 10, 12)
        wait_for("some delivered", lambda: len(receiver.acked()) >= 20)
        assert counters(srv.stub).pending > 0, "drained before the kill: slow the destination down"
        os.kill(first, signal.SIGKILL)
        srv.outbox_pid(other_than=first)  # restarted by the server
        wait_for("every message delivered", delivered_all(srv.stub, 120), timeout=60)
    except BaseException:
        srv.kill()
        raise
    assert srv.kill(signal.SIGTERM) == 0
    snap, expected = stored(config, data)
    assert len(expected) == 120
    assert_nothing_lost(receiver, snap, expected)
    assert re.search(r"the outbound process \(pid \d+\) died unexpectedly", (tmp_path / "server.log").read_text())


@pytest.mark.process
def test_kill_9_of_the_whole_server_mid_delivery_loses_nothing(tmp_path: Path, receiver: Receiver) -> None:
    config = tmp_path / "k9all.toml"
    config.write_text(blueprint(receiver.url, rate=40, concurrency=4))
    data = tmp_path / "data"
    receiver.plan = lambda wid, n, doc: ("slow", 0.02)
    first = Serve(config, data)
    try:
        load_messages(first.stub, 10, 12)
        wait_for("some delivered", lambda: len(receiver.acked()) >= 20)
        assert counters(first.stub).pending > 0, "drained before the kill: slow the destination down"
    finally:
        first.kill()
    second = Serve(config, data)
    try:
        wait_for("every message delivered", delivered_all(second.stub, 120), timeout=60)
    finally:
        second.kill(signal.SIGTERM)
    snap, expected = stored(config, data)
    assert len(expected) == 120
    assert_nothing_lost(receiver, snap, expected)
