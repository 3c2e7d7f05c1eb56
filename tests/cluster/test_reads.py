"""Reads on cluster nodes, over gRPC on a real three-server NATS cluster (in-process nodes, each with its own data
directory): every write answers the stream sequence it was applied at; a read that names it with `min_sequence`
waits for it on any node, within its deadline; and a node that cannot vouch for its data (its applier held up,
stopped for good, or out of touch with NATS) answers UNAVAILABLE, reason NODE_BEHIND, instead of stale data.

A node's applier is held up for real: the test holds its store's LMDB write lock, as a long write transaction of
the same store would, so the applier fetches the stream but cannot apply; or the node reaches NATS through a TCP
relay that goes silent (tests/cluster/relay.py), so it hears nothing from the stream while the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2

from resolver.bootstrap import build_server
from resolver.cluster.local import LocalNats
from resolver.config import settings_from_document
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc as rpc
from tests.cluster.conftest import WAIT_S, Served, position, wait_equal_positions
from tests.cluster.relay import Relay
from tests.conftest import status_details

MakeServers = Callable[..., list[Served]]
FAR = 10**12  # a sequence no test stream reaches


def upsert(node: Served, key: str, external_id: str) -> pb.UpsertResponse:
    response: pb.UpsertResponse = node.stub.Upsert(
        pb.UpsertRequest(idempotency_key=key, identifiers=pb.Identifiers(external_id=external_id)), timeout=30)
    return response


def resolve_request(external_id: str, min_sequence: int = 0) -> pb.ResolveRequest:
    return pb.ResolveRequest(identifiers=pb.Identifiers(external_id=external_id), min_sequence=min_sequence)


def info_of(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of an UNAVAILABLE refusal."""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    info, _ = status_details(err)
    assert info is not None
    return info


def refusal(call: Callable[[], object]) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of the UNAVAILABLE that `call` must fail with."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return info_of(caught.value)


def until_refused(node: Served) -> grpc.RpcError:
    """Resolve on `node` until it refuses (bounded); that refusal."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            node.stub.Resolve(resolve_request("anyone"), timeout=10)
        except grpc.RpcError as exc:
            return exc
        assert time.monotonic() < deadline, "the node never refused a read"
        time.sleep(0.1)


def until_answers(node: Served, request: pb.ResolveRequest) -> pb.ResolveResponse:
    """Resolve `request` on `node` until it answers instead of refusing (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            answer: pb.ResolveResponse = node.stub.Resolve(request, timeout=10)
            return answer
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(0.1)


@contextmanager
def write_lock_held(node: Served) -> Iterator[None]:
    """Hold `node`'s LMDB write lock, as a long write transaction of its store would (its sweeper's, say): its
    applier waits for it, and applies nothing meanwhile."""
    with node.service.store.write():
        yield


def test_every_write_answers_the_sequence_it_was_applied_at(make_servers: MakeServers) -> None:
    a, b = make_servers(2)
    first = upsert(a, "k1", "E1")
    assert first.log_sequence == 1
    other = upsert(b, "k2", "E2")
    assert other.log_sequence == 2
    merged = a.stub.Merge(pb.MergeRequest(idempotency_key="m1", survivor_uuid=first.customer_uuid,
                                          merged_uuids=[other.customer_uuid]), timeout=30)
    occurred = timestamp_pb2.Timestamp()
    occurred.GetCurrentTime()
    recorded = b.stub.RecordInteraction(pb.RecordInteractionRequest(
        interaction_id="call-1", customer_uuid=first.customer_uuid, channel="voice", occurred_at=occurred), timeout=30)
    unmerged = a.stub.Unmerge(pb.UnmergeRequest(idempotency_key="u1", survivor_uuid=first.customer_uuid,
                                                merged_uuid=other.customer_uuid), timeout=30)
    forgotten = b.stub.Forget(pb.ForgetRequest(idempotency_key="f1", customer_uuid=other.customer_uuid,
                                               reason="erasure request"), timeout=30)
    assert [r.log_sequence for r in (merged, recorded, unmerged, forgotten)] == [3, 4, 5, 6]
    retry = b.stub.Upsert(pb.UpsertRequest(idempotency_key="k1", identifiers=pb.Identifiers(external_id="E1")),
                          timeout=30)
    assert (retry.replayed, retry.log_sequence) == (True, 1)  # the stream de-duplicated it: the first write's
    assert wait_equal_positions([a.service, b.service]) == 6  # no command but these six in the log


def test_min_sequence_reads_a_write_made_on_another_node(make_servers: MakeServers) -> None:
    """B cannot apply while its write lock is held: without min_sequence it answers from what it has; with it, the
    read waits for the write, until the deadline's share, then says where B is."""
    a, b = make_servers(2, read_wait_s=30, max_silence_s=0)
    with write_lock_held(b):
        written = upsert(a, "k1", "E1")
        waiting = b.stub.Resolve.future(resolve_request("E1", written.log_sequence), timeout=60)
        stale = b.stub.Resolve(resolve_request("E1"), timeout=10)
        assert stale.outcome == pb.OUTCOME_NOT_FOUND  # a read that asks nothing gets what B has
        info = refusal(lambda: b.stub.Resolve(resolve_request("E1", written.log_sequence), timeout=1))
        assert info.reason == "NODE_BEHIND"  # answered before the deadline (not DEADLINE_EXCEEDED), saying where B is
        assert (info.metadata["position"], info.metadata["min_sequence"]) == ("0", str(written.log_sequence))
        assert not waiting.done()  # B has applied nothing: the read is still waiting
    answer = waiting.result(timeout=WAIT_S)
    assert (answer.outcome, answer.customer_uuid) == (pb.OUTCOME_MATCHED, written.customer_uuid)
    customer = b.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=written.customer_uuid,
                                                        min_sequence=written.log_sequence), timeout=10)
    assert customer.identifiers.external_id == "E1"
    streamed = list(b.stub.ResolveStream(iter([resolve_request("E1", written.log_sequence)]), timeout=10))
    assert [r.customer_uuid for r in streamed] == [written.customer_uuid]


