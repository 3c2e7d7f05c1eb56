"""Serving: health, reflection, bounded concurrency, graceful SIGTERM, workers sharing one LMDB environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from resolver.client import ResolverClient
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.integration.helpers import phone, resolve_req, upsert_req

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.process
def test_health_reports_serving(channel):  # noqa: ANN001
    h = health_pb2_grpc.HealthStub(channel)
    for name in ("", "resolver.v1.IdentityResolver"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel):  # noqa: ANN001
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"resolver.v1.IdentityResolver", "grpc.health.v1.Health"} <= names


@contextmanager
def write_lock_held(server) -> Iterator[None]:  # noqa: ANN001
    """Hold the store's LMDB write lock, so every Upsert waits behind it (a real slow write)."""
    txn = server.service.store.env.begin(write=True)
    try:
        yield
    finally:
        txn.abort()


def test_past_max_concurrent_rpcs_is_resource_exhausted(make_server, settings):  # noqa: ANN001
    server = make_server(settings.with_overrides(max_concurrent_rpcs=2))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        with ThreadPoolExecutor(2) as pool:
            with write_lock_held(server):
                blocked = [pool.submit(stub.Upsert, upsert_req(external_id=f"RE-{i}"), timeout=10) for i in range(2)]
                # give both calls time to occupy the two slots
                for _ in range(100):
                    if server.server._state.active_rpc_count >= 2:  # noqa: SLF001 - observe, not drive
                        break
                    threading.Event().wait(0.02)
                with pytest.raises(grpc.RpcError) as e:
                    stub.Resolve(resolve_req(external_id="RE-0"), timeout=5)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [f.result().action for f in blocked] == [pb.ACTION_CREATED, pb.ACTION_CREATED]
        assert stub.Resolve(resolve_req(external_id="RE-0")).outcome == pb.OUTCOME_MATCHED


def test_client_retries_deadline_exceeded_with_the_same_key(server):  # noqa: ANN001
    with ResolverClient(f"127.0.0.1:{server.port}", write_timeout=0.2, max_attempts=6, backoff=0.05) as client:
        with write_lock_held(server):
            release = threading.Timer(0.5, lambda: None)
            release.start()
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(r=client.upsert(external_id="CL-1", phones=(phone(7),))))
            t.start()
            release.join()
        t.join(10)
        r = result["r"]
        assert client.attempts_made >= 2
        assert r.identifiers.external_id == "CL-1"
        with server.service.store.read() as v:
            assert v.count("records") == 1 and v.count("changes") == 1  # executed exactly once
        assert client.resolve(phones=(phone(7),)).customer_uuid == r.customer_uuid


def test_client_sets_a_deadline_and_does_not_retry_errors(server):  # noqa: ANN001
    with ResolverClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(grpc.RpcError) as e:
            client.upsert(idempotency_key="k", phones=("12",))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.attempts_made == 1


