"""Cluster nodes that take CRM webhooks and deliver outbound messages (in this process: gRPC, the webhook endpoint,
the events applier and the deliverer as threads of build_server), and the blueprint they share."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from resolver.bootstrap import Running, build_server
from resolver.config import Settings, load_settings
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc as rpc
from tests.cluster.conftest import WAIT_S
from tests.integration.test_events import ENV as EVENTS_ENV
from tests.integration.test_outbound import ENV as OUTBOUND_ENV

ENV = {**EVENTS_ENV, **OUTBOUND_ENV}


def blueprint(stream: str, *, nats: list[str] | None = None, outbound_url: str = "", lease_s: float = 3.0) -> str:
    """A node's blueprint: SALESFORCE webhooks in, and with `outbound_url` every customer change out to `CRM`.
    `nats`: written into `[cluster]` (in-process nodes); None: given on the command line (`--cluster`)."""
    text = textwrap.dedent(f"""
        version = 1
        [server]
        workers = 1
        grace_period_s = 1
        [storage]
        map_size_mb = 64
        [attributes]
        status = {{ type = "string", enum = ["Active", "Churned"], owner = "SALESFORCE" }}
        credit_limit = {{ type = "number", minimum = 0, owner = "SALESFORCE" }}
        tier = {{ type = "string" }}
        [sources.SALESFORCE]
        field_map = {{ Customer_Status__c = "status", Credit_Limit__c = "credit_limit", Tier__c = "tier" }}
        identifiers = {{ Email = "email" }}
        secrets = [{{ env = "SF_SECRET_OLD" }}]
        [events]
        http_listen = "127.0.0.1:0"
        rate_per_s = 500
        unknown_record_wait_s = 2
        [cluster]
        stream = "{stream}"
        apply_timeout_s = 20
        lease_s = {lease_s:g}
        """)
    if nats is not None:
        text += f"nats = {json.dumps(nats)}\n"
    if outbound_url:
        text += textwrap.dedent(f"""
            [outbound.CRM]
            url = "{outbound_url}"
            secrets = [{{ env = "CRM_OUT_SECRET" }}]
            events = ["customer.created", "customer.updated"]
            fields = ["status", "credit_limit", "tier"]
            backoff_initial_s = 0.05
            backoff_max_s = 0.2
            """)
    return text


@dataclass
class Node:
    """One in-process node: its server, a gRPC stub, and its webhook port."""

    running: Running
    channel: grpc.Channel
    stub: rpc.IdentityResolverStub
    stopped: bool = False

    @property
    def http_port(self) -> int:
        return self.running.http_port

    @property
    def position(self) -> int:
        return self.running.service.writer.position  # type: ignore[attr-defined,no-any-return]

    def counters(self) -> pb.EventCounters:
        return self.stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)

    def outbound(self) -> pb.OutboundCounters:
        return self.stub.GetOutboundCounters(pb.GetOutboundCountersRequest(), timeout=5)


def node_settings(root: Path, i: int, text: str) -> Settings:
    path = root / f"node{i}.toml"
    path.write_text(text)
    return load_settings(path, environ=ENV, data_dir=str(root / f"node{i}"), listen="127.0.0.1:0")


def start_node(settings: Settings) -> Node:
    """Serve one node here: gRPC, webhooks, the events applier and (with [outbound]) the deliverer."""
    running = build_server(settings, sweeper=False, applier=True, deliverer=bool(settings.outbound))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    return Node(running, channel, rpc.IdentityResolverStub(channel))


def stop_node(node: Node) -> None:
    """Stop the node (its deliverer gives the lease up); once: a second call does nothing."""
    if node.stopped:
        return
    node.stopped = True
    node.channel.close()
    node.running.stop(grace=0)


def serving(root: Path, text: str) -> Iterator[Callable[[int], list[Node]]]:
    """A fixture's body: `start(count)` serves nodes from blueprint `text` (numbered on under `root`); every one is
    stopped when the fixture ends."""
    started: list[Node] = []

    def start(count: int) -> list[Node]:
        nodes = [start_node(node_settings(root, len(started) + i, text)) for i in range(count)]
        started.extend(nodes)
        return nodes

    try:
        yield start
    finally:
        for node in started:
            stop_node(node)


def wait_for(what: str, cond: Callable[[], Any], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.05)
