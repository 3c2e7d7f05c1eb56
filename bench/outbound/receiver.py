"""The CRM's side of the outbound bench: a webhook receiver in a process of its own (aiohttp on uvloop), which
checks every Standard Webhooks signature with its copy of the secret (as a CRM must: it costs what it costs there)
and answers 200, or holds every request unanswered while "held" (the deliverer then waits with `concurrency`
requests in flight and sends nothing more: a backlog builds up in the outbox without being drained).

`python -m bench.outbound receive --secret-env NAME [--held] [--sched-idle]` prints "ready PORT", then obeys lines
on stdin: "hold", "go" (answer everything, held requests first), "stats" (one JSON line on stdout: requests,
acknowledged, distinct webhook-ids, re-sends of an acknowledged id, bad signatures, time of the first and last
acknowledgement since the last "go"), "quit".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web


class Receiver:
    """Counts what it is sent; `opened` gates every answer."""

    def __init__(self, key: bytes, verify: bool) -> None:
        self.key = key
        self.verify = verify
        self.opened = asyncio.Event()
        self.requests = 0
        self.acked: set[str] = set()
        self.resent = 0  # requests for a webhook-id already acknowledged (a re-send after a lost acknowledgement)
        self.bad_signatures = 0
        self.go_at = time.monotonic()
        self.first_ack: float | None = None
        self.last_ack: float | None = None

    def signed(self, request: web.Request, body: bytes) -> bool:
        wid = request.headers.get("webhook-id", "")
        stamp = request.headers.get("webhook-timestamp", "")
        mac = base64.b64encode(hmac.new(self.key, f"{wid}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
        return any(hmac.compare_digest(s, "v1," + mac) for s in request.headers.get("webhook-signature", "").split())

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if self.verify and not self.signed(request, body):
            self.bad_signatures += 1
            return web.Response(status=401)
        await self.opened.wait()
        wid = request.headers.get("webhook-id", "")
        if wid in self.acked:
            self.resent += 1
        self.acked.add(wid)
        now = time.monotonic() - self.go_at
        self.first_ack = now if self.first_ack is None else self.first_ack
        self.last_ack = now
        return web.Response(status=200, body=b"{}", content_type="application/json")

    def command(self, line: str) -> None:
        if line == "hold":
            self.opened.clear()
        elif line == "go":
            self.go_at = time.monotonic()
            self.first_ack = self.last_ack = None
            self.opened.set()
        elif line == "stats":
            print(json.dumps(self.stats()), flush=True)

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "acknowledged_ids": len(self.acked), "resent_after_ack": self.resent,
                "bad_signatures": self.bad_signatures, "first_ack_s": self.first_ack, "last_ack_s": self.last_ack}


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.outbound receive", description=__doc__)
    p.add_argument("--secret-env", required=True, help="the environment variable holding the whsec_ secret")
    p.add_argument("--held", action="store_true", help="start held (answer nothing until 'go')")
    p.add_argument("--no-verify", action="store_true", help="do not check signatures")
    p.add_argument("--sched-idle", action="store_true", help="run under SCHED_IDLE (only on CPU others leave)")
    a = p.parse_args(argv)
    if a.sched_idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    value = os.environ[a.secret_env]
    key = base64.b64decode(value[6:]) if value.startswith("whsec_") else value.encode()
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    receiver = Receiver(key, not a.no_verify)
    if not a.held:
        receiver.opened.set()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    done = asyncio.Event()

    def read_stdin() -> None:
        for raw in sys.stdin:
            line = raw.strip()
            if line == "quit":
                break
            loop.call_soon_threadsafe(receiver.command, line)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    print(f"ready {port}", flush=True)
    loop.run_until_complete(done.wait())
    receiver.opened.set()  # let held handlers finish before the runner closes
    loop.run_until_complete(runner.cleanup())
    return 0
