"""Outbound delivery on a cluster (real three-server NATS, a real HTTP receiver that checks every signature): every
node's outbox queues the same messages, exactly one node sends them (the holder of the delivery lease), its
decisions reach every node's outbox through the log, and when it stops (gracefully, or kill -9) another node takes
over within the lease and sends what is left: at least once, a duplicate only as the same webhook-id and body. A
holder cut off from NATS stops sending before another node can take the lease."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from resolver.cluster.lease import KEY, Lease, bucket
from resolver.cluster.local import LocalNats, ResolverNode
from resolver.cluster.local import start_nodes as launch_nodes
from resolver.cluster.log import CommandLog
from resolver.config import load_settings
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc as rpc
from tests.cluster.conftest import WAIT_S, digest_of
from tests.cluster.crm import ENV, Node, blueprint, node_settings, serving, stop_node, wait_for
from tests.cluster.relay import Relay
from tests.integration.test_outbound import Receiver, Seen, assert_order_and_ids, upsert

LEASE_S = 3.0
StartNodes = Callable[[int], list[Node]]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def start_nodes(nats_cluster: LocalNats, tmp_path: Path, stream_name: str, receiver: Receiver
                ) -> Iterator[StartNodes]:
    yield from serving(tmp_path, blueprint(stream_name, nats=nats_cluster.urls, outbound_url=receiver.url,
                                           lease_s=LEASE_S))


def holders(nodes: list[Node]) -> list[Node]:
    """The nodes whose deliverer may send now."""
    return [n for n in nodes if n.running.deliverer is not None and n.running.deliverer.turn is not None
            and n.running.deliverer.turn.held()]


def delivered(receiver: Receiver, customers: set[str]) -> Callable[[], bool]:
    return lambda: customers <= {s.customer for s in receiver.acked()}


def once_each(seen: list[Seen]) -> None:
    """Every webhook-id was sent once (a normal run: nothing failed, no deliverer changed)."""
    ids = [s.webhook_id for s in seen]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_one_node_delivers_each_message_once_and_every_outbox_follows(start_nodes: StartNodes,
                                                                        receiver: Receiver) -> None:
    nodes = start_nodes(3)
    wait_for("one delivery lease holder", lambda: len(holders(nodes)) == 1)
    customers = {upsert(nodes[i % 3].stub, f"C{i}", tier="t").customer_uuid for i in range(9)}
    wait_for("every customer.created delivered", delivered(receiver, customers))
    wait_for("every outbox emptied", lambda: all(n.outbound().pending == 0 for n in nodes))
    seen = receiver.snapshot()
    once_each(seen)
    assert_order_and_ids(seen)
    assert len(holders(nodes)) == 1
    for node in nodes:  # the deliverer's acknowledgements were applied by every node
        c = node.outbound()
        assert (c.counters["committed"], c.counters["delivered"], c.dead) == (9, 9, 0)


def test_a_stopped_deliverer_hands_over_and_the_next_sends_only_what_is_left(start_nodes: StartNodes,
                                                                            receiver: Receiver) -> None:
    nodes = start_nodes(3)
    wait_for("one delivery lease holder", lambda: len(holders(nodes)) == 1)
    (first,) = holders(nodes)
    before = {upsert(first.stub, f"B{i}").customer_uuid for i in range(3)}
    wait_for("delivered by the first holder", delivered(receiver, before))
    wait_for("its acknowledgements applied everywhere", lambda: all(n.outbound().pending == 0 for n in nodes))
    stop_node(first)  # gives the lease up
    rest = [n for n in nodes if n is not first]
    after = {upsert(rest[i % 2].stub, f"A{i}").customer_uuid for i in range(3)}
    wait_for("delivered by the next holder", delivered(receiver, before | after), timeout=LEASE_S + WAIT_S)
    assert len(holders(rest)) == 1
    seen = receiver.snapshot()
    once_each(seen)  # the next holder did not send again what the first one had delivered
    assert_order_and_ids(seen)


def test_a_dead_letter_is_every_nodes_and_its_replay_through_any_node_is_delivered(start_nodes: StartNodes,
                                                                                    receiver: Receiver) -> None:
    refuse = {"on": True}
    receiver.plan = lambda wid, n, doc: 422 if refuse["on"] else 200
    nodes = start_nodes(3)
    wait_for("one delivery lease holder", lambda: len(holders(nodes)) == 1)
    upsert(nodes[0].stub, "D1")
    wait_for("dead-lettered on every node", lambda: all(n.outbound().dead == 1 for n in nodes))
    (holder,) = holders(nodes)
    other = next(n for n in nodes if n is not holder)  # the replay is any node's, not only the deliverer's
    (dead,) = other.stub.ListOutboundDeadLetters(pb.ListOutboundDeadLettersRequest(), timeout=5).messages
    refuse["on"] = False
    assert other.stub.ReplayOutboundDeadLetter(pb.ReplayOutboundDeadLetterRequest(id=dead.id), timeout=30).requeued
    wait_for("replayed and delivered everywhere", lambda: all(
        (c := n.outbound()).dead == 0 and c.pending == 0 and c.counters["delivered"] == 1 for n in nodes))
    attempts = [s for s in receiver.snapshot() if s.webhook_id == dead.webhook_id]
    assert [s.answer for s in attempts] == [422, 200] and attempts[0].body == attempts[1].body


def lease_holder(spec_source: Path, nats: LocalNats, stream: str) -> str:
    """The value of the delivery lease's key now ("" if nobody holds it)."""
    settings = load_settings(spec_source, environ=ENV).with_overrides(nats=tuple(nats.urls))
    log = CommandLog(settings.cluster, name="test lease reader")
    try:
        kv = log.key_value(bucket(settings.cluster), LEASE_S)

        async def read() -> str:
            try:
                entry = await kv.get(KEY)
            except Exception:  # not held (never taken, given up or expired)
                return ""
            return bytes(entry.value or b"").decode()

        return log.call(read(), 10)
    finally:
        log.close()


