"""`resolver reindex` on real data directories: a store moves from xxh3 to keyed BLAKE2b, and from one key to
another, with every customer still found by every identifier, no identifier-derived xxh3 key left in the indexes,
and the old index intact whenever a reindex does not finish."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import lmdb
import pytest
import xxhash

from resolver.bootstrap import build_server
from resolver.config import Settings, load_settings
from resolver.errors import StoreError
from resolver.events.signatures import sign
from resolver.normalize import Kind
from resolver.reindex import run_reindex
from resolver.store import INDEX_NAMES
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.serve import launched

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
INDEX_DBS = [name.encode() for name in INDEX_NAMES.values()]
KEYED_DBS = [*INDEX_DBS, b"ev_tomb_ext"]  # every database keyed by an identifier's hash
BUSY = "stop it before reindexing"
MISMATCH = "the store does not match the configuration"
WAIT_S = 15.0


@dataclass(frozen=True)
class Person:
    external_id: str
    emails: tuple[str, ...]
    phones: tuple[str, ...]

    def identifiers(self) -> list[tuple[Kind, str]]:
        return ([(Kind.EXTERNAL_ID, self.external_id)] if self.external_id else []) + [
            (Kind.EMAIL, e) for e in self.emails] + [(Kind.PHONE, p) for p in self.phones]


# Canaries: identifiers that must never be readable in an index key.
PEOPLE = [
    Person("CANARY-EXT-7Q01", ("canary.quill.7q01@reindex-test.example",), (phone(7001),)),
    Person("CANARY-EXT-7Q02", ("canary.ursa.7q02@reindex-test.example", "ursa.work.7q02@reindex-test.example"),
           (phone(7002), phone(7012))),
    Person("CANARY-EXT-7Q03", ("canary.vega.7q03@reindex-test.example",), (phone(7003),)),  # merged into 7Q02
    Person("", ("canary.wren.7q04@reindex-test.example",), (phone(7004),)),  # no external_id
]
MERGED_INTO = {2: 1}  # PEOPLE[2] is merged into PEOPLE[1]


# -- blueprints -----------------------------------------------------------------------------------------------


def index_key_file(path: Path) -> Path:
    """A fresh index key as `resolver key new` prints one: 32 random bytes in base64 (used as the key's bytes)."""
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def index_table(key_id: str = "", key_file: Path | None = None) -> str:
    if not key_id:
        return ""  # the default: xxh3-128, unkeyed
    return f'[index]\nhash = "blake2b"\nkey_id = "{key_id}"\nsecret = {{ file = "{key_file}" }}\n'


@dataclass(frozen=True)
class Blueprint:
    path: Path
    settings: Settings
    secret: bytes | None  # the blake2b key's bytes (None: xxh3)

    def key(self, kind: Kind, value: str) -> bytes:
        """The index key, computed here from the key-function spec (resolver._keys_py), not with the store's."""
        data = bytes((kind,)) + value.encode()
        if self.secret is None:
            return xxhash.xxh3_128_digest(data)
        return hashlib.blake2b(data, digest_size=16, key=self.secret).digest()


def blueprint(tmp_path: Path, name: str, key_id: str = "", extra: str = "") -> Blueprint:
    key_file = index_key_file(tmp_path / f"{name}.key") if key_id else None
    path = tmp_path / f"{name}.toml"
    path.write_text(SERVER_TOML + "[attributes]\nname = { type = \"string\" }\n" + extra + index_table(key_id, key_file))
    settings = load_settings(path, data_dir=str(tmp_path / "data"), listen="127.0.0.1:0")
    return Blueprint(path, settings, key_file.read_text().strip().encode() if key_file else None)


# -- running things ---------------------------------------------------------------------------------------------


def resolver_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resolver", *map(str, args)], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def reindex(bp: Blueprint, *flags: str) -> subprocess.CompletedProcess[str]:
    return resolver_cli("reindex", "--config", bp.path, "--data-dir", bp.settings.server.data_dir, *flags)


def check(bp: Blueprint) -> subprocess.CompletedProcess[str]:
    return resolver_cli("check", "--config", bp.path, "--data-dir", bp.settings.server.data_dir)


def assert_check_ok(bp: Blueprint) -> None:
    r = check(bp)
    assert r.returncode == 0 and "check: OK" in r.stdout, r.stdout + r.stderr


@pytest.fixture
def start() -> Iterator[Callable[..., Any]]:
    """Start real servers in this process; all stopped at the end. (Not conftest's `make_server`: its teardown
    opens each data directory under the server's blueprint, which a reindexed directory refuses by design; these
    tests run `resolver check` under the final blueprint themselves.)"""
    running: list[Any] = []

    def make(s: Settings, **kw: Any) -> Any:
        r = build_server(s, sweeper=False, **kw)
        running.append(r)
        return r

    yield make
    for r in running:
        r.stop(grace=0)


@contextmanager
def client(running: Any) -> Iterator[resolver_pb2_grpc.IdentityResolverStub]:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield resolver_pb2_grpc.IdentityResolverStub(channel)


def populate(stub: resolver_pb2_grpc.IdentityResolverStub) -> dict[tuple[Kind, str], str]:
    """Write PEOPLE and the merge; each identifier -> the uuid that must answer for it."""
    uids = [stub.Upsert(upsert_req(external_id=p.external_id, emails=p.emails, phones=p.phones,
                                   attributes={"name": f"Person {i}"})).customer_uuid for i, p in enumerate(PEOPLE)]
    for merged, survivor in MERGED_INTO.items():
        stub.Merge(pb.MergeRequest(idempotency_key=str(uuid.uuid4()), survivor_uuid=uids[survivor],
                                   merged_uuids=[uids[merged]]))
        uids[merged] = uids[survivor]
    return {ident: uids[i] for i, p in enumerate(PEOPLE) for ident in p.identifiers()}


def resolved(stub: resolver_pb2_grpc.IdentityResolverStub, ident: tuple[Kind, str]) -> str:
    kind, value = ident
    field = {Kind.EXTERNAL_ID: "external_id", Kind.EMAIL: "emails", Kind.PHONE: "phones"}[kind]
    r = stub.Resolve(resolve_req(**{field: value if kind is Kind.EXTERNAL_ID else (value,)}))
    assert r.outcome == pb.OUTCOME_MATCHED, (kind, r)
    return r.customer_uuid


def assert_every_identifier_resolves(bp: Blueprint, start: Callable[..., Any],
                                     expected: dict[tuple[Kind, str], str]) -> None:
    running = start(bp.settings)
    with client(running) as stub:
        assert {ident: resolved(stub, ident) for ident in expected} == expected
    running.stop(grace=0)


def stored_keys(data_dir: Path) -> dict[bytes, set[bytes]]:
    """The keys of every identifier-keyed database, read with lmdb directly."""
    env = lmdb.open(str(data_dir), readonly=True, max_dbs=64)
    try:
        out = {}
        for name in KEYED_DBS:
            db = env.open_db(name, create=False)
            with env.begin() as txn, txn.cursor(db=db) as cur:
                out[name] = {bytes(k) for k in cur.iternext(keys=True, values=False)}
        return out
    finally:
        env.close()


def expected_keys(bp: Blueprint, expected: dict[tuple[Kind, str], str]) -> dict[bytes, set[bytes]]:
    out: dict[bytes, set[bytes]] = {name: set() for name in INDEX_DBS}
    for kind, value in expected:
        out[INDEX_NAMES[kind].encode()].add(bp.key(kind, value))
    return out


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def canaries() -> list[bytes]:
    return [value.encode() for p in PEOPLE for _, value in p.identifiers()]


# -- the move, end to end ---------------------------------------------------------------------------------------


def test_xxh3_to_keyed_blake2b_then_to_a_new_key(tmp_path: Path, start: Callable[..., Any]) -> None:
    old = blueprint(tmp_path, "old")
    key_a = blueprint(tmp_path, "a", key_id="2026-a")
    key_b = blueprint(tmp_path, "b", key_id="2026-b")
    data = Path(old.settings.server.data_dir)
    running = start(old.settings)
    with client(running) as stub:
        expected = populate(stub)
    running.stop(grace=0)
    assert len(set(expected.values())) == 3  # four people, two of them merged into one
    xxh3 = expected_keys(old, expected)
    assert {n: k for n, k in stored_keys(data).items() if n in INDEX_DBS} == xxh3

    # xxh3 -> blake2b key A
    r = reindex(key_a)
    assert r.returncode == 0, r.stderr
    assert (f"reindex: {data}: xxh3-128 -> blake2b (key id 2026-a): 3 records; index entries: ix_external 3, "
            "ix_email 5, ix_phone 5; 0 deleted-record tombstone(s) dropped, in ") in r.stdout
    assert "run `resolver compact`" in r.stdout
    freed = (data / "data.mdb").read_bytes()  # LMDB freed the old index pages without zeroing them: hence the advice
    assert all(k in freed for found in xxh3.values() for k in found)
    assert_check_ok(key_a)
    keys = stored_keys(data)
    assert {n: k for n, k in keys.items() if n in INDEX_DBS} == expected_keys(key_a, expected)
    for name, found in keys.items():  # no identifier in clear in an index key, nor its unkeyed hash
        assert not [c for c in canaries() for k in found if c in k]
        assert not found & xxh3.get(name, set())
    assert_every_identifier_resolves(key_a, start, expected)

    refused = check(old)  # the old blueprint no longer opens the store
    assert refused.returncode == 2
    assert (f"{MISMATCH}: hash is blake2b, configuration says xxh3-128; key_id is 2026-a, configuration says . "
            "Index keys depend on the hash algorithm and key: `resolver reindex --config NEW.toml`") in refused.stderr
    with pytest.raises(StoreError, match=f"{MISMATCH}: hash is blake2b, configuration says xxh3-128"):
        start(old.settings)

    # the old xxh3 keys sit in freed pages until compaction; afterwards no byte of them is in the directory
    compacted = resolver_cli("compact", "--config", key_a.path, "--data-dir", data)
    assert compacted.returncode == 0, compacted.stderr
    files = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
    assert [k.hex() for found in xxh3.values() for k in found if k in files] == []

    # key A -> key B (rotation: a new key id)
    r = reindex(key_b)
    assert r.returncode == 0, r.stderr
    assert "blake2b (key id 2026-a) -> blake2b (key id 2026-b): 3 records" in r.stdout
    assert_check_ok(key_b)
    keys = stored_keys(data)
    assert {n: k for n, k in keys.items() if n in INDEX_DBS} == expected_keys(key_b, expected)
    assert not any(keys[n] & k for n, k in expected_keys(key_a, expected).items())
    assert_every_identifier_resolves(key_b, start, expected)
    with pytest.raises(StoreError, match=f"{MISMATCH}: key_id is 2026-b, configuration says 2026-a"):
        start(key_a.settings)

    # and the new key takes writes like any other
    running = start(key_b.settings)
    with client(running) as stub:
        late = stub.Upsert(upsert_req(external_id="LATE-AFTER-REINDEX", emails=("late@reindex-test.example",)))
        assert resolved(stub, (Kind.EMAIL, "late@reindex-test.example")) == late.customer_uuid
    running.stop(grace=0)
    assert_check_ok(key_b)


# -- never under a process that has the store open ----------------------------------------------------------------


def test_reindex_refuses_while_the_directory_is_served(tmp_path: Path, start: Callable[..., Any]) -> None:
    old = blueprint(tmp_path, "old")
    key_a = blueprint(tmp_path, "a", key_id="a1")
    data = Path(old.settings.server.data_dir)
    running = start(old.settings)
    with client(running) as stub:
        expected = populate(stub)
        before = fingerprint(data / "data.mdb")
        # a server in this process holds LMDB's lock: seen from another process, and from this one
        r = reindex(key_a)
        assert r.returncode == 2
        assert r.stderr.strip() == f"resolver: {data} is in use by process {os.getpid()}, which has the store open: {BUSY}"
        with pytest.raises(StoreError, match=f"in use by this process, which has the store open: {BUSY}"):
            run_reindex(key_a.settings)
        assert fingerprint(data / "data.mdb") == before
        assert {ident: resolved(stub, ident) for ident in expected} == expected  # still serving
    running.stop(grace=0)

    with launched(old.path, Path(old.settings.server.data_dir), tmp_path / "serve.log", workers=1):  # holds serve.lock
        r = reindex(key_a)
        assert r.returncode == 2
        assert r.stderr.strip() == f"resolver: {data} is in use by a running server (`resolver serve`): {BUSY}"
    assert fingerprint(data / "data.mdb") == before
    assert_check_ok(old)


# -- a reindex that does not finish leaves the old index ---------------------------------------------------------

# Runs `resolver reindex` in a child that dies, without aborting anything, at its Nth index entry: a crash in the
# middle of the write transaction (the storage underneath is the real one).
CRASHING_REINDEX = textwrap.dedent(
    """
    import os, sys
    from resolver import store
    from resolver.cli import main

    real, added = store.Txn.index_add, [0]

    def index_add(self, kind, value, uid):
        added[0] += 1
        if added[0] == int(sys.argv[1]):
            os._exit(9)
        real(self, kind, value, uid)

    store.Txn.index_add = index_add
    sys.exit(main(sys.argv[2:]))
    """
)


def test_a_crash_mid_way_or_a_bad_blueprint_leaves_the_store_intact(tmp_path: Path, start: Callable[..., Any]) -> None:
    old = blueprint(tmp_path, "old")
    key_a = blueprint(tmp_path, "a", key_id="a1")
    data = Path(old.settings.server.data_dir)
    running = start(old.settings)
    with client(running) as stub:
        expected = populate(stub)
    running.stop(grace=0)
    before = fingerprint(data / "data.mdb")
    xxh3 = stored_keys(data)

    crash = subprocess.run([sys.executable, "-c", CRASHING_REINDEX, "7", "reindex", "--config", str(key_a.path),
                            "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert crash.returncode == 9, crash.stderr
    assert stored_keys(data) == xxh3
    assert_check_ok(old)
    assert check(key_a).returncode == 2  # meta still names xxh3
    assert_every_identifier_resolves(old, start, expected)

    no_key_id = tmp_path / "no-key-id.toml"
    no_key_id.write_text(key_a.path.read_text().replace('key_id = "a1"\n', ""))
    missing_secret = tmp_path / "missing-secret.toml"
    missing_secret.write_text(key_a.path.read_text().replace(str(tmp_path / "a.key"), str(tmp_path / "nowhere.key")))
    before = fingerprint(data / "data.mdb")
    for bad, why in ((no_key_id, "index.key_id: blake2b needs a key id"),
                     (missing_secret, "index.secret: cannot read")):
        r = resolver_cli("reindex", "--config", bad, "--data-dir", data)
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert fingerprint(data / "data.mdb") == before
    assert_check_ok(old)

    r = reindex(key_a)  # and a later reindex finishes
    assert r.returncode == 0, r.stderr
    assert_check_ok(key_a)
    assert_every_identifier_resolves(key_a, start, expected)


# -- deleted CRM records: their external_id keys cannot follow a new key ------------------------------------------


def events_table(tmp_path: Path) -> str:
    secret = tmp_path / "sf.secret"
    secret.write_text("sf-webhook-secret-for-reindex\n")
    return textwrap.dedent(
        f"""
        [sources.SALESFORCE]
        field_map = {{}}
        secrets = [{{ file = "{secret}" }}]
        [events]
        http_listen = "127.0.0.1:0"
        """
    )


def ingest(stub: resolver_pb2_grpc.IdentityResolverStub, record_id: str, event_type: str, ts: str) -> None:
    body = json.dumps({"event_type": event_type, "source_system": "SALESFORCE", "timestamp": ts,
                       "record_id": record_id, "object_type": "Account", "change_set": {}}).encode()
    wid, now = f"msg_{uuid.uuid4().hex}", int(time.time())
    headers = {"webhook-id": wid, "webhook-timestamp": str(now),
               "webhook-signature": sign(b"sf-webhook-secret-for-reindex", wid, now, body)}
    stub.IngestEvents(pb.IngestRequest(source="SALESFORCE", body=body, headers=headers), timeout=5)


def drained(stub: resolver_pb2_grpc.IdentityResolverStub) -> pb.EventCounters:
    deadline = time.monotonic() + WAIT_S
    while (snap := stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)).in_inbox:
        assert time.monotonic() < deadline, f"inbox not drained in {WAIT_S}s: {snap}"
        time.sleep(0.05)
    return snap


def test_deleted_record_tombstones_are_dropped_only_when_asked(tmp_path: Path, start: Callable[..., Any]) -> None:
    old = blueprint(tmp_path, "old", extra=events_table(tmp_path))
    key_a = blueprint(tmp_path, "a", key_id="a1", extra=events_table(tmp_path))
    data = Path(old.settings.server.data_dir)
    running = start(old.settings, applier=True)
    with client(running) as stub:
        expected = populate(stub)
        ingest(stub, "CRM-GONE-7Q9", "CREATE", "2024-01-01T00:00:00Z")
        ingest(stub, "CRM-GONE-7Q9", "DELETE", "2024-02-01T00:00:00Z")
        assert drained(stub).counters["applied"] == 2
    running.stop(grace=0)
    gone = old.key(Kind.EXTERNAL_ID, "CRM-GONE-7Q9")
    assert stored_keys(data)[b"ev_tomb_ext"] == {gone}

    same = reindex(old)  # the same hash and key: the tombstones' keys stay valid, and stay
    assert same.returncode == 0, same.stderr
    assert "xxh3-128 -> xxh3-128" in same.stdout and "run `resolver compact`" not in same.stdout
    assert stored_keys(data)[b"ev_tomb_ext"] == {gone}

    before = fingerprint(data / "data.mdb")
    refused = reindex(key_a)
    assert refused.returncode == 2
    assert (f"resolver: {data}: not reindexed, the store is unchanged: 1 deleted CRM record(s) are remembered by "
            "the index key of their external_id (ev_tomb_ext)") in refused.stderr
    assert "--drop-record-tombstones" in refused.stderr and "CRM-GONE" not in refused.stderr
    assert fingerprint(data / "data.mdb") == before

    r = reindex(key_a, "--drop-record-tombstones")
    assert r.returncode == 0, r.stderr
    assert "; 1 deleted-record tombstone(s) dropped" in r.stdout
    assert stored_keys(data)[b"ev_tomb_ext"] == set()
    assert_check_ok(key_a)
    running = start(key_a.settings, applier=True)
    with client(running) as stub:
        assert {ident: resolved(stub, ident) for ident in expected} == expected
        gone_uuid = stub.Resolve(resolve_req(external_id="CRM-GONE-7Q9"))
        assert gone_uuid.outcome == pb.OUTCOME_NOT_FOUND
    running.stop(grace=0)
