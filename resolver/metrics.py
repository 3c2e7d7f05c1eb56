"""Prometheus metrics (issue 17): the one module that defines what the processes record, and the tiny functions the
code counts with (the figures read from LMDB at scrape time are named in resolver.metrics_endpoint).

Who records, and where (prometheus_client's multiprocess mode):
- `resolver serve` with `[metrics] listen` makes a fresh directory per run (`exported`: under $TMPDIR, removed when
  the server stops, so no file of an earlier run is ever added in) and exports it as PROMETHEUS_MULTIPROC_DIR before
  it spawns anything. Every serving process records into files of its own there (one mmap file per process and
  metric type): the supervisor (the gRPC worker when there is one), each spawned worker, the events process and
  the outbound process (`inherit`, called first thing in each).
- The supervisor answers `GET /metrics` (resolver.metrics_endpoint): it adds up every process's files
  (MultiProcessCollector) and reads what LMDB already holds at scrape time (StoreFigures there: the events and
  outbound counters, the inbox, dead-letter and outbox depths, the map and the reader table), so nothing is counted
  twice and a restart loses nothing. Why the supervisor: it idles (a scrape never takes a GIL a Resolve waits for),
  it outlives every child it restarts, and it is there in every layout.
- Files of dead processes stay until the run ends: a restarted events or outbound process leaves the counts it
  made, and removing them would make a counter go back (a reset, for Prometheus). The one gauge kept in files, the
  last commit's duration, is `mostrecent` (the newest write wins, whichever process made it); every other gauge is
  read at scrape time. So nothing calls `mark_process_dead` (it only removes files of `live*` gauges).

Labels are fixed sets only: the service's method names, status code names, outcomes, identifier kinds, actions.
Never a value from a request.

Off (no `[metrics] listen`, or a process `resolver serve` did not start: import, check, tests in process), every
function here returns after one test of a module global: prometheus_client is not even imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from resolver._probe_types import AMBIGUOUS, EMAIL, EXTERNAL_ID, MATCHED, NOT_FOUND, PHONE
from resolver.config import Settings

ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable: how the spawned children find the directory

# Server time of one call, from the interceptor's start to its end: Resolve takes a few hundred µs, so the buckets
# step by 50-100 µs up to a millisecond (a sub-millisecond p99 reads to within a step), then widen up to 5 s.
RPC_BUCKETS = (0.00005, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005, 0.0006, 0.0007, 0.0008, 0.0009,
               0.001, 0.00125, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# One LMDB commit (write + fdatasync + the synchronous meta page): about a millisecond on a good disk.
COMMIT_BUCKETS = (0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0)

OUTCOMES = {NOT_FOUND: "NOT_FOUND", MATCHED: "MATCHED", AMBIGUOUS: "AMBIGUOUS"}  # the probe loop's numbers
KINDS = {0: "NONE", EXTERNAL_ID: "EXTERNAL_ID", EMAIL: "EMAIL", PHONE: "PHONE"}  # matched_on; 0: NOT_FOUND's
ACTIONS = ("CREATED", "UPDATED", "UNCHANGED")
STAGES = ("prepare", "queued")  # where an expired call was stopped (resolver.errors.DeadlineExceeded)
LEDGER_METHODS = ("Upsert", "Merge", "Unmerge", "Forget", "RecordInteraction")  # what a ledger replay answers


class _Later:
    """A labelled child made at its first use: an outcome/kind pair that should never occur is not exported as a
    zero, yet counting one cannot fail."""

    __slots__ = ("_family", "_labels", "_child")

    def __init__(self, family: Any, *labels: str) -> None:
        self._family, self._labels = family, labels
        self._child: Any = None

    def inc(self, amount: int = 1) -> None:
        if self._child is None:
            self._child = self._family.labels(*self._labels)
        self._child.inc(amount)


class _Recorder:
    """The metrics this process records (into the exported directory's files); built by `_start` only."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        if not values.ValueClass._multiprocess:
            raise RuntimeError(f"prometheus_client was imported before {ENV} was set: its values would stay in "
                               "this process, and /metrics would not see them")
        # registry=None: the values live in the directory's files; the endpoint reads those, not a registry
        self.rpc_family = Histogram("resolver_rpc_duration_seconds", "Server time of one call of the "
                                    "IdentityResolver service, by method and status code", ("method", "code"),
                                    buckets=RPC_BUCKETS, registry=None)
        self.rpc_cells: dict[tuple[str, str], Any] = {}
        outcomes = Counter("resolver_resolve_outcomes_total", "Resolve answers (Resolve and each ResolveStream "
                           "item) by outcome and the kind that decided it", ("outcome", "matched_on"), registry=None)
        assert sorted(OUTCOMES) == list(range(len(OUTCOMES))) and sorted(KINDS) == list(range(len(KINDS)))
        self.resolve_cells = tuple(  # [outcome][kind]: two tuple indexes on the hot path
            tuple(outcomes.labels(OUTCOMES[o], KINDS[k]) if (o == NOT_FOUND) == (k == 0)
                  else _Later(outcomes, OUTCOMES[o], KINDS[k]) for k in sorted(KINDS))
            for o in sorted(OUTCOMES))
        actions = Counter("resolver_upsert_actions_total", "Upserts applied, by action (a ledger replay is not "
                          "counted here: see resolver_ledger_replays_total)", ("action",), registry=None)
        self.actions = {a: actions.labels(a) for a in ACTIONS}
        replays = Counter("resolver_ledger_replays_total", "Calls answered from the idempotency ledger (same key, "
                          "same request: nothing written), by method", ("method",), registry=None)
        self.replays = {m: replays.labels(m) for m in LEDGER_METHODS}
        self.expired = Counter("resolver_deadline_expired_total", "Calls answered DEADLINE_EXCEEDED by the service, "
                               "none of which wrote anything, by method and stage: prepare (validating, normalizing "
                               "or reading), queued (a write skipped by the writer: it waited past its deadline)",
                               ("method", "stage"), registry=None)
        self.commits = Histogram("resolver_lmdb_commit_seconds", "Duration of one LMDB write transaction's commit "
                                 "(synced to disk), in any serving process", buckets=COMMIT_BUCKETS, registry=None)
        self.last_commit = Gauge("resolver_lmdb_last_commit_seconds", "Duration of the most recent LMDB commit",
                                 multiprocess_mode="mostrecent", registry=None)

    def rpc(self, method: str, code: str, seconds: float) -> None:
        try:
            cell = self.rpc_cells[method, code]
        except KeyError:  # a method's first call with this code: labels() locks; later ones are a dict lookup
            cell = self.rpc_cells[method, code] = self.rpc_family.labels(method, code)
        cell.observe(seconds)


_on: _Recorder | None = None  # None: not recording in this process
_starting = threading.Lock()


def rpc_done(method: str, code: str, seconds: float) -> None:
    """A call of the IdentityResolver service ended: `method` (e.g. "Resolve"), its status code name, its server
    time (resolver.api.interceptors)."""
    on = _on
    if on is not None:
        on.rpc(method, code, seconds)


def resolved(outcome: int, kind: int, answers: int = 1) -> None:
    """`answers` Resolve answers were made (Resolve's one, or a ResolveStream batch's of one kind) with the probe
    loop's outcome and deciding kind (resolver._probe_types numbers)."""
    on = _on
    if on is not None:
        on.resolve_cells[outcome][kind].inc(answers)


def upserted(action: str, replayed: bool) -> None:
    """An Upsert answered: its action (CREATED / UPDATED / UNCHANGED), or a ledger replay."""
    on = _on
    if on is not None:
        (on.replays["Upsert"] if replayed else on.actions[action]).inc()


def deadline_expired(method: str, stage: str) -> None:
    """A call of `method` was answered DEADLINE_EXCEEDED with nothing written, seen at `stage` (one of STAGES)."""
    on = _on
    if on is not None:
        on.expired.labels(method, stage).inc()


def ledger_replayed(method: str) -> None:
    """A call of `method` (one of LEDGER_METHODS) was answered from the idempotency ledger."""
    on = _on
    if on is not None:
        on.replays[method].inc()


def committed(seconds: float) -> None:
    """An LMDB write transaction committed (and synced) in `seconds` (resolver.store)."""
    on = _on
    if on is not None:
        on.commits.observe(seconds)
        on.last_commit.set(seconds)


def recording() -> bool:
    """Whether this process records metrics."""
    return _on is not None


def _start(directory: str) -> None:
    """Record from now on, in this process, into `directory` (which ENV names)."""
    global _on
    with _starting:
        if _on is None:
            os.environ[ENV] = directory  # prometheus_client reads it when it makes a metric's file
            _on = _Recorder()


def _stop() -> None:
    """Stop recording here, and close this process's files (a later `_start` opens new ones in its directory)."""
    global _on
    if _on is not None:
        from prometheus_client import values

        _on = None
        values.close_all_multiprocess_files()


def inherit(settings: Settings) -> None:
    """Called first by each serving child of `resolver serve` (gRPC workers, the events and outbound processes):
    record into the directory the supervisor exported, when the blueprint has `[metrics] listen`."""
    directory = os.environ.get(ENV)
    if settings.metrics.listen and directory:
        _start(directory)


@contextmanager
def exported(settings: Settings) -> Iterator[str]:
    """`resolver serve`'s metrics directory for one run ("" with metrics off): made fresh and exported in ENV, for
    the children spawned inside the block to inherit, recorded into by this process too; removed at the end.

    With metrics off, ENV is taken out of the environment for the block: no child writes into a directory someone
    else exported."""
    previous = os.environ.pop(ENV, None)
    directory = tempfile.mkdtemp(prefix="resolver-metrics-") if settings.metrics.listen else ""
    try:
        if directory:
            _start(directory)
        yield directory
    finally:
        _stop()
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
