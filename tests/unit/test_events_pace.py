"""The applier's pace (resolver.events.pace): the policy as a pure function, the CPU meter on fake sources and on
this process's real /proc, the serving processes' discovery, the retry delay of a full inbox, the `[events]`
keys, and an in-process applier draining a real LMDB inbox at its ceiling while its watched CPU is idle."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver.config import describe
from resolver.config.load import settings_from_document
from resolver.config.tables import EventSettings
from resolver.errors import ConfigError
from resolver.events import pace
from resolver.events.pace import Meter, Pacer, ProcessButThread, Processes

EV = EventSettings(rate_per_s=2000.0, min_rate_per_s=100.0, idle_cpu=0.05, busy_cpu=0.25)


# -- the policy ------------------------------------------------------------------------------------------------

def test_the_ceiling_while_idle_the_floor_while_busy_and_the_floor_before_anything_is_known() -> None:
    for share in (0.0, 0.01, 0.05):
        assert pace.pace(share, EV) == 2000.0
    for share in (0.25, 0.5, 1.0, 3.0):
        assert pace.pace(share, EV) == 100.0
    assert pace.pace(None, EV) == 100.0


def test_between_idle_and_busy_the_rate_falls_geometrically_and_never_rises() -> None:
    assert pace.pace(0.15, EV) == pytest.approx(math.sqrt(2000.0 * 100.0))  # half way: the geometric mean
    grid = [i / 1000 for i in range(0, 1001)]
    rates = [pace.pace(s, EV) for s in grid]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert all(100.0 <= r <= 2000.0 for r in rates)
    assert len(set(rates)) > 100  # a response, not a switch


def test_the_floor_is_capped_at_the_ceiling_so_a_low_rate_per_s_is_a_fixed_pace() -> None:
    fixed = EventSettings(rate_per_s=10.0)  # a blueprint written for the fixed pace, min_rate_per_s left at 100
    assert pace.floor(fixed) == 10.0
    assert {pace.pace(s, fixed) for s in (None, 0.0, 0.1, 0.3, 1.0)} == {10.0}


def test_busy_at_or_below_idle_is_a_step_at_busy() -> None:
    step = EventSettings(rate_per_s=1000.0, min_rate_per_s=50.0, idle_cpu=0.3, busy_cpu=0.2)
    assert pace.pace(0.19, step) == 1000.0 and pace.pace(0.2, step) == 50.0 and pace.pace(0.25, step) == 50.0


# -- from CPU seconds to a share -------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """CPU seconds that grow by `cores` per second of the fake clock; None while `readable` is False."""

    def __init__(self, clock: FakeClock, cores: float = 0.0) -> None:
        self.clock, self.cores, self.readable = clock, cores, True
        self.cpu, self.at, self.reads = 0.0, clock.now, 0

    def cpu_seconds(self) -> float | None:
        self.reads += 1
        self.cpu += self.cores * (self.clock.now - self.at)
        self.at = self.clock.now
        return self.cpu if self.readable else None


def test_the_meter_gives_the_share_of_the_machine_over_its_window() -> None:
    clock = FakeClock()
    src = FakeSource(clock, cores=0.5)
    meter = Meter(src, cpus=2, clock=clock, window=0.5)
    assert meter.read() is None  # one reading: nothing to compare with
    for _ in range(10):
        clock.now += 0.1
        share = meter.read()
    assert share == pytest.approx(0.25)
    src.cores = 0.0  # the load stops: within a window the share is back to 0
    for _ in range(6):
        clock.now += 0.1
        share = meter.read()
    assert share == pytest.approx(0.0)
    src.cores = 2.0  # a burst shows within one reading
    clock.now += 0.1
    assert meter.read() > 0.05  # type: ignore[operator]


def test_after_a_gap_the_meter_averages_over_it_and_an_unreadable_source_starts_it_again() -> None:
    clock = FakeClock()
    src = FakeSource(clock, cores=1.0)
    meter = Meter(src, cpus=1, clock=clock, window=0.5)
    meter.read()
    clock.now += 0.1
    assert meter.read() == pytest.approx(1.0)
    src.cores = 0.5
    clock.now += 9.9  # nothing read for a while (the applier starved, or in a long batch): the gap's average
    assert meter.read() == pytest.approx(0.5)
    src.readable = False
    clock.now += 0.1
    assert meter.read() is None
    src.readable = True
    clock.now += 0.1
    assert meter.read() is None  # one reading again
    clock.now += 0.1
    assert meter.read() == pytest.approx(0.5)


def test_the_pacer_reads_at_most_every_sample_period_and_follows_the_load() -> None:
    step = pace.SAMPLE_S + 1e-9  # a real wait of SAMPLE_S ends a little after it
    clock = FakeClock()
    src = FakeSource(clock, cores=0.0)
    pacer = Pacer(EV, src, clock=clock, cpus=2)
    assert pacer.rate() == 100.0  # not known yet: the floor
    assert pacer.rate() == 100.0 and src.reads == 1  # the same instant: not read again
    clock.now += step
    assert pacer.rate() == 2000.0 and pacer.current == 2000.0 and pacer.share == 0.0
    src.cores = 1.2  # 60% of 2 CPUs: busy
    for _ in range(6):
        clock.now += step
        pacer.rate()
    assert pacer.current == 100.0 and pacer.share == pytest.approx(0.6)
    src.cores = 0.3  # 15%: between idle and busy
    for _ in range(6):
        clock.now += step
        pacer.rate()
    assert 100.0 < pacer.current < 2000.0


def test_processes_count_each_pid_from_when_it_is_first_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    ticks = {10: 500, 11: 7000}
    listed = [10]
    monkeypatch.setattr(pace, "ticks", lambda path: ticks.get(int(path.split("/")[2])))
    procs = Processes(lambda: listed, clock=clock)
    assert procs.cpu_seconds() == 0.0
    ticks[10] += pace.TICK  # one CPU second
    listed.append(11)  # a worker appears with 70 s already spent: none of it counts
    clock.now += pace.RESCAN_S
    assert procs.cpu_seconds() == pytest.approx(1.0) and procs.watched == [10, 11]
    ticks[11] += 2 * pace.TICK
    del ticks[10]  # gone
    assert procs.cpu_seconds() == pytest.approx(3.0)
    del ticks[11]
    assert procs.cpu_seconds() is None


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_process_but_thread_counts_the_other_threads_of_this_process_only() -> None:
    src = ProcessButThread(threading.get_native_id())
    assert src.cpu_seconds() == 0.0
    _spin(0.3)  # this (the watched) thread: not counted
    assert src.cpu_seconds() < 0.1  # type: ignore[operator]
    other = threading.Thread(target=_spin, args=(0.3,))
    other.start()
    other.join()
    assert src.cpu_seconds() >= 0.2  # type: ignore[operator]


@pytest.fixture
def two_children() -> Iterator[list[int]]:
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


def test_children_and_serving_processes_come_from_proc(two_children: list[int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    assert set(two_children) <= set(pace.children(me))
    serving = pace.serving_processes(me, two_children[0])  # as if this process were `resolver serve`, the first
    assert serving.cpu_seconds() == 0.0  # child its events process
    assert me in serving.watched and two_children[1] in serving.watched and two_children[0] not in serving.watched
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if str(p).endswith("/children") else real_exists(p))
    assert set(two_children) <= set(pace.children(me))  # the scan of /proc where the children file is missing
    assert pace.children(2**22 + 12345) == []


# -- the retry delay of a full inbox ---------------------------------------------------------------------------

def test_a_full_inbox_says_when_the_applier_at_its_floor_or_its_current_pace_makes_room(tmp_path: Path) -> None:
    from resolver.bootstrap import build_service
    from resolver.events.inbox import Ingestor

    s = settings_from_document({"events": {"rate_per_s": 1000, "min_rate_per_s": 10, "batch": 100,
                                           "high_water": 5}}, {})
    service = build_service(s.with_overrides(data_dir=str(tmp_path / "data")))
    try:
        ing = Ingestor(service.store, service.settings, service.schema)
        assert ing._full(4) is None
        full = ing._full(5)
        assert full is not None and full.retry_after_s == 10  # a batch at the floor: 100 / 10 per s
        ing.drain_rate = lambda: 1000.0  # the events process: the applier's current pace
        assert ing._full(5).retry_after_s == 1  # type: ignore[union-attr]
        ing.drain_rate = lambda: 40.0
        assert ing._full(65).retry_after_s == 4  # type: ignore[union-attr]  # (60 over the mark + 100) / 40
        ing.close()
    finally:
        service.close()


# -- the [events] keys -----------------------------------------------------------------------------------------

def test_the_pace_keys_have_defaults_are_validated_and_are_described() -> None:
    s = settings_from_document({}, {})
    assert (s.events.rate_per_s, s.events.min_rate_per_s, s.events.idle_cpu, s.events.busy_cpu) == (2000, 100, 0.03, 0.15)
    assert "apply 100-2000/s (2000/s while the serving processes use at most 3% of the CPU, 100/s from 15%)" in describe(s)
    t = settings_from_document({"events": {"rate_per_s": 500, "min_rate_per_s": 20, "idle_cpu": 0.1, "busy_cpu": 0.5}}, {})
    assert "apply 20-500/s (500/s while the serving processes use at most 10% of the CPU, 20/s from 50%)" in describe(t)
    assert "apply 50/s (fixed" in describe(settings_from_document({"events": {"rate_per_s": 50}}, {}))
    for key, bad in (("min_rate_per_s", 0), ("min_rate_per_s", -1), ("idle_cpu", -0.1), ("idle_cpu", 1.5),
                     ("busy_cpu", 0), ("busy_cpu", 2), ("rate_per_s", 0)):
        with pytest.raises(ConfigError) as e:
            settings_from_document({"events": {key: bad}}, {})
        assert f"events.{key}" in str(e.value), (key, bad)


# -- an applier in this process, on a real inbox ---------------------------------------------------------------

SECRET = b"pace-test-secret"
BLUEPRINT = {
    "version": 1,
    "server": {"workers": 1, "threads": 4},
    "storage": {"map_size_mb": 256},
    "attributes": {"status": {"type": "string", "owner": "SALESFORCE"}},
    "sources": {"SALESFORCE": {"field_map": {"Status__c": "status"}, "secrets": [{"env": "PACE_SECRET"}]}},
}


def _fill(service: object, n: int) -> list[str]:
    """Admit `n` signed CREATE events (no applier running); their webhook ids in inbox order."""
    import json

    from resolver.events.inbox import Ingestor
    from resolver.events.signatures import sign

    ing = Ingestor(service.store, service.settings, service.schema)  # type: ignore[attr-defined]
    ids, futures = [], []
    for i in range(n):
        wid = f"msg_{i:05d}_{uuid.uuid4().hex[:8]}"
        body = json.dumps({"event_type": "CREATE", "source_system": "SALESFORCE", "timestamp": "2026-01-01T00:00:00Z",
                           "record_id": f"P-{i:05d}", "object_type": "Account",
                           "change_set": {"Status__c": {"new_value": f"s{i}"}}}).encode()
        ts = int(time.time())
        futures.append(ing.submit("SALESFORCE", {"webhook-id": wid, "webhook-timestamp": str(ts),
                                                 "webhook-signature": sign(SECRET, wid, ts, body)}, body))
        ids.append(wid)
    for f in futures:
        assert f.result(30).http_status == 202
    ing.close()
    ing.flush()
    return ids


def test_an_applier_whose_serving_cpu_is_idle_drains_at_its_ceiling_in_inbox_order(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from resolver.bootstrap import build_service
    from resolver.events import counters
    from resolver.events.applier import Applier

    s = settings_from_document(BLUEPRINT | {"events": {"rate_per_s": 400, "min_rate_per_s": 5, "batch": 50,
                                                       "high_water": 100000}},
                               {"PACE_SECRET": SECRET.decode()}).with_overrides(data_dir=str(tmp_path / "data"))
    service = build_service(s)
    applier = None
    try:
        ids = _fill(service, 300)  # at the floor (5/s) these would take a minute
        caplog.set_level(logging.INFO, logger="resolver.events")
        applier = Applier(service.store, s, service.schema)
        applier.watch(FakeSource(FakeClock(), cores=0.0))  # CPU that never moves: idle serving processes
        applier.start()
        deadline = time.monotonic() + 60  # a wait condition, generous; nothing below depends on the time taken
        while "inbox empty" not in caplog.text:
            assert time.monotonic() < deadline, "the inbox was not drained"
            time.sleep(0.05)
        applier.stop()
        with service.store.read() as view:
            snap = counters.snapshot(view.txn, service.store)
            applied = [ch["event"]["webhook_id"] for ch in view.iter_changes() if "event" in ch]
    finally:
        if applier is not None:
            applier.stop()
        service.close()
    assert snap["conserved"] and snap["in_inbox"] == 0 and snap["counters"]["applied"] == 300
    assert applied == ids  # each once, in inbox order
    line = next(r.getMessage() for r in caplog.records if "inbox empty" in r.getMessage())
    m = re.match(r"applier: inbox empty: 300 events in [\d.]+ s \(\d+/s\); pace (\d+)-(\d+)/s", line)
    assert m and m.group(1) in ("5", "400") and m.group(2) == "400", line  # the floor only until the first reading
    assert applier.pacer.current == 400.0  # where it stayed: the ceiling
