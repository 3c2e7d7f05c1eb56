"""What a gRPC call costs this machine right now, with none of resolver's code: the server CPU per call of a bare
grpcio health check (a sync server of 16 threads, as `resolver serve` runs them) at a fixed open-loop rate from a
client process of its own, read from /proc.

Why: this shared VM has phases in which every gRPC call costs several times its usual CPU (bench/README.md,
"Is the machine fast for RPCs?"), and then a latency bench measures a queue, not the code. `make bench-machine`
prints the figure alone; bench/events prints it in its report header (`floor_us_per_call`), measured before its
windows.

    python -m bench.machine [--rate 500] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from typing import Any

from bench import procstat

# Above this many µs of server CPU per bare health check, the machine is in a slow phase (fast: ~150 µs; the slow
# phases measured 460-1,100 µs): the report says so, so that nobody reads its latencies as the code's.
SLOW_US = 400


def _serve() -> None:
    """A sync grpcio server with only the standard health service, on 127.0.0.1:0; prints its port."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(16))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def _send(port: int, rate: float, seconds: float) -> None:
    """`rate` health checks a second for `seconds`, open loop (each sent at its time, not after the last answer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def run() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest()
            await check(request, timeout=5)
            calls, start = [], time.monotonic()
            for i in range(int(rate * seconds)):
                late = start + i / rate - time.monotonic()
                if late > 0:
                    await asyncio.sleep(late)
                calls.append(asyncio.ensure_future(check(request, timeout=5)))
            await asyncio.gather(*calls, return_exceptions=True)

    asyncio.run(run())


def floor_cpu_per_call(rate: float = 500, seconds: float = 5) -> dict[str, Any]:
    """The server CPU per bare health check (µs) at `rate` calls/s over `seconds`, after a one-second warm-up;
    `slow`: above SLOW_US."""
    server = subprocess.Popen([sys.executable, "-m", "bench.machine", "serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        send = [sys.executable, "-m", "bench.machine", "send", port]
        subprocess.run([*send, str(min(rate, 200)), "1"], check=True)  # connections, threads and caches warm
        before = procstat.cpu_seconds(server.pid) or 0.0
        subprocess.run([*send, str(rate), str(seconds)], check=True)
        used = (procstat.cpu_seconds(server.pid) or 0.0) - before
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
    us = round(used / (rate * seconds) * 1e6)
    return {"floor_us_per_call": us, "rate": rate, "seconds": seconds, "slow": us > SLOW_US}


def describe(figures: dict[str, Any]) -> str:
    """One line for a report."""
    phase = (f"a SLOW phase (over {SLOW_US} µs; latencies measured now are this machine's, not the code's)"
             if figures["slow"] else "a normal phase")
    return (f"bare grpcio health check: {figures['floor_us_per_call']} µs of server CPU per call at "
            f"{figures['rate']:g}/s: {phase}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _serve()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "send":
        _send(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.machine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    print(describe(floor_cpu_per_call(args.rate, args.seconds)))


if __name__ == "__main__":
    main()
