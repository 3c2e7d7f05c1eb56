"""CRM change events on a cluster (real three-server NATS, in-process nodes with their webhook endpoints): a webhook
accepted by any node is applied once, through the replicated log, on every node; the same webhook accepted by two
nodes is one command; an event's application published again (a crash between its publication and its removal
from the inbox) changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from resolver.cluster import codec
from resolver.cluster.digest import store_digest
from resolver.cluster.local import LocalNats
from resolver.cluster.log import CommandLog
from resolver.events.command import EventCommand
from resolver.normalize import Kind
from resolver.uuids import new_customer_uuid
from resolver.v1 import resolver_pb2 as pb
from tests.cluster.crm import Node, blueprint, serving, wait_for
from tests.integration.helpers import resolve_req
from tests.integration.test_events import event, post, signed

StartNodes = Callable[[int], list[Node]]


@pytest.fixture
def start_nodes(nats_cluster: LocalNats, tmp_path: Path, stream_name: str) -> Iterator[StartNodes]:
    yield from serving(tmp_path, blueprint(stream_name, nats=nats_cluster.urls))


def drained(nodes: list[Node]) -> int:
    """Wait until every node's inbox is empty and every node applied as far as the furthest; that position."""
    wait_for("inboxes drained", lambda: all(n.counters().in_inbox == 0 for n in nodes))
    wait_for("positions equal", lambda: len({n.position for n in nodes}) == 1)
    return nodes[0].position


def same_digests(nodes: list[Node]) -> None:
    digests = {store_digest(n.running.service.store) for n in nodes}
    assert len(digests) == 1, digests


def attributes(node: Node, record_id: str) -> dict[str, Any]:
    r = node.stub.Resolve(resolve_req(external_id=record_id, fields=["status", "credit_limit", "tier"]), timeout=5)
    assert r.outcome == pb.OUTCOME_MATCHED, record_id
    return dict(r.attributes)


def event_changes(node: Node) -> list[str]:
    """The webhook-ids of the change-log entries that events made, in order."""
    with node.running.service.store.read() as view:
        return [ch["event"]["webhook_id"] for ch in view.iter_changes() if "event" in ch]


def create(record_id: str, tier: str, ts: str = "2024-01-01T00:00:00Z") -> bytes:
    return event(record_id, {"Customer_Status__c": "Active", "Tier__c": tier}, event_type="CREATE", ts=ts)


def test_webhooks_posted_to_different_nodes_are_applied_once_on_every_node(start_nodes: StartNodes) -> None:
    nodes = start_nodes(3)
    sent = []
    for i in range(6):
        body, wid = create(f"R{i}", "bronze"), f"msg_create_{i}"
        assert post(nodes[i % 3].http_port, body, signed(body, wid=wid))[0] == 202
        sent.append(wid)
    for i in range(6):  # an update of each record, through another node than its creation
        body, wid = event(f"R{i}", {"Tier__c": "gold"}, ts="2024-01-02T00:00:00Z"), f"msg_update_{i}"
        assert post(nodes[(i + 1) % 3].http_port, body, signed(body, wid=wid))[0] == 202
        sent.append(wid)
    # one command per event in the stream, and one per retry of an UPDATE that reached the stream before its CREATE
    assert drained(nodes) >= len(sent)
    for node in nodes:
        assert {attributes(node, f"R{i}")["tier"] for i in range(6)} == {"gold"}
        assert sorted(event_changes(node)) == sorted(sent)  # each event applied once here
    assert sum(n.counters().counters["applied"] for n in nodes) == len(sent)  # each counted by the node it reached
    same_digests(nodes)


def test_an_update_published_before_its_create_waits_for_it_on_every_node(start_nodes: StartNodes) -> None:
    """A record's UPDATE reaches node B and is published before its CREATE, posted to node A, exists: refused
    UNKNOWN_RECORD on every node, it goes back to B's inbox and is published again (another message id) once the
    CREATE is applied: the UPDATE wins everywhere, nothing is dead-lettered."""
    a, b, c = start_nodes(3)
    update = event("R5", {"Tier__c": "gold"}, ts="2024-01-02T00:00:00Z")
    assert post(b.http_port, update, signed(update, wid="msg_update_r5"))[0] == 202
    wait_for("the UPDATE tried and put back", lambda: b.counters().counters["requeued"] >= 1)
    body = create("R5", "bronze")
    assert post(a.http_port, body, signed(body, wid="msg_create_r5"))[0] == 202
    drained([a, b, c])
    for node in (a, b, c):
        assert attributes(node, "R5")["tier"] == "gold"
        assert sorted(event_changes(node)) == ["msg_create_r5", "msg_update_r5"]
        assert not node.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=5).dead_letters
    same_digests([a, b, c])


