"""Writers' throughput beside change-feed watchers (issue 15 part 4): Upserts/s from 4 writers with no watcher, with
a live watcher (takes every event as it is committed) and with a stalled watcher (opens the stream, never reads).

    python -m bench.feed [--repeat 3] [--seconds 8] [--workers 2] [--out bench/out/feed]

One `resolver serve` (--workers processes) on a temporary data directory, open attribute schema, `[changes]
stall_timeout_s = 600` so the stalled watcher stays stalled through its phase instead of being cut off (being cut
off is tests/integration/test_feed.py's business). Four writer processes, one round_robin channel each over every
worker's own port (as ResolverClient connects), closed loop (the next Upsert once the previous answered), each over
its own 200 customers, every Upsert changing an attribute: every one commits a change-log entry.

- live: one process reads WatchChanges(from_sequence=0) as fast as events come and checks them gap-free;
- stalled: one process opens WatchChanges(from_sequence=1) over a channel with a 16 KiB stream window (no BDP
  probing) and never reads: the log's backlog fills the window at once and the server's send blocks (the state a
  client that stops reading leaves the server in until `stall_timeout_s`).

A round runs the three cases back to back, the order rotated each round; a case: its watcher started, 1 s, then
the writers for --seconds. A figure is the median over rounds, a ratio the median of per-round ratios to "none"
(drift on this shared machine hits the cases of a round alike). Before round 1 the writers run once unmeasured
(warm-up; it also gives the stalled watcher its backlog). Prints a table; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from bench import procstat

ROOT = Path(__file__).resolve().parent.parent
RESOLVER = str(Path(sys.executable).parent / "resolver")
WRITERS = 4
CUSTOMERS_PER_WRITER = 200
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]
CASES = ("none", "live", "stalled")
BLUEPRINT = textwrap.dedent(
    """
    version = 1
    [storage]
    map_size_mb = 4096
    [changes]
    stall_timeout_s = 600
    """
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the client processes (spawned) ------------------------------------------------------------------------------


def _writer(target: str, index: int, run: str, start_at: float, seconds: float, out: Any) -> None:
    import grpc
    from google.protobuf import struct_pb2

    from resolver.v1 import resolver_pb2 as pb
    from resolver.v1 import resolver_pb2_grpc

    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    stub = resolver_pb2_grpc.IdentityResolverStub(channel)
    stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)  # connected before the clock starts
    n = 0
    time.sleep(max(0.0, start_at - time.time()))
    end = start_at + seconds
    while time.time() < end:
        attributes = struct_pb2.Struct()
        attributes.update({"tier": f"{run}-{n}"})
        stub.Upsert(pb.UpsertRequest(idempotency_key=f"{run}-{index}-{n}", attributes=attributes,
                                     identifiers=pb.Identifiers(external_id=f"FB-{index}-{n % CUSTOMERS_PER_WRITER}")),
                    timeout=30)
        n += 1
    channel.close()
    out.put(n)


def _live(address: str, stop: Any, out: Any) -> None:
    import grpc

    from resolver.v1 import resolver_pb2 as pb

    channel = grpc.insecure_channel(address)
    # raw bytes: this process shares the machine's cores with the server and the writers, so it decodes only the
    # sequence (field 1, the message's first bytes) and leaves the rest of each event alone
    call = channel.unary_stream("/resolver.v1.IdentityResolver/WatchChanges",
                                request_serializer=pb.WatchRequest.SerializeToString,
                                response_deserializer=None)(pb.WatchRequest(from_sequence=0))
    seen = {"events": 0, "gaps": 0, "last": 0}

    def read() -> None:
        try:
            for raw in call:
                seq = _sequence(raw)
                if seen["last"] and seq != seen["last"] + 1:
                    seen["gaps"] += 1
                seen["last"] = seq
                seen["events"] += 1
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stop.wait()
    call.cancel()
    reader.join(10)
    channel.close()
    out.put(seen)


def _sequence(raw: bytes) -> int:
    """ChangeEvent.sequence from its serialized bytes: field 1 (tag 0x08) is written first, as a varint."""
    if not raw or raw[0] != 0x08:
        return 0
    value = shift = 0
    for byte in raw[1:11]:
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return value


def _stalled(address: str, stop: Any, out: Any) -> None:
    import grpc

    from resolver.v1 import resolver_pb2 as pb
    from resolver.v1 import resolver_pb2_grpc

    channel = grpc.insecure_channel(address, options=SMALL_WINDOW)
    call = resolver_pb2_grpc.IdentityResolverStub(channel).WatchChanges(pb.WatchRequest(from_sequence=1))
    stop.wait()  # never read
    call.cancel()
    channel.close()
    out.put({})


# -- the run -------------------------------------------------------------------------------------------------------


def writers_run(ctx: Any, target: str, run: str, seconds: float) -> int:
    """Upserts of the 4 writers over `seconds`, started together."""
    out = ctx.Queue()
    start_at = time.time() + 1.5
    procs = [ctx.Process(target=_writer, args=(target, i, run, start_at, seconds, out)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join(30)
    return total


def run_case(ctx: Any, case: str, server_pid: int, address: str, target: str, run: str,
             seconds: float) -> dict[str, Any]:
    """One case: Upserts/s, the server's CPU per Upsert (its whole process tree, start to end of the writers'
    run), the watcher's own CPU, and what the live watcher saw."""
    stop, out = ctx.Event(), ctx.Queue()
    watcher = None
    if case != "none":
        watcher = ctx.Process(target=_live if case == "live" else _stalled, args=(address, stop, out))
        watcher.start()
        time.sleep(1.0)
    cpu = procstat.tree_cpu_seconds(server_pid)
    watcher_cpu = (procstat.cpu_seconds(watcher.pid) or 0.0) if watcher is not None else 0.0
    n = writers_run(ctx, target, run, seconds)
    result: dict[str, Any] = {"upserts_per_s": n / seconds,
                              "server_cpu_us_per_upsert": (procstat.tree_cpu_seconds(server_pid) - cpu) / n * 1e6}
    if watcher is not None:
        result["watcher_cpu_us_per_upsert"] = ((procstat.cpu_seconds(watcher.pid) or 0.0) - watcher_cpu) / n * 1e6
        stop.set()
        result |= out.get(timeout=60)
        watcher.join(30)
    return result


