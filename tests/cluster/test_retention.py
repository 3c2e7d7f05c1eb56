"""Change-log retention in a cluster (resolver.cluster.retention), over a real three-server NATS cluster: the node
holding the lease publishes the cutoff as a command, every node deletes exactly what it names, and a node that was
down when it ran catches up to the same change log."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

from resolver import feed
from resolver.cluster.codec import decode
from resolver.cluster.digest import store_digest
from resolver.cluster.lease import Lease
from resolver.cluster.log import CommandLog
from resolver.cluster.retention_publisher import RetentionPublisher
from resolver.cluster.writer import ReplicatedWriter
from resolver.service import Service
from tests.cluster.conftest import WAIT_S, Served, position, wait_equal_positions
from tests.cluster.test_replicated import upsert

MakeNodes = Callable[..., list[Service]]
KEPT = 5
RETENTION = {"retention_count": KEPT}


def log_bounds(node: Service) -> tuple[int, int]:
    """The node's oldest retained change-log sequence and the next one (resolver.feed.bounds)."""
    with node.store.read() as view:
        return feed.bounds(view)


def command_names(node: Service) -> list[str]:
    """The name of every command in the stream, in order (read with a reader of the test's own)."""
    nats = CommandLog(node.settings.cluster)
    try:
        reader = nats.reader(1)
        names: list[str] = []
        while len(names) < position(node):
            fetched = reader.fetch(256, 2.0)
            assert fetched.commands, f"the stream ended at {len(names)} of {position(node)}"
            names.extend(decode(data)[0].name for _, data in fetched.commands)
        reader.close()
        return names
    finally:
        nats.close()


def assert_same_change_log(nodes: list[Service]) -> tuple[int, int]:
    """Every node at the same position with the same store (digests) and the same change-log bounds; those."""
    wait_equal_positions(nodes)
    assert len({store_digest(n.store) for n in nodes}) == 1
    (found,) = {log_bounds(n) for n in nodes}
    return found


def wait_retained(nodes: list[Service]) -> tuple[int, int]:
    """Wait until every node applied as far and holds only the newest KEPT entries (the lease holder publishes no
    more retention then: nothing is due); the change-log bounds, the same on every node, as are the digests."""
    deadline = time.monotonic() + WAIT_S
    while True:
        written = log_bounds(nodes[0])[1]
        if len({position(n) for n in nodes}) == 1 and {log_bounds(n) for n in nodes} == {(written - KEPT, written)}:
            return assert_same_change_log(nodes)
        assert time.monotonic() < deadline, [log_bounds(n) for n in nodes]
        time.sleep(0.1)


def test_the_lease_holders_retention_leaves_the_same_change_log_on_every_node(
        make_servers: Callable[..., list[Served]]) -> None:
    served = make_servers(3, sweeper=True, overrides={**RETENTION, "sweep_interval_s": 0.2})
    a, b, c = nodes = [s.service for s in served]
    survivor = upsert(a, "k-s", "S", name="Sam")
    merged = upsert(b, "k-m", "M", name="Max")
    c.merge("merge-1", survivor, [merged])
    upsert(a, "k-after", "S", name="Sasha")  # written to the survivor since the merge: Unmerge must keep it
    for i in range(20):
        upsert(nodes[i % 3], f"k{i}", f"E{i}")
    wait_equal_positions(nodes)
    written = log_bounds(a)[1]
    assert written > 2 * KEPT
    assert wait_retained(nodes) == (written - KEPT, written)
    assert "retention.v1" in command_names(a)  # deleted through the log, not by each node's sweeper
    b.unmerge("unmerge-1", survivor, merged)  # the deleted entry's attribute was kept in the journal, on every node
    wait_retained(nodes)  # the unmerge's entries made more retention due: published and applied everywhere
    assert [n.get_customer(survivor).attributes for n in nodes] == [{"name": "Sasha"}] * 3
    assert [n.get_customer(merged).attributes for n in nodes] == [{"name": "Max"}] * 3


def test_a_node_down_when_retention_ran_catches_up_to_the_same_change_log(make_nodes: MakeNodes) -> None:
    a, b, c = make_nodes(3, overrides=RETENTION)
    for i in range(6):
        upsert((a, b, c)[i % 3], f"k{i}", f"E{i}")
    wait_equal_positions([a, b, c])
    c.close()
    for i in range(6, 20):  # written while c is down
        upsert((a, b)[i % 2], f"k{i}", f"E{i}")
    wait_equal_positions([a, b])  # the publisher's cutoff counts from its own change log: let it hold every write
    writer = cast(ReplicatedWriter, a.writer)
    publisher = RetentionPublisher(a.store, a.settings, writer, Lease(writer.log, a.settings.cluster, lambda: writer.position))
    try:
        assert publisher.publish() == 20 - KEPT
        published = position(a)
        assert publisher.publish() == 0  # nothing past the cutoff now: nothing is published
        assert position(a) == published
    finally:
        publisher.stop()
    (c,) = make_nodes(1, first=2)  # the command carries the cutoff: c's own blueprint sets no retention
    assert assert_same_change_log([a, b, c]) == (20 - KEPT + 1, 21)
    assert command_names(c).count("retention.v1") == 1
