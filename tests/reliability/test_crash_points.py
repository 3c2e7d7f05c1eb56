"""Crash points inside the write path (issue 18, item 1): a real `resolver serve` (2 workers) whose worker 0 is
told by the test-only hook (resolver.faults, RESOLVER_TEST_CRASH=POINT:N) to exit like a kill -9 at one step of
resolver.writer while it applies an Upsert:

- `before_txn` (the command is queued, no transaction yet) and `mid_txn` (applied inside the write transaction,
  not committed): after the restart nothing of the write is there (no record, index entry, change-log entry or
  ledger entry), `resolver check` passes, and the client's retry with the same key creates exactly one customer;
- `after_commit` (committed and synced, the caller not answered): the write is there, and the retry with the same
  key is a ledger replay (`replayed`) with the same uuid and version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from resolver.bootstrap import open_store
from resolver.config import load_settings
from resolver.faults import ENV_VAR, EXIT_CODE, POINTS, parse
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import TEST_BLUEPRINT
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.serve import Launched, launch
from tests.reliability.clients import exported, resolver_cli

EARLIER = 2  # acknowledged Upserts the worker applies before the one it crashes in (each its own batch)
KEY = "crash-point-key"
EXT = "CP-1"
EMAIL = "crash.point@example.com"


def crashing_request() -> pb.UpsertRequest:
    return upsert_req(KEY, external_id=EXT, emails=(EMAIL,), phones=(phone(7),),
                      attributes={"name": "Ada", "tier": "gold"})


def worker_port(server: Launched, index: int) -> int:
    """Worker `index`'s own port, from the announce line ("2 workers on ports A, B, ...")."""
    ports = server.announced.split(" on ports ", 1)[1].split(", data ", 1)[0]
    return int(ports.split(", ")[index])


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


class Stored:
    """What the data directory holds of the crashing write, read with the server stopped."""

    def __init__(self, config: Path, data: Path) -> None:
        store = open_store(load_settings(config, data_dir=str(data)), readonly=True)
        try:
            with store.read() as view:
                self.records = view.count("records")
                self.changes = [ch for ch in view.iter_changes() if ch.get("customer_uuid")]
                self.ledger = view.ledger_get(KEY)
        finally:
            store.close()


def test_the_hook_reads_point_and_count_and_refuses_anything_else() -> None:
    assert parse("") is None  # unset: no crash point, nothing counted
    hook = parse("mid_txn:7")
    assert hook is not None and (hook.point, hook.nth, hook.seen) == ("mid_txn", 7, 0)
    hook.reached("before_txn")  # another point: not counted
    for _ in range(6):
        hook.reached("mid_txn")  # the 1st to 6th time: the process lives on
    assert hook.seen == 6
    for bad in ("mid_txn", "mid_txn:0", "mid_txn:-1", "commit:1", "after_commit:x", "before_txn:1:2"):
        with pytest.raises(ValueError, match=ENV_VAR):
            parse(bad)


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_point_of_the_write_path_loses_or_duplicates_nothing(
        point: str, tmp_path: Path, reliability_report: Callable[..., None]) -> None:
    config, data, log = tmp_path / "blueprint.toml", tmp_path / "data", tmp_path / "server.log"
    config.write_text(TEST_BLUEPRINT)
    crash = f"{point}:{EARLIER + 1}"
    server = launch(config, data, log, workers=2, env={ENV_VAR: crash})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{worker_port(server, 0)}") as channel:
            stub = resolver_pb2_grpc.IdentityResolverStub(channel)
            earlier = [stub.Upsert(upsert_req(f"earlier-{i}", external_id=f"EARLY-{i}"), timeout=10)
                       for i in range(EARLIER)]
            with pytest.raises(grpc.RpcError) as err:
                stub.Upsert(crashing_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value  # the connection died with the worker
        wait_for("the worker's crash line", lambda: f"test crash point {point} reached" in log.read_text())
    finally:
        server.kill()  # the rest of the server: the supervisor, worker 1
    crash_line = next(line for line in log.read_text().splitlines() if "test crash point" in line)
    assert crash_line.endswith(f"exiting {EXIT_CODE}")

    checked = resolver_cli(config, data, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    stored = Stored(config, data)
    assert [ch["action"] for ch in stored.changes] == ["CREATED"] * (EARLIER + (point == "after_commit"))
    if point == "after_commit":  # committed: the record, its change and its ledger entry are all there
        assert stored.records == EARLIER + 1 and stored.ledger is not None
        assert stored.changes[-1]["customer_uuid"] == stored.ledger["response"]["customer_uuid"]
    else:  # nothing of the write, not even its ledger entry
        assert stored.records == EARLIER and stored.ledger is None

    server = launch(config, data, log, workers=2)  # no crash point this time
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = resolver_pb2_grpc.IdentityResolverStub(channel)
            before = stub.Resolve(resolve_req(external_id=EXT), timeout=10)
            retry = stub.Upsert(crashing_request(), timeout=10)
            again = stub.Upsert(crashing_request(), timeout=10)
            by_email = stub.Resolve(resolve_req(emails=(EMAIL,), fields=["name", "tier"]), timeout=10)
            by_phone = stub.Resolve(resolve_req(phones=(phone(7),)), timeout=10)
        if point == "after_commit":
            assert before.outcome == pb.OUTCOME_MATCHED and before.customer_uuid == stored.changes[-1]["customer_uuid"]
            assert retry.replayed and retry.action == pb.ACTION_CREATED
            assert (retry.customer_uuid, retry.version) == (before.customer_uuid, before.version) \
                == (stored.ledger["response"]["customer_uuid"], 1)
        else:
            assert before.outcome == pb.OUTCOME_NOT_FOUND
            assert not retry.replayed and retry.action == pb.ACTION_CREATED and retry.version == 1
        assert again.replayed and (again.customer_uuid, again.version) == (retry.customer_uuid, retry.version)
        assert by_email.outcome == by_phone.outcome == pb.OUTCOME_MATCHED  # one holder: not AMBIGUOUS
        assert by_email.customer_uuid == by_phone.customer_uuid == retry.customer_uuid
        assert dict(by_email.attributes) == {"name": "Ada", "tier": "gold"}
        assert server.terminate() == 0, log.read_text()[-3000:]
    finally:
        server.kill()
    assert resolver_cli(config, data, "check").returncode == 0
    customers = exported(config, data, tmp_path / "export.jsonl")
    holders = [c["uuid"] for c in customers if c.get("external_id") == EXT]
    assert holders == [retry.customer_uuid]  # exactly one customer, the one the retry answered with
    assert sorted(c["external_id"] for c in customers) == sorted([EXT] + [f"EARLY-{i}" for i in range(EARLIER)])
    assert all(e.action == pb.ACTION_CREATED for e in earlier)

    outcome = "the write was there, the retry a replay" if point == "after_commit" else \
        "nothing of the write was there, the retry created it"
    reliability_report(
        tried=f"worker 0 of a 2-worker `resolver serve` exits 137 at `{point}` ({ENV_VAR}={crash}) during an Upsert; "
              f"restart; retry with the same key (twice)",
        held=f"{outcome}; `resolver check` passed; exactly 1 customer for the key (export); "
             f"uuid {'and version ' if point == 'after_commit' else ''}as answered",
        figures=f"{EARLIER} earlier Upserts acknowledged, then the crash; records after the crash "
                f"{stored.records}; retry replayed={retry.replayed}, version {retry.version}",
    )
