"""The crash loop (issue 18, item 1): a real `resolver serve` (2 gRPC workers, the events process, the outbound
process) killed with kill -9 of its whole process group `scaled(3, 20)` times at random moments, while 4 client
threads (tests/reliability/clients.py) stream Upserts (creates, and updates of their customers with changing
values, each with its own idempotency key), RecordInteraction calls and signed CRM events (IngestEvents), and the
outbox delivers to a real HTTP receiver on 127.0.0.1 (it answers slowly, so deliveries are in flight at each kill).

After each kill `resolver check` passes on the data directory; the server restarts on it; clients retry their
unanswered requests with the same key. At the end, what every client was told holds:
- every acknowledged Upsert is there, under the uuid it was answered with, at least at its version, with the
  values of the last acknowledged write to each field; no retry made a second customer (`resolver export`: one
  customer per external_id, and exactly as many customers as were created);
- every acknowledged interaction is recorded once, on the customer it was answered with;
- every accepted event is applied exactly once or dead-lettered (none lost), and the last one sent for a record
  decides its credit limit;
- every outbound message the outbox committed reached the receiver at least once (counted by distinct webhook-id).
"""

from __future__ import annotations

import base64
import random
import statistics
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from resolver.bootstrap import open_store
from resolver.config import load_settings
from resolver.events import counters as event_counters
from resolver.events import dlq
from resolver.outbound import outbox
from resolver.v1 import resolver_pb2 as pb
from tests.conftest import SERVER_TOML, TEST_ENCRYPTION_KEY
from tests.integration.serve import Launched, launch
from tests.integration.test_outbound import Receiver, assert_order_and_ids, expected_ids
from tests.reliability.clients import Ack, Target, WriteClient, exported, resolver_cli
from tests.reliability.report import scaled

