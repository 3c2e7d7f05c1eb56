"""Back-pressure bench (issue 5): Resolve p99 while 20,000 signed CRM events are pushed and drained.

    python -m bench.events_drain [--customers 20000] [--events 20000] [--rate 1000] [--baseline 20] \
        [--drain-rate 100] [--batch 100] [--high-water 2000] [--connections 4] [--out bench/out/events]

One run, everything on 127.0.0.1, separate processes for the server, the load clients and the pusher. In
production the load clients (the contact-center platform) and the pusher (the CRM) run on other machines; here
they share the server's cores, so by default the load clients run under SCHED_FIFO 1 (`--no-realtime-clients`
to not) and the pusher under SCHED_IDLE (`--no-pusher-sched-idle`): the measuring side is not delayed by
the work it measures, and the CRM's side takes only CPU the server leaves. The server keeps its own settings
(the events process under SCHED_IDLE, as `resolver serve` does by default).

1. `bench/dataset.py` writes N customers (source SALESFORCE) and the call-setup lookup mix; `resolver import`
   loads them. A blueprint in a temp dir has the example blueprint's server, storage and matching settings,
   `[sources.SALESFORCE]` mapping `Customer_Status__c` -> status and `Credit_Limit__c` -> credit_limit with a
   secret by env reference (a random `whsec_` value made for the run), and `[events]` with a small high-water
   mark (429s must appear) and the applier's rate. `resolver serve` starts on port 0 (gRPC and webhooks).
2. **Window A** (baseline): call-setup at `--rate` for `--baseline` s via `python -m bench.loadgen` (its own
   process, open loop, no floor windows).
3. **Window B** (drain): the same load while the pusher (`python -m bench.events_drain push`, its own process,
   HTTP/1.1 keep-alive, `--connections` concurrent requests) sends `--events` signed UPDATE events for existing
   external_ids as fast as it can, waiting `Retry-After` after each 429 (bounded by `--push-budget`). The
   pusher is released when the load clients' recorded window starts (their connections to the gRPC port are
   watched in /proc/net/tcp; then the loadgen's fixed lead, warm-up and gap), and the window is as long as the
   drain is expected to last (events / drain rate, less a margin), so Resolve is measured only while the inbox
   is being filled and drained; the event counters are sampled every 0.5 s to show that.
4. **Window C** (after): the same load again once the inbox is empty: a second baseline, to see machine noise.
5. Accounting: `GetEventCounters`, a Resolve of up to 500 of the updated customers (the newest event's values
   must be visible), then the server is stopped, `resolver check` runs (conservation: accepted = applied +
   dead-lettered + in inbox), and the change log and DLQ are read: every event the pusher saw accepted must
   appear exactly once, every other event must be listed with the reason it was given up.

Writes OUT/report.md and OUT/results.json (and OUT/server.log, OUT/*.loadgen.json). With the defaults a run takes
about 4.5 minutes on a quiet 2-core machine (the drain alone is events / rate = 200 s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import re
import secrets
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SECRET_ENV = "BENCH_EVENTS_SALESFORCE_SECRET"
SOURCE = "SALESFORCE"
EVENT_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+) .*webhooks on http://127\.0\.0\.1:(\d+)")
# the loadgen's timeline after its clients connected: query parsing + warm call (~0.1 s), then a fixed lead
# (runner.run_phases lead_s=0.5) before the warm-up, and the gap (0.3 s) between the warm-up and the window
LOADGEN_LEAD_S = 0.6
LOADGEN_GAP_S = 0.3
WARMUP_S = 2.0


def log(msg: str) -> None:
    print(f"[events-drain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the events -------------------------------------------------------------------------------------------------

def _stride(customers: int) -> int:
    """A step coprime with `customers`, so event j touches customer (j * stride) % customers: all of them once
    before any twice, spread over the key space."""
    return next(s for s in (7919, 7907, 7901, 1) if math.gcd(s, customers) == 1)


def event_of(j: int, customers: int) -> tuple[str, str, int, str]:
    """Event j: (external_id, status, credit_limit, timestamp). Later events have later timestamps."""
    ext = f"CRM-{(j * _stride(customers)) % customers:09d}"
    when = (EVENT_EPOCH + timedelta(seconds=j)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ext, ("Churned" if j % 3 == 0 else "Active"), j + 1, when


def event_body(j: int, customers: int) -> bytes:
    ext, status, credit, when = event_of(j, customers)
    return json.dumps({"event_type": "UPDATE", "source_system": SOURCE, "timestamp": when, "record_id": ext,
                       "object_type": "Account",
                       "change_set": {"Customer_Status__c": {"new_value": status},
                                      "Credit_Limit__c": {"new_value": credit}}}).encode()


def webhook_id(run_id: str, j: int) -> str:
    return f"msg_drain_{run_id}_{j}"


def secret_key(value: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret, as the server reads it (resolver.config._webhook_key)."""
    return base64.b64decode(value[6:]) if value.startswith("whsec_") else value.encode()


# -- the pusher (its own process) ---------------------------------------------------------------------------------

