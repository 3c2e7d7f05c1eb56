"""An initial load (resolver.importer.commit): all or nothing, even under kill -9; the map checked first; and
keys derived from a row's normalized content (resolver.importer.prepare), so that an edited file replays its
unchanged rows and a phone-only row is never created twice."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import grpc
import pytest

from resolver import datalock
from resolver.check import find_problems
from resolver.config import Settings, load_settings
from resolver.errors import StoreError
from resolver.importer import staged
from resolver.store import Store
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.integration.helpers import phone, resolve_req
from tests.integration.serve import serving
from tests.integration.test_import_check import (
    records_by_external_id,
    resolver_cli,
    run_import_in_process,
    summary,
    write_jsonl,
)

CONTENT = ("records", "ix_external", "ix_email", "ix_phone", "ledger", "ledger_exp", "changes", "pii_refs")


def counts(settings: Settings) -> dict[str, int]:
    with closing(Store(settings)) as store, store.read() as view:
        assert find_problems(view) == []
        return {name: view.count(name) for name in CONTENT}


def big_rows(n: int) -> list[dict[str, Any] | str]:
    return [{"identifiers": {"externalId": f"K-{i:06d}", "emails": [f"k{i}@example.com"]},
             "attributes": {"name": f"Customer {i}", "tier": "gold"}} for i in range(n)]


@pytest.mark.process
def test_a_kill_9_during_an_initial_load_leaves_an_empty_store_and_the_load_runs_again(tmp_path: Path) -> None:
    # enough rows that the progress bar shows the load part way on a fast machine (40,000 went by between two of
    # its refreshes once), and past one unsynced commit of the copy (staged.COMMIT_ROWS)
    n = 120_000
    source = write_jsonl(tmp_path / "big.jsonl", big_rows(n))
    data = tmp_path / "data"
    # stderr on a terminal, so that the progress bar shows how far the load has got
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "resolver", "import", str(source), "--data-dir", str(data),
                             "--batch-size", "500"], cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    shown = b""
    done = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                shown += os.read(master, 1 << 16)
            except OSError:
                break
            done = max([int(m) for m in re.findall(rb"(\d+)/%d" % n, shown)] or [0])
            if done >= 1000:  # two batches are in the load's transaction, not committed
                break
        assert proc.poll() is None, f"the import ended before it could be killed: {shown[-500:]!r}"
        assert 0 < done < n, shown[-500:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
        assert proc.stdout is not None
        printed = proc.stdout.read()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert b"import:" not in printed  # no summary: it died mid-load

    # the load was being built beside the store (nothing else had it open): its copy is left, the store untouched
    assert len(list(data.glob(staged.STAGE_PREFIX + "*"))) == 1
    settings = load_settings(None, data_dir=str(data))
    assert counts(settings) == dict.fromkeys(CONTENT, 0)  # not a partial store: an empty one
    check = resolver_cli("check", "--data-dir", data, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 records" in check.stdout

    again = resolver_cli("import", source, "--data-dir", data, "--no-progress", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert summary(again.stdout)["created"] == n and "an initial load into an empty store" in again.stdout
    assert counts(settings)["records"] == n
    assert not list(data.glob(staged.STAGE_PREFIX + "*"))  # the killed load's copy is gone


def test_an_initial_load_that_cannot_fit_the_map_commits_nothing(tmp_path: Path) -> None:
    blueprint = tmp_path / "small.toml"
    blueprint.write_text(textwrap.dedent("""
        version = 1
        [storage]
        map_size_mb = 16
        """))
    settings = load_settings(blueprint, data_dir=str(tmp_path / "data"))
    # ~7 MB of rows: refused before any work (a load needs several bytes of map per byte of input)
    source = write_jsonl(tmp_path / "rows.jsonl", big_rows(60_000))
    result = resolver_cli("import", source, "--config", blueprint, "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert result.returncode == 2
    assert "needs about" in result.stderr and "raise [storage] map_size_mb" in result.stderr
    assert "nothing was committed" in result.stderr and summary(result.stdout)["created"] == 0
    assert counts(settings)["records"] == 0
    # ~2 MB: past the check, but the map fills up during the load: still nothing committed
    source = write_jsonl(tmp_path / "rows.jsonl", big_rows(18_000))
    result = resolver_cli("import", source, "--config", blueprint, "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert "the LMDB map is full" in result.stderr and "nothing was committed" in result.stderr
    assert counts(settings) == dict.fromkeys(CONTENT, 0)


@pytest.mark.process
def test_an_initial_load_while_a_server_serves_runs_in_place_and_the_server_answers_from_it(
        tmp_path: Path, settings: Settings, blueprint_file: Path) -> None:
    data = Path(settings.server.data_dir)
    source = write_jsonl(tmp_path / "rows.jsonl", big_rows(300))
    with serving(blueprint_file, data, tmp_path / "server.log") as announced, \
            grpc.insecure_channel(f"127.0.0.1:{announced.port}") as channel:
        stub = resolver_pb2_grpc.IdentityResolverStub(channel)
        assert stub.Resolve(resolve_req(emails=("k7@example.com",)), timeout=10).outcome == pb.OUTCOME_NOT_FOUND
        result = resolver_cli("import", source, "--config", blueprint_file, "--data-dir", data, "--no-progress",
                              cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        # the server has the store open: nothing may replace its file, so the load is one transaction in it
        assert "an initial load into an empty store, committed in one transaction" in result.stdout, result.stdout
        assert not list(data.glob(staged.STAGE_PREFIX + "*"))
        answer = stub.Resolve(resolve_req(emails=("k7@example.com",)), timeout=10)
        assert answer.outcome == pb.OUTCOME_MATCHED and answer.attributes["name"] == "Customer 7"
    assert counts(settings)["records"] == 300


def test_a_load_whose_store_was_written_meanwhile_is_not_put_in_place(tmp_path: Path, settings: Settings) -> None:
    data = Path(settings.server.data_dir)
    with ExitStack() as stack:
        stage = staged.begin(settings, stack)
        assert stage is not None and stage.work.parent == data
        with pytest.raises(StoreError, match="being rewritten"), datalock.serving(data):
            pass  # no server starts while a load is being built
        with closing(Store(stage.settings, durable=False)) as copy, copy.write() as view:
            view.txn.put(b"loaded", b"1", db=copy.db["meta"])
        with closing(Store(settings)) as store, store.write() as view:  # what no process should do meanwhile
            view.txn.put(b"written", b"1", db=store.db["meta"])
        before = (data / "data.mdb").stat().st_ino
        with pytest.raises(StoreError, match="not put in place, the store is unchanged: the store changed during"):
            staged.install(stage, Store(stage.settings, durable=False))
        assert (data / "data.mdb").stat().st_ino == before
    assert not list(data.glob(staged.STAGE_PREFIX + "*"))  # removed with the stage
    with closing(Store(settings)) as store, store.read() as view:
        meta = store.db["meta"]
        assert view.txn.get(b"written", db=meta) == b"1" and view.txn.get(b"loaded", db=meta) is None


def test_an_import_into_a_store_with_customers_runs_in_place_and_leaves_the_directory_free(
        tmp_path: Path, settings: Settings) -> None:
    assert run_import_in_process(settings, write_jsonl(tmp_path / "rows.jsonl", big_rows(20))) == 0
    with ExitStack() as stack:
        assert staged.begin(settings, stack) is None  # incremental: durable per batch, in the store itself
        with datalock.serving(Path(settings.server.data_dir)):
            pass  # a server may start while an incremental import runs


def test_a_copy_a_killed_rewrite_left_goes_at_the_next_lock_of_the_directory(
        tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    data = Path(settings.server.data_dir)
    Store(settings).close()
    for lock in (datalock.serving, datalock.exclusive):  # a server or backup starting; compact, reindex, a load
        left = [data / f"{prefix}killed" for prefix in datalock.COPY_PREFIXES]
        for copy in left:
            copy.mkdir()
            (copy / "data.mdb").write_bytes(b"\0" * (3 << 20))
        with caplog.at_level("WARNING", logger="resolver.datalock"), lock(data):
            assert not any(copy.exists() for copy in left)
        assert sum("(3 MB), left by a `resolver compact` or initial load" in m for m in caplog.messages) == 2
        caplog.clear()
    assert (data / "data.mdb").is_file() and counts(settings) == dict.fromkeys(CONTENT, 0)


def keyless(ext: str | None, name: str, *, phones: tuple[str, ...] = (), emails: tuple[str, ...] = ()) -> dict[str, Any]:
    ids: dict[str, Any] = {"phones": list(phones), "emails": list(emails)}
    if ext is not None:
        ids["externalId"] = ext
    return {"identifiers": ids, "attributes": {"name": name}}


def test_reimporting_an_edited_file_replays_its_unchanged_rows(settings: Settings,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = settings.server.data_dir.parent
    first = [keyless(f"E-{i}", f"Name {i}", phones=(phone(i),)) for i in range(20)]
    first.append(keyless(None, "Walk-in", phones=(phone(500),)))  # phone only: a phone never selects a customer
    assert run_import_in_process(settings, write_jsonl(folder / "v1.jsonl", first)) == 0
    assert summary(capsys.readouterr().out)["created"] == 21

    # the edit: two rows inserted at the top (every line moves), one changed, one dropped, the phone-only row
    # written in another notation (the same normalized content)
    edited = [keyless("E-new", "Newcomer"), keyless(None, "Walk-in 2", phones=(phone(501),))]
    edited += [keyless(f"E-{i}", "Renamed" if i == 7 else f"Name {i}", phones=(phone(i),)) for i in range(20) if i != 3]
    edited.append(keyless(None, "Walk-in", phones=("(650) 253-0500",)))
    assert run_import_in_process(settings, write_jsonl(folder / "v2.jsonl", edited)) == 0
    got = summary(capsys.readouterr().out)
    assert got == {"rows": 22, "created": 2, "updated": 1, "unchanged": 0, "replayed": 19, "rejected": 0}
    records = records_by_external_id(settings)
    assert records["E-7"].attributes == {"name": "Renamed"} and records["E-3"].attributes == {"name": "Name 3"}
    walk_ins = [r for r in records_by_external_id_all(settings) if r.external_id is None]
    assert sorted(r.attributes["name"] for r in walk_ins) == ["Walk-in", "Walk-in 2"]  # no second "Walk-in"


def records_by_external_id_all(settings: Settings) -> list[Any]:
    with closing(Store(settings)) as store, store.read() as view:
        return list(view.iter_records())


def test_equal_rows_of_one_file_are_each_a_write_and_replay_as_such(settings: Settings,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = settings.server.data_dir.parent
    rows: list[dict[str, Any] | str] = [
        keyless(None, "Twin", phones=(phone(1),)),
        keyless(None, "Twin", phones=(phone(1),)),  # the same content again: a second walk-in, not a replay
        keyless("T-1", "A"), keyless("T-1", "B"), keyless("T-1", "A"),  # set, changed, set back
    ]
    source = write_jsonl(folder / "twins.jsonl", rows)
    assert run_import_in_process(settings, source) == 0
    assert summary(capsys.readouterr().out) == {"rows": 5, "created": 3, "updated": 2, "unchanged": 0, "replayed": 0,
                                                "rejected": 0}
    assert records_by_external_id(settings)["T-1"].attributes == {"name": "A"}
    assert run_import_in_process(settings, source) == 0  # each occurrence has its own key: all five replay
    assert summary(capsys.readouterr().out)["replayed"] == 5
    assert len(records_by_external_id_all(settings)) == 3