# -- the real command line, in its own processes ------------------------------------------------------------
@contextmanager
def serve_process(data_dir: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "resolver", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert "serving on 127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("serving on 127.0.0.1:")[1].split()[0])
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.process
def test_sigterm_stops_gracefully(tmp_path):  # noqa: ANN001
    with serve_process(tmp_path / "data", "--workers", "1") as (proc, port):
        with ResolverClient(f"127.0.0.1:{port}") as c:
            c.upsert(external_id="G-1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with serve_process(tmp_path / "data", "--workers", "1") as (_, port):  # reopens cleanly, data intact
        with ResolverClient(f"127.0.0.1:{port}") as c:
            assert c.resolve(external_id="G-1").outcome == pb.OUTCOME_MATCHED


@pytest.mark.process
def test_workers_share_the_port_and_see_each_others_writes_at_once(tmp_path):  # noqa: ANN001
    with serve_process(tmp_path / "data", "--workers", "2") as (proc, port):
        # every channel is a new connection; the kernel spreads them over both workers, so with 24 write/read
        # pairs on separate connections some pairs are certainly served by different workers
        for i in range(24):
            with ResolverClient(f"127.0.0.1:{port}", spread=False) as writer:
                w = writer.upsert(external_id=f"W-{i}", phones=(phone(200 + i),))
            with ResolverClient(f"127.0.0.1:{port}", spread=False) as reader:
                r = reader.resolve(phones=(phone(200 + i),))
            assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, w.customer_uuid)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len([c for c in children if _is_worker(c)]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.process
def test_one_client_channel_spreads_over_every_worker(tmp_path):  # noqa: ANN001
    with serve_process(tmp_path / "data", "--workers", "2") as (proc, port):
        def answering(client: ResolverClient) -> set[int]:
            return {client.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5).worker_index for _ in range(12)}

        with ResolverClient(f"127.0.0.1:{port}") as client:
            info = client.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
            assert len(info.worker_ports) == 2 and port not in info.worker_ports
            assert client.target == "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in info.worker_ports)
            assert answering(client) == {0, 1}  # one channel, both workers
            for i in range(6):  # each call may land on the other worker: writes are visible to the next read
                w = client.upsert(external_id=f"S-{i}", phones=(phone(300 + i),))
                r = client.resolve(phones=(phone(300 + i),))
                assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, w.customer_uuid)
        with ResolverClient(f"127.0.0.1:{port}", spread=False) as plain:
            assert plain.target == f"127.0.0.1:{port}" and len(answering(plain)) == 1  # one connection: one worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _two_free_ports() -> int:
    """A port p such that p and p + 1 are free on 127.0.0.1 (now)."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            if base >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
        return base
    raise AssertionError("no two consecutive free ports")


@pytest.mark.process
def test_worker_port_base_fixes_each_workers_port(tmp_path):  # noqa: ANN001
    base = _two_free_ports()
    blueprint = tmp_path / "b.toml"
    blueprint.write_text(f"version = 1\n[server]\nworker_port_base = {base}\n")
    with serve_process(tmp_path / "data", "--workers", "2", "--config", str(blueprint)) as (proc, port):
        with ResolverClient(f"127.0.0.1:{port}") as client:
            assert client.target == f"ipv4:127.0.0.1:{base},127.0.0.1:{base + 1}"
            assert client.resolve(external_id="nobody").outcome == pb.OUTCOME_NOT_FOUND
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.process
def test_a_spreading_client_finds_the_workers_again_after_a_restart(tmp_path):  # noqa: ANN001
    from resolver.server import reserve_port

    with reserve_port("127.0.0.1:0") as shared:  # the shared port stays; the workers' own ports are new each start
        listen = ("--listen", f"127.0.0.1:{shared}")
        with serve_process(tmp_path / "data", "--workers", "2", *listen) as (proc, _):
            client = ResolverClient(f"127.0.0.1:{shared}", max_attempts=8, backoff=0.1)
            first = client.target
            client.upsert(external_id="R-1")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        with serve_process(tmp_path / "data", "--workers", "2", *listen):
            with client:
                assert client.resolve(external_id="R-1", timeout=5).outcome == pb.OUTCOME_MATCHED
                assert client.target.startswith("ipv4:") and client.target != first


def test_one_worker_has_nothing_to_spread(server):  # noqa: ANN001
    with ResolverClient(f"127.0.0.1:{server.port}") as client:
        assert client.target == f"127.0.0.1:{server.port}"
        assert list(client.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5).worker_ports) == []


def _is_worker(pid: str) -> bool:
    """A spawned gRPC worker (not the events process, which a blueprint-less server runs too)."""
    from resolver.events.process import PROCESS_NAME

    try:
        return ("spawn_main" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                and Path(f"/proc/{pid}/comm").read_text().strip() != PROCESS_NAME)
    except OSError:
        return False


@pytest.mark.process
def test_two_server_processes_on_one_data_dir_read_each_others_writes(tmp_path):  # noqa: ANN001
    data = tmp_path / "data"
    with serve_process(data, "--workers", "1") as (_, p1), serve_process(data, "--workers", "1") as (_, p2):
        with ResolverClient(f"127.0.0.1:{p1}") as a, ResolverClient(f"127.0.0.1:{p2}") as b:
            for i in range(10):
                w = a.upsert(external_id=f"X-{i}", attributes={"name": f"n{i}"})
                r = b.resolve(external_id=f"X-{i}", fields=("name",))
                assert (r.customer_uuid, r.version) == (w.customer_uuid, w.version)
                w2 = b.upsert(external_id=f"X-{i}", attributes={"name": f"m{i}"})
                assert a.resolve(external_id=f"X-{i}").version == w2.version == 2


@pytest.mark.process
def test_bad_blueprint_is_a_clear_error_exit_2(tmp_path):  # noqa: ANN001
    bad = tmp_path / "bad.toml"
    bad.write_text("[matching]\nmax_fanout = 1\n[views.default]\nfields = 3\n")
    r = subprocess.run([sys.executable, "-m", "resolver", "serve", "--config", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ})
    assert r.returncode == 2
    assert "matching.max_fanout" in r.stderr and "views.default.fields" in r.stderr
    assert "Traceback" not in r.stderr


def test_client_retries_unavailable_until_the_server_is_up(settings):  # noqa: ANN001
    from resolver.bootstrap import build_server
    from resolver.server import reserve_port

    with reserve_port("127.0.0.1:0") as port:
        pass  # a free port, released: nobody listens there yet
    box: dict = {}
    with ResolverClient(f"127.0.0.1:{port}", write_timeout=1.0, max_attempts=8, backoff=0.1) as client:
        t = threading.Thread(target=lambda: box.update(r=client.upsert(idempotency_key="late-1", external_id="L-1")))
        t.start()
        # the server starts only once an attempt has found no server (UNAVAILABLE) and a retry began; a fixed sleep
        # here let a slow machine's first attempt still be connecting when the server came up, and succeed
        deadline = time.monotonic() + 30
        while client.attempts_made < 2 and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        assert client.attempts_made >= 2, "the client never retried against the absent server"
        running = build_server(settings.with_overrides(listen=f"127.0.0.1:{port}"), sweeper=False)
        try:
            t.join(30)
            assert box["r"].action == pb.ACTION_CREATED
            assert client.attempts_made >= 2
        finally:
            running.stop(grace=0)
