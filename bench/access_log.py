"""What the access log costs the server: server CPU per Resolve with its lines on vs off, in the same run.

    python -m bench.access_log [--rate 1000] [--seconds 15] [--rounds 5] [--workers 1] [--customers 2000]
                               [--out bench/out/access_log]

bench/security.py's method, with its client and servers: one data directory with N customers, two `resolver serve`
on it side by side with the same blueprint but for `[logging] level`:

- **off**: "WARNING": no access line is made (the interceptor tests the level and goes on);
- **on**: "INFO", the example blueprint's: one access line per call (resolver.api.interceptors,
  resolver.api.access_lines), JSON, through the masking filter, to the server's stderr (a file here).

Alternating windows, one client connection each, medians over rounds; the cost and ratio are medians of per-round
differences and ratios. Writes OUT/results.json and OUT/report.md; prints the report.

    python -m bench.access_log --lines 20000 [--rounds 5]

measures instead, in this process, the CPU (time.process_time) per line of the writer thread's work: `--lines`
queued lines, shaped as the interceptor makes them, written by `AccessLines.flush` through the handler
`resolver serve` installs (JSON, the masking filter) into a file; the median and range over `--rounds` rounds. No
server, no client: a steadier figure for comparing two versions of the line's code on the same machine.
"""

from __future__ import annotations

import logging
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.security import BLUEPRINT, Client, Server, ab_main, ab_parser, ab_rounds, ab_servers, ab_table, log, window

CONFIGS = ("off", "on")


def measure(a: Any) -> dict[str, Any]:
    plain = Client(None, "")
    blueprints = {name: BLUEPRINT.replace('level = "WARNING"', f'level = "{level}"')
                  for name, level in (("off", "WARNING"), ("on", "INFO"))}
    with ab_servers(a, 17, lambda work: blueprints) as ab:
        ctx, servers, phones = ab
        log(f"servers: off :{servers['off'].port}, on :{servers['on'].port}; warm-up")
        for name in CONFIGS:
            window(ctx, servers[name], plain, a.rate, min(a.seconds, 3.0), phones)
        lines_before = _access_lines(servers["on"])
        measured = ab_rounds(CONFIGS, a.rounds, lambda name: window(ctx, servers[name], plain, a.rate, a.seconds,
                                                                   phones))
        for server in servers.values():
            server.stop()  # a server that stops writes every line it queued
        answered = sum(r["on"]["codes"].get("OK", 0) for r in measured.rounds)
        lines, off_lines = _access_lines(servers["on"]) - lines_before, _access_lines(servers["off"])
    if lines < answered or off_lines:
        raise SystemExit(f"the on server logged {lines} access lines for {answered} Resolves answered, the off "
                         f"server {off_lines}: the configurations are not what they say")
    return {"rate": a.rate, "seconds": a.seconds, "workers": a.workers, "customers": a.customers,
            "access_lines": lines, "rounds": measured.rounds, "machine": measured.machine}


def per_line(a: Any) -> dict[str, Any]:
    """CPU µs per access line of `AccessLines.flush` through the serving handler (see the module docstring)."""
    from resolver.api.access_lines import AccessLines, Line
    from resolver.logs import make_handler

    prefix = secrets.token_hex(4)
    lines = [Line(time.time(), "Resolve", "OK", 0.512, f"ipv4:127.0.0.1:{40000 + i % 20000}", f"{prefix}-{i:x}", "")
             for i in range(a.lines)]
    logger = logging.getLogger("resolver.access")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-lines-") as tmp, (Path(tmp) / "lines.log").open("w") as out:
        handler = make_handler("json", "masked", out)
        logger.addHandler(handler)
        queue = AccessLines(logger, interval=3600)  # only `flush` writes here
        try:
            for _ in range(a.rounds):
                for line in lines:
                    queue.add(line)
                started = time.process_time()
                queue.flush()
                rounds.append(round((time.process_time() - started) / a.lines * 1e6, 2))
        finally:
            logger.removeHandler(handler)
    return {"lines": a.lines, "rounds_us": rounds, "median_us": statistics.median(rounds)}


def _access_lines(server: Server) -> int:
    return server.log_path.read_text().count('"logger":"resolver.access"')


def report(res: dict[str, Any]) -> str:
    return "\n".join([
        "# Server CPU per Resolve: access log off vs on", "",
        f"{res['rate']:g} Resolve/s for {res['seconds']:g} s per window, {len(res['rounds'])} rounds (order alternating), "
        f"{res['workers']} worker(s), {res['customers']} customers; {res['access_lines']:,} access lines written by the "
        "on server in the measured windows.", "",
        *ab_table(res, {"off": "access log off (level WARNING)", "on": "access log on (level INFO)"}, "the access log")])


def report_lines(res: dict[str, Any]) -> str:
    rounds = res["rounds_us"]
    return (f"# CPU per access line, in process\n\n{res['lines']:,} lines a round, {len(rounds)} rounds: median "
            f"**{res['median_us']:.1f} µs** per line (range {min(rounds):.1f}-{max(rounds):.1f}).")


def main(argv: list[str] | None = None) -> int:
    parser = ab_parser("python -m bench.access_log", __doc__, "access_log")
    parser.add_argument("--lines", type=int, default=0, help="in process: CPU per line of N queued lines (no servers)")
    if parser.parse_known_args(argv)[0].lines > 0:
        return ab_main(parser, argv, per_line, report_lines)
    return ab_main(parser, argv, measure, report)


if __name__ == "__main__":
    sys.exit(main())
