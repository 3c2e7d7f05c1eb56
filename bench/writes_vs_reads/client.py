"""The load clients (one timeline of absolute send times) and the figures of a window."""

from __future__ import annotations

import gc
import os
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SLICE_NS = 100_000_000
METHODS = ("resolve", "upsert", "health")


# -- load clients ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    variant: str
    kind: str  # before | mixed | after | disk | warmup
    scenario: str  # call-setup | mixed | "" (no RPCs)
    target: str
    duration_s: float
    round: int


def client_process(part: int, parts: int, windows: list[Window], rate: float, queries: str, upserts: str, run_id: str,
            realtime: bool, ready: Any, start: Any, results: Any) -> None:
    import grpc

    from bench.loadgen.prctl import fine_timer_slack
    from bench.loadgen.runner import open_channel
    from bench.loadgen.schedule import intended_offsets
    from bench.loadgen.workload import CODECS, HEALTH, RESOLVE, UPSERT, Data, requests

    if realtime:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    fine_timer_slack()
    mid = {RESOLVE: 0, UPSERT: 1, HEALTH: 2}
    data = Data(queries=queries, upserts=upserts)
    try:
        calls: dict[tuple[str, str], Any] = {}
        for target in sorted({w.target for w in windows if w.target}):
            ch = open_channel(target)
            grpc.channel_ready_future(ch).result(timeout=30)
            for method, (ser, de) in CODECS.items():
                calls[target, method] = ch.unary_unary(method, request_serializer=ser, response_deserializer=de)
        streams = {s: requests(s, data, part=part, parts=parts, run_id=run_id, seed=part + 1)
                   for s in sorted({w.scenario for w in windows if w.scenario})}
        for (_target, method), call in calls.items():
            if method == RESOLVE:
                call(next(streams["call-setup"])[1], timeout=5)
    except Exception as exc:  # noqa: BLE001
        ready.put((part, f"{type(exc).__name__}: {exc}"))
        return
    # The request lists just built are the client's whole heap: moved out of the collector's view, no full
    # collection walks them while the timeline runs (seen: 15-37 ms pauses of every client at once, each one a
    # latency spike in whatever window it fell).
    gc.collect()
    gc.freeze()
    ready.put((part, None))
    starts: list[int] = start.get()
    lock = threading.Condition()
    outstanding = [0]
    recs = [array("q") for _ in windows]  # (method, intended offset ns, latency µs, ok) flattened

    def done(fut: Any, i: int, m: int, intended: int, off: int) -> None:
        now = time.monotonic_ns()
        ok = 1 if fut.code() == grpc.StatusCode.OK else 0
        recs[i].extend((m, off, (now - intended) // 1000, ok))
        with lock:
            outstanding[0] -= 1
            if outstanding[0] == 0:
                lock.notify_all()

    clock, sleep = time.monotonic_ns, time.sleep
    for i, w in enumerate(windows):
        if not w.scenario:
            continue
        begin = starts[i]
        stream = streams[w.scenario]
        for off in intended_offsets(rate / parts, w.duration_s, "uniform", phase=part / parts):
            when = begin + off
            method, req = next(stream)
            now = clock()
            if when > now:
                sleep((when - now) / 1e9)
            with lock:
                outstanding[0] += 1
            fut = calls[w.target, method].future(req, timeout=2.0)
            fut.add_done_callback(lambda f, i=i, m=mid[method], w_=when, o=off: done(f, i, m, w_, o))
    with lock:
        lock.wait_for(lambda: outstanding[0] == 0, timeout=10)
    results.put((part, [r.tobytes() for r in recs]))


# -- figures -----------------------------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p / 100 * len(s) // 1)) - 1))
    return float(s[k])


def window_figures(raw: list[bytes]) -> dict[str, Any]:
    lat: dict[int, list[int]] = {0: [], 1: [], 2: []}
    slices: dict[int, list[int]] = {}
    errors = 0
    for b in raw:
        a = array("q")
        a.frombytes(b)
        for j in range(0, len(a), 4):
            m, off, us, ok = a[j], a[j + 1], a[j + 2], a[j + 3]
            lat[m].append(us)
            errors += 1 - ok
            if m == 0:
                slices.setdefault(off // SLICE_NS, []).append(us)
    slice_p99 = [pct(v, 99) / 1000 for _, v in sorted(slices.items()) if len(v) >= 20]
    out: dict[str, Any] = {"errors": errors}
    for m, name in enumerate(METHODS):
        if lat[m]:
            out[name] = {"n": len(lat[m]), "p50_ms": pct(lat[m], 50) / 1000, "p99_ms": pct(lat[m], 99) / 1000,
                         "p999_ms": pct(lat[m], 99.9) / 1000, "max_ms": max(lat[m]) / 1000}
    if slice_p99:
        out["worst_slice_p99_ms"] = max(slice_p99)
        out["slice_p99_ms"] = [round(x, 2) for x in slice_p99]
    return out




def sleep_until(t_ns: int) -> None:
    d = (t_ns - time.monotonic_ns()) / 1e9
    if d > 0:
        time.sleep(d)
