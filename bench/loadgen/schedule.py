"""Arrival schedules: when each request is meant to leave, as offsets (ns) from the start of a phase."""

from __future__ import annotations

import random

SCHEDULES = ("uniform", "poisson")


def intended_offsets(rate: float, duration_s: float, schedule: str = "uniform", *, seed: int = 0,
                     phase: float = 0.0) -> list[int]:
    """Send times in [0, duration) for `rate` requests/s. Uniform: evenly spaced, shifted by `phase` of one
    interval (so N clients at rate/N, phases i/N, interleave into one uniform stream). Poisson: exponential
    inter-arrival times with mean 1/rate (independent per seed)."""
    if rate <= 0 or duration_s <= 0:
        return []
    end = int(duration_s * 1e9)
    interval = 1e9 / rate
    if schedule == "uniform":
        count = int(duration_s * rate)
        return [t for t in (int((i + phase) * interval) for i in range(count + 1)) if t < end][:count]
    if schedule == "poisson":
        rng = random.Random(seed)
        out: list[int] = []
        t = rng.expovariate(rate) * 1e9 * phase  # a random start within the first interval
        while t < end:
            out.append(int(t))
            t += rng.expovariate(rate) * 1e9
        return out
    raise ValueError(f"unknown schedule {schedule!r} (one of {', '.join(SCHEDULES)})")
