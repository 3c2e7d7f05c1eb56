"""`make run` on this checkout: builds if needed, loads the demo dataset, serves; a demo customer resolves."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from resolver.client import ResolverClient
from resolver.v1 import resolver_pb2 as pb

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_serves_the_demo_dataset(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"DATA={tmp_path / 'data'}", "LISTEN=127.0.0.1:0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )
    output = []
    try:
        port = None
        for line in proc.stdout:  # bounded: make exits (and the loop ends) if anything fails
            output.append(line)
            if "serving on 127.0.0.1:" in line:
                port = int(line.split("serving on 127.0.0.1:")[1].split()[0])
                break
        assert port is not None, "".join(output)
        assert any("import:" in line and "0 rejected" in line for line in output), "".join(output)
        with ResolverClient(f"127.0.0.1:{port}", resolve_timeout=5) as client:
            r = client.resolve(emails=["jane.doe@example.com"])
            assert r.outcome == pb.OUTCOME_MATCHED and r.matched_on == pb.MATCH_KIND_EMAIL
            assert dict(r.attributes)["name"] == "Jane Doe"
            shared = client.resolve(phones=["(650) 253-0000"])
            assert shared.outcome == pb.OUTCOME_AMBIGUOUS and len(shared.candidates) == 2
            sip = client.resolve(phones=["sip:+61291234567@carrier.example;user=phone"])
            assert sip.outcome == pb.OUTCOME_MATCHED
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stuck = subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:24,etime,args", "-g", str(proc.pid)],
                                   capture_output=True, text=True).stdout  # who did not stop, and where
            os.killpg(proc.pid, signal.SIGKILL)  # never leave the server behind for the next test
            proc.wait(timeout=10)
            rest = proc.stdout.read()
            pytest.fail("make run did not stop within 60s of SIGTERM; its processes then:\n" + stuck
                        + "its output after serving:\n" + rest[-4000:])
        finally:
            proc.stdout.close()
