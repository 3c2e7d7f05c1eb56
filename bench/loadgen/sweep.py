"""Scenario windows interleaved with the transport floor, and the sweep that finds the knee."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bench.loadgen.runner import Phase, PhaseResult, by_label, run_phases
from bench.loadgen.workload import Data

FLOOR = "health"


def interleaved(scenario: str, rate: float, *, target: str, server_pid: int = 0, duration_s: float = 10.0,
                windows: int = 4, floor: bool = True, warmup_s: float = 1.0, schedule: str = "uniform",
                timeout_s: float = 1.0, label: str = "", floor_label: str = "floor") -> list[Phase]:
    """`windows` alternating windows of the scenario and (if `floor`) the health check at the same rate, each
    scenario window `duration_s / windows` long, after an unrecorded warm-up of both."""
    base = Phase(label=label or scenario, scenario=scenario, rate=rate, duration_s=duration_s / windows,
                 target=target, schedule=schedule, server_pid=server_pid, timeout_s=timeout_s)
    phases = []
    if warmup_s > 0:
        phases.append(replace(base, label="warmup", duration_s=warmup_s, record=False))
        if floor:
            phases.append(replace(base, label="warmup", scenario=FLOOR, duration_s=warmup_s / 2, record=False))
    for w in range(windows):
        main = base
        flo = replace(base, label=floor_label, scenario=FLOOR)
        # alternate the order too, so neither kind always follows the other
        phases += [main, flo] if floor and w % 2 == 0 else [flo, main] if floor else [main]
    return phases


def run_interleaved(scenario: str, rate: float, *, clients: int = 1, data: Data | None = None,
                    **kw: Any) -> dict[str, PhaseResult]:
    return by_label(run_phases(interleaved(scenario, rate, **kw), clients=clients, data=data))


def passes(r: PhaseResult, target_ms: float) -> bool:
    """p99 within the target, the offered rate achieved (within 2%), and errors under 0.1%."""
    p99 = r.hist().get_value_at_percentile(99) / 1000
    errors = sum(r.errors.values())
    return p99 <= target_ms and r.achieved_rate >= 0.98 * r.offered_rate and errors <= 0.001 * max(r.completed, 1)


def sweep(scenario: str, rates: list[float], target_ms: float, *, target: str, server_pid: int = 0,
          clients: int = 1, data: Data | None = None, step_s: float = 4.0, floor: bool = True,
          label: str = "", floor_label: str = "floor", stop_after: int = 2, progress: Any = None) -> dict[str, Any]:
    """Raise the rate step by step; at each step run the scenario (and the floor) in alternating windows.
    The knee of each is the highest rate that passes before `stop_after` consecutive failing steps of both."""
    label = label or scenario
    steps: list[dict[str, Any]] = []
    fails = {label: 0, floor_label: 0}
    knee: dict[str, float | None] = {label: None, floor_label: None}
    for rate in rates:
        res = run_interleaved(scenario, rate, clients=clients, data=data, target=target, server_pid=server_pid,
                              duration_s=step_s, windows=2, floor=floor, warmup_s=0.5, label=label,
                              floor_label=floor_label)
        step: dict[str, Any] = {"rate": rate}
        for name, r in res.items():
            ok = passes(r, target_ms)
            step[name] = r.summary() | {"passes": ok}
            if fails[name] < stop_after:
                fails[name] = 0 if ok else fails[name] + 1
                if ok and fails[name] == 0:
                    knee[name] = rate
        steps.append(step)
        if progress:
            progress(step)
        if all(fails[n] >= stop_after for n in res):
            break
    return {"scenario": scenario, "target_ms": target_ms, "knee": {k: v for k, v in knee.items() if k in fails},
            "steps": steps}
