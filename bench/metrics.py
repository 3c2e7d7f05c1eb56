"""What metrics cost the server (issue 17): server CPU per Resolve with `[metrics]` on vs off, in the same run.

    python -m bench.metrics [--rate 1000] [--seconds 15] [--rounds 5] [--workers 1] [--customers 2000]
                            [--scrape-every 5] [--out bench/out/metrics]

bench/security.py's method, with its client and servers: one data directory with N customers, two `resolver serve`
on it side by side with the same blueprint (`[logging] level = "WARNING"`, so no access line blurs the figure) but
for metrics:

- **off**: no `[metrics]`: nothing is recorded (each counting function returns after one test of a global);
- **on**: `[metrics] listen = "127.0.0.1:0"`: every Resolve observes the latency histogram and counts its
  outcome (resolver.metrics), and a scraper in this process reads `GET /metrics` every --scrape-every seconds for
  the whole run, as Prometheus would (its rendering is server CPU, and counted; a scrape between the windows is
  not). Before the run, the bench checks that the on server counts: its Resolve count grows by the calls it answered.

A window: one client process, one connection, Resolve of a known phone at --rate, open loop, for --seconds; the
server's CPU is utime+stime of its process tree (bench/procstat.py) over the window, divided by the calls answered.
One unmeasured warm-up window each, then each round runs both back to back, the order alternating. A figure is
the median over rounds; the cost (on minus off, µs per Resolve) and the ratio are medians of per-round differences
and ratios. Writes OUT/results.json and OUT/report.md; prints the report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.security import (
    BLUEPRINT,
    Client,
    Server,
    ab_args_problem,
    ab_main,
    ab_parser,
    ab_rounds,
    ab_servers,
    ab_table,
    log,
    window,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("off", "on")
RESOLVE_OK = 'resolver_rpc_duration_seconds_count{code="OK",method="Resolve"}'


def metrics_url(server: Server) -> str:
    text = server.log_path.read_text()
    if ", metrics on " not in text:
        raise SystemExit(f"the {server.name} server announced no metrics endpoint:\n{text[-2000:]}")
    return text.split(", metrics on ")[1].split()[0]


def resolves_counted(url: str) -> float:
    """The Resolve OK count /metrics reports (0 before the first)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(RESOLVE_OK + " "):
                return float(line.split()[-1])
    return 0.0


class Scraper:
    """GET /metrics every `every` seconds in a thread of this process, as Prometheus would; times each scrape."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every = url, every
        self.seconds: list[float] = []
        self.sizes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as resp:
                body = resp.read()
            self.seconds.append(time.perf_counter() - t0)
            self.sizes.append(len(body))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def measure(a: argparse.Namespace) -> dict[str, Any]:
    plain = Client(None, "")
    blueprints = {"off": BLUEPRINT, "on": BLUEPRINT + '[metrics]\nlisten = "127.0.0.1:0"\n'}
    with ab_servers(a, 17, lambda work: blueprints) as ab:
        ctx, servers, phones = ab
        scraper: Scraper | None = None
        try:
            url = metrics_url(servers["on"])
            log(f"servers: off :{servers['off'].port}, on :{servers['on'].port} (metrics {url}); warm-up")
            before = resolves_counted(url)
            warm = {name: window(ctx, servers[name], plain, a.rate, min(a.seconds, 3.0), phones) for name in CONFIGS}
            counted = resolves_counted(url) - before
            answered = warm["on"]["codes"].get("OK", 0)
            if counted != answered + 1:  # and the client's one call before its window (it connects)
                raise SystemExit(f"the on server counted {counted:g} Resolves, answered {answered}: metrics are not on")
            scraper = Scraper(url, a.scrape_every)
            measured = ab_rounds(CONFIGS, a.rounds, lambda name: window(ctx, servers[name], plain, a.rate, a.seconds,
                                                                       phones))
            scraper.stop()
        finally:
            if scraper is not None:
                scraper.stop()
    return {"rate": a.rate, "seconds": a.seconds, "workers": a.workers, "customers": a.customers,
            "scrape_every_s": a.scrape_every, "scrapes": len(scraper.seconds) if scraper else 0,
            "scrape_ms_median": statistics.median(scraper.seconds) * 1000 if scraper and scraper.seconds else None,
            "scrape_bytes": max(scraper.sizes) if scraper and scraper.sizes else None,
            "rounds": measured.rounds, "machine": measured.machine}


def report(res: dict[str, Any]) -> str:
    return "\n".join([
        "# Server CPU per Resolve: metrics off vs on", "",
        f"{res['rate']:g} Resolve/s for {res['seconds']:g} s per window, {len(res['rounds'])} rounds (order alternating), "
        f"{res['workers']} worker(s), {res['customers']} customers; /metrics scraped every {res['scrape_every_s']:g} s "
        f"({res['scrapes']} scrapes, median {res['scrape_ms_median'] or 0:.1f} ms wall, {res['scrape_bytes'] or 0:,} "
        "bytes).", "",
        *ab_table(res, {"off": "metrics off", "on": "metrics on (histogram + outcome counter, scraped)"}, "metrics")])


def args_problem(a: argparse.Namespace) -> str | None:
    return ab_args_problem(a) or ("--scrape-every above 0" if a.scrape_every <= 0 else None)


def main(argv: list[str] | None = None) -> int:
    p = ab_parser("python -m bench.metrics", __doc__, "metrics")
    p.add_argument("--scrape-every", type=float, default=5.0, help="seconds between scrapes of /metrics (default 5)")
    return ab_main(p, argv, measure, report, args_problem)


if __name__ == "__main__":
    sys.exit(main())
