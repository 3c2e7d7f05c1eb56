"""bench/machine.py: the preflight every latency bench prints (is this machine in a slow phase for RPCs?)."""

from __future__ import annotations

import pytest

from bench.machine import SLOW_US, describe, floor_cpu_per_call


@pytest.mark.process  # grpcio processes, no resolver code: once is enough (the compiled pass)
def test_the_floor_is_measured_on_a_real_grpc_server_and_classified() -> None:
    figures = floor_cpu_per_call(rate=100, seconds=0.5)  # a real grpcio server and client, in processes of their own
    assert set(figures) == {"floor_us_per_call", "rate", "seconds", "slow"}
    assert figures["floor_us_per_call"] > 0  # the server's CPU was read while it answered (its warm-up excluded)
    assert figures["slow"] == (figures["floor_us_per_call"] > SLOW_US)


def test_the_report_line_says_which_phase() -> None:
    slow = describe({"floor_us_per_call": SLOW_US + 1, "rate": 500, "seconds": 5, "slow": True})
    fast = describe({"floor_us_per_call": 150, "rate": 500, "seconds": 5, "slow": False})
    assert f"{SLOW_US + 1} µs" in slow and "SLOW phase" in slow and "not the code's" in slow
    assert "150 µs" in fast and "normal phase" in fast and "SLOW" not in fast
