"""Sensitive attributes on a cluster (real three-server NATS, in-process nodes with their webhook endpoints, an
`[encryption]` key): every node stores the same ciphertexts, byte for byte, whatever command sealed them (Upsert, a
CRM event, a merge and its unmerge, an erasure, an event applied a second time), because a replicated apply derives
its nonces from the command (resolver.nonces) instead of drawing them. What is compared is the raw LMDB contents of
the databases that hold sealed values, not the values opened."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from resolver.cluster import codec
from resolver.cluster.digest import store_digest
from resolver.cluster.local import LocalNats
from resolver.cluster.log import CommandLog
from resolver.events.command import EventCommand
from resolver.forget import forget
from resolver.store import Store
from resolver.uuids import new_customer_uuid
from resolver.v1 import resolver_pb2 as pb
from tests.cluster.crm import Node, blueprint, serving, wait_for
from tests.integration.helpers import resolve_req, upsert_req
from tests.integration.test_events import event, post, signed

StartNodes = Callable[[int], list[Node]]
KEY = base64.b64encode(bytes(range(100, 132))).decode()
SSN = "123-45-6789"
SEALING_DBS = ("records", "changes", "merges")  # where a command's apply seals sensitive values
PLAIN_TIER = 'tier = { type = "string" }'


def sealed_blueprint(stream: str, nats: list[str], key_file: Path) -> str:
    """The CRM nodes' blueprint (tests.cluster.crm) with `tier` (which events carry) and `ssn` sensitive, and a key."""
    text = blueprint(stream, nats=nats)
    assert PLAIN_TIER in text
    text = text.replace(PLAIN_TIER, 'tier = { type = "string", sensitive = true }\n'
                                    'ssn = { type = "string", sensitive = true }')
    return text + f'[encryption]\nkeys = [{{ id = "k1", key = {{ file = "{key_file}" }} }}]\n'


@pytest.fixture
def start_nodes(nats_cluster: LocalNats, tmp_path: Path, stream_name: str) -> Iterator[StartNodes]:
    key_file = tmp_path / "k1.key"
    key_file.write_text(KEY)
    yield from serving(tmp_path, sealed_blueprint(stream_name, nats_cluster.urls, key_file))


def store_of(node: Node) -> Store:
    return node.running.service.store


def raw(node: Node, name: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a named database as LMDB holds it: sensitive values as their ciphertexts."""
    store = store_of(node)
    with store.read() as view, view.txn.cursor(db=store.db[name]) as cur:
        return list(cur.iternext(keys=True, values=True))


def settled(nodes: list[Node]) -> int:
    """Wait until every inbox is empty and every node applied as far as the furthest one; that position."""
    wait_for("inboxes drained", lambda: all(n.counters().in_inbox == 0 for n in nodes))
    wait_for("positions equal", lambda: len({n.position for n in nodes}) == 1)
    return nodes[0].position


def upsert(node: Node, key: str, external_id: str, **attributes: object) -> str:
    return node.stub.Upsert(upsert_req(key, external_id=external_id, attributes=attributes), timeout=20).customer_uuid


def shown(node: Node, external_id: str) -> dict[str, object]:
    r = node.stub.Resolve(resolve_req(external_id=external_id, fields=["ssn", "tier"]), timeout=5)
    assert r.outcome == pb.OUTCOME_MATCHED, external_id
    return dict(r.attributes)


def assert_identical_ciphertexts(nodes: list[Node]) -> None:
    for name in SEALING_DBS:
        first = raw(nodes[0], name)
        assert all(raw(n, name) == first for n in nodes[1:]), f"{name} differs between replicas"
    records = b"".join(v for _, v in raw(nodes[0], "records"))
    assert b'"enc":"v1:k1:' in records and SSN.encode() not in records  # sealed, not merely equal in clear
    assert len({store_digest(store_of(n)) for n in nodes}) == 1


def test_every_sealing_command_leaves_the_same_bytes_on_every_node(start_nodes: StartNodes) -> None:
    a, b, c = nodes = start_nodes(3)
    x = upsert(a, "u1", "E1", ssn=SSN, tier="gold")
    upsert(b, "u2", "E1", ssn="987-65-4321")  # the record sealed again, ssn and tier, by another node's write
    y = upsert(c, "u3", "E2", ssn="555-55-5555", tier="bronze")
    for wid, body in (("msg_c", event("R1", {"Tier__c": "silver"}, event_type="CREATE")),
                      ("msg_u", event("R1", {"Tier__c": "platinum"}, ts="2024-01-02T00:00:00Z"))):
        assert post(a.http_port, body, signed(body, wid=wid))[0] == 202  # one inbox: applied in this order
    settled(nodes)
    sealed_changes = b"".join(v for _, v in raw(a, "changes"))
    assert sealed_changes.count(b'"enc":"v1:k1:') >= 5 and b"platinum" not in sealed_changes
    assert_identical_ciphertexts(nodes)

    c.running.service.merge("m1", x, [y], "CRM")  # the journal keeps both records, sealed
    settled(nodes)
    assert raw(b, "merges") and b"555-55-5555" not in b"".join(v for _, v in raw(b, "merges"))
    assert_identical_ciphertexts(nodes)
    b.running.service.unmerge("m2", x, y)
    forget(a.running.service, "f1", y, "erasure request", "ops")  # redacts the change log in place
    settled(nodes)
    assert_identical_ciphertexts(nodes)
    for node in nodes:  # and every node opens them to the same values
        assert shown(node, "E1") == {"ssn": "987-65-4321", "tier": "gold"}
        assert shown(node, "R1") == {"tier": "platinum"}


def test_an_event_applied_again_under_a_new_message_id_seals_the_same_bytes_everywhere(
        start_nodes: StartNodes) -> None:
    """A node that crashed between publishing an event and removing it from its inbox publishes it again, past the
    stream's de-duplication (another message id, another stream sequence): the second application is a command of
    its own, sealed with nonces of its own, and still the same on every node."""
    nodes = start_nodes(3)
    body = event("R7", {"Tier__c": "gold"}, event_type="CREATE")
    assert post(nodes[0].http_port, body, signed(body, wid="msg_r7"))[0] == 202
    first = settled(nodes)
    log = CommandLog(nodes[0].running.service.settings.cluster, name="test republisher")
    try:
        again = EventCommand("SALESFORCE", "msg_r7", body, time.time_ns() // 1000, new_customer_uuid())
        assert not log.publish(codec.encode(again), f"{codec.message_id(again)}@again", timeout=10).duplicate
    finally:
        log.close()
    wait_for("applied again everywhere", lambda: all(n.position == first + 1 for n in nodes))
    assert_identical_ciphertexts(nodes)
    assert {shown(n, "R7")["tier"] for n in nodes} == {"gold"}
