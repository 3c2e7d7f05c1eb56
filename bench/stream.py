"""ResolveStream over the wire beside grpcio's own streaming floor: lookups per second and server CPU per item.

    python -m bench.stream [--requests 20000] [--rounds 5] [--customers 20000] [--out bench/out/stream]

The batch loop as a client meets it is ResolveStream through gRPC, not `Resolver.resolve_many` in process
(bench/import_rate.py's loops): each request and each answer is a gRPC message of its own. One data directory gets
N customers (bench/hostile.py's loader: one phone each); then, alternating in each round:

- **stream**: `resolver serve` (1 worker, bench/security.py's blueprint) answers one ResolveStream of `--requests`
  ResolveRequests (the customers' phones, shuffled, every one a match) sent as fast as the client can;
- **floor**: a bare grpcio server (this module, `floor`: the served thread count, no interceptor) echoing the same
  request bytes back on a bidirectional stream of raw bytes: what any Python stream method costs before it does
  anything.

The client (this process) sends pre-serialized requests and counts the answers; the server's CPU is utime+stime of
its process tree (bench/procstat.py) over the stream, per item. A figure is the median over rounds; the ratios
(stream / floor) are medians of per-round ratios. Writes OUT/results.json and OUT/report.md; prints the report.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from bench import procstat
from bench.hostile import load_customers, phone
from bench.security import BLUEPRINT, ROOT, Server, log, write_report

FLOOR_METHOD = "/bench.Floor/Echo"
THREADS = 16  # the served [server] threads


def serve_floor() -> None:
    """The floor's server: one bidirectional stream method on raw bytes, each item sent back as it came."""

    def echo(items: Iterable[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from items

    server = grpc.server(futures.ThreadPoolExecutor(THREADS))
    handler = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Floor", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


class Floor:
    """The floor's server process, its port read from its first line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.stream", "floor"], stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        line = self.proc.stdout.readline() if self.proc.stdout is not None else ""
        if "serving on 127.0.0.1:" not in line:
            self.stop()
            raise SystemExit(f"the floor server did not start: {line!r}")
        self.port = int(line.split("serving on 127.0.0.1:")[1])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def one_stream(channel: grpc.Channel, method: str, items: list[bytes], pid: int) -> dict[str, float]:
    """One stream of `items` through `method`; its rate and the server's CPU per item. Every item must be answered."""
    call = channel.stream_stream(method)
    cpu, started = procstat.tree_cpu_seconds(pid), time.perf_counter()
    answered = sum(1 for _ in call(iter(items), timeout=600))
    elapsed, used = time.perf_counter() - started, procstat.tree_cpu_seconds(pid) - cpu
    if answered != len(items):
        raise SystemExit(f"{method}: {answered} answers to {len(items)} requests")
    return {"per_s": len(items) / elapsed, "cpu_us": used / len(items) * 1e6}


def measure(a: argparse.Namespace) -> dict[str, Any]:
    from resolver.v1 import resolver_pb2 as pb

    numbers = [phone(i) for i in range(a.customers)]
    random.Random(5).shuffle(numbers)
    items = [pb.ResolveRequest(identifiers=pb.Identifiers(phones=[numbers[i % len(numbers)]])).SerializeToString()
             for i in range(a.requests)]
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        log(f"{a.customers} customers -> {work / 'data'}")
        load_customers(work / "data", a.customers)
        (work / "blueprint.toml").write_text(BLUEPRINT)
        server, floor = Server("stream", work / "blueprint.toml", work / "data", 1, work), Floor()
        try:
            targets = {"stream": ("/resolver.v1.IdentityResolver/ResolveStream", server.port, server.proc.pid),
                       "floor": (FLOOR_METHOD, floor.port, floor.proc.pid)}
            channels = {name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, (_, port, _) in targets.items()}
            answer = pb.ResolveResponse.FromString(next(iter(channels["stream"].stream_stream(targets["stream"][0])(
                iter(items[:1]), timeout=30))))
            if answer.outcome != pb.OUTCOME_MATCHED:
                raise SystemExit(f"the first request did not match: {answer}")
            for name, (method, _, pid) in targets.items():  # warm-up
                one_stream(channels[name], method, items[:2000], pid)
            rounds = []
            for r in range(a.rounds):
                order = ("stream", "floor") if r % 2 == 0 else ("floor", "stream")
                got = {name: one_stream(channels[name], targets[name][0], items, targets[name][2]) for name in order}
                rounds.append(got)
                log(f"round {r + 1}/{a.rounds}: " + ", ".join(
                    f"{n} {got[n]['per_s']:,.0f}/s, {got[n]['cpu_us']:.0f} µs CPU per item" for n in ("stream", "floor")))
        finally:
            server.stop()
            floor.stop()
    return {"requests": a.requests, "customers": a.customers, "rounds": rounds}


def _median(rounds: list[dict[str, Any]], name: str, key: str) -> float:
    return statistics.median(r[name][key] for r in rounds)


def report(res: dict[str, Any]) -> str:
    rounds = res["rounds"]
    rate_ratio = statistics.median(r["stream"]["per_s"] / r["floor"]["per_s"] for r in rounds)
    cpu_ratio = statistics.median(r["stream"]["cpu_us"] / r["floor"]["cpu_us"] for r in rounds)
    return "\n".join([
        "# ResolveStream over the wire beside grpcio's streaming floor", "",
        f"One stream of {res['requests']:,} requests per window, {len(rounds)} rounds (order alternating), 1 worker, "
        f"{res['customers']:,} customers; `{res['command']}` ({res['date']}).", "",
        "| | items/s (median) | server CPU µs per item (median) |", "| --- | ---: | ---: |",
        f"| ResolveStream | {_median(rounds, 'stream', 'per_s'):,.0f} | {_median(rounds, 'stream', 'cpu_us'):.0f} |",
        f"| floor: bare grpcio echo stream | {_median(rounds, 'floor', 'per_s'):,.0f} | "
        f"{_median(rounds, 'floor', 'cpu_us'):.0f} |",
        f"| **ResolveStream / floor** | **{rate_ratio:.2f}×** | **{cpu_ratio:.2f}×** |"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["floor"]:
        serve_floor()
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000, help="requests per stream (default 20,000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, both streams once per round (default 5)")
    p.add_argument("--customers", type=int, default=20_000, help="customers in the data directory (default 20,000)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "stream"), help="where the report goes")
    a = p.parse_args(args)
    if a.requests < 2000 or a.rounds < 1 or not 1 <= a.customers <= 80_000:
        p.error("--requests at least 2,000; --rounds at least 1; --customers 1 to 80,000 (bench.hostile's phones)")
    res = measure(a)
    res["command"] = f"{p.prog} " + " ".join(args)
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    write_report(res, Path(a.out), report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