def pid_of(holder: str) -> int:
    return int(holder.split(":")[1]) if holder else 0


@pytest.mark.slow
def test_kill_9_of_the_deliverer_node_another_takes_over_at_least_once(
        nats_cluster: LocalNats, tmp_path: Path, stream_name: str, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "node.toml"
    config.write_text(blueprint(stream_name, outbound_url=receiver.url, lease_s=LEASE_S))
    nodes = [ResolverNode(f"r{i}", tmp_path / f"r{i}" / "data", nats_cluster.urls, config) for i in range(3)]
    launch_nodes(nodes)
    channels: list[grpc.Channel] = []
    try:
        def stub(node: ResolverNode) -> rpc.IdentityResolverStub:
            channels.append(grpc.insecure_channel(node.address))
            return rpc.IdentityResolverStub(channels[-1])

        stubs = [stub(n) for n in nodes]
        wait_for("a delivery lease holder", lambda: pid_of(lease_holder(config, nats_cluster, stream_name)) in
                 {n.proc.pid for n in nodes if n.proc is not None})
        before = {upsert(stubs[i % 3], f"K{i}").customer_uuid for i in range(6)}
        wait_for("delivered before the kill", delivered(receiver, before))
        holder = pid_of(lease_holder(config, nats_cluster, stream_name))
        victim = next(n for n in nodes if n.proc is not None and n.proc.pid == holder)
        receiver.plan = lambda wid, n, doc: ("slow", 0.5)  # attempts in flight when the deliverer dies
        survivors = [n for n in nodes if n is not victim]
        more = {upsert(stubs[nodes.index(survivors[i % 2])], f"L{i}").customer_uuid for i in range(6)}
        victim.kill()  # kill -9 of the node's processes, attempts in flight
        receiver.plan = lambda wid, n, doc: 200
        wait_for("a surviving node took the lease over",
                 lambda: pid_of(lease_holder(config, nats_cluster, stream_name)) in
                 {n.proc.pid for n in survivors if n.proc is not None}, timeout=LEASE_S + WAIT_S)
        after = {upsert(stubs[nodes.index(survivors[i % 2])], f"M{i}").customer_uuid for i in range(6)}
        wait_for("everything delivered", delivered(receiver, before | more | after), timeout=LEASE_S + WAIT_S)
        assert_order_and_ids(receiver.snapshot())  # a re-send is the same webhook-id with the same body
        victim.start()  # it catches up, its outbox too (what the new holder delivered is no longer pending there)
        channels.append(grpc.insecure_channel(victim.address))
        restarted = rpc.IdentityResolverStub(channels[-1])
        wait_for("the restarted node's outbox caught up", lambda: restarted.GetOutboundCounters(
            pb.GetOutboundCountersRequest(), timeout=5).pending == 0)
        settings = [load_settings(config, environ=ENV, data_dir=n.data_dir) for n in nodes]
        wait_for("the stores converged", lambda: len({digest_of(s) for s in settings}) == 1)
    finally:
        for channel in channels:
            channel.close()
        for node in nodes:
            node.kill()


def test_a_holder_that_cannot_renew_stops_before_another_can_take_the_lease(
        nats_cluster: LocalNats, tmp_path: Path, stream_name: str) -> None:
    """A reaches NATS through a link that goes silent while it holds the lease; B waits for it. Sampled all along,
    never do both hold it: A stops sending before the key can expire and B can take it."""
    link = Relay(nats_cluster.nodes[0].client_port)
    settings = node_settings(tmp_path, 0, blueprint(stream_name, nats=nats_cluster.urls, lease_s=LEASE_S))
    logs = [CommandLog(replace(settings.cluster, nats=(link.url,)), name="A"), CommandLog(settings.cluster, name="B")]
    leases: list[Lease] = []
    try:
        leases.append(Lease(logs[0], settings.cluster, lambda: 1 << 62))
        wait_for("A holds the lease", leases[0].held)
        leases.append(Lease(logs[1], settings.cluster, lambda: 1 << 62))
        a, b = leases
        link.cut()
        deadline = time.monotonic() + LEASE_S + WAIT_S
        while True:  # A's hold only shrinks now (no renewal gets through): sampled before B's, it must be over
            a_held, b_held = a.held(), b.held()
            if b_held:
                assert not a_held, "A still sent while B held the lease"
                break
            assert time.monotonic() < deadline, "B never took the lease over"
            time.sleep(0.01)
    finally:
        for lease in leases:
            lease.close()
        for log in logs:
            log.close()
        link.close()