class _Conn:
    """One keep-alive HTTP/1.1 connection of the pusher: a request out, one response (Content-Length framed, as
    the server sends) back. Hand-written on asyncio streams because the pusher stands in for a CRM on another
    machine: it shares this box with the server, and aiohttp's client cost ~270 µs of CPU per request here
    against ~100 µs for this (signing and building the event included)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, head: bytes, body: bytes, timeout: float) -> tuple[int, dict[bytes, bytes], bytes]:
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


async def _push(a: argparse.Namespace, key: bytes) -> dict[str, Any]:
    from resolver.events.signatures import sign

    path = f"/v1/webhooks/{SOURCE}"
    codes: Counter[str] = Counter()
    accepted: dict[int, float] = {}  # event -> seconds after go when acknowledged 202
    duplicates: list[int] = []  # events whose 202 said "duplicate" (an earlier attempt had been stored)
    gave_up: dict[int, str] = {}
    retry_after: Counter[str] = Counter()
    first_429: list[float] = []
    pending = iter(range(a.events))
    conns = [_Conn(a.port) for _ in range(a.connections)]
    try:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # wait for "go"
        go = time.monotonic()
        deadline = go + a.budget

        async def worker(conn: _Conn) -> None:
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
                    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                            ValueError, IndexError) as exc:
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
    return {"go_monotonic": go, "elapsed_s": round(elapsed, 3), "events": a.events, "connections": a.connections,
            "codes": dict(codes), "accepted": sorted(accepted), "duplicates": sorted(duplicates),
            "gave_up": {str(k): v for k, v in sorted(gave_up.items())}, "retry_after": dict(retry_after),
            "first_429_s": None if t429 is None else round(t429, 3),
            "accepted_before_first_429": sum(1 for t in times if t429 is None or t <= t429),
            "last_accept_s": round(times[-1], 3) if times else None,
            "accepted_per_s": [per_s.get(s, 0) for s in range(int(times[-1]) + 1)] if times else []}


def push_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.events_drain push",
                                description="the pusher: waits for a 'go' line on stdin, then pushes")
    p.add_argument("--port", type=int, required=True, help="the webhook HTTP port on 127.0.0.1")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--budget", type=float, default=150.0, help="seconds after go; events not accepted by then are given up")
    p.add_argument("--run-id", required=True)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    key = secret_key(os.environ[SECRET_ENV])
    import uvloop  # the CRM's side costs this machine a third less CPU on uvloop than on asyncio's loop

    out = uvloop.run(_push(a, key))
    Path(a.json).write_text(json.dumps(out))
    return 0


# -- the orchestrator -------------------------------------------------------------------------------------------

def blueprint(a: argparse.Namespace) -> str:
    """Server, storage and matching as in examples/blueprint.toml; SALESFORCE owns status and credit_limit."""
    return textwrap.dedent(f"""\
        version = 1
        name = "events drain bench"
        [server]
        workers = 2
        threads = 16
        max_concurrent_rpcs = 256
        grace_period_s = 5
        [storage]
        map_size_mb = 4096
        max_readers = 1024
        sweep_interval_s = 60
        [index]
        hash = "xxh3-128"
        [matching]
        write_keys = ["external_id", "email"]
        default_region = "US"
        phone_acceptance = "valid"
        max_fanout = 25
        max_candidates = 10
        blocked_values = ["+18005550100", "unknown@acme.example"]
        [attributes.name]
        type = "string"
        max_length = 200
        [attributes.status]
        type = "string"
        enum = ["Active", "Churned", "Prospect", "Suspended"]
        owner = "SALESFORCE"
        [attributes.tier]
        type = "string"
        enum = ["bronze", "silver", "gold", "platinum"]
        [attributes.credit_limit]
        type = "number"
        minimum = 0
        owner = "SALESFORCE"
        [attributes.preferred_language]
        type = "string"
        pattern = "^[a-z]{{2}}(-[A-Z]{{2}})?$"
        [views.default]
        fields = ["name", "status", "tier", "preferred_language"]
        [reliability]
        peak_rps = 2000
        latency_target_ms = 1.0
        idempotency_retention_s = 86400
        [logging]
        payload = "masked"
        level = "INFO"
        [sources.SALESFORCE]
        field_map = {{ Customer_Status__c = "status", Credit_Limit__c = "credit_limit" }}
        secrets = [{{ env = "{SECRET_ENV}" }}]
        [events]
        http_listen = "127.0.0.1:0"
        rate_per_s = {a.drain_rate:g}
        batch = {a.batch}
        high_water = {a.high_water}
        timestamp_tolerance_s = 300
        process_nice = {a.events_nice}
        process_sched_idle = {"true" if a.events_sched_idle else "false"}
        commit_window_ms = {a.commit_window_ms:g}
        """)


def established_to(port: int) -> int:
    """Established TCP connections whose remote end is 127.0.0.1:`port` (the client side of each)."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 3 and f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


def cpu_jiffies() -> tuple[int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return f[3] + f[4], sum(f[:8])


def busy_since(before: tuple[int, int]) -> float:
    idle, total = cpu_jiffies()
    return round(1 - (idle - before[0]) / max(total - before[1], 1), 3)


def foreign_cpu() -> dict[int, float]:
    """CPU seconds so far of every live process that is not this run's (not this process or a descendant)."""
    from bench.loadgen.procstat import _stat

    stats = {int(n): st for n in os.listdir("/proc") if n.isdigit() and (st := _stat(int(n))) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo += children.get(pid, [])
    return {pid: cpu for pid, (_, cpu) in stats.items() if pid not in ours}


def foreign_cores(before: dict[int, float], seconds: float) -> float:
    """Cores other processes kept busy since `before` (processes that exited meanwhile are missed)."""
    now = foreign_cpu()
    return round(sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items()) / max(seconds, 1e-9), 2)


EVENTS_PROCESS = "resolver-events"  # the comm of `resolver serve`'s events process (webhooks + applier)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def process_cpu(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes by role: the supervisor (worker 0 with one worker), each
    spawned gRPC worker, the events process (webhooks + applier). Other children (the resource tracker) are left
    out."""
    from bench.loadgen.procstat import _stat

    out: dict[str, float] = {}
    if (st := _stat(server_pid)) is not None:
        out["supervisor"] = st[1]
    kids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit() and (st := _stat(int(n))) and st[0] == server_pid)
    workers = 0
    for pid in kids:
        st = _stat(pid)
        if st is None:
            continue
        if _comm(pid) == EVENTS_PROCESS:
            out["events process"] = out.get("events process", 0.0) + st[1]
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            out[f"worker {workers}"] = st[1]
            workers += 1
    return out


def _cpu_of(pid: int) -> float | None:
    from bench.loadgen.procstat import _stat

    st = _stat(pid)
    return st[1] if st is not None else None


def process_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores each server process kept busy between two `process_cpu` readings."""
    return {k: round((v - before.get(k, 0.0)) / max(seconds, 1e-9), 3) for k, v in after.items()}


def connection_placement(server_pid: int, ports: dict[str, int]) -> dict[str, Any]:
    """Which server process holds each established connection on the gRPC and webhook ports (SO_REUSEPORT
    spreads gRPC connections over the workers at random; webhooks and the applier are the events process's)."""
    from bench.loadgen.procstat import _stat

    kids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit() and (st := _stat(int(n))) and st[0] == server_pid)
    owner: dict[str, int] = {}
    for pid in [server_pid, *kids]:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    rows: list[list[str]] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows += [ln.split() for ln in Path(path).read_text().splitlines()[1:]]
        except OSError:
            continue
    rows = [f for f in rows if len(f) >= 10 and f[9] in owner]
    # the workers: the children listening on the gRPC port (not the resource tracker), in start order
    workers = sorted({owner[f[9]] for f in rows if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == ports["grpc"]
                      and owner[f[9]] != server_pid}) or kids
    counts: dict[str, dict[str, int]] = {}
    for f in rows:
        if f[3] != "01":
            continue
        local = int(f[1].rsplit(":", 1)[1], 16)
        for name, port in ports.items():
            if local == port:
                pid = owner[f[9]]
                label = ("events process" if _comm(pid) == EVENTS_PROCESS else "supervisor" if pid not in workers
                         else f"worker {workers.index(pid)}")
                counts.setdefault(label, {}).setdefault(name, 0)
                counts[label][name] += 1
    return {"workers": workers, "connections": counts}


