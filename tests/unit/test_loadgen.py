"""The load generator is open loop: a server stall shows in the tail, and the offered rate is achieved.

A real gRPC server on 127.0.0.1:0 answers grpc.health.v1 Check from ONE handler thread, so a stalled call
holds back every call behind it, as a stalled server does. Only the timing asserts the issue asks for.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loadgen import Phase, intended_offsets, run_phases
from bench.procstat import tree_cpu_seconds


class StallingHealth(health_pb2_grpc.HealthServicer):
    """Answers at once, except call number `stall_at`, which first sleeps `stall_s`."""

    def __init__(self, stall_at: int = 0, stall_s: float = 0.1) -> None:
        self.calls = itertools.count(1)
        self.stall_at = stall_at
        self.stall_s = stall_s
        self.lock = threading.Lock()

    def Check(self, request, context):  # noqa: ANN001, N802 - the gRPC method name
        with self.lock:
            n = next(self.calls)
        if n == self.stall_at:
            time.sleep(self.stall_s)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _serve(servicer: StallingHealth) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@pytest.fixture
def fast_server() -> Iterator[str]:
    yield from _serve(StallingHealth())


@pytest.fixture
def stalling_server() -> Iterator[str]:
    # call 1 is the client's warm-up call; call ~500 falls in the middle of the recorded second
    yield from _serve(StallingHealth(stall_at=500, stall_s=0.1))


def test_a_100ms_stall_shows_in_p99_and_max(stalling_server: str) -> None:
    # 500/s for 2 s: 1,000 requests; the ~50 intended during the stall wait for it, up to 100 ms each.
    # A closed-loop client would have sent none of them and reported one slow call (below p99.9).
    (r,) = run_phases([Phase("stall", "health", rate=500, duration_s=2.0, target=stalling_server, timeout_s=5)])
    h = r.hist()
    assert r.completed == r.intended == 1000 and not r.errors
    assert h.get_max_value() >= 95_000  # µs: the stalled call itself
    assert h.get_value_at_percentile(99) >= 50_000  # the requests queued behind it carry the stall
    # Only lower bounds: a slow machine can only raise latencies (an upper bound on p50 failed on a VM whose bare
    # health check ran at p50 130 ms, not on the load generator)


def test_achieved_rate_equals_offered_rate_within_2_percent(fast_server: str) -> None:
    (r,) = run_phases([Phase("rate", "health", rate=500, duration_s=4.0, target=fast_server, timeout_s=30)])
    assert r.intended == 2000
    assert r.achieved_rate == pytest.approx(500, rel=0.02)
    assert r.ok == r.completed and not r.errors


def test_two_client_processes_split_the_rate_and_merge_histograms(fast_server: str) -> None:
    (r,) = run_phases([Phase("two", "health", rate=400, duration_s=1.0, target=fast_server)], clients=2)
    assert r.intended == 400 and r.completed == 400 and r.hist().get_total_count() == 400


def test_poisson_schedule_has_the_right_mean_inter_arrival() -> None:
    offsets = intended_offsets(1000, 20.0, "poisson", seed=3)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert statistics.fmean(gaps) == pytest.approx(1e6, rel=0.03)  # ns; 20,000 samples: sd of the mean 0.7%
    assert statistics.stdev(gaps) == pytest.approx(1e6, rel=0.05)  # exponential: sd equals the mean
    assert offsets != intended_offsets(1000, 20.0, "poisson", seed=4)


def test_uniform_schedules_of_n_clients_interleave_into_one_even_stream() -> None:
    merged = sorted(intended_offsets(250, 1.0, phase=0.0) + intended_offsets(250, 1.0, phase=0.5))
    assert len(merged) == 500
    assert {b - a for a, b in itertools.pairwise(merged)} <= {1_999_999, 2_000_000, 2_000_001}


def test_server_cpu_is_read_for_a_process_and_its_children() -> None:
    import os

    before = tree_cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert tree_cpu_seconds(os.getpid()) >= before + 0.03


def test_the_dataset_holds_only_numbers_resolver_accepts(tmp_path) -> None:  # noqa: ANN001
    import json

    from bench.dataset import REGIONS, generate
    from resolver.normalize import normalize_phone

    info = generate(tmp_path, customers=400, queries=200, upserts=20, seed=5)
    assert len(REGIONS) >= 20 and info["shared_phone_refs"] > 0
    rows = [json.loads(line) for line in (tmp_path / "customers.jsonl").read_text().splitlines()]
    for row in rows:
        for phone in row["identifiers"]["phones"]:
            assert normalize_phone(phone, row.get("defaultRegion") or None).startswith("+")
    queries = (tmp_path / "queries.jsonl").read_text().splitlines()
    assert len(queries) == 200 and 10 <= info["unknown_queries"] <= 60


@pytest.mark.parametrize("scenario", ["crm-sync", "mixed"])
def test_write_scenarios_parse_their_requests_before_the_first_send(tmp_path, scenario: str) -> None:  # noqa: ANN001
    # A stream that parsed its Upsert templates at its first Upsert stalled that client's timeline inside the
    # first timed window with writes; a bad file must therefore fail when the stream is made, not when used.
    from bench.loadgen.workload import Data, requests

    queries, upserts = tmp_path / "q.jsonl", tmp_path / "u.jsonl"
    queries.write_text('{"identifiers": {"phones": ["+16502530000"]}}\n')
    upserts.write_text('{"identifiers": {"externalId": "A"}, "no_such_field": 1}\n')
    with pytest.raises(Exception, match="no_such_field"):
        requests(scenario, Data(queries=str(queries), upserts=str(upserts)))


def test_a_client_process_ends_when_the_process_that_started_it_is_killed(tmp_path) -> None:  # noqa: ANN001
    """A bench killed mid-run must not leave its SCHED_FIFO clients sending: each client asks for SIGKILL when
    its parent ends (bench.loadgen.prctl.die_with_parent)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pid_file = tmp_path / "child.pid"
    script = tmp_path / "parent.py"  # a file, not -c: a spawned child imports its target from its parent's main
    script.write_text(f"""
import multiprocessing, os, sys, time
sys.path.insert(0, {os.getcwd()!r})
from bench.loadgen.prctl import die_with_parent

def child(parent):
    die_with_parent(parent)
    open({str(pid_file)!r}, "w").write(str(os.getpid()))
    while True:
        time.sleep(0.05)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    p.start()
    time.sleep(600)
""")
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # alive while its parent is
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # reaped by init once killed; until then it may linger as a zombie, which /proc shows as Z
            try:
                if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the client outlived the process that started it")
    finally:
        if parent.poll() is None:
            parent.kill()
