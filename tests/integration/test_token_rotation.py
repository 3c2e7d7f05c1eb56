"""Token rotation without a restart: `resolver serve` with two workers under a steady load, the tokens file
rewritten, SIGHUP to the supervisor. No call of the load fails; afterwards every worker refuses the old token and
admits the new one."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from resolver.auth import new_token
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML
from tests.integration.helpers import resolve_req
from tests.integration.serve import launched

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
LOAD_THREADS = 4  # two per worker


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, as an operator's tooling should: a reload never reads half a file."""
    part = path.with_suffix(".part")
    part.write_text(text)
    os.replace(part, path)


def code_of(stub: resolver_pb2_grpc.IdentityResolverStub, token: str) -> grpc.StatusCode:
    try:
        stub.Resolve(resolve_req(emails=("probe@example.com",)), metadata=(("authorization", f"Bearer {token}"),),
                     timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_sighup_rotates_tokens_in_every_worker_without_failing_a_call(tmp_path: Path) -> None:
    steady, old, new = (new_token(name, "resolve") for name in ("load", "old", "new"))
    tokens = tmp_path / "tokens"
    write_atomically(tokens, f"{steady.line}\n{old.line}\n")
    blueprint = tmp_path / "blueprint.toml"
    blueprint.write_text(SERVER_TOML + f'\n[auth]\ntokens_file = "{tokens}"\n')

    log = tmp_path / "serve.log"
    with launched(blueprint, tmp_path / "data", log, workers=2) as server:
        proc, port = server.proc, server.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as shared:
            info = resolver_pb2_grpc.IdentityResolverStub(shared).GetServerInfo(
                pb.GetServerInfoRequest(), metadata=(("authorization", f"Bearer {steady.token}"),), timeout=10)
        assert len(info.worker_ports) == 2
        channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in info.worker_ports]  # one per worker
        workers = [resolver_pb2_grpc.IdentityResolverStub(ch) for ch in channels]
        try:
            assert [code_of(w, old.token) for w in workers] == [grpc.StatusCode.OK] * 2
            assert [code_of(w, new.token) for w in workers] == [grpc.StatusCode.UNAUTHENTICATED] * 2

            stop = threading.Event()
            done = [0] * LOAD_THREADS
            failures: list[str] = []

            def load(i: int) -> None:  # a steady stream of calls with the token that stays in the file
                stub = workers[i % 2]
                while not stop.is_set():
                    code = code_of(stub, steady.token)
                    if code != grpc.StatusCode.OK:
                        failures.append(f"worker {i % 2}: {code.name}")
                    done[i] += 1

            threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(LOAD_THREADS)]
            for t in threads:
                t.start()
            try:
                while min(done) < 20:  # every thread is under way before the rotation (bounded by the load itself)
                    assert not failures and proc.poll() is None
                    time.sleep(0.01)
                write_atomically(tokens, f"{steady.line}\n{new.line}\n")
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 30  # a bounded wait for both workers to have reloaded
                while any(code_of(w, new.token) != grpc.StatusCode.OK for w in workers):
                    assert time.monotonic() < deadline, "a worker still refuses the new token 30 s after SIGHUP"
                    time.sleep(0.05)
                after = list(done)
                while any(d < a + 20 for d, a in zip(done, after, strict=True)):  # the load goes on past the reload
                    assert proc.poll() is None
                    time.sleep(0.01)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=30)
            assert failures == [], log.read_text()[-4000:]
            assert [code_of(w, old.token) for w in workers] == [grpc.StatusCode.UNAUTHENTICATED] * 2
            assert [code_of(w, new.token) for w in workers] == [grpc.StatusCode.OK] * 2
        finally:
            for ch in channels:
                ch.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    reloaded = [line for line in log.read_text().splitlines() if "reload" in line and str(tokens) in line]
    assert len(reloaded) == 2 and not any("fail" in line for line in reloaded)  # once in each worker