def test_the_same_webhook_posted_to_two_nodes_is_applied_once(start_nodes: StartNodes) -> None:
    a, b, c = start_nodes(3)
    body = create("R1", "silver")
    headers = signed(body, wid="msg_twice")
    assert post(a.http_port, body, headers)[1]["status"] == "accepted"
    assert post(b.http_port, body, headers)[1]["status"] == "accepted"  # each node admits what reaches it
    assert post(a.http_port, body, headers)[1]["status"] == "duplicate"  # ... once
    assert drained([a, b, c]) == 1  # the stream took the second publication as the retry of the first
    for node in (a, b, c):
        assert event_changes(node) == ["msg_twice"]
        assert attributes(node, "R1")["tier"] == "silver"
    assert (a.counters().counters["applied"], b.counters().counters["applied"]) == (1, 1)
    same_digests([a, b, c])


def test_an_event_published_again_changes_nothing(start_nodes: StartNodes, nats_cluster: LocalNats) -> None:
    """What a node that crashed after publishing an event, before removing it from its inbox, does on restart:
    it publishes the event's application again, with a new time and a new uuid; past the stream's de-duplication
    window (here: under another message id) it is applied a second time, and changes nothing on any node."""
    nodes = start_nodes(3)
    bodies = {"msg_c": create("R7", "bronze"), "msg_u": event("R7", {"Tier__c": "gold"}, ts="2024-01-03T00:00:00Z")}
    for wid, body in bodies.items():
        assert post(nodes[0].http_port, body, signed(body, wid=wid))[0] == 202
    first = drained(nodes)
    store = nodes[1].running.service.store
    with store.read() as view:
        (uid,) = view.probe(Kind.EXTERNAL_ID, "R7", limit=2).uuids
        before = (view.record(uid).to_json(), list(view.iter_changes()))  # type: ignore[union-attr]
    spec = nodes[0].running.service.settings.cluster
    log = CommandLog(spec, name="test republisher")
    try:
        for wid, body in bodies.items():
            again = EventCommand("SALESFORCE", wid, body, time.time_ns() // 1000 + 5_000_000, new_customer_uuid())
            appended = log.publish(codec.encode(again), f"{codec.message_id(again)}@again", timeout=10)
            assert not appended.duplicate
    finally:
        log.close()
    wait_for("applied again everywhere", lambda: all(n.position == first + 2 for n in nodes))
    with store.read() as view:
        assert list(view.probe(Kind.EXTERNAL_ID, "R7", limit=2).uuids) == [uid]  # no second customer from the CREATE
        assert (view.record(uid).to_json(), list(view.iter_changes())) == before  # type: ignore[union-attr]
    same_digests(nodes)


def test_a_dead_letter_stays_on_its_node_and_its_replay_goes_through_the_log(start_nodes: StartNodes) -> None:
    a, b, c = start_nodes(3)
    early = event("R9", {"Tier__c": "gold"}, ts="2024-01-05T00:00:00Z")  # before any customer holds R9
    assert post(b.http_port, early, signed(early, wid="msg_early"))[0] == 202
    drained([a, b, c])
    dead = [n.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=5).dead_letters for n in (a, b, c)]
    assert [len(d) for d in dead] == [0, 1, 0]  # refused on every node, dead-lettered where it was accepted
    assert dead[1][0].reason == "UNKNOWN_RECORD"
    body = create("R9", "bronze")
    assert post(c.http_port, body, signed(body, wid="msg_create_r9"))[0] == 202
    drained([a, b, c])
    replayed = b.stub.ReplayDeadLetter(pb.ReplayDeadLetterRequest(id=dead[1][0].id), timeout=30)
    assert replayed.applied
    drained([a, b, c])
    for node in (a, b, c):
        assert attributes(node, "R9")["tier"] == "gold"
        assert event_changes(node) == ["msg_create_r9", "msg_early"]
    assert not b.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=5).dead_letters
    same_digests([a, b, c])
