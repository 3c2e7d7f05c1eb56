"""The events bench's own parts: the pusher's HTTP/1.1 connection, the load clients' real-time priority, the
drain figures (the applier's log lines as the bench reads them, windows D and E) and the backlog writer.

The connection is exercised against a real aiohttp server on 127.0.0.1:0 (keep-alive, 429 with Retry-After,
a server that closes the connection); the priority in a child process, so this test process keeps its own; the
backlog writer in a child process too, on a real LMDB inbox.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from bench.events.pusher import Connection as _Conn


@pytest.fixture()
def http_port() -> Iterator[int]:
    """A webhook-like endpoint: 202 JSON, 429 + Retry-After for a body "full", and "Connection: close" for
    "bye"; it counts the TCP connections it accepted."""
    import threading

    state: dict[str, object] = {}
    ready = threading.Event()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if body == b"full":
            return web.json_response({"error": "INBOX_FULL"}, status=429, headers={"Retry-After": "2"})
        if body == b"bye":
            return web.json_response({"status": "accepted"}, status=202, headers={"Connection": "close"})
        return web.json_response({"status": "accepted", "id": request.headers["webhook-id"]}, status=202)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/webhooks/{source}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["port"] = runner.addresses[0][1]
        state["stop"] = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        ready.set()
        await state["stop"].wait()  # type: ignore[attr-defined]
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield int(state["port"])  # type: ignore[call-overload]
    state["loop"].call_soon_threadsafe(state["stop"].set)  # type: ignore[attr-defined]
    thread.join(10)


def _head(port: int, body: bytes, wid: str) -> bytes:
    return (f"POST /v1/webhooks/SALESFORCE HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
            f"webhook-id: {wid}\r\n\r\n").encode()


def test_the_pusher_connection_reads_status_headers_and_body_and_keeps_alive(http_port: int) -> None:
    async def go() -> list[tuple[int, dict[bytes, bytes], bytes]]:
        conn = _Conn(http_port)
        try:
            out = []
            for body, wid in ((b"{}", "a"), (b"full", "b"), (b"{}", "c")):
                out.append(await conn.post(_head(http_port, body, wid), body, 5.0))
            writer = conn.writer
            out.append(await conn.post(_head(http_port, b"bye", "d"), b"bye", 5.0))
            assert writer is not None and conn.writer is None  # the server said close: dropped
            out.append(await conn.post(_head(http_port, b"{}", "e"), b"{}", 5.0))  # reconnects
            return out
        finally:
            conn.close()

    answers = asyncio.run(go())
    assert [a[0] for a in answers] == [202, 429, 202, 202, 202]
    assert b'"id": "a"' in answers[0][2] and b'"id": "e"' in answers[4][2]
    assert answers[1][1][b"retry-after"] == b"2"


def test_a_refused_connection_raises_and_leaves_the_connection_closed() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go() -> None:
        conn = _Conn(port)
        with pytest.raises(OSError):
            await conn.post(_head(port, b"{}", "x"), b"{}", 1.0)
        assert conn.writer is None

    asyncio.run(go())


def test_realtime_priority_is_sched_fifo_1_for_root_and_explained_otherwise() -> None:
    code = ("import os; from bench.loadgen.runner import realtime_priority; "
            "print(realtime_priority()); print(os.sched_getscheduler(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    if os.geteuid() == 0:
        assert out[0] == "SCHED_FIFO 1" and int(out[1]) == os.SCHED_FIFO
    else:
        assert out[0].startswith("normal (PermissionError") and int(out[1]) == os.SCHED_OTHER


# -- the drain figures (issue 14) ------------------------------------------------------------------------------

def test_the_bench_reads_the_pace_lines_the_applier_writes() -> None:
    from bench.events.accounting import applier_pace
    from resolver.events.applier import _Stretch

    period, drain = _Stretch(10.0), _Stretch(0.0)
    for s, n, end in ((period, 1234, 20.0), (drain, 20000, 31.5)):
        s.events, s.ended = n, end
        s.see(100.0, 0.31)
        s.see(2000.0, None)
        s.see(2000.0, 0.004)
    text = (f"2026-01-01 00:00:00,000 INFO resolver.events[1]: applier: {period.line()}\n"
            f"2026-01-01 00:00:01,000 INFO resolver.events[1]: applier: inbox empty: {drain.line()}\n")
    assert "serving processes at 0-31% of the CPU" in text
    got = applier_pace(text)
    assert (got["pace_low"], got["pace_high"]) == (100, 2000)
    assert [(x["inbox_empty"], x["events"], x["seconds"], x["per_s"]) for x in got["lines"]] == [
        (False, 1234, 10.0, 123), (True, 20000, 31.5, 635)]
    assert applier_pace("nothing here") == {"lines": [], "pace_low": None, "pace_high": None}


def _results(a_p99: float, b_p99: float, a_errors: dict[str, int]) -> dict:
    """The parts of a run's results the verdicts read (a run that lost nothing)."""
    ledger = {"missing_count": 0, "applied_twice_or_more": 0, "neither_acknowledged_nor_given_up": 0,
              "unacknowledged_stored_count": 0, "acknowledged_202": 10, "pushed": 10}
    return {"window_a": {"latency_ms": {"p99": a_p99}, "errors": a_errors},
            "window_b": {"latency_ms": {"p99": b_p99}}, "window_c": {"latency_ms": {"p99": a_p99}},
            "ledger": ledger, "counters": {"counters": {"accepted": 10}, "conserved": True}, "check": {"exit": 0},
            "visible": {"wrong": 0}, "drain": {"drain_rate_in_window_b_per_s": 100.0,
                                               "events_flowing_through_window_b": True},
            "pusher": {"codes": {"202": 10}, "first_429_s": None}}


