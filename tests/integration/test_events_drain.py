"""The applier's adaptive pace against the real server: `resolver serve` (two gRPC workers and the events process)
on an inbox that already holds a burst of events, with nobody calling Resolve.

The old applier drained at a fixed `rate_per_s`; now that is the ceiling, kept while the serving processes are
idle, and `min_rate_per_s` the floor. The burst here is 2,000 events with the floor at 20/s (100 s of draining if
the pace stayed there) and the ceiling at 1,000/s. Nothing below asserts on elapsed time: the test waits (with a
generous deadline) for the applier to report the inbox empty, then asserts on what was applied, in which order,
and on the pace the applier reports in its log: it reached the configured ceiling, far above the old fixed 100/s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from resolver.bootstrap import build_service
from resolver.config import Settings, load_settings
from resolver.events import counters
from resolver.events.inbox import Ingestor
from resolver.events.signatures import sign
from tests.conftest import SERVER_TOML, TEST_ENCRYPTION_KEY

# tests of processes, signals and files: the pure pass runs the same code in process (Makefile test-pure)
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
KEY = b"drain-test-secret"
ENV = {"DRAIN_TEST_SECRET": KEY.decode(),
       "RESOLVER_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY}
BURST = 2000
CEILING, FLOOR = 1000, 20
DEADLINE_S = 180.0  # a wait condition only: at the floor the burst would take 100 s, at the ceiling about 2


def _blueprint() -> str:
    return SERVER_TOML + textwrap.dedent(
        f"""
        [attributes]
        status = {{ type = "string", owner = "SALESFORCE" }}
        credit_limit = {{ type = "number", minimum = 0, owner = "SALESFORCE" }}
        [sources.SALESFORCE]
        field_map = {{ Customer_Status__c = "status", Credit_Limit__c = "credit_limit" }}
        secrets = [{{ env = "DRAIN_TEST_SECRET" }}]
        [events]
        http_listen = "127.0.0.1:0"
        rate_per_s = {CEILING}
        min_rate_per_s = {FLOOR}
        batch = 100
        high_water = 100000
        """
    )


def _fill(settings: Settings, n: int) -> list[str]:
    """Admit `n` signed CREATE events through the admission path, with no applier running; their webhook ids."""
    service = build_service(settings)
    try:
        ingestor = Ingestor(service.store, settings, service.schema)
        ids, futures = [], []
        for i in range(n):
            wid = f"msg_burst_{i:05d}_{uuid.uuid4().hex[:6]}"
            body = json.dumps({"event_type": "CREATE", "source_system": "SALESFORCE",
                               "timestamp": "2026-01-01T00:00:00Z", "record_id": f"BURST-{i:05d}",
                               "object_type": "Account",
                               "change_set": {"Customer_Status__c": {"new_value": "Active"},
                                              "Credit_Limit__c": {"new_value": i}}}).encode()
            ts = int(time.time())
            futures.append(ingestor.submit("SALESFORCE", {"webhook-id": wid, "webhook-timestamp": str(ts),
                                                          "webhook-signature": sign(KEY, wid, ts, body)}, body))
            ids.append(wid)
        assert all(f.result(60).http_status == 202 for f in futures)
        ingestor.close()
        ingestor.flush()
        with service.store.read() as view:
            assert counters.snapshot(view.txn, service.store)["in_inbox"] == n
    finally:
        service.close()
    return ids


def test_an_idle_server_drains_a_burst_at_its_ceiling_not_at_the_old_fixed_rate(tmp_path: Path) -> None:
    config, data, log_path = tmp_path / "drain.toml", tmp_path / "data", tmp_path / "server.log"
    config.write_text(_blueprint())
    settings = load_settings(config, environ=ENV, data_dir=str(data))
    ids = _fill(settings, BURST)

    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "resolver", "serve", "--config", str(config), "--data-dir", str(data),
             "--listen", "127.0.0.1:0", "--workers", "2"],
            stdout=log, stderr=log, env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "applier: inbox empty" not in log_path.read_text():
            assert proc.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the burst was not drained: {log_path.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = log_path.read_text()
    assert code == 0, text[-3000:]

    # what was applied: every event once, in inbox order, and the counters conserve
    service = build_service(settings)
    try:
        with service.store.read() as view:
            snap = counters.snapshot(view.txn, service.store)
            applied = [ch["event"]["webhook_id"] for ch in view.iter_changes() if "event" in ch]
    finally:
        service.close()
    assert snap["conserved"] and snap["in_inbox"] == 0
    assert snap["counters"]["applied"] == BURST and snap["counters"]["dead_lettered"] == 0
    assert applied == ids

    # the pace the applier reports: it watched the serving processes, and ran at the configured ceiling
    assert f"applier {FLOOR}-{CEILING}/s" in text  # the events process's start-up line
    drains = re.findall(r"applier: inbox empty: (\d+) events in [\d.]+ s \(\d+/s\); pace (\d+)-(\d+)/s; "
                        r"serving processes at (\d+)-(\d+)% of the CPU", text)
    assert [int(d[0]) for d in drains] == [BURST], text[-3000:]  # one drain: the burst
    low, high = int(drains[0][1]), int(drains[0][2])
    assert high == CEILING and FLOOR <= low <= CEILING
    assert high >= 10 * 100  # ten times the old fixed default of 100/s
