"""The replicated write path over a real three-server NATS cluster, with in-process nodes (each a Service with its
own data directory, its ReplicatedWriter and its applier): read-your-writes, the same state everywhere, retries,
errors, every command type, restart and a node that fell behind the stream's retention."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from resolver.bootstrap import build_server
from resolver.cluster.applier import stored_position
from resolver.cluster.digest import store_digest
from resolver.cluster.log import CommandLog
from resolver.config import Settings
from resolver.errors import AlreadyExists, ClusterError, IdempotencyKeyReused, Unavailable
from resolver.forget import forget
from resolver.identifiers import RawIdentifiers
from resolver.interactions import InteractionInput
from resolver.interactions import apply as apply_interaction
from resolver.interactions import prepare as prepare_interaction
from resolver.resolve import ResolveInput
from resolver.service import Service, now_us
from resolver.store import Store
from resolver.upsert import UpsertInput
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc as rpc
from tests.cluster.conftest import position, wait_equal_positions
from tests.conftest import status_details

MakeNodes = Callable[..., list[Service]]


def upsert(node: Service, key: str, external_id: str, **attributes: object) -> str:
    return node.upsert(UpsertInput(key, RawIdentifiers(external_id=external_id), attributes)).customer_uuid


def resolved(node: Service, external_id: str) -> str:
    return node.resolve(ResolveInput(RawIdentifiers(external_id=external_id))).customer_uuid


def same_digests(nodes: list[Service]) -> None:
    wait_equal_positions(nodes)
    digests = {store_digest(n.store) for n in nodes}
    assert len(digests) == 1, digests


def test_a_write_is_read_at_once_on_its_node_and_soon_on_every_node(make_nodes: MakeNodes) -> None:
    nodes = make_nodes(3)
    uids = []
    for i, node in enumerate(nodes):
        uids.append(upsert(node, f"k{i}", f"E{i}", name=f"n{i}"))
        assert resolved(node, f"E{i}") == uids[-1]  # read-your-writes: applied here before the answer
    wait_equal_positions(nodes)
    for node in nodes:
        assert [resolved(node, f"E{i}") for i in range(3)] == uids
    same_digests(nodes)


def test_a_retry_through_another_node_is_replayed_not_applied_again(make_nodes: MakeNodes) -> None:
    a, b, c = make_nodes(3)
    first = a.upsert(UpsertInput("key-1", RawIdentifiers(external_id="E1", emails=["x@example.com"])))
    again = b.upsert(UpsertInput("key-1", RawIdentifiers(external_id="E1", emails=["x@example.com"])))
    assert (again.customer_uuid, again.version, again.replayed) == (first.customer_uuid, 1, True)
    assert not first.replayed
    assert position(a) == 1  # the stream de-duplicated the retry: one command in the log
    with pytest.raises(IdempotencyKeyReused):  # the same key, another request: the ledger refuses it everywhere
        c.upsert(UpsertInput("key-1", RawIdentifiers(external_id="E2")))
    same_digests([a, b, c])
    with a.store.read() as txn:
        assert txn.count("records") == 1


def test_an_error_is_the_writers_answer_and_the_same_everywhere(make_nodes: MakeNodes) -> None:
    a, b, c = make_nodes(3)
    upsert(a, "k1", "E1")
    other = upsert(b, "k2", "E2")
    with pytest.raises(AlreadyExists):  # E1 is held by another customer: refused in apply, on every node
        c.upsert(UpsertInput("k3", RawIdentifiers(external_id="E1"), customer_uuid=other))
    same_digests([a, b, c])
    assert resolved(a, "E1") != other


def test_every_command_type_leaves_identical_stores(make_nodes: MakeNodes) -> None:
    a, b, c = make_nodes(3)
    x = upsert(a, "k1", "E1", name="Ada")
    y = b.upsert(UpsertInput("k2", RawIdentifiers(external_id="E2", phones=["+16502530000"]))).customer_uuid
    merged = c.merge("m1", x, [y], "CRM")
    assert merged.customer_uuid == x and resolved(c, "E2") == x
    settings = a.settings
    cmd = prepare_interaction(InteractionInput("call-1", now_us(), identifiers=RawIdentifiers(phones=["+16502530000"]),
                                               channel="voice"), settings, a.schema, a.policy, now_us=now_us())
    recorded = a.writer.submit(lambda txn, command: apply_interaction(txn, command, settings), cmd)
    assert recorded.customer_uuid == x
    unmerged = b.unmerge("u1", x, y)
    assert unmerged.merged_uuid == y and resolved(b, "E2") == y
    assert forget(c, "f1", y, "erasure request", "ops").customer_uuid == y
    same_digests([a, b, c])
    wait_equal_positions([a, b, c])
    assert [resolved(n, "E2") for n in (a, b, c)] == ["", "", ""]  # forgotten everywhere


def test_a_restarted_node_resumes_from_its_stored_position(make_nodes: MakeNodes) -> None:
    a, b = make_nodes(2)
    for i in range(3):
        upsert(a, f"k{i}", f"E{i}")
    wait_equal_positions([a, b])
    settings = b.settings
    b.close()
    store = Store(settings, readonly=True)
    assert stored_position(store, settings.cluster.stream) == 3
    store.close()
    for i in range(3, 8):  # written while b is down
        upsert(a, f"k{i}", f"E{i}")
    (b,) = make_nodes(1, first=1)
    same_digests([a, b])
    assert position(b) == 8
    assert resolved(b, "E7") == resolved(a, "E7") != ""


def test_a_store_of_another_stream_is_refused(make_nodes: MakeNodes) -> None:
    (a,) = make_nodes(1)
    upsert(a, "k1", "E1")
    a.close()
    with pytest.raises(ClusterError, match="applied stream"):
        make_nodes(1, stream="another")


def test_a_node_behind_the_streams_retention_says_so(make_nodes: MakeNodes,
                                                     node_settings: Callable[..., Settings]) -> None:
    """A node that needs commands the stream dropped applies nothing, refuses writes and reads (NODE_BEHIND, not stale
    data) and leaves rotation (health NOT_SERVING): it must start again from a backup."""
    (a,) = make_nodes(1, stream_max_age_s=1.0, dedupe_window_s=0.5)
    upsert(a, "k1", "E1")
    upsert(a, "k2", "E2")
    log = CommandLog(a.settings.cluster)
    try:
        deadline = time.monotonic() + 20
        while log.bounds()[0] <= 2:  # the stream drops its commands after a second
            assert time.monotonic() < deadline, log.bounds()
            time.sleep(0.2)
    finally:
        log.close()
    running = build_server(node_settings(1, stream_max_age_s=1.0, dedupe_window_s=0.5).with_overrides(
        listen="127.0.0.1:0"), sweeper=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            deadline = time.monotonic() + 20
            while check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never said NOT_SERVING"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as refused:
                rpc.IdentityResolverStub(channel).Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id="E1")),
                                                          timeout=5)
            info, _ = status_details(refused.value)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and info is not None
            assert (info.reason, info.metadata["position"]) == ("NODE_BEHIND", "0")
        with pytest.raises(Unavailable, match="backup"):
            upsert(running.service, "k3", "E3")
        assert position(running.service) == 0  # it applied nothing: it did not skip what it never saw
    finally:
        running.stop(grace=0)


def test_a_command_this_version_cannot_read_stops_the_applier_before_it(make_nodes: MakeNodes) -> None:
    """Skipping a command a newer version wrote would leave this store without it: the node stops and says so."""
    (a,) = make_nodes(1)
    upsert(a, "k1", "E1")
    log = CommandLog(a.settings.cluster)
    try:
        assert log.publish(b'["upsert.v9", []]', "from-a-newer-version", timeout=10).seq == 2
    finally:
        log.close()
    applier = a.writer.applier  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while applier.behind is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "stream sequence 2" in applier.behind and "upgrade this node" in applier.behind
    assert position(a) == 1
    with pytest.raises(Unavailable, match="upgrade"):
        upsert(a, "k2", "E2")


def test_a_stream_nats_cannot_hold_is_refused_at_start_up(make_nodes: MakeNodes) -> None:
    with pytest.raises(ClusterError, match="NATS refused stream"):  # five replicas on three servers
        make_nodes(1, replicas=5)
