"""Run phases of open-loop load from client processes; merge their histograms (bench/loadgen/histograms.py); read
the server's CPU.

A phase is (target, scenario, rate, duration, schedule). Every client process runs every phase at rate/N,
on one shared timeline of absolute CLOCK_MONOTONIC times set by the parent, so phases of different
scenarios (a Resolve window, then a health window, ...) alternate against the same server in one run.
Each request's latency is its completion time minus its *intended* send time; a client that falls behind
sends late and the lateness is charged to the request, never skipped.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.loadgen.histograms import LOWEST, Latencies, add_by_code, added, decoded, encoded, new_histogram
from bench.loadgen.prctl import die_with_parent, fine_timer_slack
from bench.loadgen.schedule import intended_offsets
from bench.loadgen.workload import Data
from bench.procstat import tree_cpu_seconds

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CURVE = (0.0, 50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0)
SLICE_S = 0.1  # the per-slice timeline of the slowest call
LEAD_S = 0.5  # from the clients' start signal to the first phase: every client is sleeping on the timeline by then
GAP_S = 0.3  # between phases, for in-flight calls to drain


@dataclass(frozen=True)
class Phase:
    """One window of load. `record=False` phases (warm-up) are sent but not reported."""

    label: str
    scenario: str
    rate: float
    duration_s: float
    target: str = "127.0.0.1:50051"
    schedule: str = "uniform"
    server_pid: int = 0  # whose CPU to read (and its descendants); 0: not measured
    timeout_s: float = 1.0
    record: bool = True
    gap_s: float | None = None  # pause after this phase for in-flight calls to drain (None: the run's default)


@dataclass
class PhaseResult:
    """What one phase (or several phases merged under one label) measured, across every client process."""

    label: str
    scenario: str
    offered_rate: float
    duration_s: float
    intended: int = 0  # requests the schedule called for
    sent: int = 0
    completed: int = 0  # answered, with any status
    ok: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    server_cpu_s: float | None = None
    late_sends: int = 0  # sends more than 1 ms after their intended time (the client fell behind)
    send_span_s: float = 0.0  # from the phase start to the last send plus one interval (the slowest client's)
    histogram: str = ""  # encoded HdrHistogram of latency (µs, from intended send time)
    lag_histogram: str = ""  # encoded HdrHistogram of send lag (µs): pacing accuracy
    phases: int = 1
    # the slowest call (µs) per SLICE_S of intended send time from the phase's start: where in the window a
    # p99 came from (a steady spread, or one stall). Merged phases: slice k of each, the worst.
    slices_us: list[int] = field(default_factory=list)
    # the latency histogram of each status code's calls apart (code name -> encoded HdrHistogram, µs): how fast a
    # refusal came back, beside how long an answer took
    code_histograms: dict[str, str] = field(default_factory=dict)

    # -- derived figures ---------------------------------------------------------------------------------

    def hist(self) -> HdrHistogram:
        return decoded(self.histogram)

    def lag(self) -> HdrHistogram:
        return decoded(self.lag_histogram)

    def hist_of(self, code: str) -> HdrHistogram:
        """The latency histogram of the calls that ended with status `code` ("OK", "RESOURCE_EXHAUSTED", ...)."""
        return decoded(self.code_histograms.get(code, ""))

    @property
    def achieved_rate(self) -> float:
        """Completed requests per second of the intended duration, or of the time sending really took if the
        clients fell behind (then the rate is lower than offered, as it should be)."""
        span = max(self.duration_s, self.send_span_s)
        return self.completed / span if span else 0.0

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.codes.items() if k != "OK"}

    @property
    def cpu_per_request_us(self) -> float | None:
        if self.server_cpu_s is None or not self.completed:
            return None
        return self.server_cpu_s / self.completed * 1e6

    def summary(self) -> dict[str, Any]:
        """The machine-readable figures (latencies in ms), with the percentile curve for plots."""
        h, lag = self.hist(), self.lag()
        ms = {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
        return {
            "label": self.label, "scenario": self.scenario, "phases": self.phases,
            "offered_rate": self.offered_rate, "achieved_rate": round(self.achieved_rate, 1),
            "duration_s": self.duration_s, "send_span_s": round(self.send_span_s, 3), "intended": self.intended,
            "sent": self.sent,
            "completed": self.completed, "ok": self.ok, "errors": self.errors,
            "latency_ms": ms | {"max": h.get_max_value() / 1000, "mean": round(h.get_mean_value() / 1000, 4)},
            "curve_ms": [[p, h.get_value_at_percentile(p) / 1000 if p < 100 else h.get_max_value() / 1000]
                         for p in CURVE],
            "send_lag_us": {"p50": lag.get_value_at_percentile(50), "p99": lag.get_value_at_percentile(99),
                            "p99.9": lag.get_value_at_percentile(99.9), "max": lag.get_max_value()},
            "late_sends": self.late_sends,
            "slice_s": SLICE_S,
            "slowest_per_slice_ms": [round(us / 1000, 2) for us in self.slices_us],
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_per_request_us": None if self.cpu_per_request_us is None else round(self.cpu_per_request_us, 1),
        }

    def merge(self, other: PhaseResult) -> None:
        """Fold another result of the same label into this one (histograms added, counts summed)."""
        self.histogram = added(self.histogram, other.histogram)
        self.lag_histogram = added(self.lag_histogram, other.lag_histogram)
        self.duration_s += other.duration_s
        self.intended += other.intended
        self.sent += other.sent
        self.completed += other.completed
        self.ok += other.ok
        self.late_sends += other.late_sends
        self.send_span_s += other.send_span_s
        self.codes = dict(Counter(self.codes) + Counter(other.codes))
        self.slices_us = [max(a, b) for a, b in zip_longest(self.slices_us, other.slices_us, fillvalue=0)]
        add_by_code(self.code_histograms, other.code_histograms)
        if self.server_cpu_s is not None and other.server_cpu_s is not None:
            self.server_cpu_s += other.server_cpu_s
        else:
            self.server_cpu_s = None
        self.phases += other.phases


# -- the client process ----------------------------------------------------------------------------------


def realtime_priority() -> str:
    """Put this process (and the client processes it spawns later: the policy is inherited) under SCHED_FIFO 1,
    so the load generator is not delayed by what it measures when it shares the server's cores; what it got.

    The load generator stands for the contact-center platform, which in production runs on other machines.
    On a shared 2-core box its own scheduling delay (a late send, a late read of the answer) is charged to the
    request, and a bench comparing two windows would measure the client's CPU contention as the server's.
    Needs root or CAP_SYS_NICE; without it the clients stay at normal priority and the reason is returned.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError) as exc:
        return f"normal ({type(exc).__name__}: {exc})"
    return "SCHED_FIFO 1"