class Sampler:
    """GetEventCounters every `period` s in a thread: (t since `t0`, accepted, applied, dead-lettered, throttled,
    in_inbox). One light unary call every half second next to 1,000 Resolves a second."""

    def __init__(self, stub: Any, t0: float, period: float = 0.5) -> None:
        self.stub, self.t0, self.period = stub, t0, period
        self.rows: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counter-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from resolver.v1 import resolver_pb2 as pb

        while not self._stop.is_set():
            try:
                s = self.stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=5)
                c = s.counters
                self.rows.append([round(time.monotonic() - self.t0, 3), c["accepted"], c["applied"], c["dead_lettered"],
                                  c["throttled"], s.in_inbox])
            except Exception as exc:  # noqa: BLE001 - a missed sample is reported, never fatal
                self.rows.append([round(time.monotonic() - self.t0, 3), -1, -1, -1, -1, -1])
                log(f"counter sample failed: {exc}")
            self._stop.wait(self.period)

    def last(self) -> list[float] | None:
        good = [r for r in self.rows if r[1] >= 0]
        return good[-1] if good else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _sched_idle() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def run_loadgen(a: argparse.Namespace, target: str, server_pid: int, queries: Path, duration: float, out: Path,
                name: str) -> subprocess.Popen[bytes]:
    cmd = [PY, "-m", "bench.loadgen", "--target", target, "--scenario", "call-setup", "--queries", str(queries),
           "--rate", f"{a.rate:g}", "--duration", f"{duration:g}", "--windows", "1", "--no-floor",
           "--warmup", f"{WARMUP_S:g}", "--clients", str(a.clients), "--server-pid", str(server_pid),
           "--json", str(out / f"{name}.loadgen.json")]
    if a.realtime_clients:
        cmd.append("--realtime")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=(out / f"{name}.loadgen.log").open("wb"), stderr=subprocess.STDOUT)


def finish_loadgen(proc: subprocess.Popen[bytes], out: Path, name: str, timeout: float) -> dict[str, Any]:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"loadgen window {name} did not finish in {timeout:.0f}s") from None
    if rc != 0:
        raise RuntimeError(f"loadgen window {name} failed: {(out / f'{name}.loadgen.log').read_text()[-2000:]}")
    doc = json.loads((out / f"{name}.loadgen.json").read_text())
    res: dict[str, Any] = doc["results"]["call-setup"]
    res["client_priority"] = doc.get("client_priority", "normal")
    return res


def window(a: argparse.Namespace, target: str, server_pid: int, queries: Path, duration: float, out: Path,
           name: str) -> dict[str, Any]:
    load0, busy0, other0, t = os.getloadavg(), cpu_jiffies(), foreign_cpu(), time.monotonic()
    server0 = process_cpu(server_pid)
    proc = run_loadgen(a, target, server_pid, queries, duration, out, name)
    res = finish_loadgen(proc, out, name, duration + 120)
    wall = time.monotonic() - t
    res["machine"] = {"loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                      "busy_fraction": busy_since(busy0), "wall_s": round(wall, 1),
                      "other_processes_cores": foreign_cores(other0, wall),
                      "server_process_cores": process_cores(server0, process_cpu(server_pid), wall)}
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["push"]:
        return push_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.events_drain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--events", type=int, default=20_000, help="signed UPDATE events to push")
    p.add_argument("--rate", type=float, default=1000.0, help="call-setup Resolves/s offered in every window")
    p.add_argument("--baseline", type=float, default=20.0, help="seconds of window A (and of window C)")
    p.add_argument("--no-after", action="store_true", help="skip window C (the baseline after the drain)")
    p.add_argument("--drain-rate", type=float, default=100.0,
                   help="[events] rate_per_s: the applier's pace (the server's default; below the admission rate, "
                        "so the inbox fills)")
    p.add_argument("--batch", type=int, default=100, help="[events] batch")
    p.add_argument("--high-water", type=int, default=2000, help="[events] high_water: 429s above it")
    p.add_argument("--connections", type=int, default=4, help="concurrent keep-alive requests of the pusher")
    p.add_argument("--push-budget", type=float,
                   help="seconds the pusher may take, then it gives up (default: 1.5 x events / drain rate, at least 150)")
    p.add_argument("--clients", type=int, default=2, help="load client processes")
    p.add_argument("--events-nice", type=int, default=10,
                   help="[events] process_nice: the events process's nice increment (server setting, not load)")
    p.add_argument("--commit-window-ms", type=float, default=5.0,
                   help="[events] commit_window_ms: admissions within this of the first share one synced commit")
    p.add_argument("--pusher-sched-idle", action=argparse.BooleanOptionalAction, default=True,
                   help="run the pusher (the CRM's side, not the server) under SCHED_IDLE (the default): in production "
                        "it is on another machine; here it then takes only CPU the server and the load clients leave")
    p.add_argument("--realtime-clients", action=argparse.BooleanOptionalAction, default=True,
                   help="run the load clients (the contact-center platform, the measuring side) under SCHED_FIFO 1 "
                        "(the default; needs root): in production they are on other machines; here, at normal "
                        "priority, their own scheduling delay was most of window B's p99 (bench/README.md)")
    p.add_argument("--events-sched-idle", action=argparse.BooleanOptionalAction, default=True,
                   help="[events] process_sched_idle (default true, as the server's default)")
    p.add_argument("--repeat", type=int, default=1,
                   help="independent runs (OUT/run-1 ...), then OUT/summary.md with each run's ratio and the median: "
                        "one run's p99 ratio moves by 2x between runs on a small shared machine")
    p.add_argument("--out", default="bench/out/events")
    p.add_argument("--work", help="where the dataset and data go (default: a temp dir, removed)")
    a = p.parse_args(argv)
    if a.push_budget is None:
        a.push_budget = max(150.0, 1.5 * a.events / a.drain_rate)
    out = Path(a.out) if Path(a.out).is_absolute() else ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.repeat > 1:
        return repeat(argv, a.repeat, out)
    started = time.monotonic()
    results: dict[str, Any] = {"command": "python -m bench.events_drain " + shlex.join(argv),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
                               "settings": {k: getattr(a, k) for k in ("customers", "events", "rate", "baseline",
                                                                       "drain_rate", "batch", "high_water",
                                                                       "connections", "push_budget", "clients",
                                                                       "events_nice", "events_sched_idle",
                                                                       "commit_window_ms", "pusher_sched_idle",
                                                                       "realtime_clients")}}
    with ExitStack() as stack:
        work = Path(a.work) if a.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="events-drain-")))
        work.mkdir(parents=True, exist_ok=True)
        results["verdicts"] = run(a, work, out, results, stack)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(render(results))
    log(f"report: {out / 'report.md'} ({results['elapsed_s']:.0f} s)")
    v = results["verdicts"]
    return 0 if v["no_event_lost"] and v["conserved"] else 1


