"""Open-loop load generator for resolver (and any server speaking resolver.v1 or grpc.health.v1).

Requests leave at a fixed arrival rate (uniform or Poisson schedule), whatever the server does; each latency
is measured from the request's *intended* send time, so a stalled server shows as the stall it caused (no
coordinated omission). Load runs in client processes of its own, apart from the server; their HdrHistograms
are merged. `python -m bench.loadgen --help` or `resolver bench load --help`.
"""

from bench.loadgen.runner import Phase, PhaseResult, run_phases
from bench.loadgen.schedule import intended_offsets

__all__ = ["Phase", "PhaseResult", "intended_offsets", "run_phases"]
