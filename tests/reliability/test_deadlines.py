"""Deadlines (issue 18, item 3): an expired request does no commit work, and this is counted; a client that retries
after DEADLINE_EXCEEDED with the same idempotency key never duplicates a customer.

The defect this found: Service.upsert (and merge, unmerge, Forget, RecordInteraction) checked the caller's deadline
before handing the command to the writer thread, but a command that then waited in the writer's queue past its
deadline was still applied, for a caller that had stopped waiting. Now the writer checks each command's deadline
when it reaches it and skips an expired one (DeadlineExceeded, stage "queued", nothing written), and the gRPC edge
counts every DEADLINE_EXCEEDED it answers in `resolver_deadline_expired_total{method, stage}`.

Against a real `resolver serve` (with /metrics): a burst of phone-only Upserts with 1-5 ms deadlines (every fourth
5-50 ms: on a machine busy enough, every 1-5 ms call can expire before the server sees it, and the test needs calls
that expire on the server, in its queue or before the writer). A phone never
selects an existing customer (contract §4.3), so a write applied twice would be two customers on one phone, an
AMBIGUOUS Resolve: the ledger alone must keep each key to one customer.
"""

from __future__ import annotations

import functools
import random
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from resolver.bootstrap import build_service
from resolver.check import find_problems
from resolver.config import load_settings
from resolver.errors import DeadlineExceeded
from resolver.identifiers import RawIdentifiers
from resolver.store import Store, Txn
from resolver.upsert import UpsertInput
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import SERVER_TOML
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.serve import launched
from tests.reliability.report import scaled

BURST = scaled(400, 2000)
CHANNELS = 4
IN_FLIGHT = 16  # per channel
T = TypeVar("T")
# retried, same key; CANCELLED: the call expired while it waited in gRPC's core for room (resolver.api.backlog)
UNACKNOWLEDGED = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


@contextmanager
def _writer_held(txn_reached: threading.Event, release: threading.Event) -> Iterator[Callable[[Txn, None], None]]:
    """A command that holds the writer thread (inside its batch transaction) until `release` is set."""

    def hold(txn: Txn, command: None) -> None:
        txn_reached.set()
        assert release.wait(30)

    try:
        yield hold
    finally:
        release.set()


def test_a_write_that_waited_in_the_writer_past_its_deadline_is_skipped(tmp_path: Path) -> None:
    """The regression: the deadline had not passed when Service.upsert queued the write, it passed while the writer
    was busy; the writer skips it (stage "queued"), nothing of it is stored, and a retry with the same key writes it
    once."""
    config = tmp_path / "deadlines.toml"
    config.write_text(SERVER_TOML)
    service = build_service(load_settings(config, data_dir=str(tmp_path / "data")))
    inp = UpsertInput("late-1", RawIdentifiers(phones=(phone(1),)))
    try:
        reached, release = threading.Event(), threading.Event()
        with _writer_held(reached, release) as hold:
            busy = service.writer.submit_nowait(hold, None)
            assert reached.wait(10)
            answer: Future[object] = Future()

            def call() -> None:
                try:
                    answer.set_result(service.upsert(inp, deadline=time.monotonic() + 0.05))
                except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                    answer.set_exception(exc)

            threading.Thread(target=call).start()
            time.sleep(0.2)  # the write is queued behind `hold`, and its deadline passes
        busy.result(10)
        with pytest.raises(DeadlineExceeded) as expired:
            answer.result(10)
        assert expired.value.stage == "queued"
        with service.store.read() as view:
            assert view.count("records") == 0 and view.ledger_get("late-1") is None  # nothing written
        first = service.upsert(inp, deadline=time.monotonic() + 10)
        again = service.upsert(inp, deadline=time.monotonic() + 10)
        assert (first.action, first.replayed, again.replayed) == ("CREATED", False, True)
        assert again.customer_uuid == first.customer_uuid
        with service.store.read() as view:
            assert view.count("records") == 1
    finally:
        service.close()


