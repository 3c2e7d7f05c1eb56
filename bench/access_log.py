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
"""

from __future__ import annotations

import sys
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


def _access_lines(server: Server) -> int:
    return server.log_path.read_text().count('"logger":"resolver.access"')


def report(res: dict[str, Any]) -> str:
    return "\n".join([
        "# Server CPU per Resolve: access log off vs on", "",
        f"{res['rate']:g} Resolve/s for {res['seconds']:g} s per window, {len(res['rounds'])} rounds (order alternating), "
        f"{res['workers']} worker(s), {res['customers']} customers; {res['access_lines']:,} access lines written by the "
        "on server in the measured windows.", "",
        *ab_table(res, {"off": "access log off (level WARNING)", "on": "access log on (level INFO)"}, "the access log")])


def main(argv: list[str] | None = None) -> int:
    return ab_main(ab_parser("python -m bench.access_log", __doc__, "access_log"), argv, measure, report)


if __name__ == "__main__":
    sys.exit(main())
