"""The local NATS cluster the cluster tests and `make cluster` start (resolver.cluster.local)."""

from __future__ import annotations

import socket
from pathlib import Path

from resolver.cluster.local import LocalNats


def test_a_port_taken_before_its_server_binds_it_gets_the_cluster_new_ports(tmp_path: Path) -> None:
    """A port picked free and taken by another process before its server binds it (it happened in CI: nine
    cluster tests errored) makes that server exit; `start` picks new ports for the cluster and starts it again."""
    cluster = LocalNats(tmp_path / "nats")
    taken = cluster.nodes[1].client_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start()
        try:
            assert taken not in {n.client_port for n in cluster.nodes}
            assert cluster.wait_leader() in {n.name for n in cluster.nodes}
            assert all(proc.poll() is None for proc in cluster.procs.values())
        finally:
            cluster.stop()
