"""The backlog writer, for window E: signed events put into the running server's inbox from a process of its own,
through the admission path (signature, schema, dedupe, group commit) but not over HTTP, and past the inbox's
high-water mark, faster than the applier drains them: the applier then drains a backlog, and its rate is what
is measured, not the webhook intake's (window D measures that end to end).

`python -m bench.events backlog --config C --data-dir D --run-id R --json FILE [--first J] [--events N] ...`
prints "ready", waits for a "go" line on stdin, admits events J .. J+N-1 (LMDB serializes this writer with the
server's), and writes what it saw (as the pusher does) to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.events.crm import SECRET_ENV, SOURCE, event_body, secret_key, webhook_id


def admit(a: argparse.Namespace) -> dict[str, Any]:
    """Say "ready", wait for "go", admit every event (all queued at once: the committer writes up to 256 per
    transaction); the answers, in the pusher's JSON shape."""
    from resolver.attributes import AttributeSchema
    from resolver.bootstrap import open_store
    from resolver.config import load_settings
    from resolver.errors import ResolverError
    from resolver.events.inbox import Ingestor
    from resolver.events.signatures import sign

    settings = load_settings(Path(a.config), data_dir=a.data_dir).with_overrides(high_water=10**9)
    store = open_store(settings)
    key = secret_key(os.environ[SECRET_ENV])
    codes: Counter[str] = Counter()
    accepted: list[int] = []
    gave_up: dict[str, str] = {}
    try:
        ingestor = Ingestor(store, settings, AttributeSchema(settings))
        print("ready", flush=True)
        sys.stdin.readline()  # "go"
        go = time.monotonic()
        futures = []
        for j in range(a.first, a.first + a.events):
            body, wid, ts = event_body(j, a.customers), webhook_id(a.run_id, j), int(time.time())
            futures.append((j, ingestor.submit(SOURCE, {"webhook-id": wid, "webhook-timestamp": str(ts),
                                                        "webhook-signature": sign(key, wid, ts, body)}, body)))
        for j, future in futures:
            try:
                admission = future.result(60)
            except ResolverError as exc:
                codes[type(exc).__name__] += 1
                gave_up[str(j)] = f"{type(exc).__name__}: {exc}"
                continue
            codes[str(admission.http_status)] += 1
            if not admission.duplicate:
                accepted.append(j)
        elapsed = time.monotonic() - go
        ingestor.close()
        ingestor.flush()
    finally:
        store.close()
    return {"elapsed_s": round(elapsed, 3), "first": a.first, "events": a.events, "codes": dict(codes),
            "accepted": accepted, "gave_up": gave_up}


def main(argv: Sequence[str]) -> int:
    """`python -m bench.events backlog ...`: the backlog writer's command line; the secret comes from SECRET_ENV."""
    p = argparse.ArgumentParser(prog="python -m bench.events backlog",
                                description="the backlog writer: waits for a 'go' line on stdin, then admits")
    p.add_argument("--config", required=True, help="the server's blueprint")
    p.add_argument("--data-dir", required=True, help="the server's data directory")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--first", type=int, default=0, help="the first event's number")
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--run-id", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--sched-idle", action="store_true", help="run under SCHED_IDLE (only on CPU others leave)")
    a = p.parse_args(argv)
    if a.sched_idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    Path(a.json).write_text(json.dumps(admit(a)))
    return 0
