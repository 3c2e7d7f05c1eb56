"""Fixtures of the cluster tests: a real three-server NATS JetStream cluster on 127.0.0.1 (one per test module),
and resolver nodes over it, each with its own data directory, as in-process services or as `resolver serve`
processes. Every process started here is stopped at teardown, and every wait is bounded.

Each test gets a stream of its own on the shared NATS cluster, so tests of one module never see each other's
commands.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from resolver.bootstrap import Running, build_server, build_service
from resolver.cluster.digest import Digest, store_digest
from resolver.cluster.local import LocalNats
from resolver.config import Settings, settings_from_document
from resolver.service import Service
from resolver.store import Store
from resolver.v1 import resolver_pb2_grpc as rpc

_streams = itertools.count()
WAIT_S = 30.0


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNats]:
    cluster = LocalNats(tmp_path_factory.mktemp("nats")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def stream_name() -> str:
    return f"t{next(_streams)}"


@pytest.fixture
def node_settings(nats_cluster: LocalNats, tmp_path: Path, stream_name: str) -> Callable[..., Settings]:
    """Settings of node `i` (its own data directory) on this test's stream; `cluster=` overrides [cluster] keys,
    `overrides` any other key (Settings.with_overrides: `retention_count=`, `sweep_interval_s=`)."""

    def make(i: int, overrides: dict[str, Any] | None = None, **cluster: Any) -> Settings:
        return settings_from_document({
            "version": 1,
            "server": {"workers": 1, "data_dir": str(tmp_path / f"node{i}")},
            "storage": {"map_size_mb": 64},
            "cluster": {"nats": nats_cluster.urls, "stream": stream_name, "apply_timeout_s": 20, **cluster},
        }, {}).with_overrides(**(overrides or {}))

    return make


@pytest.fixture
def make_nodes(node_settings: Callable[..., Settings]) -> Iterator[Callable[..., list[Service]]]:
    """Build in-process nodes (Service with a ReplicatedWriter); all closed at teardown."""
    built: list[Service] = []

    def make(count: int, first: int = 0, **cluster: Any) -> list[Service]:
        nodes = [build_service(node_settings(i, **cluster)) for i in range(first, first + count)]
        built.extend(nodes)
        return nodes

    yield make
    for node in built:
        try:
            node.close()
        except Exception:  # closed by the test already (lmdb: closing twice is harmless, a writer is not)
            pass


@dataclass
class Served:
    """An in-process node serving gRPC on 127.0.0.1 (build_server: the servicer with its read gate), and a stub."""

    running: Running
    channel: grpc.Channel
    stub: rpc.IdentityResolverStub

    @property
    def service(self) -> Service:
        return self.running.service


@pytest.fixture
def make_servers(node_settings: Callable[..., Settings]) -> Iterator[Callable[..., list[Served]]]:
    """Serve in-process nodes over gRPC (`first` numbers their data directories; `cluster=` overrides [cluster]
    keys; `sweeper`: the sweepers run, and change-log retention with them); every one stopped at teardown."""
    served: list[Served] = []

    def make(count: int, first: int = 0, sweeper: bool = False, **cluster: Any) -> list[Served]:
        for i in range(first, first + count):
            running = build_server(node_settings(i, **cluster).with_overrides(listen="127.0.0.1:0"), sweeper=sweeper)
            channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
            served.append(Served(running, channel, rpc.IdentityResolverStub(channel)))
        return served[-count:]

    yield make
    for node in served:
        node.channel.close()
        node.running.stop(grace=0)


def position(node: Service) -> int:
    return node.writer.position  # type: ignore[attr-defined,no-any-return]


def wait_equal_positions(nodes: list[Service], timeout: float = WAIT_S) -> int:
    """Wait until every node applied as far as the furthest one; that position."""
    deadline = time.monotonic() + timeout
    while True:
        target = max(position(n) for n in nodes)
        if all(position(n) == target for n in nodes):
            return target
        assert time.monotonic() < deadline, f"positions never met: {[position(n) for n in nodes]}"
        time.sleep(0.05)


def digest_of(settings: Settings) -> Digest:
    """The digest of the store in `settings`, opened read-only beside whatever serves it."""
    store = Store(settings, readonly=True)
    try:
        return store_digest(store)
    finally:
        store.close()
