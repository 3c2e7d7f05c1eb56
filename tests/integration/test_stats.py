"""`resolver stats` on a real store: exact counts after known writes through a real server, the LMDB figures, the
table and `--json`, and a read-only run (in a process of its own) beside a server that goes on serving."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import pytest

from resolver.cli import main as cli_main
from resolver.config import Settings
from resolver.events.signatures import sign
from resolver.stats import Counts, collect
from resolver.v1 import resolver_pb2 as pb
from tests.conftest import TEST_BLUEPRINT
from tests.integration.helpers import phone, resolve_req, upsert_req

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"stats-test-webhook-secret"
MAP_SIZE = 256 * 1024 * 1024  # SERVER_TOML's [storage] map_size_mb, what the server writes with


@pytest.fixture
def blueprint_text(tmp_path: Path) -> str:
    """The test blueprint plus a CRM source (so events are on), gRPC intake only: no applier runs in the test
    server (no sweeper), so what is admitted stays in the inbox."""
    (tmp_path / "sf.secret").write_bytes(SECRET)
    return TEST_BLUEPRINT + (
        "\n[sources.SALESFORCE]\nfield_map = { Tier__c = \"tier\" }\n"
        f"secrets = [{{ file = \"{tmp_path / 'sf.secret'}\" }}]\n[events]\nhttp_listen = \"\"\n")


def ingest(stub: Any, body: bytes, webhook_id: str) -> None:
    stamp = int(time.time())
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(stamp),
               "webhook-signature": sign(SECRET, webhook_id, stamp, body)}
    stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=5)


def write_known_content(stub: Any) -> None:
    """Four customers; D merged into C; one interaction of A; B forgotten; one CRM event admitted (waiting in the
    inbox) and one dead-lettered at admission."""
    a = stub.Upsert(upsert_req(external_id="E-1", emails=("a@example.com",), phones=(phone(1),)), timeout=5)
    b = stub.Upsert(upsert_req(external_id="E-2", emails=("b@example.com",), phones=(phone(1),)), timeout=5)
    c = stub.Upsert(upsert_req(external_id="E-3", emails=("c@example.com",)), timeout=5)
    d = stub.Upsert(upsert_req(emails=("d@example.com",), phones=(phone(4),)), timeout=5)
    stub.Merge(pb.MergeRequest(idempotency_key="m-1", survivor_uuid=c.customer_uuid, merged_uuids=[d.customer_uuid]),
               timeout=5)
    call = pb.RecordInteractionRequest(interaction_id="call-1", customer_uuid=a.customer_uuid, channel="voice")
    call.occurred_at.FromSeconds(1_714_557_600)
    stub.RecordInteraction(call, timeout=5)
    stub.Forget(pb.ForgetRequest(idempotency_key="f-1", customer_uuid=b.customer_uuid, reason="ticket 1"), timeout=5)
    ingest(stub, json.dumps({"event_type": "UPDATE", "source_system": "SALESFORCE", "timestamp": "2024-01-01T00:00:00Z",
                             "record_id": "E-1", "object_type": "Account",
                             "change_set": {"Tier__c": {"new_value": "gold"}}}).encode(), "msg-ok")
    with pytest.raises(grpc.RpcError) as bad:
        ingest(stub, b'{"event_type": "UPSERT"}', "msg-bad")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


EXPECTED = Counts(
    customers=2,  # A and C (B forgotten, D merged into C)
    aliases=1,  # D -> C
    tombstones=1,  # B
    index_entries={"external_id": 2, "email": 3, "phone": 2},  # E-1, E-3; a@, c@, d@; phone(1) of A, phone(4) of C
    ledger_entries=7,  # 4 Upserts, the Merge, the interaction, the Forget
    changes=7,  # one per committed write: 4 CREATED, MERGED, INTERACTION_RECORDED, DELETED
    last_change_sequence=7,
    inbox=1,
    dead_letters=1,
    outbox_pending=0,  # no [outbound] destination
    outbox_dead=0,
    interactions=1,
    audit_entries=1,
)


def test_exact_counts_and_lmdb_figures_of_a_store_with_known_content(server: Any, stub: Any, settings: Settings,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_known_content(stub)
    server.stop(grace=0)  # one process may open an environment once: the server's goes first

    stats = collect(settings)
    assert stats.counts == EXPECTED
    m = stats.lmdb
    assert (m.map_size_bytes, m.page_size, m.max_readers) == (MAP_SIZE, mmap.PAGESIZE, 1024)
    assert m.bytes_used == m.pages_used * m.page_size <= m.file_bytes
    assert m.map_used_percent == round(100 * m.bytes_used / MAP_SIZE, 2) > 0
    # only this command reads now, with its one snapshot: the newest transaction
    assert (m.readers_in_use, m.readers_with_snapshot, m.oldest_snapshot_txn) == (1, 1, m.last_txn_id)
    assert m.last_txn_id >= 9  # at least one commit per write above
    # the map size is the one the store was written with, not the one this command's blueprint says
    assert collect(settings.with_overrides(map_size_mb=1024)).lmdb.map_size_bytes == MAP_SIZE

    argv = ["stats", "--config", str(settings.blueprint_path), "--data-dir", str(settings.server.data_dir)]
    assert cli_main(argv + ["--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["counts"] == asdict(EXPECTED) and document["lmdb"]["map_size_bytes"] == MAP_SIZE
    assert cli_main(argv) == 0
    table = capsys.readouterr().out
    assert f"stats: {settings.server.data_dir}" in table
    for label, value in (("customers", "2"), ("index entries: email", "3"), ("ledger entries", "7"),
                         ("change log: last sequence", "7"), ("event inbox", "1"), ("event dead letters", "1"),
                         ("audit entries", "1"), ("LMDB map size", "256.0 MiB")):
        assert any(line.split() == [*label.split(), *value.split()] for line in table.splitlines()), (label, table)


@pytest.mark.process
def test_stats_reads_a_directory_a_server_is_serving(server: Any, stub: Any, settings: Settings) -> None:
    for i in range(3):
        stub.Upsert(upsert_req(external_id=f"S-{i}", phones=(phone(10 + i),)), timeout=5)
    assert stub.Resolve(resolve_req(external_id="S-0"), timeout=5).customer_uuid  # the server now holds a reader slot

    run = subprocess.run(
        [sys.executable, "-m", "resolver", "stats", "--json", "--config", str(settings.blueprint_path),
         "--data-dir", str(settings.server.data_dir)],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["counts"]["customers"] == 3 and document["counts"]["index_entries"]["phone"] == 3
    assert document["lmdb"]["map_size_bytes"] == MAP_SIZE
    assert document["lmdb"]["readers_in_use"] >= 2  # the serving process's slot and the command's own

    # the server went on serving, reads and writes
    written = stub.Upsert(upsert_req(external_id="S-3"), timeout=5)
    assert stub.Resolve(resolve_req(external_id="S-3"), timeout=5).customer_uuid == written.customer_uuid


def test_a_directory_without_a_store_is_an_error_and_nothing_is_created(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing-here"
    assert cli_main(["stats", "--data-dir", str(missing)]) == 2
    assert "no resolver data here" in capsys.readouterr().err
    assert not missing.exists()
