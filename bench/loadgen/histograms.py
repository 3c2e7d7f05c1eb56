"""The load generator's latency histograms: HdrHistograms of microseconds, 1 µs .. 60 s at 3 significant digits,
carried from the client processes to the parent encoded (str), and kept per status code as well as for all calls.

An empty encoding ("") stands for a histogram with nothing recorded.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

LOWEST, HIGHEST, DIGITS = 1, 60_000_000, 3


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST, HIGHEST, DIGITS)


def decoded(encoded: str) -> HdrHistogram:
    """The histogram `encoded` holds; an empty one for ""."""
    return HdrHistogram.decode(encoded) if encoded else new_histogram()


def encoded(h: HdrHistogram) -> str:
    return h.encode().decode()


def added(a: str, b: str) -> str:
    """The encoding of the sum of two encoded histograms."""
    total = decoded(a)
    total.add(decoded(b))
    return encoded(total)


def add_by_code(into: dict[str, str], other: dict[str, str]) -> None:
    """Add `other`'s per-code histograms (code name -> encoded) into `into`, code by code."""
    for code, h in other.items():
        into[code] = added(into.get(code, ""), h)


class Latencies:
    """One phase's latencies (µs) as a client records them: of every call, and of each status code's calls apart
    (how fast a refusal came back, beside how long an answer took)."""

    def __init__(self) -> None:
        self.all = new_histogram()
        self.by_code: dict[str, HdrHistogram] = {}

    def record(self, code: str, us: int) -> None:
        self.all.record_value(us)
        per_code = self.by_code.get(code)
        if per_code is None:
            per_code = self.by_code[code] = new_histogram()
        per_code.record_value(us)

    def encoded_by_code(self) -> dict[str, str]:
        return {name: encoded(h) for name, h in self.by_code.items()}
