"""The bulk path of `resolver import` (resolver.bulk): plain creates written from pre-encoded bytes must leave
exactly the store `resolver.upsert.apply` leaves, row for row, database for database; and an initial load (one
transaction, appends, `apply` unnested; or built beside the store in several unsynced commits and put in place)
exactly the store an import committed batch by batch leaves."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lmdb
import pytest

from resolver import bulk, uuids
from resolver import importer as importer_main
from resolver.attributes import AttributeSchema
from resolver.check import find_problems
from resolver.cli import build_parser
from resolver.config import Settings, load_settings
from resolver.identifiers import RawIdentifiers, policy_from
from resolver.importer import prepare as importer_prepare
from resolver.importer import run_import, staged
from resolver.importer.jsonl import simple_input
from resolver.store import Store
from resolver.upsert import UpsertInput, _change_entry, _result, _updated, planned_create, prepare
from tests.integration.helpers import phone
from tests.integration.test_import_check import summary, write_jsonl


def dump(settings: Settings) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every (key, value) of every named database (every duplicate of the dupsort indexes), in key order."""
    with closing(Store(settings)) as store, store.read() as view:
        assert set(store.db) >= {"records", "ix_phone", "ledger", "changes", "pii_refs"}
        out = {}
        for name, db in store.db.items():
            with view.txn.cursor(db=db) as cur:
                out[name] = [(bytes(k), bytes(v)) for k, v in cur.iternext(keys=True, values=True)]
        return out


class CountingUuids(uuids.LoadUuids):
    """An import's uuids without their random bits: the same line gives the same uuid in every run."""

    def for_line(self, line: int) -> str:
        return uuids.text(uuids.uuid7_int(self.unix_ms, self.seed + line, 0))


def deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, the same uuids and clock readings in the same order as after any other call (each import a
    start time of its own)."""
    starts = itertools.count(1_700_000_000_000)
    clock = itertools.count(1_800_000_000_000_000, 1000)

    class Starts:
        @staticmethod
        def start() -> uuids.LoadUuids:
            return CountingUuids(next(starts), 0)

    monkeypatch.setattr(importer_main, "LoadUuids", Starts)
    monkeypatch.setattr(importer_prepare, "now_us", lambda: next(clock))


def run(settings: Settings, source: Path, *args: str) -> int:
    return run_import(settings, build_parser().parse_args(["import", str(source), "--no-progress", *args]))


def rows() -> list[dict[str, Any] | str]:
    """Creates, and everything that must not take the shortcut: a row repeating an earlier external_id, email
    or phone (in the same batch or an earlier one), customer_uuid / expected_version / removals, rejects of
    both kinds (invalid, and refused only when applied), an explicit key used twice, placeholders."""
    out: list[dict[str, Any] | str] = []
    for i in range(60):
        row: dict[str, Any] = {"identifiers": {"externalId": f"B-{i}", "emails": [f"B.{i}@Example.com"],
                                               "phones": [phone(i)]},
                               "attributes": {"name": f"Customer {i}", "tier": "gold", "clear_me": None}}
        if i % 7 == 3:
            row["identifiers"]["phones"].append(phone(i - 1))  # a household line: a create with a duplicate
        if i % 11 == 5:
            row["identifiers"]["emails"] = [f"b.{i - 2}@example.com"]  # an existing email: an update of B-(i-2)?
            row["identifiers"].pop("externalId")
        if i % 13 == 4:
            row["identifiers"]["externalId"] = f"B-{i - 1}"  # an update of the row before (maybe the same batch)
        if i % 17 == 9:
            row["identifiers"]["phones"] = ["anonymous", phone(900 + i)]  # a placeholder: skipped
        out.append(row)
    out += [
        {"identifiers": {"externalId": "B-0"}, "attributes": {"tier": "silver"}},  # update
        {"identifiers": {"externalId": "B-1"}, "attributes": {"name": "Customer 1", "tier": "gold"}},  # unchanged
        {"identifiers": {"externalId": "B-2", "emails": ["b.3@example.com"]}},  # ext held by B-2, email by B-3
        {"identifiers": {"externalId": "NEW-1", "emails": ["b.4@example.com"]}},  # email of B-4 (other ext): create
        {"identifiers": {"externalId": "B-5"}, "expectedVersion": 9},  # ABORTED
        {"customerUuid": "3f1c6f0e-1d3a-4a53-9a70-0c0a3ea52f00", "attributes": {"name": "x"}},  # NOT_FOUND
        {"identifiers": {"phones": ["12345"]}},  # invalid
        "{not json",
        {"idempotencyKey": "explicit-1", "identifiers": {"externalId": "E-1", "phones": [phone(500)]}},
        {"idempotencyKey": "explicit-1", "identifiers": {"externalId": "E-1", "phones": [phone(500)]}},  # replay
        {"idempotencyKey": "explicit-1", "identifiers": {"externalId": "E-2"}},  # key reused: refused
        {"identifiers": {"externalId": "R-1", "emails": ["r@example.com"]},
         "removeIdentifiers": {"emails": ["nobody@example.com"]}},  # a create with a removal: apply decides
        {"identifiers": {"externalId": "B-6"}, "removeIdentifiers": {"externalId": "B-6"}},
    ]
    for i in range(30):  # a switchboard: past max_fanout (25) holders, a phone names no potential duplicate
        out.append({"identifiers": {"externalId": f"S-{i}", "phones": [phone(700)]}, "attributes": {"n": i}})
    for i in range(40):  # a second wave: creates after all of that
        out.append({"identifiers": {"externalId": f"C-{i}", "phones": [phone(600 + i)]}, "attributes": {"n": i}})
    return out


def test_the_bulk_path_writes_exactly_what_apply_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    first = write_jsonl(tmp_path / "first.jsonl", rows()[:30])
    source = write_jsonl(tmp_path / "rows.jsonl", rows())
    results = {}
    for path in ("bulk", "apply"):
        if path == "apply":
            monkeypatch.setattr(bulk.BulkWriter, "try_create", lambda self, planned: False)
        deterministic(monkeypatch)
        settings = load_settings(None, data_dir=str(tmp_path / path), default_region="US")
        run(settings, first, "--batch-size", "8")  # customers that exist before the file is imported
        capsys.readouterr()
        code = run(settings, source, "--batch-size", "16", "--rejects", str(tmp_path / f"{path}.rejected.jsonl"))
        counts = summary(capsys.readouterr().out)
        again = run(settings, source, "--batch-size", "16", "--rejects", str(tmp_path / f"{path}.again.jsonl"))
        recount = summary(capsys.readouterr().out)
        with closing(Store(settings)) as store, store.read() as view:
            assert find_problems(view) == []
        results[path] = (code, counts, again, recount, dump(settings),
                         (tmp_path / f"{path}.rejected.jsonl").read_text())
    bulk_run, apply_run = results["bulk"], results["apply"]
    assert bulk_run[4].keys() == apply_run[4].keys()
    for name in bulk_run[4]:
        assert bulk_run[4][name] == apply_run[4][name], f"{name} differs between the bulk path and apply"
    assert bulk_run[0] == apply_run[0] == 1  # some rows rejected
    assert bulk_run[1] == apply_run[1]
    assert bulk_run[1]["created"] > 60 and bulk_run[1]["updated"] >= 3 and bulk_run[1]["unchanged"] >= 1
    # the 30 rows of `first` replay (their keys come from their content), and the repeated explicit key
    assert bulk_run[1]["replayed"] == 31 and bulk_run[1]["rejected"] == 5
    assert bulk_run[2:4] == apply_run[2:4]
    assert bulk_run[3]["created"] == bulk_run[3]["updated"] == 0  # the re-import replays every row
    assert bulk_run[3]["replayed"] == bulk_run[1]["rows"] - bulk_run[1]["rejected"]
    assert bulk_run[5] == apply_run[5]  # the same rejects, the same reasons


def test_most_rows_of_a_load_take_the_bulk_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    taken: list[bool] = []
    original = bulk.BulkWriter.try_create

    def spy(self: bulk.BulkWriter, planned: bulk.Planned) -> bool:
        taken.append(original(self, planned))
        return taken[-1]

    monkeypatch.setattr(bulk.BulkWriter, "try_create", spy)
    settings = load_settings(None, data_dir=str(tmp_path / "data"))
    source = write_jsonl(tmp_path / "load.jsonl", [
        {"identifiers": {"externalId": f"L-{i}", "phones": [phone(i // 2 * 2)]}} for i in range(100)  # pairs share
    ])
    assert run(settings, source, "--batch-size", "10") == 0
    assert summary(capsys.readouterr().out)["created"] == 100
    assert taken.count(True) == 100  # a shared phone selects nobody: still a create, its holders named after
    with closing(Store(settings)) as store, store.read() as view:
        answers = {r["customer_uuid"]: r["potential_duplicates"]
                   for r in (json.loads(v)["response"] for _, v in view.txn.cursor(db=store.db["ledger"]))}
        by_ext = {r.external_id: r.uuid for r in view.iter_records()}
    for i in range(0, 100, 2):  # each pair's second names the first; the first was alone at its turn
        first, second = by_ext[f"L-{i}"], by_ext[f"L-{i + 1}"]
        assert answers[first] == [] and answers[second] == [first]

    taken.clear()
    source = write_jsonl(tmp_path / "mail.jsonl", [
        {"identifiers": {"externalId": f"M-{i}", "emails": [f"m{i // 2}@example.com"]}} for i in range(100)
    ])
    assert run(settings, source, "--batch-size", "10") == 0
    assert summary(capsys.readouterr().out)["created"] == 100
    assert taken.count(True) == 50 and taken.count(False) == 50  # an email may select: the second needs apply


def test_planned_create_is_what_apply_makes_of_a_create() -> None:
    settings = load_settings(None, default_region="US")
    schema, policy = AttributeSchema(settings), policy_from(settings)
    inputs = [
        UpsertInput("k1", RawIdentifiers("X-1", ("A@Example.com", "a@example.com"), (phone(1), "(650) 253-0001")),
                    {"name": "Ann", "n": 3.0, "gone": None, "flag": False}, source_system="CRM"),
        UpsertInput("k2", RawIdentifiers(phones=(phone(2), "anonymous"))),
        UpsertInput("k3", RawIdentifiers(emails=("b@example.com",)), {"s": " text "}),
    ]
    for inp in inputs:
        cmd = prepare(inp, settings, schema, policy, now_us=123, new_uuid=str(uuid.uuid4()))
        planned = planned_create(cmd)
        assert planned is not None
        rec, change, result = planned
        want, changes = _updated(None, cmd)
        assert rec == want and rec.encode() == want.encode()
        assert change == _change_entry(cmd, want, "CREATED", changes)
        assert result == _result(cmd, want, "CREATED", ())
    cmd = prepare(UpsertInput("k4", RawIdentifiers("X-2"), expected_version=1), settings, schema, policy, now_us=1)
    assert planned_create(cmd) is None


def crash_in_the_third_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = 0
    original = bulk.BulkWriter.flush

    def crash(self: bulk.BulkWriter) -> None:
        nonlocal flushes
        flushes += 1
        if flushes == 3:
            raise lmdb.DiskError("simulated: the disk went away")
        original(self)

    monkeypatch.setattr(bulk.BulkWriter, "flush", crash)


def test_a_failed_batch_of_an_incremental_import_leaves_the_batches_before_it_and_the_import_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(None, data_dir=str(tmp_path / "data"))
    source = write_jsonl(tmp_path / "crash.jsonl", [{"identifiers": {"externalId": f"K-{i}", "phones": [phone(i)]}}
                                                    for i in range(50)])
    crash_in_the_third_flush(monkeypatch)
    assert run(settings, source, "--batch-size", "10", "--commit-every-batch") == 2
    out, err = capsys.readouterr()
    assert "storage error" in err and "rows up to line 20 are committed" in err
    assert "initial load" not in out
    with closing(Store(settings)) as store, store.read() as view:
        assert sorted(r.external_id or "" for r in view.iter_records()) == sorted(f"K-{i}" for i in range(20))
        assert view.count("ledger") == 20 and view.count("changes") == 20
        assert find_problems(view) == []

    monkeypatch.undo()
    assert run(settings, source, "--batch-size", "10") == 0  # the store holds customers: incremental
    counts = summary(capsys.readouterr().out)
    assert counts["replayed"] == 20 and counts["created"] == 30
    with closing(Store(settings)) as store, store.read() as view:
        assert view.count("records") == 50 and [c["seq"] for c in view.iter_changes()] == list(range(1, 51))


@pytest.mark.parametrize("commit_rows", [staged.COMMIT_ROWS, 10])  # the copy: one commit, or one per batch
def test_a_failed_initial_load_leaves_an_empty_store_and_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    commit_rows: int) -> None:
    settings = load_settings(None, data_dir=str(tmp_path / "data"))
    source = write_jsonl(tmp_path / "crash.jsonl", [{"identifiers": {"externalId": f"K-{i}", "phones": [phone(i)]}}
                                                    for i in range(50)])
    monkeypatch.setattr(staged, "COMMIT_ROWS", commit_rows)
    crash_in_the_third_flush(monkeypatch)
    assert run(settings, source, "--batch-size", "10") == 2
    out, err = capsys.readouterr()
    assert "storage error" in err and "nothing was committed" in err and "initial load" not in out
    assert not list((tmp_path / "data").glob(staged.STAGE_PREFIX + "*"))  # the copy was removed
    with closing(Store(settings)) as store, store.read() as view:
        assert [view.count(name) for name in ("records", "ledger", "ledger_exp", "changes", "pii_refs", "ix_phone")] == [
            0, 0, 0, 0, 0, 0]
        assert find_problems(view) == []

    monkeypatch.undo()
    assert run(settings, source, "--batch-size", "10") == 0
    out = capsys.readouterr().out
    assert summary(out)["created"] == 50 and "an initial load into an empty store" in out
    with closing(Store(settings)) as store, store.read() as view:
        assert view.count("records") == 50 and [c["seq"] for c in view.iter_changes()] == list(range(1, 51))
        assert find_problems(view) == []


@contextmanager
def held_open(settings: Settings) -> Iterator[None]:
    """Another process with the store's LMDB environment open (as a server's workers have it) for the block."""
    Store(settings).close()  # made first, as a server makes it
    with subprocess.Popen([sys.executable, "-c", "import lmdb, sys; env = lmdb.open(sys.argv[1], max_dbs=64); "
                           "print('open', flush=True); sys.stdin.read()", str(settings.server.data_dir)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline() == "open\n"
            yield
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)


def test_an_initial_load_leaves_exactly_what_an_import_batch_by_batch_leaves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "rows.jsonl", rows())
    monkeypatch.setattr(staged, "COMMIT_ROWS", 20)  # the staging copy committed every other batch
    results = {}
    said = {"initial": "built beside it and put in place whole", "in-place": "committed in one transaction"}
    for mode, extra in (("initial", ()), ("in-place", ()), ("every-batch", ("--commit-every-batch",))):
        deterministic(monkeypatch)
        settings = load_settings(None, data_dir=str(tmp_path / mode), default_region="US")
        with held_open(settings) if mode == "in-place" else nullcontext():
            code = run(settings, source, "--batch-size", "16", "--rejects", str(tmp_path / f"{mode}.rejected.jsonl"),
                       *extra)
        out = capsys.readouterr().out
        assert ("an initial load into an empty store" in out) == (mode != "every-batch")
        assert mode not in said or said[mode] in out, out
        again = run(settings, source, "--batch-size", "16", "--rejects", str(tmp_path / f"{mode}.again.jsonl"))
        recount = summary(capsys.readouterr().out)
        with closing(Store(settings)) as store, store.read() as view:
            assert find_problems(view) == []
        results[mode] = (code, summary(out), again, recount, dump(settings),
                         (tmp_path / f"{mode}.rejected.jsonl").read_text())
    initial, batched = results["initial"], results["every-batch"]
    assert results["in-place"] == initial  # staged or in one transaction: the same store, answers and rejects
    assert initial[0] == batched[0] == 1 and initial[1] == batched[1] and initial[2:4] == batched[2:4]
    assert initial[1]["created"] > 60 and initial[1]["updated"] >= 3 and initial[1]["rejected"] == 5
    assert initial[3]["replayed"] == initial[1]["rows"] - initial[1]["rejected"]  # the re-import replays every row
    assert initial[4].keys() == batched[4].keys()
    for name in initial[4]:
        assert initial[4][name] == batched[4][name], f"{name} differs between an initial load and batch commits"
    assert initial[5] == batched[5]  # the same rejects, the same reasons
    assert all(uuid.UUID(bytes=k).version == 7 for k, _ in initial[4]["records"])
    created = [json.loads(v)["customer_uuid"] for _, v in initial[4]["changes"] if json.loads(v)["action"] == "CREATED"]
    assert len(created) == initial[1]["created"] and created == sorted(created)  # uuids follow the file's order


@pytest.mark.parametrize("line", [
    '{"identifiers": {"externalId": "A", "externalId": "B"}}',
    '{"identifiers": {"externalId": "A"}, "identifiers": {"externalId": "B"}}',
    '{"attributes": {"name": "a", "name": "b"}}',
    '{"attributes": {"name": "a", "na\\u006de": "b"}}',
    '{"attributes": {"a/b": 1, "a\\/b": 2}}',
])
def test_repeated_keys_never_take_the_json_fast_path(line: str) -> None:
    assert simple_input(line) is None