def test_a_run_whose_baseline_refused_calls_is_marked_as_unable_to_judge_the_target() -> None:
    from bench.events.accounting import verdicts
    from bench.events.report import render_summary

    healthy = verdicts(_results(2.0, 2.5, {}))
    assert (healthy["baseline_overloaded"], healthy["baseline_refused"], healthy["p99_ratio_b_over_a"]) == (False, 0, 1.25)
    over = verdicts(_results(47.0, 230.0, {"RESOURCE_EXHAUSTED": 20, "CANCELLED": 5}))
    assert (over["baseline_overloaded"], over["baseline_refused"]) == (True, 25)
    runs = [{"run": 1, "started": "s", "a_p99_ms": 47.0, "b_p99_ms": 230.0, **over},
            {"run": 2, "started": "s", "a_p99_ms": 2.0, "b_p99_ms": 2.5, **healthy}]
    text = render_summary({"command": "c", "runs": runs, "median_p99_ratio_b_over_a": 2.97,
                           "every_run_lost_nothing": True, "median_p99_ratio_b_over_a_healthy_baseline": 1.25})
    assert "1 of 2 runs had window A itself refusing or losing calls (runs 1)" in text
    assert "Median over the other runs: 1.25×" in text
    text = render_summary({"command": "c", "runs": runs[:1], "median_p99_ratio_b_over_a": 4.89,
                           "every_run_lost_nothing": True, "median_p99_ratio_b_over_a_healthy_baseline": None})
    assert "no ratio here can judge the target" in text


def test_idle_drain_figures_count_from_the_release_to_the_empty_inbox() -> None:
    from bench.events.accounting import idle_drain_figures, merge_pushes

    rows = [[0.0, 0, 0, 0, 0, 0], [0.25, 900, 300, 0, 0, 600], [0.5, 1000, 700, 0, 0, 300], [0.75, 1000, 990, 10, 0, 0],
            [1.0, 1000, 990, 10, 0, 0], [1.25, -1, -1, -1, -1, -1]]
    push = {"events": 1000, "accepted": list(range(1000)), "gave_up": {}, "codes": {"202": 1000}, "elapsed_s": 0.4}
    d = idle_drain_figures(rows, push, 0.8)
    assert (d["drained"], d["applied"], d["inbox_empty_after_s"], d["drain_rate_per_s"]) == (True, 1000, 0.75, 1333.3)
    assert (d["admissions_per_s"], d["inbox_max"], d["throttled_429"]) == (2500.0, 600, 0)
    merged = merge_pushes({"events": 2, "accepted": [1, 0], "gave_up": {"5": "x"}},
                          {"events": 3, "accepted": [3, 2], "gave_up": {}})
    assert merged == {"events": 5, "accepted": [0, 1, 2, 3], "gave_up": {"5": "x"}}


def test_the_backlog_writer_admits_its_events_past_the_high_water_mark(tmp_path: Path) -> None:
    import json
    import textwrap

    from bench.events.crm import SECRET_ENV, new_secret, webhook_id
    from resolver.bootstrap import build_service
    from resolver.config import load_settings
    from resolver.events import counters

    config, data, out = tmp_path / "bp.toml", tmp_path / "data", tmp_path / "backlog.json"
    config.write_text(textwrap.dedent(f"""\
        version = 1
        [storage]
        map_size_mb = 256
        [attributes.status]
        type = "string"
        owner = "SALESFORCE"
        [attributes.credit_limit]
        type = "number"
        owner = "SALESFORCE"
        [sources.SALESFORCE]
        field_map = {{ Customer_Status__c = "status", Credit_Limit__c = "credit_limit" }}
        secrets = [{{ env = "{SECRET_ENV}" }}]
        [events]
        high_water = 10
        """))
    env = {**os.environ, SECRET_ENV: new_secret()}
    proc = subprocess.Popen([sys.executable, "-m", "bench.events", "backlog", "--config", str(config), "--data-dir",
                             str(data), "--first", "7", "--events", "50", "--customers", "100", "--run-id", "t1",
                             "--json", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    proc.communicate(b"go\n", timeout=60)
    assert proc.returncode == 0
    got = json.loads(out.read_text())
    assert got["codes"] == {"202": 50} and got["accepted"] == list(range(7, 57)) and got["gave_up"] == {}
    service = build_service(load_settings(config, environ=env, data_dir=str(data)))
    try:
        with service.store.read() as view:
            snap = counters.snapshot(view.txn, service.store)
            assert snap["in_inbox"] == 50 and snap["counters"]["accepted"] == 50  # five times the high-water mark
            wid = webhook_id("t1", 7)
            assert view.txn.get(f"SALESFORCE\0{wid}".encode(), db=service.store.db["ev_ids"]) is not None
    finally:
        service.close()
