"""resolver.api.access_lines: access lines queued by the calls, written by a thread of the process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver.api.access_lines import FIELDS, AccessLines, Line

ROOT = Path(__file__).resolve().parents[2]


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Iterator[tuple[logging.Logger, Keep]]:
    logger = logging.getLogger(f"test.access.{time.monotonic_ns()}")
    keep = Keep()
    logger.addHandler(keep)
    logger.propagate = False
    yield logger, keep
    logger.removeHandler(keep)


def line(i: int, at: float = 1_700_000_000.25) -> Line:
    return Line(at + i, "Resolve", "OK", 0.5 + i, "ipv4:127.0.0.1:5", f"r-{i}", "t-reader")


def test_flush_hands_each_line_to_logging_in_call_order_with_the_calls_time_and_fields(kept) -> None:
    logger, keep = kept
    lines = AccessLines(logger, interval=3600)  # the thread never flushes during this test: only `flush` does
    for i in range(20):
        lines.add(line(i))
    assert keep.records == []  # queued, not written in the calls
    lines.flush()
    assert [r.request_id for r in keep.records] == [f"r-{i}" for i in range(20)]  # type: ignore[attr-defined]
    first = keep.records[0]
    assert first.levelno == logging.INFO and first.name == logger.name
    assert first.getMessage() == "Resolve OK 0.500 ms"
    assert first.created == 1_700_000_000.25 and first.msecs == 250.0  # the call's end, not the flush's time
    assert first.process == os.getpid() and not first.args  # made in this process, the message already rendered
    assert first.relativeCreated == pytest.approx((first.created - logging._startTime) * 1000)  # noqa: SLF001
    assert {f: getattr(first, f) for f in FIELDS} == {"rpc": "Resolve", "code": "OK", "duration_ms": 0.5,
                                                     "peer": "ipv4:127.0.0.1:5", "request_id": "r-0",
                                                     "caller": "t-reader"}
    lines.flush()
    assert len(keep.records) == 20  # written once


def test_the_thread_writes_queued_lines_without_a_flush(kept) -> None:
    logger, keep = kept
    lines = AccessLines(logger, interval=0.01)
    lines.add(line(1))
    deadline = time.monotonic() + 30  # a functional wait, not a timing figure
    while not keep.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.request_id for r in keep.records] == ["r-1"]  # type: ignore[attr-defined]


_EXITING = """
import logging, os, sys
from resolver.api.access_lines import AccessLines, Line
logging.basicConfig(stream=sys.stdout, format="%(request_id)s", level=logging.INFO)
lines = AccessLines(logging.getLogger("resolver.access"), interval=3600)
for i in range(5):
    lines.add(Line(0.0, "Resolve", "OK", 1.0, "peer", f"parent-{i}", ""))
pid = os.fork()
if pid == 0:  # the child queues its own line; what the parent queued is the parent's to write
    lines.add(Line(0.0, "Resolve", "OK", 1.0, "peer", "child-0", ""))
    lines.flush()
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
# the parent exits normally without a flush: atexit writes what it queued
"""


def test_a_normal_exit_writes_every_queued_line_and_a_forked_child_only_its_own() -> None:
    out = subprocess.run([sys.executable, "-c", _EXITING], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.split() == ["child-0", "parent-0", "parent-1", "parent-2", "parent-3", "parent-4"], out.stderr


def test_a_real_handler_writes_the_json_access_line_through_the_masking_filter(kept, tmp_path: Path) -> None:
    from resolver.logs import make_handler

    logger, _ = kept
    path = tmp_path / "log"
    with path.open("w") as stream:
        handler = make_handler("json", "masked", stream)
        logger.addHandler(handler)
        lines = AccessLines(logger, interval=3600)
        lines.add(Line(1_700_000_000.5, "Resolve", "OK", 1.25, "ipv4:127.0.0.1:5", "14155559888", ""))
        lines.flush()
        logger.removeHandler(handler)
    entry = json.loads(path.read_text())
    assert entry["ts"] == "2023-11-14T22:13:20.500Z" and entry["msg"] == "Resolve OK 1.250 ms"
    assert entry["request_id"] != "14155559888" and "5559888" not in path.read_text()  # a phone-shaped id is masked


def test_past_max_queued_a_call_writes_its_own_line_nothing_dropped_memory_bounded(kept) -> None:
    logger, keep = kept
    lines = AccessLines(logger, interval=3600, max_queued=3)
    for i in range(5):
        lines.add(line(i))
    assert [r.request_id for r in keep.records] == ["r-3", "r-4"]  # type: ignore[attr-defined]  # in their calls
    lines.flush()
    assert sorted(r.request_id for r in keep.records) == [f"r-{i}" for i in range(5)]  # type: ignore[attr-defined]