def repeat(argv: list[str], n: int, out: Path) -> int:
    """`n` whole runs one after another, each with its own server, dataset and report in OUT/run-k; then
    OUT/summary.md and OUT/summary.json: every run's p99 during and without the drain, and the median ratio."""
    once: list[str] = []
    skip = False
    for arg in argv:  # the same command without --repeat / --out (each run gets its own folder)
        if skip:
            skip = False
        elif arg in ("--repeat", "--out"):
            skip = True
        elif not arg.startswith(("--repeat=", "--out=")):
            once.append(arg)
    codes, runs = [], []
    for k in range(1, n + 1):
        log(f"run {k} of {n}")
        codes.append(main(once + ["--out", str(out / f"run-{k}")]))
        r = json.loads((out / f"run-{k}" / "results.json").read_text())
        runs.append({"run": k, "started": r["started"], "a_p99_ms": r["window_a"]["latency_ms"]["p99"],
                     "b_p99_ms": r["window_b"]["latency_ms"]["p99"], **r["verdicts"]})
    ratios = [x["p99_ratio_b_over_a"] for x in runs if x["p99_ratio_b_over_a"] is not None]
    median = statistics.median(ratios) if ratios else float("nan")
    summary = {"command": "python -m bench.events_drain " + shlex.join(argv), "runs": runs,
               "median_p99_ratio_b_over_a": round(median, 3), "every_run_lost_nothing": all(c == 0 for c in codes)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["# Back-pressure bench: Resolve p99 during an event drain, repeated (issue 5)", "",
             f"Command: `{summary['command']}`", "",
             f"**Median p99 ratio (B during the drain / A without it): {median:.2f}×** over {n} runs (target ≤ 1.3×); "
             f"no event lost and counters conserved in every run: {'yes' if summary['every_run_lost_nothing'] else '**NO**'}.",
             "", "| run | started | p99 A ms | p99 B ms | B / A | B / C | report |", "|---:|---|---:|---:|---:|---:|---|"]
    for x in runs:
        c = f"{x['p99_ratio_b_over_c']:.2f}×" if x["p99_ratio_b_over_c"] else "-"
        lines.append(f"| {x['run']} | {x['started']} | {x['a_p99_ms']:.3f} | {x['b_p99_ms']:.3f} | "
                     f"{x['p99_ratio_b_over_a']:.2f}× | {c} | run-{x['run']}/report.md |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    log(f"summary: {out / 'summary.md'} (median B / A {median:.2f}x)")
    return 0 if summary["every_run_lost_nothing"] else 1


def machine_info() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip())
    from resolver import _hotpath

    return {"cpus": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "git": git + ("+dirty" if dirty else ""),
            "hot_path": getattr(_hotpath, "IMPLEMENTATION", getattr(_hotpath, "implementation", "?"))}


def run(a: argparse.Namespace, work: Path, out: Path, results: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
    import grpc

    from bench.dataset import generate
    from bench.run import Proc
    from resolver.v1 import resolver_pb2 as pb
    from resolver.v1 import resolver_pb2_grpc

    ds, data = work / "dataset", work / "data"
    log(f"dataset: {a.customers} customers -> {ds}")
    results["dataset"] = generate(ds, a.customers, max(a.customers, 20_000), 0)
    config = work / "events-bench.toml"
    config.write_text(blueprint(a))
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    os.environ[SECRET_ENV] = secret  # the server, `resolver check` and the pusher inherit it
    cmd = [str(Path(PY).parent / "resolver"), "import", str(ds / "customers.jsonl"), "--config", str(config),
           "--data-dir", str(data), "--no-progress"]
    t = time.monotonic()
    imp = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if imp.returncode != 0:
        raise SystemExit(f"import failed:\n{imp.stdout}\n{imp.stderr[-3000:]}")
    results["import"] = {"summary": imp.stdout.strip().splitlines()[-1], "seconds": round(time.monotonic() - t, 1)}
    log(results["import"]["summary"])

    server = Proc([str(Path(PY).parent / "resolver"), "serve", "--config", str(config), "--data-dir", str(data),
                   "--listen", "127.0.0.1:0"], "serving on", out / "server.log")
    stopped = [False]

    def stop_server() -> None:
        if not stopped[0]:
            stopped[0] = True
            server.stop()

    stack.callback(stop_server)
    m = SERVING.search((out / "server.log").read_text())
    if not m:
        raise SystemExit(f"cannot read the ports from {out / 'server.log'}")
    grpc_port, http_port = int(m.group(1)), int(m.group(2))
    target = f"127.0.0.1:{grpc_port}"
    results["server"] = {"grpc": target, "webhooks": f"http://127.0.0.1:{http_port}/v1/webhooks/{SOURCE}",
                         "pid": server.pid, "blueprint": config.read_text()}
    log(f"server pid {server.pid}: gRPC {target}, webhooks on {http_port}")
    channel = grpc.insecure_channel(target)
    stack.callback(channel.close)
    stub = resolver_pb2_grpc.IdentityResolverStub(channel)
    stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=10)  # connected, and the store answers
    queries = ds / "queries.jsonl"

    # -- window A: the baseline --------------------------------------------------------------------------------
    log(f"window A: call-setup at {a.rate:g}/s for {a.baseline:g}s, no events")
    results["window_a"] = window(a, target, server.pid, queries, a.baseline, out, "a_baseline")
    log(f"  A: p99 {results['window_a']['latency_ms']['p99']:.3f} ms")

    # -- window B: the same load while the pusher fills the inbox and the applier drains it ------------------------
    drain_s = a.events / a.drain_rate
    dur_b = round(min(120.0, max(5.0, 0.9 * drain_s - 1.0)), 1)
    run_id = secrets.token_hex(4)
    push_json = out / "pusher.json"
    push_json.unlink(missing_ok=True)
    pusher = subprocess.Popen([PY, "-m", "bench.events_drain", "push", "--port", str(http_port), "--events",
                               str(a.events), "--customers", str(a.customers), "--connections", str(a.connections),
                               "--budget", f"{a.push_budget:g}", "--run-id", run_id, "--json", str(push_json)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(out / "pusher.log").open("wb"),
                              preexec_fn=_sched_idle if a.pusher_sched_idle else None)
    stack.callback(lambda: pusher.poll() is None and pusher.kill())
    assert pusher.stdin is not None and pusher.stdout is not None
    if not select.select([pusher.stdout], [], [], 60)[0] or pusher.stdout.readline().strip() != b"ready":
        raise SystemExit(f"the pusher did not start: {(out / 'pusher.log').read_text()[-2000:]}")
    log(f"window B: call-setup at {a.rate:g}/s for {dur_b:g}s while {a.events} events are pushed "
        f"(drain at {a.drain_rate:g}/s takes ~{drain_s:.0f}s)")
    base_conns = established_to(grpc_port)
    load0, busy0, other0, t_b = os.getloadavg(), cpu_jiffies(), foreign_cpu(), time.monotonic()
    server_b0 = process_cpu(server.pid)
    loadgen = run_loadgen(a, target, server.pid, queries, dur_b, out, "b_drain")
    seen_deadline = time.monotonic() + 60
    while established_to(grpc_port) < base_conns + a.clients and time.monotonic() < seen_deadline:
        time.sleep(0.01)
    connected = time.monotonic()
    go_at = connected + LOADGEN_LEAD_S + WARMUP_S + LOADGEN_GAP_S
    time.sleep(max(0.0, go_at - time.monotonic()))
    go = time.monotonic()
    pusher.stdin.write(b"go\n")
    pusher.stdin.flush()
    busy_b = cpu_jiffies()
    sampler = Sampler(stub, go)
    placement: dict[str, Any] = {}
    placer = threading.Timer(3.0, lambda: placement.update(
        connection_placement(server.pid, {"grpc": grpc_port, "webhooks": http_port})))
    placer.start()
    pusher_cpu0 = _cpu_of(pusher.pid)
    b = finish_loadgen(loadgen, out, "b_drain", dur_b + 120)
    pusher_cpu1 = _cpu_of(pusher.pid)
    b["machine"] = {"loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "busy_fraction": busy_since(busy0), "busy_fraction_from_go": busy_since(busy_b),
                    "wall_s": round(time.monotonic() - t_b, 1),
                    "other_processes_cores": foreign_cores(other0, time.monotonic() - t_b),
                    "server_process_cores": process_cores(server_b0, process_cpu(server.pid), time.monotonic() - t_b),
                    "connected_s_before_go": round(go - connected, 3),
                    # the pusher's CPU from its release to the end of B (it is still pushing then), in cores
                    "pusher_cores": (round((pusher_cpu1 - pusher_cpu0) / max(time.monotonic() - go, 1e-9), 3)
                                     if pusher_cpu0 is not None and pusher_cpu1 is not None else None)}
    placer.join(10)
    b["connection_placement"] = placement
    results["window_b"] = b
    log(f"  B: p99 {b['latency_ms']['p99']:.3f} ms; waiting for the pusher and the drain")
    try:
        pusher.wait(a.push_budget + 60)
    except subprocess.TimeoutExpired:
        pusher.kill()
        raise SystemExit("the pusher overran its budget") from None
    push = json.loads(push_json.read_text())
    drain_deadline = time.monotonic() + max(60.0, 3 * a.high_water / a.drain_rate + 30)
    while ((row := sampler.last()) is None or row[5] != 0) and time.monotonic() < drain_deadline:
        time.sleep(0.2)
    drained_at = time.monotonic() - go
    time.sleep(0.6)  # one more sample after the inbox emptied
    sampler.stop()
    results["pusher"] = {k: v for k, v in push.items() if k not in ("accepted",)} | {"accepted_count": len(push["accepted"])}
    results["drain"] = drain_figures(a, sampler.rows, push, dur_b, drained_at)
    log(f"  pushed: {push['codes']}, drained {results['drain']['drained']} after {drained_at:.1f}s")

    # -- window C: the baseline again, inbox empty ------------------------------------------------------------------
    if not a.no_after:
        log(f"window C: call-setup at {a.rate:g}/s for {a.baseline:g}s, inbox empty")
        results["window_c"] = window(a, target, server.pid, queries, a.baseline, out, "c_after")
        log(f"  C: p99 {results['window_c']['latency_ms']['p99']:.3f} ms")

    # -- accounting ----------------------------------------------------------------------------------------------
    snap = stub.GetEventCounters(pb.GetEventCountersRequest(), timeout=10)
    results["counters"] = {"counters": dict(snap.counters), "in_inbox": snap.in_inbox, "in_dlq": snap.in_dlq,
                           "conserved": snap.conserved}
    results["visible"] = check_visible(stub, pb, push["accepted"], a.customers)
    channel.close()
    stop_server()
    chk = subprocess.run([str(Path(PY).parent / "resolver"), "check", "--config", str(config), "--data-dir", str(data)],
                         cwd=ROOT, capture_output=True, text=True)
    results["check"] = {"exit": chk.returncode, "output": (chk.stdout + chk.stderr).strip().splitlines()}
    results["ledger"] = reconcile(config, data, run_id, push)
    return verdicts(results)


def drain_figures(a: argparse.Namespace, rows: list[list[float]], push: dict[str, Any], dur_b: float,
                  drained_at: float) -> dict[str, Any]:
    good = [r for r in rows if r[1] >= 0]
    in_window = [r for r in good if r[0] <= dur_b]
    busy = [r for r in good if r[2] > 0]
    first_apply = busy[0][0] if busy else None
    empty = next((r for r in good if r[0] > 0.5 and r[5] == 0 and r[1] >= len(push["accepted"])), None)
    applied_total = good[-1][2] + good[-1][3] if good else 0
    rate = None
    if first_apply is not None and empty is not None and empty[0] > first_apply:
        rate = round(applied_total / (empty[0] - first_apply), 1)  # samples every 0.5 s: a few % either way
    win_rate = None
    if len(in_window) >= 2:
        r0, r1 = in_window[0], in_window[-1]
        win_rate = round(((r1[2] + r1[3]) - (r0[2] + r0[3])) / max(r1[0] - r0[0], 1e-9), 1)
    return {"samples": good, "columns": ["t_s", "accepted", "applied", "dead_lettered", "throttled", "in_inbox"],
            "window_b_s": dur_b, "drained": empty is not None, "inbox_empty_after_s": empty[0] if empty else None,
            "waited_s": round(drained_at, 1),
            "inbox_nonempty_through_window_b": bool(in_window) and all(r[5] > 0 for r in in_window if r[0] >= 1.0),
            # the inbox not yet drained when window B ended, and through B either never empty (back-pressure) or fed
            # in every second (admissions slower than the applier)
            "events_flowing_through_window_b": (empty is not None and empty[0] >= dur_b and bool(in_window)
                                                and (all(r[5] > 0 for r in in_window if r[0] >= 1.0)
                                                     or all(n > 0 for n in push["accepted_per_s"][:int(dur_b)]))),
            "admissions_in_window_b_per_s": round(sum(push["accepted_per_s"][:int(dur_b)]) / max(int(dur_b), 1), 1),
            "inbox_max": max((r[5] for r in good), default=0),
            "inbox_min_in_window_b": min((r[5] for r in in_window if r[0] >= 1.0), default=None),
            "inbox_max_in_window_b": max((r[5] for r in in_window), default=None),
            "drain_rate_per_s": rate, "drain_rate_in_window_b_per_s": win_rate, "configured_rate_per_s": a.drain_rate,
            "admissions_per_s": (round(len(push["accepted"]) / push["last_accept_s"], 1)
                                 if push.get("last_accept_s") else None),
            "burst_admissions_per_s": (round(push["accepted_before_first_429"] / push["first_429_s"], 1)
                                       if push.get("first_429_s") else None)}


def check_visible(stub: Any, pb: Any, accepted: list[int], customers: int, n: int = 500) -> dict[str, Any]:
    """Resolve up to `n` updated customers: each must show its newest accepted event's status and credit_limit."""
    newest: dict[str, int] = {}
    for j in accepted:
        ext = event_of(j, customers)[0]
        newest[ext] = max(j, newest.get(ext, -1))
    exts = sorted(newest)
    picked = exts[:: max(1, len(exts) // n)][:n]
    wrong: list[str] = []
    for ext in picked:
        _, status, credit, _ = event_of(newest[ext], customers)
        r = stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id=ext), fields=["status", "credit_limit"]),
                         timeout=5)
        got = dict(r.attributes)
        if r.outcome != pb.OUTCOME_MATCHED or got.get("status") != status or got.get("credit_limit") != credit:
            wrong.append(f"{ext}: expected {status}/{credit}, got {pb.Outcome.Name(r.outcome)} {got}")
    return {"checked": len(picked), "wrong": len(wrong), "examples": wrong[:5]}


def reconcile(config: Path, data: Path, run_id: str, push: dict[str, Any]) -> dict[str, Any]:
    """Read the change log and the DLQ (server stopped): every event the pusher had acknowledged 202 must be in
    exactly one of them exactly once; no other event of this run may be there."""
    from resolver.config import load_settings
    from resolver.events import dlq
    from resolver.store import Store

    prefix = f"msg_drain_{run_id}_"
    store = Store(load_settings(config, data_dir=str(data)), readonly=True)
    applied: Counter[int] = Counter()
    dead: dict[int, str] = {}
    try:
        with store.read() as view:
            for ch in view.iter_changes():
                wid = ch.get("event", {}).get("webhook_id", "")
                if wid.startswith(prefix):
                    applied[int(wid[len(prefix):])] += 1
            if "ev_dlq" in store.db:
                for meta, _ in dlq.iterate(view.txn, store.db["ev_dlq"]):
                    wid = meta.get("webhook_id", "")
                    if wid.startswith(prefix):
                        dead[int(wid[len(prefix):])] = str(meta.get("reason", "?"))
    finally:
        store.close()
    acked = set(push["accepted"])
    gave_up = {int(k) for k in push["gave_up"]}
    seen = set(applied) | set(dead)
    return {"acknowledged_202": len(acked), "applied_once": sum(1 for j in acked if applied[j] == 1 and j not in dead),
            "dead_lettered": len(dead), "dead_letter_reasons": dict(Counter(dead.values())),
            "applied_twice_or_more": sum(1 for c in applied.values() if c > 1),
            "acknowledged_but_missing": sorted(acked - seen)[:20], "missing_count": len(acked - seen),
            "stored_but_not_acknowledged": sorted(seen - acked)[:20], "unacknowledged_stored_count": len(seen - acked),
            "given_up": len(gave_up), "accounted": len(acked) + len(gave_up), "pushed": push["events"],
            "neither_acknowledged_nor_given_up": push["events"] - len(acked | gave_up)}


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    a, b = r["window_a"]["latency_ms"], r["window_b"]["latency_ms"]
    c = r.get("window_c", {}).get("latency_ms")
    led, cnt = r["ledger"], r["counters"]["counters"]
    ratio = b["p99"] / a["p99"] if a["p99"] else None
    no_loss = (led["missing_count"] == 0 and led["applied_twice_or_more"] == 0 and led["neither_acknowledged_nor_given_up"] == 0
               and led["unacknowledged_stored_count"] == 0 and cnt["accepted"] == led["acknowledged_202"]
               and r["visible"]["wrong"] == 0)
    return {"p99_ratio_b_over_a": None if ratio is None else round(ratio, 3),
            "p99_ratio_b_over_c": round(b["p99"] / c["p99"], 3) if c and c["p99"] else None,
            "p99_target_holds": ratio is not None and ratio <= 1.3,
            "conserved": bool(r["counters"]["conserved"]) and r["check"]["exit"] == 0,
            "no_event_lost": no_loss, "all_accepted": led["acknowledged_202"] == led["pushed"],
            "throttled_429": r["pusher"]["codes"].get("429", 0), "first_429_s": r["pusher"]["first_429_s"],
            "window_inside_drain": r["drain"]["events_flowing_through_window_b"]}


# -- the report -------------------------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _slowest_slices(b: dict[str, Any], samples: list[list[Any]], n: int = 5) -> list[str]:
    """The worst `n` slices of window B (the loadgen's slowest call per slice, from B's start = the release),
    each with the event counters sampled nearest to it: a p99 made by one stall shows as one slice far above
    the rest, and whether the inbox was admitting or draining then."""
    worst = b.get("slowest_per_slice_ms") or []
    if not worst:
        return []
    width = b.get("slice_s", 0.1)
    rows = []
    for k in sorted(range(len(worst)), key=worst.__getitem__, reverse=True)[:n]:
        t = k * width
        near = min(samples, key=lambda row: abs(row[0] - t)) if samples else None
        where = f" (at {near[0]:.1f} s: applied {near[2]:,}, in inbox {near[5]:,})" if near else ""
        rows.append(f"{t:.1f} s: {worst[k]:.2f} ms{where}")
    median = statistics.median(worst)
    return [f"- Slowest calls of window B by {width * 1000:g} ms slice (median slice {median:.2f} ms): "
            + "; ".join(rows) + ".", ""]


def render(r: dict[str, Any]) -> str:
    s, v, d, pu, led = r["settings"], r["verdicts"], r["drain"], r["pusher"], r["ledger"]
    cnt = r["counters"]["counters"]
    wins = [("A: no events (before)", r["window_a"]), ("B: during push + drain", r["window_b"])]
    if "window_c" in r:
        wins.append(("C: no events (after)", r["window_c"]))
    a99 = r["window_a"]["latency_ms"]["p99"]
    lines = [
        "# Back-pressure bench: Resolve during an event drain (issue 5)", "",
        f"{r['started']} · git {r['machine']['git']} · {r['machine']['cpus']} CPU {r['machine']['cpu_model']} · "
        f"Python {r['machine']['python']} · hot path {r['machine']['hot_path']} · {r.get('elapsed_s', '?')} s", "",
        f"Command: `{r['command']}`", "",
        f"{s['customers']:,} customers; call-setup at {s['rate']:g}/s (open loop, {s['clients']} load client processes); "
        f"{s['events']:,} signed UPDATE events pushed over HTTP keep-alive with {s['connections']} concurrent requests; "
        f"inbox high-water {s['high_water']:,}, applier {s['drain_rate']:g}/s in batches of {s['batch']}; "
        f"webhooks and applier in the events process at nice +{s.get('events_nice', 10)}"
        f"{' under SCHED_IDLE' if s.get('events_sched_idle') else ''}, commit window {s.get('commit_window_ms', 0):g} ms"
        f"{'; the pusher under SCHED_IDLE' if s.get('pusher_sched_idle') else ''}; load clients "
        f"{r['window_a'].get('client_priority', 'normal')}.", "",
        "## Verdicts", "",
        f"- **Resolve p99 during the drain vs without it: {_ms(r['window_b']['latency_ms']['p99'])} ms vs {_ms(a99)} ms = "
        f"{v['p99_ratio_b_over_a']:.2f}×** (target ≤ 1.3×): the target "
        f"{'**holds**' if v['p99_target_holds'] else '**does NOT hold**'}"
        + (f"; against the baseline after the drain (C): {v['p99_ratio_b_over_c']:.2f}×." if v["p99_ratio_b_over_c"] else "."),
        f"- **No event lost: {'yes' if v['no_event_lost'] else 'NO'}**: {led['acknowledged_202']:,} of {led['pushed']:,} "
        f"acknowledged 202 ({led['given_up']} given up by the pusher), {led['applied_once']:,} applied exactly once, "
        f"{led['dead_lettered']} dead-lettered, {led['missing_count']} acknowledged but missing, "
        f"{led['applied_twice_or_more']} applied twice, {led['unacknowledged_stored_count']} stored without a 202; "
        f"server `accepted` counter {cnt['accepted']:,}; {r['visible']['checked']} customers resolved afterwards show "
        f"their newest event's values ({r['visible']['wrong']} wrong).",
        f"- **Conservation: {'holds' if v['conserved'] else 'FAILS'}**: accepted {cnt['accepted']:,} = applied "
        f"{cnt['applied']:,} + dead-lettered {cnt['dead_lettered']:,} + in inbox {r['counters']['in_inbox']} "
        f"(`resolver check` exit {r['check']['exit']}).",
        (f"- **429s once the inbox is full: {v['throttled_429']:,}** (server `throttled` {cnt['throttled']:,}); the first "
         f"after {_s(v['first_429_s'])}, once {pu['accepted_before_first_429']:,} events were admitted "
         f"(high-water {s['high_water']:,}); largest inbox seen {d['inbox_max']:,}. Retry-After values: {pu['retry_after']}."
         if v["throttled_429"] else
         f"- **429s: none**: the inbox never reached the high-water mark ({s['high_water']:,}; largest seen "
         f"{d['inbox_max']:,}): the pusher's admissions ({_r(d['admissions_in_window_b_per_s'])}/s during B, "
         f"{_r(d['admissions_per_s'])}/s overall) did not outpace the applier ({s['drain_rate']:g}/s). Back-pressure was "
         "not exercised; a lower `--drain-rate` or `--high-water` makes it so."),
        f"- Events admitted and applied throughout window B: {'yes' if v['window_inside_drain'] else 'NO'} "
        f"({_r(d['admissions_in_window_b_per_s'])} admissions/s during B; inbox between {d['inbox_min_in_window_b']} and "
        f"{d['inbox_max_in_window_b']}; inbox empty {_s(d['inbox_empty_after_s'])} after the release, "
        f"B ended at {d['window_b_s']:g} s).",
        *shared_warning(wins),
        "",
        "## Resolve latency (ms, from the intended send time)", "",
        "| window | offered/s | achieved/s | p50 | p90 | p99 | p99.9 | max | errors | server CPU/req µs | send lag p99 µs "
        "| loadavg 1m before → after | CPU busy | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for name, w in wins:
        lat, mach = w["latency_ms"], w["machine"]
        lines.append(f"| {name} | {w['offered_rate']:g} | {w['achieved_rate']:.1f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
                     f"{_ms(lat['p99'])} | {_ms(lat['p99.9'])} | {_ms(lat['max'])} | {w['errors'] or 0} | "
                     f"{w['server_cpu_per_request_us'] if w['server_cpu_per_request_us'] is not None else '-'} | "
                     f"{w['send_lag_us']['p99']} | {mach['loadavg_before'][0]:.2f} → {mach['loadavg_after'][0]:.2f} | "
                     f"{mach['busy_fraction']:.0%} | {mach.get('other_processes_cores', '-')} |")
    lines.append("")
    lines.append("| ratio B / A | " + " | ".join(
        f"{k} {r['window_b']['latency_ms'][k] / r['window_a']['latency_ms'][k]:.2f}×" for k in ("p50", "p99", "p99.9", "max")
        if r["window_a"]["latency_ms"][k]) + " |")
    lines += [
        "", "Server CPU/req in B includes the admissions and the applier (the same server process tree: the events "
        "process is a child of `resolver serve`).",
        "Server CPU by process (cores, over each window): " + "; ".join(
            f"{name.split(':')[0]} {w['machine'].get('server_process_cores', '-')}" for name, w in wins) + ".",
        f"The pusher (not part of the server) used {r['window_b']['machine'].get('pusher_cores', '-')} cores during B.",
        "Connections during B per server process (gRPC: the loadgen's clients + this run's counter channel; "
        f"webhooks: the pusher's): {r['window_b'].get('connection_placement', {}).get('connections', '-')}.", "",
        "## Intake and drain", "",
        f"- Pusher: {pu['events']:,} events in {pu['elapsed_s']:.1f} s; answers {pu['codes']}; "
        f"{len(pu['duplicates'])} 202 'duplicate' (an earlier attempt had been stored).",
        f"- Admissions: {_r(d['admissions_per_s'])}/s overall (accepted / time of the last 202), "
        f"{_r(d['burst_admissions_per_s'])}/s in the first burst (before the first 429); per second: "
        f"{pu['accepted_per_s']}.",
        f"- Drain: inbox empty {_s(d['inbox_empty_after_s'])} after the first event; applier {_r(d['drain_rate_per_s'])}/s "
        f"overall, {_r(d['drain_rate_in_window_b_per_s'])}/s during window B (configured {d['configured_rate_per_s']:g}/s).",
        f"- Window B: {d['window_b_s']:g} s recorded, starting when the pusher was released; the drain was expected to "
        f"take {s['events'] / s['drain_rate']:.0f} s.", "",
        *_slowest_slices(r["window_b"], d["samples"]),
        "Inbox over time (s after the release: accepted, applied, in inbox), every 2 s:", "", "```",
    ]
    last = -2.0
    for row in d["samples"]:
        if row[0] - last >= 2.0 or row is d["samples"][-1]:
            lines.append(f"{row[0]:6.1f} s  accepted {row[1]:6d}  applied {row[2]:6d}  throttled {row[4]:6d}  "
                         f"in inbox {row[5]:5d}")
            last = row[0]
    lines += ["```", "", "## `resolver check` (server stopped)", "", "```", *r["check"]["output"], "```", "",
              "## How it runs", "",
              "Separate processes: `resolver serve` (2 workers, the example blueprint's server settings), the loadgen "
              "(`python -m bench.loadgen`, its own client processes), the pusher (`python -m bench.events_drain push`). "
              "The pusher is released when the loadgen's recorded window starts (estimated from its clients' connections, "
              f"{r['window_b']['machine']['connected_s_before_go']:.2f} s before); window B is shorter than the expected "
              "drain so every Resolve in it competes with admissions and/or the applier. Figures: `results.json`.", ""]
    return "\n".join(lines)


def shared_warning(wins: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """A plain warning when processes outside this run used CPU during a window (another benchmark, a build)."""
    busy = [(name, w["machine"].get("other_processes_cores") or 0.0) for name, w in wins]
    if all(c < 0.15 for _, c in busy):
        return [f"- The machine was quiet apart from this run (other processes ≤ {max(c for _, c in busy):.2f} cores "
                "in every window)."]
    return ["- **The machine was shared**: other processes kept " + ", ".join(f"{c:.2f} cores busy in {n}" for n, c in busy)
            + " (of " + str(os.cpu_count()) + "): the latency figures are not clean."]


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
