"""What the limits tests (test_limits.py) share: their blueprint, a client pool that writes until the store refuses,
signed webhooks, and looks at a running server from outside (its worker processes, LMDB's reader table).

Nothing here opens the store for writing or frees a reader slot: the reader table is read with
`Environment.readers()` only (never `reader_check`, which would do the server's work for it).
"""

from __future__ import annotations

import json
import os
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import lmdb
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML, TEST_ENCRYPTION_KEY
from tests.integration.helpers import post_webhook, upsert_req

SECRET = b"limits-test-secret"
ENV = {"LIMITS_TEST_SECRET": SECRET.decode(), "RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY}
CALL_S = 30.0  # one call's deadline: generous, the machine is shared
# Attribute text without digits or "@": nothing in it looks like an identifier to the log masking.
NOTE = "".join(chr(97 + (i * 7) % 26) for i in range(4000))
MAX_DBS = 64  # opening the store's environment read-only from a test: above what resolver.store names


def blueprint(path: Path, *, map_mb: int, events: bool = False, more: str = "") -> Path:
    """The tests' blueprint (tests.conftest.SERVER_TOML with a `map_mb` map) with three long text attributes, with
    `events` a CRM source whose webhooks come on 127.0.0.1:0 (`[events]` last, so `more` can add keys to it)."""
    text = SERVER_TOML.replace("map_size_mb = 256", f"map_size_mb = {map_mb}")
    assert f"map_size_mb = {map_mb}" in text
    text += textwrap.dedent("""
        [attributes]
        name = { type = "string" }
        note_a = { type = "string" }
        note_b = { type = "string" }
        note_c = { type = "string" }
        """)
    if events:
        text += textwrap.dedent("""
            [sources.CRM]
            field_map = { Name = "name", Note_A = "note_a", Note_B = "note_b", Note_C = "note_c" }
            secrets = [{ env = "LIMITS_TEST_SECRET" }]
            [events]
            http_listen = "127.0.0.1:0"
            """)
    path.write_text(text + textwrap.dedent(more))
    return path


def big_upsert(external_id: str, *, chars: int = len(NOTE)) -> pb.UpsertRequest:
    """A create of about 3 x `chars` bytes of attributes (and as much again in its change-log entry)."""
    return upsert_req(f"key-{external_id}", external_id=external_id,
                      attributes={"name": external_id, "note_a": NOTE[:chars], "note_b": NOTE[:chars],
                                  "note_c": NOTE[:chars]})


def stub(port: int) -> tuple[grpc.Channel, resolver_pb2_grpc.IdentityResolverStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, resolver_pb2_grpc.IdentityResolverStub(channel)


@dataclass(frozen=True)
class Refusal:
    """A write the server refused: the request (to retry it) and what the status said."""

    external_id: str
    request: pb.UpsertRequest
    code: grpc.StatusCode
    reason: str
    limit: str
    message: str


def refusal(external_id: str, request: pb.UpsertRequest, err: grpc.RpcError) -> Refusal:
    """The refusal `err` of `request`, with its ErrorInfo (reason "" and limit "" when it carries none)."""
    reason = limit = ""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, limit = info.reason, info.metadata.get("limit", "")
    return Refusal(external_id, request, err.code(), reason, limit, err.details() or "")


@dataclass
class Filled:
    """What `fill` saw: the acknowledged creates (by external id), the refusals, and how long it took."""

    acked: dict[str, pb.UpsertResponse] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    seconds: float = 0.0


def fill(port: int, tag: str, *, clients: int = 4, cap: int = 20_000) -> Filled:
    """Create customers of `big_upsert` from `clients` threads until the server refuses one; every thread stops at
    its next answer. Each refusal is kept, whatever its code (the test asserts on them); more than `cap` creates
    without one is an AssertionError (the store never filled)."""
    out = Filled()
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()

    def client(c: int) -> None:
        channel, rpc = stub(port)
        with channel:
            for i in range(cap):
                if stop.is_set():
                    return
                ext = f"{tag}-{c}-{i}"
                request = big_upsert(ext)
                try:
                    response = rpc.Upsert(request, timeout=CALL_S)
                except grpc.RpcError as err:
                    with lock:
                        out.refused.append(refusal(ext, request, err))
                    stop.set()
                    return
                with lock:
                    out.acked[ext] = response

    threads = [threading.Thread(target=client, args=(c,), name=f"fill-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    out.seconds = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a fill client hung"
    assert out.refused, f"{len(out.acked)} creates and the store never refused one"
    return out


def signed_webhook(port: int, webhook_id: str, body: bytes) -> tuple[int, dict[str, object]]:
    """POST a CRM event, signed now, to the webhook endpoint: the HTTP status and the JSON answer."""
    answer = post_webhook(port, "CRM", SECRET, webhook_id, body, timeout=CALL_S)
    return answer.status, json.loads(answer.body)


def create_event(record_id: str, *, chars: int = len(NOTE)) -> bytes:
    """A CRM CREATE of `record_id` carrying three notes of `chars` characters."""
    note = (NOTE * (chars // len(NOTE) + 1))[:chars]
    return json.dumps({"event_type": "CREATE", "source_system": "CRM", "timestamp": "2026-01-01T00:00:00Z",
                       "record_id": record_id, "object_type": "Account",
                       "change_set": {"Name": {"new_value": record_id}, "Note_A": {"new_value": note},
                                      "Note_B": {"new_value": note}, "Note_C": {"new_value": note}}}).encode()


@dataclass(frozen=True)
class Slot:
    """One held LMDB reader slot: the process, and the snapshot it reads (None: a spare slot, no transaction)."""

    pid: int
    txnid: int | None


def reader_slots(data: Path) -> list[Slot]:
    """LMDB's reader table of the store in `data`, as `Environment.readers()` lists it (slots of dead processes
    included: this reclaims nothing)."""
    env = lmdb.open(str(data), readonly=True, lock=True, max_dbs=MAX_DBS, map_size=0)
    try:
        listing = env.readers()
    finally:
        env.close()
    slots = []
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3:
            slots.append(Slot(int(fields[0]), None if fields[2] == "-" else int(fields[2])))
    return slots


def worker_pids(supervisor: int) -> list[int]:
    """The gRPC worker processes `resolver serve` (pid `supervisor`) spawned: its children that run a
    multiprocessing spawn (not its resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == supervisor and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


def data_file_bytes(data: Path) -> int:
    return (data / "data.mdb").stat().st_size