KILLS = scaled(3, 20)
CLIENTS = 4
SF_KEY = b"crash-loop-salesforce-secret"
CRM_KEY = b"crash-loop-crm-outbound-key"
ENV = {"CRASH_SF_SECRET": SF_KEY.decode(), "CRASH_CRM_SECRET": "whsec_" + base64.b64encode(CRM_KEY).decode(),
       "RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY}
ACKS_BEFORE_KILL = 10  # acknowledged answers since the restart before the next kill may come: writes are flowing
RUN_S = (0.2, 2.0)  # then a random moment within this many seconds
DRAIN_S = 180.0


def blueprint(url: str) -> str:
    return SERVER_TOML.replace("workers = 1", "workers = 2") + textwrap.dedent(
        f"""
        [attributes]
        name = {{ type = "string" }}
        tier = {{ type = "string" }}
        status = {{ type = "string", enum = ["Active", "Churned"], owner = "SALESFORCE" }}
        credit_limit = {{ type = "number", minimum = 0, owner = "SALESFORCE" }}
        last_interaction_date = {{ type = "date-time" }}
        [sources.SALESFORCE]
        field_map = {{ Customer_Status__c = "status", Credit_Limit__c = "credit_limit" }}
        secrets = [{{ env = "CRASH_SF_SECRET" }}]
        [events]
        http_listen = ""
        rate_per_s = 2000
        min_rate_per_s = 200
        high_water = 1000000
        [activity]
        record_type = "Task"
        subject = "{{channel}} call - {{disposition}}"
        default_owner = "crm-queue-owner"
        [outbound.CRM]
        url = "{url}"
        secrets = [{{ env = "CRASH_CRM_SECRET" }}]
        events = ["interaction.recorded", "customer.created", "customer.updated"]
        fields = ["tier", "status", "credit_limit"]
        rate_per_s = 0
        concurrency = 8
        timeout_s = 2
        backoff_initial_s = 0.05
        backoff_max_s = 0.5
        """
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(key=CRM_KEY, plan=lambda wid, attempt, doc: ("slow", 0.005))
    r.server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # resets by killed senders
    yield r
    r.close()


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


class Stored:
    """What the data directory holds, read with the server stopped: the change log's applied events and recorded
    interactions, the outbox's counters and the webhook-ids it made, the event counters."""

    def __init__(self, config: Path, data: Path) -> None:
        store = open_store(load_settings(config, environ=ENV, data_dir=str(data)), readonly=True)
        try:
            with store.read() as view:
                changes = list(view.iter_changes())
                self.events = event_counters.snapshot(view.txn, store)
                self.dead_letters = {meta["webhook_id"] for meta, _ in
                                     dlq.iterate(view.txn, store.db["ev_dlq"], 0, ring=store.sealer.ring)}
                self.outbound = outbox.snapshot(view.txn, store)
            self.made = expected_ids(store)  # webhook-id -> change sequence of every message the outbox made
        finally:
            store.close()
        self.applied = Counter(ch["event"]["webhook_id"] for ch in changes if "event" in ch)
        self.interactions = [(ch["interaction_id"], ch["customer_uuid"]) for ch in changes
                             if ch["action"] == "INTERACTION_RECORDED"]


def expected_values(acks: list[Ack]) -> dict[str, dict[str, Any]]:
    """external_id -> field -> the value of the last acknowledged write that set it (acks in one client's order;
    each customer belongs to one client)."""
    values: dict[str, dict[str, Any]] = {}
    for a in acks:
        values.setdefault(a.ref, {}).update(a.values)
    return values


def test_kill_9_loop_under_writes_loses_and_duplicates_nothing(
        tmp_path: Path, receiver: Receiver, reliability_report: Callable[..., None]) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    config, data, log = tmp_path / "blueprint.toml", tmp_path / "data", tmp_path / "server.log"
    config.write_text(blueprint(receiver.url))
    target, stop = Target(), threading.Event()
    clients = [WriteClient(i, target, stop, source="SALESFORCE", secret=SF_KEY, seed=seed + i) for i in range(CLIENTS)]
    restarts: list[float] = []
    checks: list[float] = []
    kills = 0

    def acks() -> int:
        return sum(len(c.log.acks) for c in clients)

    def flowing(since: int) -> None:
        wait_for("writes acknowledged since the restart", lambda: acks() >= since + ACKS_BEFORE_KILL, 60)

    def start() -> Launched:
        started = time.monotonic()
        server = launch(config, data, log, workers=2, env=ENV)
        restarts.append(time.monotonic() - started)
        target.up(server.port)
        return server

    server = start()
    try:
        for c in clients:
            c.start()
        for _ in range(KILLS):
            flowing(acks())
            time.sleep(rng.uniform(*RUN_S))
            server.kill()  # first the power cut, with calls in flight; then the clients learn it is gone
            target.down()
            kills += 1
            started = time.monotonic()
            r = resolver_cli(config, data, "check", env=ENV)
            checks.append(time.monotonic() - started)
            assert r.returncode == 0, f"kill {kills} (seed {seed}): {r.stdout}{r.stderr}"
            server = start()
        flowing(acks())
        stop.set()
        for c in clients:
            c.join(timeout=120)
        assert not any(c.is_alive() for c in clients), "a client did not finish its last request"
        for c in clients:
            assert c.log.unexpected == [], f"seed {seed}: {c.log.unexpected}"
        stub = target.stub()
        wait_for("the inbox drained", lambda: stub.GetEventCounters(pb.GetEventCountersRequest(),
                                                                    timeout=10).in_inbox == 0, DRAIN_S)
        wait_for("the outbox drained", lambda: stub.GetOutboundCounters(pb.GetOutboundCountersRequest(),
                                                                        timeout=10).pending == 0, DRAIN_S)
        target.close()
        assert server.terminate() == 0, log.read_text()[-3000:]
    finally:
        stop.set()
        target.close()
        server.kill()
    r = resolver_cli(config, data, "check", env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr

    log_acks = [a for c in clients for a in c.log.acks]
    upserts = [a for a in log_acks if a.kind == "upsert"]
    interactions = [a for a in log_acks if a.kind == "interaction"]
    events = [a for a in log_acks if a.kind == "event"]
    # every client kept its keys unique: one acknowledgement per key
    assert len({a.key for a in log_acks}) == len(log_acks)

    # -- Upserts: present, same uuid, at least the acknowledged version, the last acknowledged values ----------
    customers = exported(config, data, tmp_path / "export.jsonl", env=ENV)
    per_identifier = Counter([c["external_id"] for c in customers] + [e for c in customers for e in c["emails"]])
    duplicates = {ident: n for ident, n in per_identifier.items() if n > 1}
    assert duplicates == {}, f"seed {seed}: customers duplicated: {duplicates}"
    by_ext = {c["external_id"]: c for c in customers}
    created = {a.ref for a in upserts if a.ref.startswith("C")} | {a.ref for a in events if a.ref.startswith("E")}
    assert set(by_ext) == created, f"seed {seed}: lost {sorted(created - set(by_ext))[:5]}, " \
                                   f"unexpected {sorted(set(by_ext) - created)[:5]}"
    uuids: dict[str, set[str]] = {}
    for a in upserts + interactions:
        uuids.setdefault(a.ref, set()).add(a.uuid)
    for ext, seen in uuids.items():
        assert seen == {by_ext[ext]["uuid"]}, f"seed {seed}: {ext} answered as {seen}, stored as {by_ext[ext]['uuid']}"
    for a in upserts:
        assert by_ext[a.ref]["version"] >= a.version, f"seed {seed}: {a.key} acknowledged version {a.version}, " \
                                                      f"stored {by_ext[a.ref]['version']}"
    for ext, values in expected_values(upserts + events).items():
        stored_values = {k: by_ext[ext]["attributes"].get(k) for k in values}
        assert stored_values == values, f"seed {seed}: {ext}"

    # -- interactions, events, outbound: from the store and the receiver ------------------------------------
    stored = Stored(config, data)
    recorded = Counter(ix for ix, _ in stored.interactions)
    assert {ix: n for ix, n in recorded.items() if n > 1} == {}
    assert dict(stored.interactions) == {a.key: a.uuid for a in interactions}

    accepted = {a.key for a in events}
    dead = stored.dead_letters
    assert {w: n for w, n in stored.applied.items() if n > 1} == {}, "an event applied twice"
    assert accepted <= set(stored.applied) | dead, f"seed {seed}: lost events {sorted(accepted - set(stored.applied))[:5]}"
    ec = stored.events["counters"]
    assert stored.events["conserved"] and stored.events["in_inbox"] == 0
    assert ec["accepted"] == len(accepted) == ec["applied"] + ec["dead_lettered"]

    made = stored.made
    seen = receiver.snapshot()
    delivered = {s.webhook_id for s in receiver.acked()}
    assert delivered == set(made), f"seed {seed}: undelivered {sorted(set(made) - delivered)[:5]}"
    assert_order_and_ids(seen, CRM_KEY)
    oc = stored.outbound["counters"]
    assert stored.outbound["conserved"] and stored.outbound["pending"] == stored.outbound["dead"] == 0
    assert oc["committed"] == oc["delivered"] == len(made)

    replays = sum(a.replayed for a in log_acks)
    retried = sum(a.attempts > 1 for a in log_acks)
    resent = sum(1 for s in seen if s.answer == 200) - len(delivered)
    restart_s = sorted(restarts[1:])
    reliability_report(
        tried=f"{kills} kill -9 of a 2-worker `resolver serve` (events + outbound processes) at random moments "
              f"(seed {seed}) under {CLIENTS} clients: {len(upserts)} Upserts, {len(interactions)} interactions, "
              f"{len(events)} CRM events acknowledged; {retried} unanswered requests retried with the same key "
              f"({sum(c.log.retries for c in clients)} failed attempts)",
        held=f"`resolver check` passed after every kill and at the end; every acknowledged write present with its "
             f"uuid, >= its version and its last values; duplicates=0 ({len(customers)} customers = {len(created)} "
             f"created); interactions recorded once; {len(accepted)} events: {ec['applied']} applied once, "
             f"{ec['dead_lettered']} dead-lettered, 0 lost; {len(made)} outbound messages all delivered",
        figures=f"replays seen {replays} (retries answered from the ledger / as duplicates); outbound re-sends of "
                f"an acknowledged id {resent}; restart to serving {min(restart_s):.2f}/"
                f"{statistics.median(restart_s):.2f}/{max(restart_s):.2f} s (min/median/max); "
                f"`resolver check` after a kill {statistics.median(checks):.2f} s median",
    )