def _metrics(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> int:
    return int(samples.get((name, frozenset(labels.items())), 0.0))


def _burst(port: int, keys: list[str], deadlines_ms: list[float]) -> dict[str, grpc.StatusCode]:
    """Every key's Upsert, each with its own deadline, over CHANNELS channels with IN_FLIGHT calls in flight on
    each (a new one sent as the oldest ends): enough to keep the writer's queue full, not so many that every call
    expires before a handler takes it. The codes, by key."""
    codes: dict[str, grpc.StatusCode] = {}
    lock = threading.Lock()

    def send(part: int) -> None:
        got: dict[str, grpc.StatusCode] = {}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = resolver_pb2_grpc.IdentityResolverStub(channel)
            grpc.channel_ready_future(channel).result(timeout=10)
            flying: list[tuple[str, grpc.Future]] = []
            for i in range(part, len(keys), CHANNELS):
                if len(flying) >= IN_FLIGHT:
                    key, oldest = flying.pop(0)
                    got[key] = oldest.code()
                flying.append((keys[i], stub.Upsert.future(_request(keys[i]), timeout=deadlines_ms[i] / 1000)))
            got.update((key, fut.code()) for key, fut in flying)
        with lock:
            codes.update(got)

    threads = [threading.Thread(target=send, args=(part,)) for part in range(CHANNELS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == len(keys)
    return codes


def _patiently(call: Callable[[], T]) -> T:
    """`call()`, retried as a client does while the server sheds load (RESOURCE_EXHAUSTED: right after the burst
    it is still finishing calls whose clients already left) for up to 30 s."""
    until = time.monotonic() + 30
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > until:
                raise
            time.sleep(0.05)


def _request(key: str) -> pb.UpsertRequest:
    index = int(key.rsplit("-", 1)[1])
    return upsert_req(key, phones=(phone(index),), attributes={"name": f"burst {index}"})


def test_upserts_past_1_to_5_ms_deadlines_write_nothing_are_counted_and_retries_never_duplicate(
        tmp_path: Path, reliability_report: Callable[..., None]) -> None:
    config, data = tmp_path / "deadlines.toml", tmp_path / "data"
    config.write_text(SERVER_TOML + textwrap.dedent("""
        [attributes]
        name = { type = "string" }
        [metrics]
        listen = "127.0.0.1:0"
        """))
    rng = random.Random(18)
    keys = [f"dl-{i}" for i in range(BURST)]
    deadlines_ms = [rng.uniform(5, 50) if i % 4 == 0 else rng.uniform(1, 5) for i in range(len(keys))]
    with launched(config, data, tmp_path / "server.log") as server:
        metrics_url = server.announced.after("metrics on ")
        codes = _burst(server.port, keys, deadlines_ms)
        answered = Counter(codes.values())
        assert set(answered) <= {grpc.StatusCode.OK} | UNACKNOWLEDGED, answered
        samples = _metrics(metrics_url)
        expired = {stage: _sample(samples, "resolver_deadline_expired_total", method="Upsert", stage=stage)
                   for stage in ("prepare", "queued")}
        handled = {code: _sample(samples, "resolver_rpc_duration_seconds_count", method="Upsert", code=code)
                   for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")}
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = resolver_pb2_grpc.IdentityResolverStub(channel)

            def outcome(key: str) -> pb.ResolveResponse:
                return _patiently(lambda: stub.Resolve(resolve_req(phones=(phone(int(key.rsplit("-", 1)[1])),)),
                                                       timeout=10))

            applied = {key for key in keys if outcome(key).outcome == pb.OUTCOME_MATCHED}
            # every DEADLINE_EXCEEDED the service answered was counted, and none of them wrote: what was applied is
            # exactly the calls its handler finished (OK, or CANCELLED: finished after the client had left)
            assert sum(expired.values()) == handled["DEADLINE_EXCEEDED"], (expired, handled)
            assert len(applied) == handled["OK"] + handled["CANCELLED"], (len(applied), handled)
            assert answered[grpc.StatusCode.DEADLINE_EXCEEDED] >= sum(expired.values()), (answered, expired)
            acknowledged = {key for key, code in codes.items() if code == grpc.StatusCode.OK}
            assert acknowledged <= applied

            retried = sorted(key for key, code in codes.items() if code in UNACKNOWLEDGED)
            replays: Counter[bool] = Counter()
            for key in retried:  # the client's retry: the same key and request, a deadline long enough
                answer = _patiently(functools.partial(stub.Upsert, _request(key), timeout=30))
                assert answer.replayed == (key in applied), key  # applied before: answered from the ledger
                replays[answer.replayed] += 1
            finals = {key: outcome(key) for key in keys}
        assert server.terminate() == 0

    assert all(r.outcome == pb.OUTCOME_MATCHED for r in finals.values()), Counter(r.outcome for r in finals.values())
    assert len({r.customer_uuid for r in finals.values()}) == BURST  # one customer per key
    store = Store(load_settings(config, data_dir=str(data)), readonly=True)
    try:
        with store.read() as view:
            assert view.count("records") == BURST  # no duplicate hides behind an unresolved phone
            assert find_problems(view) == []
    finally:
        store.close()
    assert sum(expired.values()) > 0, (expired, answered)  # the burst did reach expired work on the server

    reliability_report(
        tried=f"{BURST} phone-only Upserts with deadlines of 1-5 ms (every fourth 5-50 ms), {IN_FLIGHT} in flight on "
              f"each of {CHANNELS} channels, against `resolver serve` (1 worker); then every unacknowledged key retried "
              "with the same key and a 30 s deadline",
        held="every DEADLINE_EXCEEDED the service answered is counted (resolver_deadline_expired_total = its "
             "DEADLINE_EXCEEDED answers) and wrote nothing (customers stored = calls its handler finished); every "
             "acknowledged write present; a retry replays exactly the keys applied before; one customer per key, "
             "`resolver check` clean",
        figures=f"client saw {dict((c.name, n) for c, n in answered.items())}; server expired {expired} "
                f"(prepare: before the writer, queued: skipped by the writer); handler finished {handled['OK']} OK + "
                f"{handled['CANCELLED']} after the client left; {len(applied)} applied in the burst; {len(retried)} "
                f"retries, {replays[True]} answered from the ledger, {replays[False]} written then",
    )
