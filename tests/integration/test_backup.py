"""`resolver backup` and `resolver restore` (issue 17 point 2): real server on 127.0.0.1:0, real LMDB, the CLI in
processes of its own (LMDB opens an environment once per process: the servers run in this one).

What is proved: a backup taken while 4 threads Upsert without pause restores to a store that passes `resolver check`
and holds every write acknowledged before the backup started, each with at least the acknowledged version; a
server started on the restored directory resolves; the manifest says what the copy holds (last change, counts,
checksum, index hash, version). Restore refuses a non-empty target, a backup whose data.mdb was altered, and a
directory without a manifest, writing nothing; backup refuses a non-empty directory.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

import resolver
from resolver.config import Settings
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.integration.helpers import resolve_req, upsert_req

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
WRITERS = 4
WAIT_S = 60.0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resolver", *map(str, args)], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, check=False)


@dataclass(frozen=True)
class Ack:
    """One acknowledged Upsert: when its answer arrived (time.monotonic) and what it said."""

    at: float
    external_id: str
    customer_uuid: str
    version: int


class WriteLoad:
    """`WRITERS` threads that Upsert without pause until stopped: each creates customers and updates the ones it
    made, and records every acknowledged write."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)
        self.stop = threading.Event()
        self.acks: list[Ack] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(t,), daemon=True) for t in range(WRITERS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _write(self, t: int) -> None:
        mine: list[str] = []
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                if i % 3 == 0:  # update one of this thread's customers: a new version of it
                    ext = mine[i % len(mine)]
                    req = upsert_req(external_id=ext, attributes={"tier": f"t{i}"})
                else:
                    ext = f"w{t}-{i}"
                    mine.append(ext)
                    req = upsert_req(external_id=ext, emails=(f"w{t}-{i}@example.com",), attributes={"name": ext})
                r = self.stub.Upsert(req, timeout=30)
                ack = Ack(time.monotonic(), ext, r.customer_uuid, r.version)
                with self._lock:
                    self.acks.append(ack)
        except BaseException as exc:  # noqa: BLE001 - reported by the test, never swallowed
            self.errors.append(exc)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(self.acks) < count and not self.errors:
            assert time.monotonic() < deadline, f"only {len(self.acks)} writes acknowledged in {WAIT_S}s"
            time.sleep(0.01)

    def finish(self) -> list[Ack]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=WAIT_S)
        self.channel.close()
        assert not self.errors, self.errors
        assert not any(t.is_alive() for t in self.threads)
        return list(self.acks)


