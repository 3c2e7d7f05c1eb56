"""Shared fixtures: real settings on a temp LMDB directory, a real gRPC server on 127.0.0.1:0."""

from __future__ import annotations

import base64
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from resolver.config import Settings, load_settings
from tests.reliability.report import REPORT

# The encryption key of the test blueprints and of examples/blueprint.toml (a fixed, public test key; child
# processes inherit it).
TEST_ENCRYPTION_KEY = base64.b64encode(bytes(range(32))).decode()
os.environ.setdefault("RESOLVER_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY)

# How the blueprints of tests that start a server open: one worker of 8 threads, a 1 s grace period, a 256 MB map,
# sensitive attributes encrypted with the test key.
SERVER_TOML = textwrap.dedent(
    """
    version = 1
    [server]
    workers = 1
    threads = 8
    grace_period_s = 1
    # closed loops of up to 50 writers keep a worker's threads busy for longer than the served max_queue_wait_ms
    # (50 ms) on a busy machine: admission's refusals are tested where overload is the subject
    # (tests/reliability/test_overload.py, with the served defaults)
    refusal_share = 0
    max_queue_wait_ms = 60000
    [storage]
    map_size_mb = 256
    [encryption]
    keys = [{ id = "test", key = { env = "RESOLVER_ENCRYPTION_KEY" } }]
    """
)

TEST_BLUEPRINT = SERVER_TOML + textwrap.dedent(
    """
    [matching]
    default_region = "US"
    max_fanout = 4
    max_candidates = 3
    blocked_values = ["+16502530099"]
    [attributes]
    name = { type = "string", max_length = 50 }
    status = { type = "string", enum = ["Active", "Churned"], owner = "SALESFORCE" }
    credit_limit = { type = "number", minimum = 0, owner = "BILLING" }
    tier = { type = "string" }
    birth_date = { type = "date", input_formats = ["%m/%d/%Y"] }
    last_interaction_date = { type = "date-time" }
    [views.default]
    fields = ["name", "status"]
    [views.billing]
    fields = ["name", "credit_limit"]
    """
)


@pytest.fixture
def blueprint_text() -> str:
    """The blueprint `blueprint_file` holds (and `settings` reads); a module overrides it to run under its own."""
    return TEST_BLUEPRINT


@pytest.fixture
def blueprint_file(tmp_path: Path, blueprint_text: str) -> Path:
    path = tmp_path / "blueprint.toml"
    path.write_text(blueprint_text)
    return path


@pytest.fixture
def settings(tmp_path: Path, blueprint_file: Path) -> Settings:
    return load_settings(blueprint_file, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0")


@pytest.fixture
def make_server() -> Iterator[Callable[[Settings], object]]:
    """Start real servers (in this process) for given settings; all stopped at the end.

    After they stop, `resolver check` runs over every data directory the test wrote: whatever a test did,
    indexes and records must agree.
    """
    from resolver.bootstrap import build_server
    from resolver.check import find_problems
    from resolver.store import Store

    running = []

    def make(s: Settings):  # noqa: ANN202
        r = build_server(s, sweeper=False)
        running.append(r)
        return r

    yield make
    for r in running:
        r.stop(grace=0)  # idempotent: some tests stop their server themselves
    for s in {str(r.service.settings.server.data_dir): r.service.settings for r in running}.values():
        store = Store(s, readonly=True)
        try:
            with store.read() as view:
                assert find_problems(view) == [], f"resolver check fails after the test's writes in {s.server.data_dir}"
        finally:
            store.close()


@pytest.fixture
def server(make_server, settings):  # noqa: ANN001, ANN201
    return make_server(settings)


@pytest.fixture
def channel(server) -> Iterator[grpc.Channel]:  # noqa: ANN001
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield ch
    ch.close()


@pytest.fixture
def stub(channel):  # noqa: ANN001, ANN201
    from resolver.v1 import resolver_pb2_grpc

    return resolver_pb2_grpc.IdentityResolverStub(channel)


def unpack_details(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo | None,
                                                      error_details_pb2.BadRequest | None]:
    """The ErrorInfo and BadRequest details of a google.rpc.Status (None: absent)."""
    info, bad = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    return info, bad


def status_details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, list[tuple[str, str]]]:
    """ErrorInfo and BadRequest (field, reason) pairs carried by a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, "error without google.rpc.Status details"
    info, bad = unpack_details(status)
    return info, [(v.field, v.reason) for v in bad.field_violations] if bad is not None else []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The reliability report (tests/reliability/report.py), written once: by pytest itself, or by pytest-xdist's
    controller from every worker's rows (a worker hands its rows over instead)."""
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output["reliability_rows"] = REPORT.rows_out()
        return
    if REPORT.rows:
        path = REPORT.write()
        session.config.get_terminal_writer().line(f"reliability report: {path}")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist's controller, as each worker ends: its reliability rows join the report."""
    REPORT.rows_in(getattr(node, "workeroutput", {}).get("reliability_rows", []))
