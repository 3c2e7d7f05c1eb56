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


def test_each_stream_answer_is_the_bytes_resolve_answers(stub, channel):  # noqa: ANN001
    """ResolveStream and Resolve decode and encode on the same paths: item for item the same response bytes
    (matched, ambiguous on a shared line, not found, explained, projected, skipped identifiers, a refused item)."""
    for i in range(6):
        stub.Upsert(upsert_req(external_id=f"E-{i}", phones=(phone(200 + i % 4),), emails=(f"e{i}@example.com",),
                               attributes={"name": f"N {i}", "tier": ("gold", "silver")[i % 2]}))
    reqs = [resolve_req(phones=(phone(200 + i % 6),), explain=i % 2 == 0) for i in range(12)]
    reqs += [resolve_req(emails=("e3@example.com",), fields=["tier"]), resolve_req(external_id="E-5", view="billing"),
             resolve_req(phones=("not a number", phone(201)), emails=("nobody@example.com",), explain=True),
             resolve_req(external_id="nobody"), resolve_req(phones=(phone(202),), view="nope"),
             resolve_req(phones=("+44 20 7946 0958",), default_region="GB")]
    resolve = channel.unary_unary("/resolver.v1.IdentityResolver/Resolve")
    streamed = list(channel.stream_stream("/resolver.v1.IdentityResolver/ResolveStream")(
        iter([r.SerializeToString() for r in reqs]), timeout=30))
    assert len(streamed) == len(reqs)
    outcomes = set()
    for req, answer in zip(reqs, streamed, strict=True):
        resp = pb.ResolveResponse.FromString(answer)
        outcomes.add(resp.outcome if not resp.error.code else "error")
        if resp.error.code:  # a refused item: the status Resolve aborts with, as the item's own error
            with pytest.raises(grpc.RpcError) as err:
                resolve(req.SerializeToString(), timeout=10)
            assert (err.value.code().value[0], resp.error.message) == (resp.error.code, err.value.details())
        else:
            assert answer == resolve(req.SerializeToString(), timeout=10)
    assert outcomes == {pb.OUTCOME_MATCHED, pb.OUTCOME_AMBIGUOUS, pb.OUTCOME_NOT_FOUND, "error"}


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
