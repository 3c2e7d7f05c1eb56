"""Back-pressure and drain bench (issues 5 and 14): Resolve p99 while signed CRM events are pushed and drained, and
how fast the applier drains with and without Resolve load.

    python -m bench.events [--customers 20000] [--events 20000] [--rate 1000] [--baseline 20] \
        [--drain-rate 2000] [--min-drain-rate 100] [--idle-cpu 0.03] [--busy-cpu 0.15] [--batch 100] \
        [--high-water 2000] [--connections 4] [--idle-events N] [--idle-connections 32] [--backlog-events N] \
        [--out bench/out/events]

One run, everything on 127.0.0.1, separate processes for the server, the load clients and the pusher. In
production the load clients (the contact-center platform) and the pusher (the CRM) run on other machines; here
they share the server's cores, so by default the load clients run under SCHED_FIFO 1 (`--no-realtime-clients`
to not) and the pusher under SCHED_IDLE (`--no-pusher-sched-idle`): the measuring side is not delayed by
the work it measures, and the CRM's side takes only CPU the server leaves. The server keeps its own settings
(the events process under SCHED_IDLE, as `resolver serve` does by default). The applier's pace adapts
(resolver.events.pace): `--drain-rate` is `[events] rate_per_s`, its ceiling while the serving processes are
idle, `--min-drain-rate` its floor while they are busy (the server's defaults unless given; equal values: the
old fixed pace).

1. `bench/dataset.py` writes N customers (source SALESFORCE) and the call-setup lookup mix; `resolver import`
   loads them. A blueprint in a temp dir has the example blueprint's server, storage and matching settings,
   `[sources.SALESFORCE]` mapping `Customer_Status__c` -> status and `Credit_Limit__c` -> credit_limit with a
   secret by env reference (a random `whsec_` value made for the run), and `[events]` with a small high-water
   mark (429s must appear) and the applier's pace. `resolver serve` starts on port 0 (gRPC and webhooks).
2. **Window A** (baseline): call-setup at `--rate` for `--baseline` s via `python -m bench.loadgen` (its own
   process, open loop, no floor windows).
3. **Window B** (drain under load): the same load while the pusher (`python -m bench.events push`, its own
   process, HTTP/1.1 keep-alive, `--connections` concurrent requests) sends `--events` signed UPDATE events for
   existing external_ids as fast as it can, waiting `Retry-After` after each 429 (bounded by `--push-budget`).
   The pusher is released when the load clients' recorded window starts (their connections to the gRPC port
   are watched in /proc/net/tcp; then the loadgen's fixed lead, warm-up and gap), and the window is as long as
   the drain is expected to last at the applier's floor (events / floor, less a margin; `--window-b`), so
   Resolve is measured only while the inbox is being filled and drained; the event counters are sampled every
   0.5 s to show that, and the pace the applier logged is read from the server's log.
4. **Window C** (after): the same load again once the inbox is empty: a second baseline, to see machine noise.
5. **Window D** (drain with no load, over HTTP): `--idle-events` more events (numbered after B's, so newer)
   pushed with `--idle-connections` concurrent requests and no Resolve load: what a CRM's bulk push gets end to
   end (the webhook intake can be the limit here, not the applier).
6. **Window E** (a backlog with no load): `--backlog-events` more events written into the inbox by the backlog
   writer (`python -m bench.events backlog`, its own process: the admission path without HTTP, past the
   high-water mark), faster than the applier drains them: the applier's own rate with idle serving processes.
7. Accounting: `GetEventCounters`, a Resolve of up to 500 of the updated customers (the newest event's values
   must be visible), then the server is stopped, `resolver check` runs (conservation: accepted = applied +
   dead-lettered + in inbox), and the change log and DLQ are read: every event the pusher or the backlog writer
   saw accepted must appear exactly once, every other event must be listed with the reason it was given up.

Writes OUT/report.md and OUT/results.json (and OUT/server.log, OUT/*.loadgen.json). How long a run takes is in
bench/README.md.

The modules: `crm` (the events and their signing key), `pusher` (the CRM's HTTP/1.1 client, its own process),
`backlog` (the backlog writer of window E), `blueprint`, `serverstat` (the server's processes and connections),
`windows` (a loadgen window and the machine around it), `run` (the orchestration), `accounting` (drain figures,
ledger, verdicts), `report`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def floor_rate(a: Any) -> float:
    """The applier's floor for the bench's options: its pace while Resolve keeps the workers busy."""
    return float(min(a.min_drain_rate, a.drain_rate))


def log(msg: str) -> None:
    """A progress line on stdout, time-stamped."""
    print(f"[events-drain {time.strftime('%H:%M:%S')}] {msg}", flush=True)