def backup(settings: Settings, blueprint: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("backup", target, "--config", blueprint, "--data-dir", settings.server.data_dir)


def restore(blueprint: Path, source: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("restore", source, "--config", blueprint, "--data-dir", target)


def test_a_backup_under_write_load_restores_every_acknowledged_write(
        tmp_path: Path, settings: Settings, blueprint_file: Path, make_server: Callable[[Settings], Any]) -> None:
    server = make_server(settings)
    load = WriteLoad(server.port)
    load.start()
    try:
        load.wait_for(200)
        began, wall_began = time.monotonic(), time.time_ns() // 1000
        done = backup(settings, blueprint_file, tmp_path / "backup")
        ended, wall_ended = time.monotonic(), time.time_ns() // 1000
        load.wait_for(len(load.acks) + 50)  # the server still serves and writes after the backup
    finally:
        acks = load.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "check: OK" in done.stdout and "backup: " in done.stdout
    before = [a for a in acks if a.at < began]
    assert len(before) >= 200
    assert [a for a in acks if began <= a.at <= ended], "no write was acknowledged while the backup ran"
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["data.mdb", "manifest.json"]

    restored = tmp_path / "restored"
    r = restore(blueprint_file, tmp_path / "backup", restored)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: OK" in r.stdout and "restore: " in r.stdout
    r = run_cli("check", "--config", blueprint_file, "--data-dir", restored)
    assert r.returncode == 0, r.stdout

    newest: dict[str, Ack] = {}
    for a in before:
        if a.external_id not in newest or a.version > newest[a.external_id].version:
            newest[a.external_id] = a
    again = make_server(settings.with_overrides(data_dir=str(restored)))
    with grpc.insecure_channel(f"127.0.0.1:{again.port}") as channel:
        stub = resolver_pb2_grpc.IdentityResolverStub(channel)
        for ext, ack in newest.items():
            got = stub.Resolve(resolve_req(external_id=ext), timeout=10)
            assert (got.outcome, got.customer_uuid) == (pb.OUTCOME_MATCHED, ack.customer_uuid), ext
            assert got.version >= ack.version, ext

    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    data = (tmp_path / "backup" / "data.mdb").read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["size"] == len(data)
    assert manifest["resolver_backup"] == 1 and manifest["data_file"] == "data.mdb"
    assert manifest["resolver_version"] == resolver.__version__
    assert (manifest["format"], manifest["hash"], manifest["key_id"]) == ("1", settings.index.hash,
                                                                          settings.index.key_id)
    assert wall_began <= manifest["created_us"] <= wall_ended  # the snapshot was taken during the command
    assert datetime.fromisoformat(manifest["created_at"]) == EPOCH + timedelta(microseconds=manifest["created_us"])
    assert manifest["source"] == str(Path(settings.server.data_dir).resolve())
    with again.service.store.read() as view:
        assert manifest["last_change_seq"] == view.last_change_seq() >= len(before)
        assert manifest["counts"]["records"] == view.count("records") >= len(newest)
        for name in ("records", "aliases", "changes", "ledger", "ix_external", "ix_email", "ix_phone", "meta"):
            assert manifest["counts"][name] == view.count(name), name


def test_restore_and_backup_refuse_what_they_must_not_touch(
        tmp_path: Path, settings: Settings, blueprint_file: Path, make_server: Callable[[Settings], Any]) -> None:
    server = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        resolver_pb2_grpc.IdentityResolverStub(channel).Upsert(upsert_req(external_id="b-1"), timeout=10)
    good = tmp_path / "good"
    assert backup(settings, blueprint_file, good).returncode == 0

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    r = backup(settings, blueprint_file, busy)
    assert r.returncode == 2 and "is not empty (it holds notes.txt)" in r.stderr
    r = restore(blueprint_file, good, busy)
    assert r.returncode == 2 and "is not empty (it holds notes.txt): restore only into an empty" in r.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_bytes((good / "manifest.json").read_bytes())
    data = bytearray((good / "data.mdb").read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / "data.mdb").write_bytes(bytes(data))
    target = tmp_path / "target"
    r = restore(blueprint_file, damaged, target)
    assert r.returncode == 2 and "does not match the checksum in its manifest" in r.stderr
    assert "nothing was restored" in r.stderr
    assert not target.exists()

    (damaged / "manifest.json").unlink()
    r = restore(blueprint_file, damaged, target)
    assert r.returncode == 2 and "no manifest.json" in r.stderr
    assert not target.exists()

    # the good backup restores into that target, and a server started on it resolves
    r = restore(blueprint_file, good, target)
    assert r.returncode == 0, r.stdout + r.stderr
    again = make_server(settings.with_overrides(data_dir=str(target)))
    with grpc.insecure_channel(f"127.0.0.1:{again.port}") as channel:
        got = resolver_pb2_grpc.IdentityResolverStub(channel).Resolve(resolve_req(external_id="b-1"), timeout=10)
    assert got.outcome == pb.OUTCOME_MATCHED
    r = restore(blueprint_file, good, target)  # and never over a store
    assert r.returncode == 2 and "is not empty" in r.stderr


def test_a_backup_holds_no_byte_of_a_customer_forgotten_before_it(
        tmp_path: Path, settings: Settings, blueprint_file: Path, make_server: Callable[[Settings], Any]) -> None:
    canaries = ["CANARY-EXT-BK9Q", "canary.bk9q@backup-test.example", "Canary Bk9q Name"]
    server = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = resolver_pb2_grpc.IdentityResolverStub(channel)
        for i in range(40):  # neighbours: the canary's pages stay in use after it goes
            stub.Upsert(upsert_req(external_id=f"n-{i}", emails=(f"n{i}@example.com",), attributes={"name": f"N{i}"}),
                        timeout=10)
            if i == 20:
                gone = stub.Upsert(upsert_req(external_id=canaries[0], emails=(canaries[1],),
                                              attributes={"name": canaries[2]}), timeout=10).customer_uuid
        stub.Forget(pb.ForgetRequest(idempotency_key="forget-1", customer_uuid=gone, reason="ticket 1"), timeout=10)
    live = (Path(settings.server.data_dir) / "data.mdb").read_bytes()
    assert [c for c in canaries if c.encode() in live], "LMDB left no byte of the erased customer to find"

    r = backup(settings, blueprint_file, tmp_path / "backup")
    assert r.returncode == 0, r.stdout + r.stderr
    files = {p.name: p.read_bytes() for p in (tmp_path / "backup").iterdir()}
    assert [(c, name) for c in canaries for name, blob in files.items() if c.encode() in blob] == []