def open_channel(target: str) -> Any:
    """An insecure channel to `target`; a list of addresses (`ipv4:A:P1,A:P2`, resolver.client.workers_target) is
    one channel over every worker, round-robin, as ResolverClient opens it (but refusals are counted, not retried)."""
    import grpc

    from resolver.client import service_config

    spread = target.startswith(("ipv4:", "ipv6:")) and "," in target
    config = service_config(3, True, retry_refused=False)
    return grpc.insecure_channel(target, options=[("grpc.service_config", config)] if spread else None)


def _client(part: int, parts: int, phases: list[Phase], data: Data, run_id: str, seed: int,
            ready: Any, start: Any, results: Any, parent: int) -> None:
    """One client process: connect, report ready, wait for the timeline, send every phase, report."""
    import grpc

    from bench.loadgen.workload import CODECS, requests

    die_with_parent(parent)
    fine_timer_slack()
    channels: dict[str, Any] = {}
    calls: dict[tuple[str, str], Any] = {}
    streams: dict[str, Any] = {}
    try:
        for ph in phases:
            if ph.target not in channels:
                ch = open_channel(ph.target)
                try:
                    grpc.channel_ready_future(ch).result(timeout=15)
                except grpc.FutureTimeoutError:
                    raise ConnectionError(f"cannot connect to {ph.target} within 15 s") from None
                channels[ph.target] = ch
            if ph.scenario not in streams:
                streams[ph.scenario] = requests(ph.scenario, data, part=part, parts=parts, run_id=run_id,
                                                seed=seed * 1000 + part)
        for target, ch in channels.items():
            for method, (ser, de) in CODECS.items():
                calls[target, method] = ch.unary_unary(method, request_serializer=ser, response_deserializer=de)
        # one warm call per target and method in use, so the first measured request pays no connection setup
        for ph in phases:
            method, req = next(streams[ph.scenario])
            try:
                calls[ph.target, method](req, timeout=5)
            except grpc.RpcError:
                pass
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        ready.put((part, f"{type(exc).__name__}: {exc}"))
        return
    # The request lists just built are the client's whole heap: moved out of the collector's view, no full
    # collection walks them while the timeline runs (seen: 15-37 ms pauses of every client at once, each one a
    # latency spike in whatever window it fell).
    gc.collect()
    gc.freeze()
    ready.put((part, None))
    t0, gaps = start.get()  # absolute monotonic ns of the first phase, gap between phases (ns)

    done: list[tuple[int, int, int, Any]] = []  # (phase index, intended ns, done ns, code) appended by callbacks
    outstanding = [0]
    lock = threading.Condition()

    def finished(fut: Any, index: int, intended: int) -> None:
        now = time.monotonic_ns()
        done.append((index, intended, now, fut.code()))
        with lock:
            outstanding[0] -= 1
            if outstanding[0] == 0:
                lock.notify_all()

    sent = [0] * len(phases)
    spans = [0.0] * len(phases)
    intended_counts = [0] * len(phases)
    lag = [new_histogram() for _ in phases]
    late = [0] * len(phases)
    begin = t0
    phase_start = [0] * len(phases)
    for index, ph in enumerate(phases):
        phase_start[index] = begin
        offsets = intended_offsets(ph.rate / parts, ph.duration_s, ph.schedule, seed=seed * 7919 + part * 31 + index,
                                   phase=part / parts if ph.schedule == "uniform" else 1.0)
        intended_counts[index] = len(offsets)
        stream = streams[ph.scenario]
        timeout = ph.timeout_s
        h_lag, sleep, clock = lag[index], time.sleep, time.monotonic_ns
        for off in offsets:
            when = begin + off
            method, req = next(stream)
            now = clock()
            if when > now:
                sleep((when - now) / 1e9)
                now = clock()
            late_ns = now - when
            if late_ns > 1_000_000:
                late[index] += 1
            h_lag.record_value(max(late_ns // 1000, LOWEST))
            with lock:
                outstanding[0] += 1
            fut = calls[ph.target, method].future(req, timeout=timeout)
            fut.add_done_callback(lambda f, i=index, w=when: finished(f, i, w))
            sent[index] += 1
        if sent[index]:
            spans[index] = (clock() - begin) / 1e9 + parts / ph.rate
        begin += int(ph.duration_s * 1e9) + (gaps if ph.gap_s is None else int(ph.gap_s * 1e9))
    with lock:
        lock.wait_for(lambda: outstanding[0] == 0, timeout=max(p.timeout_s for p in phases) + 5)

    out = []
    latencies = [Latencies() for _ in phases]
    codes: list[Counter[str]] = [Counter() for _ in phases]
    slices: list[dict[int, int]] = [{} for _ in phases]
    for index, intended, finish, code in list(done):
        us = max((finish - intended) // 1000, LOWEST)
        latencies[index].record(code.name, us)
        codes[index][code.name] += 1
        k = int((intended - phase_start[index]) // (SLICE_S * 1e9))
        slices[index][k] = max(slices[index].get(k, 0), us)
    for index, ph in enumerate(phases):
        c = codes[index]
        out.append(PhaseResult(
            label=ph.label, scenario=ph.scenario, offered_rate=ph.rate, duration_s=ph.duration_s,
            intended=intended_counts[index], sent=sent[index], completed=sum(c.values()), ok=c.get("OK", 0),
            codes=dict(c), late_sends=late[index], send_span_s=spans[index],
            histogram=encoded(latencies[index].all), lag_histogram=encoded(lag[index]),
            slices_us=[slices[index].get(k, 0) for k in range(max(slices[index], default=-1) + 1)],
            code_histograms=latencies[index].encoded_by_code(),
        ))
    results.put((part, out))
    for ch in channels.values():
        ch.close()


# -- the parent ------------------------------------------------------------------------------------------


def run_phases(phases: list[Phase], *, clients: int = 1, data: Data | None = None, gap_s: float = GAP_S,
               seed: int = 1, run_id: str | None = None, lead_s: float = LEAD_S,
               at_phase: Callable[[Phase], None] | None = None) -> list[PhaseResult]:
    """Run `phases` back to back (with `gap_s` between them for in-flight calls to drain) from `clients`
    processes; return one merged result per recorded phase, with the server's CPU seconds read around it.
    `at_phase(phase)` is called in this process as each phase starts (to mark what a sampler sees)."""
    if not phases:
        return []
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    starts = [ctx.Queue() for _ in range(clients)]
    run_id = run_id or uuid.uuid4().hex[:8]
    procs = [ctx.Process(target=_client, name=f"loadgen-{i}",
                         args=(i, clients, phases, data or Data(), run_id, seed, ready, starts[i], results, os.getpid()))
             for i in range(clients)]
    for p in procs:
        p.start()
    try:
        problems = [err for _, err in (ready.get(timeout=120) for _ in procs) if err]
        if problems:
            raise RuntimeError(f"a load client failed to start: {problems[0]}")
        gap = int(gap_s * 1e9)
        t0 = time.monotonic_ns() + int(lead_s * 1e9)
        for q in starts:
            q.put((t0, gap))
        cpu: list[float | None] = []
        at = t0
        for ph in phases:
            _sleep_until(at)
            if at_phase is not None:
                at_phase(ph)
            before = tree_cpu_seconds(ph.server_pid) if ph.server_pid else None
            after_gap = gap if ph.gap_s is None else int(ph.gap_s * 1e9)
            at += int(ph.duration_s * 1e9) + after_gap
            _sleep_until(at - after_gap // 10)
            after = tree_cpu_seconds(ph.server_pid) if ph.server_pid else None
            cpu.append(None if before is None or after is None else after - before)
        deadline = max(p.timeout_s for p in phases) + 60
        parts = [results.get(timeout=deadline) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    merged: list[PhaseResult] = []
    for index in range(len(phases)):
        per_client = [out[index] for _, out in sorted(parts, key=lambda x: x[0])]
        first = per_client[0]
        for other in per_client[1:]:
            span = max(first.send_span_s, other.send_span_s)
            first.merge(other)
            first.phases, first.duration_s, first.send_span_s = 1, phases[index].duration_s, span
        first.server_cpu_s = cpu[index]
        merged.append(first)
    return [r for r, ph in zip(merged, phases, strict=True) if ph.record]


def by_label(results: list[PhaseResult]) -> dict[str, PhaseResult]:
    """Merge recorded phases that share a label (e.g. alternating Resolve and health windows)."""
    out: dict[str, PhaseResult] = {}
    for r in results:
        if r.label in out:
            out[r.label].merge(r)
        else:
            out[r.label] = PhaseResult(**asdict(r))
    return out


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
