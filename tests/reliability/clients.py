"""The client side of the crash tests: a server handle that survives restarts, client threads that stream writes
and log every acknowledged answer (Jepsen's acknowledged-write log), and the operator's CLI.

A client sends one request at a time and retries an unanswered one (connection lost, UNAVAILABLE, a deadline, a
cancelled call) with the SAME idempotency key, interaction id or webhook-id until it is answered, waiting for the
server to come back when it is down. So every request a client made ends acknowledged, and an answer that says
`replayed` / `duplicate` tells that an earlier, unanswered attempt had been applied before the crash.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from resolver.events.signatures import sign
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.integration.helpers import upsert_req

ROOT = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 10.0
# What a client retries with the same key: the request may or may not have been applied.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


def resolver_cli(config: Path, data: Path, *args: str, env: Mapping[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`resolver ARGS --config CONFIG --data-dir DATA` in a process of its own, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "resolver", *args, "--config", str(config), "--data-dir", str(data)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          timeout=timeout)


def exported(config: Path, data: Path, target: Path, env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """`resolver export` of the store into `target`: its customer lines (exit code 0 and the trailer asserted)."""
    r = resolver_cli(config, data, "export", str(target), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert "resolver_export" in lines[0] and "resolver_export_end" in lines[-1]
    customers = lines[1:-1]
    assert lines[-1]["resolver_export_end"]["customers"] == len(customers)
    return customers


class Target:
    """Where the server is now: a stub per incarnation. `down()` before a kill, `up(port)` after the restart;
    `stub()` blocks while the server is down (bounded by `wait_s`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._channel: grpc.Channel | None = None
        self._stub: resolver_pb2_grpc.IdentityResolverStub | None = None
        self.closed = False

    def up(self, port: int) -> None:
        with self._cond:
            self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            self._stub = resolver_pb2_grpc.IdentityResolverStub(self._channel)
            self._cond.notify_all()

    def down(self) -> None:
        with self._cond:
            if self._channel is not None:
                self._channel.close()  # calls in flight on it end CANCELLED: their clients retry after the restart
            self._channel, self._stub = None, None

    def close(self) -> None:
        self.down()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def stub(self, wait_s: float = 120.0) -> resolver_pb2_grpc.IdentityResolverStub:
        with self._cond:
            if not self._cond.wait_for(lambda: self._stub is not None or self.closed, timeout=wait_s):
                raise AssertionError(f"the server was not back within {wait_s}s")
            if self._stub is None:
                raise AssertionError("the test closed the target while a client still had a request to finish")
            return self._stub


@dataclass(frozen=True)
class Ack:
    """One acknowledged answer: what was asked (`kind`, `key`, the customer's `ref` = external_id, the `values`
    it set) and what the server answered (`uuid`, `version`, `replayed`: an earlier attempt had been applied)."""

    kind: str  # "upsert", "interaction", "event"
    key: str  # idempotency key, interaction id or webhook-id
    ref: str
    uuid: str
    version: int
    values: dict[str, Any]
    replayed: bool
    attempts: int


@dataclass
class ClientLog:
    """One client's acknowledged answers, in the order it got them, and what went wrong on the way."""

    acks: list[Ack] = field(default_factory=list)
    retries: int = 0
    unexpected: list[str] = field(default_factory=list)  # errors no retry can fix: each one a failed test


class WriteClient(threading.Thread):
    """Streams a mix of writes until `stop` is set, then finishes the request in hand: Upserts (creates of new
    customers, updates of its own customers with changing values), RecordInteraction on its customers, and signed
    CRM events (UPDATEs of its customers' credit limit, CREATEs of event-only records) through IngestEvents.

    Each client owns its customers (external ids `C{n}-...` / `E{n}-...`), so the order of its own acknowledged
    writes is the order they took effect, and event timestamps rise with every event it sends."""

    def __init__(self, n: int, target: Target, stop: threading.Event, *, source: str, secret: bytes,
                 seed: int) -> None:
        super().__init__(name=f"write-client-{n}", daemon=True)
        self.n = n
        self.target = target
        self.stop = stop
        self.source = source
        self.secret = secret
        self.rng = random.Random(seed)
        self.log = ClientLog()
        self.customers: dict[str, str] = {}  # external_id -> uuid, once a create was acknowledged
        self.records: list[str] = []  # record ids of CRM CREATE events it sent (acknowledged)
        self.seq = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.seq += 1
                roll = self.rng.random()
                if not self.customers or roll < 0.2:
                    self.upsert_create()
                elif roll < 0.6:
                    self.upsert_update()
                elif roll < 0.75:
                    self.interaction()
                elif roll < 0.95:
                    self.event_update()
                else:
                    self.event_create()
        except Exception as exc:  # noqa: BLE001 - the test reports it
            self.log.unexpected.append(f"{type(exc).__name__}: {exc}")

    # -- the writes -------------------------------------------------------------------------------------------

    def upsert_create(self) -> None:
        ext = f"C{self.n}-{self.seq}"
        values = {"name": f"Customer {self.n}-{self.seq}", "tier": f"t{self.seq}"}
        req = upsert_req(f"up-{self.n}-{self.seq}", external_id=ext, emails=(f"c{self.n}-{self.seq}@example.com",),
                         attributes=values)
        r, attempts = self._call(lambda stub: stub.Upsert(req, timeout=CALL_TIMEOUT_S))
        self.customers[ext] = r.customer_uuid
        self._ack("upsert", req.idempotency_key, ext, r.customer_uuid, r.version, values, r.replayed, attempts)

    def upsert_update(self) -> None:
        ext = self.rng.choice(sorted(self.customers))
        values: dict[str, Any] = {"tier": f"t{self.seq}"}
        if self.rng.random() < 0.3:
            values["name"] = f"Renamed {self.n}-{self.seq}"
        req = upsert_req(f"up-{self.n}-{self.seq}", external_id=ext, attributes=values)
        r, attempts = self._call(lambda stub: stub.Upsert(req, timeout=CALL_TIMEOUT_S))
        self._ack("upsert", req.idempotency_key, ext, r.customer_uuid, r.version, values, r.replayed, attempts)

    def interaction(self) -> None:
        ext = self.rng.choice(sorted(self.customers))
        req = pb.RecordInteractionRequest(interaction_id=f"ix-{self.n}-{self.seq}", customer_uuid=self.customers[ext],
                                          channel="voice", queue="billing", disposition="resolved", agent_id="agent-7")
        req.occurred_at.FromMicroseconds(1_700_000_000_000_000 + self.seq * 1_000_000)
        details = struct_pb2.Struct()
        details.update({"duration_s": self.seq % 600})
        req.details.CopyFrom(details)
        r, attempts = self._call(lambda stub: stub.RecordInteraction(req, timeout=CALL_TIMEOUT_S))
        self._ack("interaction", req.interaction_id, ext, r.customer_uuid, 0, {}, r.replayed, attempts)

    def event_update(self) -> None:
        ext = self.rng.choice(sorted(self.customers) + self.records)
        self._event(ext, "UPDATE", {"Credit_Limit__c": self.seq}, {"credit_limit": self.seq})

    def event_create(self) -> None:
        ext = f"E{self.n}-{self.seq}"
        self._event(ext, "CREATE", {"Credit_Limit__c": self.seq, "Customer_Status__c": "Active"},
                    {"credit_limit": self.seq, "status": "Active"})
        self.records.append(ext)

    def _event(self, record_id: str, event_type: str, change_set: dict[str, Any], values: dict[str, Any]) -> None:
        # the CRM's own clock: rises with each event this client sends, so the last acknowledged one wins
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_700_000_000 + self.n * 10_000_000 + self.seq))
        body = json.dumps({"event_type": event_type, "source_system": self.source, "timestamp": stamp,
                           "record_id": record_id, "object_type": "Account",
                           "change_set": {f: {"new_value": v} for f, v in change_set.items()}}).encode()
        wid = f"msg_{self.n}_{self.seq}"

        def ingest(stub: resolver_pb2_grpc.IdentityResolverStub) -> pb.IngestResponse:
            now = int(time.time())  # each attempt signs afresh (the timestamp tolerance); the webhook-id stays
            headers = {"webhook-id": wid, "webhook-timestamp": str(now),
                       "webhook-signature": sign(self.secret, wid, now, body)}
            return stub.IngestEvents(pb.IngestRequest(source=self.source, body=body, headers=headers),
                                     timeout=CALL_TIMEOUT_S)

        r, attempts = self._call(ingest)
        self._ack("event", wid, record_id, "", 0, values, r.duplicate, attempts)

    # -- the retry loop ---------------------------------------------------------------------------------------

    def _call(self, call: Callable[[resolver_pb2_grpc.IdentityResolverStub], Any]) -> tuple[Any, int]:
        """`call(stub)` until answered; (the answer, attempts). A non-retryable error is a failed test."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return call(self.target.stub()), attempts
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise AssertionError(f"{err.code().name}: {err.details()}") from None
            except ValueError as err:  # the test closed the channel for a kill between stub() and the call:
                # the request never left, so it is retried like a CANCELLED one. grpcio says "Cannot invoke RPC on
                # closed channel!" or "Cannot invoke RPC: Channel closed!", by where it noticed.
                said = str(err).lower()
                if "cannot invoke rpc" not in said or "closed" not in said:
                    raise
            self.log.retries += 1
            time.sleep(0.05 + self.rng.random() * 0.1)

    def _ack(self, kind: str, key: str, ref: str, uuid: str, version: int, values: dict[str, Any], replayed: bool,
             attempts: int) -> None:
        self.log.acks.append(Ack(kind, key, ref, uuid, version, values, replayed, attempts))
