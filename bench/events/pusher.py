"""The pusher, standing in for the CRM: its own process, signed events over HTTP/1.1 keep-alive.

`python -m bench.events push --port P --run-id R --json FILE [--first J] ...` prints "ready", waits for a "go"
line on stdin, then pushes every event (J, J+1, ...) as fast as `--connections` concurrent requests allow,
waiting `Retry-After` after each 429, and writes what it saw (answers, when each event was acknowledged, what
it gave up) to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.events.crm import SECRET_ENV, SOURCE, event_body, secret_key, webhook_id

Answer = tuple[int, dict[bytes, bytes], bytes]  # status, lower-cased headers, body


class Connection:
    """One keep-alive HTTP/1.1 connection of the pusher: a request out, one response (Content-Length framed, as
    the server sends) back. Hand-written on asyncio streams because the pusher stands in for a CRM on another
    machine but shares this box with the server: every µs it spends is taken from the server, and a client
    library costs several times more per request (bench/README.md)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, head: bytes, body: bytes, timeout: float) -> Answer:
        """(status, lower-cased headers, body); any failure closes the connection (the next post reconnects)."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            self.writer.write(head + body)
            raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            lines = raw.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:] if x)}
            answer = await asyncio.wait_for(self.reader.readexactly(int(headers.get(b"content-length", b"0"))), timeout)
            if headers.get(b"connection", b"").lower() == b"close":
                self.close()
            return status, headers, answer
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, IndexError)


async def push(a: argparse.Namespace, key: bytes) -> dict[str, Any]:
    """Say "ready", wait for "go" on stdin, push every event; what the CRM saw, for the accounting."""
    from resolver.events.signatures import sign

    path = f"/v1/webhooks/{SOURCE}"
    codes: Counter[str] = Counter()
    accepted: dict[int, float] = {}  # event -> seconds after go when acknowledged 202
    duplicates: list[int] = []  # events whose 202 said "duplicate" (an earlier attempt had been stored)
    gave_up: dict[int, str] = {}
    retry_after: Counter[str] = Counter()
    first_429: list[float] = []
    pending = iter(range(a.first, a.first + a.events))
    conns = [Connection(a.port) for _ in range(a.connections)]
    try:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # wait for "go"
        go = time.monotonic()
        deadline = go + a.budget

        async def worker(conn: Connection) -> None:
            for j in pending:
                body = event_body(j, a.customers)
                wid = webhook_id(a.run_id, j)
                failures = 0
                while True:
                    if time.monotonic() > deadline:
                        gave_up[j] = f"push budget of {a.budget:g}s exhausted"
                        break
                    ts = int(time.time())
                    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{a.port}\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\nwebhook-id: {wid}\r\nwebhook-timestamp: {ts}\r\n"
                            f"webhook-signature: {sign(key, wid, ts, body)}\r\n\r\n").encode()
                    try:
                        status, headers, answer = await conn.post(head, body, 30.0)
                    except TRANSPORT_ERRORS as exc:
                        codes[f"error {type(exc).__name__}"] += 1
                        failures += 1
                        if failures >= 5:
                            gave_up[j] = f"{failures} transport errors, last {type(exc).__name__}: {exc}"
                            break
                        await asyncio.sleep(0.5)
                        continue
                    codes[str(status)] += 1
                    if status == 202:
                        accepted[j] = time.monotonic() - go
                        if b'"duplicate"' in answer:
                            duplicates.append(j)
                        break
                    if status == 429:
                        if not first_429:
                            first_429.append(time.monotonic() - go)
                        after = headers.get(b"retry-after", b"").decode()
                        retry_after[after] += 1
                        try:
                            wait = float(after)
                        except ValueError:
                            wait = 1.0
                        await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
                        continue
                    if status >= 500 and failures < 4:
                        failures += 1
                        await asyncio.sleep(0.5)
                        continue
                    gave_up[j] = f"HTTP {status}: {answer[:200].decode(errors='replace')}"
                    break

        await asyncio.gather(*(worker(c) for c in conns))
        elapsed = time.monotonic() - go
    finally:
        for c in conns:
            c.close()
    t429 = first_429[0] if first_429 else None
    times = sorted(accepted.values())
    per_s = Counter(int(t) for t in times)
    return {"go_monotonic": go, "elapsed_s": round(elapsed, 3), "first": a.first, "events": a.events,
            "connections": a.connections,
            "codes": dict(codes), "accepted": sorted(accepted), "duplicates": sorted(duplicates),
            "gave_up": {str(k): v for k, v in sorted(gave_up.items())}, "retry_after": dict(retry_after),
            "first_429_s": None if t429 is None else round(t429, 3),
            "accepted_before_first_429": sum(1 for t in times if t429 is None or t <= t429),
            "last_accept_s": round(times[-1], 3) if times else None,
            "accepted_per_s": [per_s.get(s, 0) for s in range(int(times[-1]) + 1)] if times else []}


def main(argv: Sequence[str]) -> int:
    """`python -m bench.events push ...`: the pusher's command line; the secret comes from SECRET_ENV."""
    p = argparse.ArgumentParser(prog="python -m bench.events push",
                                description="the pusher: waits for a 'go' line on stdin, then pushes")
    p.add_argument("--port", type=int, required=True, help="the webhook HTTP port on 127.0.0.1")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--first", type=int, default=0, help="the first event's number (events FIRST .. FIRST+EVENTS-1)")
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--budget", type=float, default=150.0, help="seconds after go; events not accepted by then are given up")
    p.add_argument("--run-id", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--sched-idle", action="store_true", help="run under SCHED_IDLE (only on CPU others leave)")
    a = p.parse_args(argv)
    if a.sched_idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    key = secret_key(os.environ[SECRET_ENV])
    import uvloop  # the CRM's side costs this machine less CPU on uvloop than on asyncio's loop (bench/README.md)

    out = uvloop.run(push(a, key))
    Path(a.json).write_text(json.dumps(out))
    return 0
