"""ResolveStream: order kept, errors per item, 100k requests in one stream, bounded memory for a stalled reader."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.integration.helpers import phone, resolve_req, upsert_req

ROOT = Path(__file__).resolve().parents[2]


def test_stream_answers_in_request_order_with_per_item_errors(stub):  # noqa: ANN001
    uuids = [stub.Upsert(upsert_req(external_id=f"S-{i}", phones=(phone(i),))).customer_uuid for i in range(30)]
    reqs = []
    for i in range(30):
        reqs.append(resolve_req(phones=(phone(i),)))
        if i % 7 == 3:
            reqs.append(resolve_req(phones=(phone(i),), view="nope"))  # invalid: its own error, stream goes on
        if i % 5 == 1:
            reqs.append(resolve_req(external_id="UNKNOWN"))
    responses = list(stub.ResolveStream(iter(reqs)))
    assert len(responses) == len(reqs)
    expected = iter(uuids)
    for req, resp in zip(reqs, responses, strict=True):
        if req.view == "nope":
            assert resp.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert resp.outcome == pb.OUTCOME_UNSPECIFIED
        elif req.identifiers.external_id == "UNKNOWN":
            assert resp.outcome == pb.OUTCOME_NOT_FOUND and not resp.error.code
        else:
            assert (resp.outcome, resp.customer_uuid) == (pb.OUTCOME_MATCHED, next(expected))


@pytest.mark.scale
@pytest.mark.slow
def test_one_stream_of_100k_requests(stub):  # noqa: ANN001
    for i in range(50):
        stub.Upsert(upsert_req(external_id=f"B-{i}", phones=(phone(i),)))
    n = 100_000
    reqs = (resolve_req(phones=(phone(i % 100),)) for i in range(n))
    matched = 0
    count = 0
    for i, resp in enumerate(stub.ResolveStream(reqs)):
        count += 1
        expect_match = i % 100 < 50
        assert (resp.outcome == pb.OUTCOME_MATCHED) == expect_match, i
        matched += expect_match
    assert count == n and matched == n // 2


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.process
@pytest.mark.slow
def test_a_client_that_stops_reading_does_not_grow_server_memory(tmp_path):  # noqa: ANN001
    proc = subprocess.Popen(
        [sys.executable, "-m", "resolver", "serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        port = int(line.split("serving on 127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = resolver_pb2_grpc.IdentityResolverStub(ch)
            # every answer carries a 4 kB attribute and every request ~2 kB of (unknown) emails, so unread
            # answers and unread requests fill the HTTP/2 windows within a few thousand messages
            stub.Upsert(upsert_req(external_id="BIG", attributes={"blob": "x" * 4000}))
            sent = itertools.count()
            padding = tuple(f"nobody{j:03d}.{'y' * 80}@example.com" for j in range(20))

            def requests():  # noqa: ANN202
                for i in sent:
                    if i >= 1_000_000:  # bound the test even if flow control failed
                        return
                    yield resolve_req(external_id="BIG", emails=padding)

            call = stub.ResolveStream(requests())
            assert next(call).outcome == pb.OUTCOME_MATCHED  # the stream works, and now the client reads no more
            time.sleep(3)
            rss_1, sent_1 = _rss_kib(proc.pid), next(sent)
            time.sleep(3)
            rss_2, sent_2 = _rss_kib(proc.pid), next(sent)
            call.cancel()
        # flow control holds the client: after the windows filled, it could send nothing more...
        assert sent_2 - sent_1 < 100, (sent_1, sent_2)
        assert sent_2 < 200_000
        # ...and the server's memory stopped growing
        assert rss_2 - rss_1 < 10_000, (rss_1, rss_2)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