def measure(a: argparse.Namespace) -> dict[str, Any]:
    from bench.run import Proc
    from resolver.client import workers_target

    work = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    config = work / "blueprint.toml"
    config.write_text(BLUEPRINT)
    logfile = work / "server.log"
    server = Proc([RESOLVER, "serve", "--config", str(config), "--data-dir", str(work / "data"), "--listen",
                   "127.0.0.1:0", "--workers", str(a.workers)], "serving on", logfile)
    try:
        port = int(logfile.read_text().split("serving on 127.0.0.1:")[1].split()[0])
        address = f"127.0.0.1:{port}"
        target = workers_target(address) or address
        ctx = multiprocessing.get_context("spawn")
        load_before = os.getloadavg()[0]
        log(f"server on {address} ({a.workers} workers); warm-up")
        writers_run(ctx, target, "warmup", min(a.seconds, 5.0))
        rounds: list[dict[str, Any]] = []
        for r in range(a.repeat):
            order = CASES[r % 3:] + CASES[:r % 3]
            got = {}
            for case in order:
                got[case] = run_case(ctx, case, server.pid, address, target, f"r{r}-{case}", a.seconds)
                log(f"round {r + 1}: {case}: {got[case]['upserts_per_s']:,.0f} Upserts/s, server "
                    f"{got[case]['server_cpu_us_per_upsert']:,.0f} µs CPU per Upsert")
            rounds.append(got)
        return {"rounds": rounds, "seconds": a.seconds, "workers": a.workers, "writers": WRITERS,
                "loadavg": [load_before, os.getloadavg()[0]], "cores": os.cpu_count()}
    finally:
        server.stop()


def table(res: dict[str, Any]) -> str:
    rows = ["| case | Upserts/s, median | min..max | ratio to none (median per round) | server µs CPU per Upsert "
            "| watcher process µs CPU per Upsert |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for case in CASES:
        rates = [r[case]["upserts_per_s"] for r in res["rounds"]]
        ratios = [r[case]["upserts_per_s"] / r["none"]["upserts_per_s"] for r in res["rounds"]]
        cpu = statistics.median(r[case]["server_cpu_us_per_upsert"] for r in res["rounds"])
        own = statistics.median(r[case].get("watcher_cpu_us_per_upsert", 0.0) for r in res["rounds"])
        rows.append(f"| {case} | {statistics.median(rates):,.0f} | {min(rates):,.0f}..{max(rates):,.0f} | "
                    f"{statistics.median(ratios):.3f} | {cpu:,.0f} | {own:,.0f} |")
    live = [r["live"] for r in res["rounds"]]
    rows += ["", f"{len(res['rounds'])} rounds × {res['seconds']:g} s per case; {res['writers']} writers, server "
             f"{res['workers']} workers; live watcher: {sum(x['events'] for x in live):,} events, "
             f"{sum(x['gaps'] for x in live)} gaps; load average {res['loadavg'][0]:.2f} → {res['loadavg'][1]:.2f} "
             f"on {res['cores']} cores"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.feed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="rounds, each case once per round (default 3)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per case (default 8)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "feed"), help="where results.json goes")
    a = p.parse_args(argv)
    if a.repeat < 1 or a.seconds <= 0 or a.workers < 1:
        p.error("--repeat and --workers at least 1, --seconds above 0")
    res = measure(a)
    res["command"] = "python -m bench.feed " + " ".join(argv if argv is not None else sys.argv[1:])
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
