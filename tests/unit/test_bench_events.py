"""The events bench's own parts: the pusher's HTTP/1.1 connection and the load clients' real-time priority.

The connection is exercised against a real aiohttp server on 127.0.0.1:0 (keep-alive, 429 with Retry-After,
a server that closes the connection); the priority in a child process, so this test process keeps its own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

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
