"""`resolver compact` on real data directories: the bytes of deleted customers leave every file, everything else
stays as it was, and the store is never replaced under a process that has it open."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import grpc
import lmdb
import pytest

from resolver import compact, datalock
from resolver.compact import copy_live, run_compact
from resolver.config import Settings
from resolver.errors import StoreError
from resolver.store import INDEX_NAMES, Store, Txn, uuid_bytes, uuid_text
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.serve import launched

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^compact: .+: (?P<before>\d+) -> (?P<after>\d+) bytes, (?P<entries>\d+) entries in "
                     r"(?P<dbs>\d+) databases, in [\d.]+s$", re.MULTILINE)
BUSY = "stop it before compacting"


def resolver_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resolver", *map(str, args)], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def found_in(data_dir: Path, needles: list[bytes]) -> dict[bytes, list[str]]:
    """Each needle and the files under `data_dir` whose bytes hold it (needles found nowhere are left out)."""
    files = {p: p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}
    hits = {n: [p.name for p, blob in files.items() if n in blob] for n in needles}
    return {n: where for n, where in hits.items() if where}


def fingerprint(path: Path) -> tuple[int, str]:
    return path.stat().st_ino, hashlib.sha256(path.read_bytes()).hexdigest()


def records(settings: Settings) -> dict[str, bytes]:
    with closing(Store(settings, readonly=True)) as store, store.read() as view:
        return {rec.uuid: rec.encode() for rec in view.iter_records()}


@dataclass(frozen=True)
class Person:
    external_id: str
    email: str
    phone: str
    name: str

    def needles(self) -> list[bytes]:
        return [v.encode() for v in (self.external_id, self.email, self.phone, self.name)]


KEEPERS = [Person(f"KEEP-{i:04d}", f"keeper.{i}@example.com", phone(i), f"Keeper Number {i}") for i in range(150)]
DOOMED = [Person("ERASE-ME-7Q1", "quentin.xylo.7q1@erasure-test.example", phone(9101), "Quentin Xylophage"),
          Person("ERASE-ME-7Q2", "ursula.zephyr.7q2@erasure-test.example", phone(9102), "Ursula Zephyrine")]


def upsert(stub: resolver_pb2_grpc.IdentityResolverStub, p: Person, tier: str) -> str:
    r = stub.Upsert(upsert_req(external_id=p.external_id, emails=(p.email,), phones=(p.phone,),
                               attributes={"name": p.name, "tier": tier}))
    return r.customer_uuid


def answers(stub: resolver_pb2_grpc.IdentityResolverStub, people: list[Person]) -> list[bytes]:
    """Resolve each person by each identifier: the responses, serialized deterministically."""
    out = []
    for p in people:
        for ids in ({"external_id": p.external_id}, {"emails": (p.email,)}, {"phones": (p.phone,)}):
            r = stub.Resolve(resolve_req(**ids, fields=("name", "tier")))
            out.append(r.SerializeToString(deterministic=True))
    return out


def forget(view: Txn, uid: bytes) -> None:
    """Simulate the erasure of customer `uid` (the real DELETE is resolver.erase's): its record and index entries
    go, and so does every other entry keyed by its uuid or copying it (change log, ledger responses)."""
    rec = view.record(uid)
    assert rec is not None
    for kind, value in rec.identifiers():
        view.index_remove(kind, value, uid)
    view.delete_record(uid)
    text = uuid_text(uid).encode()
    ledger_keys: set[bytes] = set()
    for name, db in view.store.db.items():
        if name in INDEX_NAMES.values():
            continue
        with view.txn.cursor(db=db) as cur:
            doomed = [bytes(k) for k, v in cur if bytes(k).startswith(uid) or text in v]
        for k in doomed:
            view.txn.delete(k, db=db)
        if name == "ledger":
            ledger_keys.update(doomed)
    with view.txn.cursor(db=view.store.db["ledger_exp"]) as cur:  # the sweeper's order of those ledger entries
        expiring = [bytes(k) for k, _ in cur if bytes(k)[8:] in ledger_keys]
    for k in expiring:
        view.txn.delete(k, db=view.store.db["ledger_exp"])


# -- erasure end to end --------------------------------------------------------------------------------------


@pytest.mark.process
def test_compact_leaves_no_byte_of_deleted_customers_and_keeps_every_other(make_server, settings: Settings,
                                                                           blueprint_file: Path) -> None:  # noqa: ANN001
    data = Path(settings.server.data_dir)
    server = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = resolver_pb2_grpc.IdentityResolverStub(channel)
        doomed_uids = []
        for i, p in enumerate(KEEPERS):
            upsert(stub, p, "gold")
            if i in (40, 90):  # among the others, so that they share pages
                doomed_uids.append(upsert(stub, DOOMED[len(doomed_uids)], "gold"))
        for tier in ("silver", "bronze"):  # more versions: more copies of their bytes
            for p in DOOMED:
                upsert(stub, p, tier)
        before = answers(stub, KEEPERS)
    server.stop(grace=0)

    with closing(Store(settings)) as store, store.write() as view:
        for uid in doomed_uids:
            forget(view, uuid_bytes(uid))
    kept = records(settings)
    assert len(kept) == len(KEEPERS)
    needles = [n for p in DOOMED for n in p.needles()]
    assert set(found_in(data, needles)) == set(needles)  # before compaction: every one of them is still there

    result = resolver_cli("compact", "--config", blueprint_file, "--data-dir", data)
    assert result.returncode == 0, result.stderr
    m = SUMMARY.search(result.stdout)
    assert m, result.stdout
    assert int(m["after"]) < int(m["before"]) and int(m["entries"]) > len(KEEPERS)

    assert found_in(data, needles) == {}  # in no file of the data directory
    assert sorted(p.name for p in data.iterdir()) == ["data.mdb", datalock.LOCK_FILE]  # lock.mdb: made on open
    check = resolver_cli("check", "--config", blueprint_file, "--data-dir", data)
    assert check.returncode == 0 and "check: OK" in check.stdout, check.stdout + check.stderr
    assert records(settings) == kept
    assert set(found_in(data, [n for p in KEEPERS[::10] for n in p.needles()])) == {
        n for p in KEEPERS[::10] for n in p.needles()}

    again = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{again.port}") as channel:
        stub = resolver_pb2_grpc.IdentityResolverStub(channel)
        assert answers(stub, KEEPERS) == before
        for p in DOOMED:
            assert stub.Resolve(resolve_req(emails=(p.email,))).outcome == pb.OUTCOME_NOT_FOUND
        stub.Upsert(upsert_req(external_id="AFTER-1"))  # and it takes writes
    again.stop(grace=0)


# -- why compact rewrites the entries instead of using LMDB's compacting copy --------------------------------

VALUE = 150  # bytes: 20 entries of 8-byte keys fill one 4 KiB page; a node takes 166 bytes (≡ 6 mod 8)


def value(tag: bytes, i: int) -> bytes:
    """A 150-byte value that ends in a 6-byte token of its own."""
    return (b"%s-SECRET-%02d-" % (tag, i)).ljust(VALUE - 6, b".") + b"T%s%02d" % (tag[:3], i)


@pytest.mark.parametrize("lib_version", [0, 1], ids=["lmdb-0.9", "lmdb-1.0"])
def test_lmdb_compacting_copy_keeps_the_tail_of_a_deleted_entry_and_compact_keeps_nothing(
        tmp_path: Path, lib_version: int) -> None:
    """Twenty entries in one leaf page per database. In `mid`, the 11th is deleted: the nodes below it move up
    over it, and its bytes stay only in the freed page. In `low`, the last one put (the page's lowest node) is
    deleted: nothing moves, its bytes stay in the page's free gap, and the gap's edge is 6 bytes off a word
    boundary. LMDB's compacting copy leaves out the freed page and the gap, but copies the gap's edge: the deleted
    value's last 6 bytes."""
    env = lmdb.open(str(tmp_path / "src"), map_size=1 << 26, max_dbs=4, lib_version=lib_version)
    dbs = {tag: env.open_db(tag) for tag in (b"mid", b"low")}
    with env.begin(write=True) as txn:
        for tag, db in dbs.items():
            for i in range(20):
                txn.put(b"%08d" % i, value(tag, i), db=db)
    for tag, gone in ((b"mid", 10), (b"low", 19)):
        with env.begin(write=True) as txn:
            assert txn.delete(b"%08d" % gone, db=dbs[tag])
            assert txn.stat(dbs[tag])["leaf_pages"] == 1
    (tmp_path / "lmdb").mkdir()
    env.copy(str(tmp_path / "lmdb"), compact=True)
    (tmp_path / "ours").mkdir()
    copied = copy_live(env, tmp_path / "ours", map_size=1 << 26)
    env.close()
    assert copied.entries == {b"low": 19, b"mid": 19}

    deleted = {b"mid": value(b"mid", 10), b"low": value(b"low", 19)}
    source = (tmp_path / "src" / "data.mdb").read_bytes()
    theirs = (tmp_path / "lmdb" / "data.mdb").read_bytes()
    ours = (tmp_path / "ours" / "data.mdb").read_bytes()
    assert all(v in source for v in deleted.values())
    assert not any(v[:-6] in theirs for v in deleted.values())
    assert deleted[b"low"][-6:] in theirs, "LMDB's compacting copy no longer copies the edge of a page's free gap"
    assert deleted[b"mid"][-6:] not in theirs
    for v in deleted.values():
        assert v[:20] not in ours and v[-6:] not in ours
    live = [value(tag, i) for tag, gone in ((b"mid", 10), (b"low", 19)) for i in range(20) if i != gone]
    assert all(v in ours for v in live)


def test_many_deletions_in_shared_pages_leave_nothing(tmp_path: Path) -> None:
    """Hundreds of entries under random keys, one in ten deleted, each in its own transaction, with later writes:
    no deleted value, nor its own last 6 bytes, is in the rewritten file."""
    import random

    rnd = random.Random(7)
    env = lmdb.open(str(tmp_path / "src"), map_size=1 << 27, max_dbs=2)
    db = env.open_db(b"records")
    keys = [rnd.randbytes(16) for _ in range(2000)]
    values = [b"%05d-%s-Z%05d" % (i, b"x" * rnd.randint(20, 400), i) for i in range(len(keys))]
    with env.begin(write=True) as txn:
        for k, v in zip(keys, values, strict=True):
            txn.put(k, v, db=db)
    gone = rnd.sample(range(len(keys)), 200)
    for i in gone:
        with env.begin(write=True) as txn:
            txn.delete(keys[i], db=db)
    with env.begin(write=True) as txn:
        for j in range(50):
            txn.put(rnd.randbytes(16), b"later-%d" % j, db=db)
    (tmp_path / "ours").mkdir()
    copy_live(env, tmp_path / "ours", map_size=1 << 27)
    env.close()
    source = (tmp_path / "src" / "data.mdb").read_bytes()
    ours = (tmp_path / "ours" / "data.mdb").read_bytes()
    assert sum(values[i] in source for i in gone) > 0
    assert [i for i in gone if values[i][-6:] in ours] == []
    assert all(values[i] in ours for i in set(range(len(keys))) - set(gone))


# -- never under a process that has the store open -----------------------------------------------------------


@pytest.mark.process
def test_compact_refuses_while_a_server_process_serves_the_directory(tmp_path: Path, blueprint_file: Path) -> None:
    data = tmp_path / "data"
    with launched(blueprint_file, data, tmp_path / "serve.log", workers=1):
        before = fingerprint(data / "data.mdb")
        result = resolver_cli("compact", "--config", blueprint_file, "--data-dir", data)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"resolver: {data} is in use by a running server (`resolver serve`): {BUSY}")
        assert fingerprint(data / "data.mdb") == before
        assert not list(data.glob(compact.WORK_PREFIX + "*"))


@pytest.mark.process
def test_compact_refuses_while_any_process_has_the_store_open(make_server, settings: Settings,
                                                              blueprint_file: Path) -> None:  # noqa: ANN001
    """A server built in-process (no serve.lock) is seen through LMDB's own lock, from another process and from
    this one."""
    data = Path(settings.server.data_dir)
    server = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        resolver_pb2_grpc.IdentityResolverStub(channel).Upsert(upsert_req(external_id="OPEN-1"))
    before = fingerprint(data / "data.mdb")
    result = resolver_cli("compact", "--config", blueprint_file, "--data-dir", data)
    assert result.returncode == 2
    assert result.stderr.strip() == f"resolver: {data} is in use by process {os.getpid()}, which has the store open: {BUSY}"
    with pytest.raises(StoreError, match=f"in use by this process, which has the store open: {BUSY}"):
        run_compact(settings)
    assert fingerprint(data / "data.mdb") == before
    server.stop(grace=0)
    run_compact(settings)  # once it is closed


@pytest.mark.process
def test_a_server_does_not_start_while_compact_holds_the_directory(tmp_path: Path, settings: Settings,
                                                                   blueprint_file: Path) -> None:
    Store(settings).close()
    data = Path(settings.server.data_dir)
    with datalock.exclusive(data):
        r = subprocess.run([sys.executable, "-m", "resolver", "serve", "--config", str(blueprint_file), "--data-dir",
                            str(data), "--listen", "127.0.0.1:0", "--workers", "1"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"resolver: {data} is being rewritten (by `resolver compact`, `reindex` or an initial "
                                "load): start the server once it has finished")


# -- a failed step changes nothing ---------------------------------------------------------------------------


def small_store(settings: Settings) -> None:
    with closing(Store(settings)) as store, store.write() as view:
        view.txn.put(b"k", b"v", db=store.db["ledger"])


def test_a_copy_that_does_not_match_is_not_installed(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from resolver.cli import main as cli_main

    small_store(settings)
    data = Path(settings.server.data_dir)
    before = fingerprint(data / "data.mdb")
    real = compact.copy_live

    def short(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        copied = real(*args, **kw)
        return compact.Copied(copied.txnid, {**copied.entries, b"ledger": 2})

    monkeypatch.setattr(compact, "copy_live", short)
    assert cli_main(["compact", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"resolver: {data}: not compacted, the store is unchanged: "
                           "the copy does not hold what the store holds: ledger 1 (store 2)")
    assert fingerprint(data / "data.mdb") == before and (data / "lock.mdb").exists()
    assert not list(data.glob(compact.WORK_PREFIX + "*"))


@pytest.mark.process
def test_a_write_during_the_copy_is_not_lost(settings: Settings, blueprint_file: Path,
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A process that opens the store, writes and closes while the copy is made (after the first check): the copy
    is not installed."""
    small_store(settings)
    data = Path(settings.server.data_dir)
    rows = tmp_path / "one.jsonl"
    rows.write_text('{"identifiers": {"externalId": "LATE-1"}}\n')
    real = compact.verify_copy

    def verify_then_import(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        real(*args, **kw)
        r = resolver_cli("import", rows, "--config", blueprint_file, "--data-dir", data, "--no-progress")
        assert r.returncode == 0, r.stderr

    monkeypatch.setattr(compact, "verify_copy", verify_then_import)
    with pytest.raises(StoreError, match="not compacted, the store is unchanged: the store changed while it was "
                                         r"being copied \(transaction \d+, now \d+\): a process wrote to it"):
        run_compact(settings)
    assert any(b"LATE-1" in v for v in records(settings).values())
    assert not list(data.glob(compact.WORK_PREFIX + "*"))


def test_the_new_file_keeps_the_permissions_of_the_old(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    small_store(settings)
    data = Path(settings.server.data_dir) / "data.mdb"
    data.chmod(0o640)
    assert run_compact(settings) == 0
    assert SUMMARY.search(capsys.readouterr().out)
    assert data.stat().st_mode & 0o777 == 0o640
    assert records(settings) == {}


@pytest.mark.process
def test_a_process_that_opens_the_store_during_the_swap_fails_instead_of_splitting_it(settings: Settings) -> None:
    """While `replacing` holds LMDB's lock, an opener waits inside LMDB's open; once released, the lock file it
    opened is empty, and its open fails rather than running beside the next process on another lock file."""
    small_store(settings)
    data = Path(settings.server.data_dir)
    opener = [sys.executable, "-c", "import lmdb, sys\ntry:\n    lmdb.open(sys.argv[1], max_dbs=64)\n"
              "except lmdb.Error as e:\n    print(type(e).__name__)\nelse:\n    print('opened')", str(data)]
    with datalock.replacing(data):
        proc = subprocess.Popen(opener, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while f"-> POSIX  ADVISORY  READ {proc.pid} " not in Path("/proc/locks").read_text():  # it waits on us
            assert proc.poll() is None and time.monotonic() < deadline, "the opener did not wait"
            time.sleep(0.02)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "InvalidParameterError"  # EINVAL: an empty lock file cannot be mapped
    assert not (data / "lock.mdb").exists()
    assert records(settings) == {}  # the next open makes a new lock file