def test_a_min_sequence_past_the_stream_is_refused_with_the_position(make_servers: MakeServers) -> None:
    """The wait ends within the call's deadline, or at `read_wait_s` when the call has none (or a longer one)."""
    (a,) = make_servers(1, read_wait_s=30)
    (b,) = make_servers(1, first=1, read_wait_s=0.5)
    upsert(a, "k1", "E1")
    written = upsert(a, "k2", "E2")
    until_answers(b, resolve_request("E2", written.log_sequence))
    info = refusal(lambda: a.stub.Resolve(resolve_request("E1", FAR), timeout=2))  # bounded by the deadline
    assert info.reason == "NODE_BEHIND" and info.domain == "resolver.v1"
    assert (info.metadata["position"], info.metadata["min_sequence"]) == ("2", str(FAR))
    assert int(info.metadata["stream_sequence"]) >= 2
    pending = b.stub.Resolve.future(resolve_request("E1", FAR))  # no deadline at all: read_wait_s bounds it
    with pytest.raises(grpc.RpcError) as caught:
        pending.result(timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = refusal(lambda: b.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=written.customer_uuid,
                                                                    min_sequence=FAR), timeout=10))
    assert info.reason == "NODE_BEHIND"
    info = refusal(lambda: list(b.stub.ResolveStream(iter([resolve_request("E1"), resolve_request("E2", FAR)]),
                                                     timeout=10)))
    assert info.reason == "NODE_BEHIND"  # a request past the position ends the stream: read it elsewhere


def test_a_node_whose_applier_is_held_up_refuses_reads(make_servers: MakeServers) -> None:
    """B sees the command in the stream but cannot apply it: more than max_lag behind, it refuses, and answers
    again once it has caught up."""
    (a,) = make_servers(1)
    (b,) = make_servers(1, first=1, max_lag=0, max_silence_s=0)
    with write_lock_held(b):
        written = upsert(a, "k1", "E1")
        refused = until_refused(b)
        info = info_of(refused)
        assert info.reason == "NODE_BEHIND" and "behind its last sequence" in str(refused.details())
        assert info.metadata["position"] == "0" and int(info.metadata["stream_sequence"]) >= 1
        assert refusal(lambda: b.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=written.customer_uuid),
                                                  timeout=10)).reason == "NODE_BEHIND"
    answer = until_answers(b, resolve_request("E1", written.log_sequence))
    assert answer.customer_uuid == written.customer_uuid
    assert position(b.service) == 1


@pytest.fixture
def relay(nats_cluster: LocalNats) -> Iterator[Relay]:
    """A link to one NATS server; a test names it before make_servers, so that its nodes stop before it closes."""
    link = Relay(nats_cluster.nodes[0].client_port)
    try:
        yield link
    finally:
        link.close()


def test_a_node_cut_off_from_nats_refuses_reads(relay: Relay, make_servers: MakeServers) -> None:
    """B reaches NATS only through a link that goes silent while A writes: B cannot tell how far behind it is,
    refuses reads after max_silence_s, and answers again once the link is back and it has caught up."""
    (a,) = make_servers(1)
    (b,) = make_servers(1, first=1, nats=[relay.url], max_silence_s=2, connect_timeout_s=1)
    upsert(a, "k1", "E1")
    until_answers(b, resolve_request("E1", 1))
    relay.cut()
    try:
        written = upsert(a, "k2", "E2")
        refused = until_refused(b)
        info = info_of(refused)
        assert info.reason == "NODE_BEHIND" and info.metadata["position"] == "1"
        assert "has not heard from the replicated log" in str(refused.details())
    finally:
        relay.restore()
    answer = until_answers(b, resolve_request("E2", written.log_sequence))
    assert answer.customer_uuid == written.customer_uuid


def test_on_one_machine_writes_answer_0_and_min_sequence_is_met_at_once(tmp_path: Path) -> None:
    """Without [cluster] every acknowledged write is visible to every read: there is no log, nothing to wait for."""
    settings = settings_from_document({"version": 1, "server": {"data_dir": str(tmp_path / "one"),
                                                                 "listen": "127.0.0.1:0"},
                                       "storage": {"map_size_mb": 64}}, {})
    running = build_server(settings, sweeper=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpc.IdentityResolverStub(channel)
            written = stub.Upsert(pb.UpsertRequest(idempotency_key="k1", identifiers=pb.Identifiers(external_id="E1")),
                                  timeout=30)
            assert written.log_sequence == 0
            answer = stub.Resolve(resolve_request("E1", FAR), timeout=10)
            assert (answer.outcome, answer.customer_uuid) == (pb.OUTCOME_MATCHED, written.customer_uuid)
            assert stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=written.customer_uuid, min_sequence=FAR),
                                    timeout=10).customer_uuid == written.customer_uuid
    finally:
        running.stop(grace=0)
