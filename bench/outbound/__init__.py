"""Outbound delivery bench (issue 15): how fast the deliverer drains the outbox to a local CRM receiver, and what a
drain costs Resolve's p99 at call-setup load.

    python -m bench.outbound [--customers 20000] [--messages 20000] [--rate 1000] [--baseline 20] [--window-b 10] \
        [--concurrency 64] [--repeat 3] [--out bench/out/outbound]

One run, everything on 127.0.0.1, separate processes for the server, the load clients, the receiver and the backlog
writer. In production the load clients (the contact-center platform) and the receiver (the CRM) are on other
machines; here they share the server's two cores, so, as in bench/events, the load clients run under SCHED_FIFO 1
(`--no-realtime-clients` not to) and the receiver under SCHED_IDLE (`--no-receiver-sched-idle`). The server keeps
its own settings: the deliverer runs in its outbound process at the events process's priority (SCHED_IDLE, nice
+10), `[outbound.CRM] rate_per_s = 0` (unlimited) and `concurrency` from `--concurrency`.

1. `bench/dataset.py` writes N customers and the call-setup lookup mix; `resolver import` loads them (an import
   queues no outbound message). The receiver (`python -m bench.outbound receive`) starts *held*: it checks each
   request's signature and then answers nothing until told "go". `resolver serve` starts with `[outbound.CRM]`
   pointing at it.
2. The backlog writer (`python -m bench.outbound backlog`) commits `--messages` real Upserts (credit_limit changes,
   one customer.updated message each) through the real write path, 1,000 per transaction: the outbox holds them,
   and the deliverer waits on `concurrency` held requests.
3. **Window A**: call-setup at `--rate` for `--baseline` s: p99 with a full outbox and an idle deliverer.
4. **Window B**: the same load; once its recorded window starts the receiver is told "go" and the deliverer drains
   at full speed for the whole window (the outbox is sampled every 0.5 s: it must still hold messages when B
   ends, else the window saw idle time too and the run says so).
5. **Window C**: the same load again once the outbox is empty: a second baseline, to see machine noise.
6. **Window D**: no Resolve load: the receiver is held, a second backlog of `--messages` is written, the receiver
   is told "go", and the drain is timed from "go" to an empty outbox: the deliverer's own rate (messages/s).
7. Accounting: the counters must conserve (committed = delivered + pending + dead + discarded), the receiver must
   have acknowledged every message once at least, with no bad signature; `resolver check` must pass.

Writes OUT/report.md and OUT/results.json (OUT/server.log, OUT/*.loadgen.json); `--repeat N`: OUT/run-k and
OUT/summary.md with the median ratio B / A and the median drain rate.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def log(msg: str) -> None:
    """A progress line on stdout, time-stamped."""
    print(f"[outbound-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
