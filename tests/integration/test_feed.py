"""WatchChanges (contract §7): gap-free resumable feed, retention and OUT_OF_RANGE, filters, masking, and a client that
stops reading cut off with RESOURCE_EXHAUSTED while the writers go on. Real servers and stores, no mocks.

FEED_WRITES sets the resume test's write count (default 1,000; 10,000 is the issue's figure:
`FEED_WRITES=10000 .venv/bin/python -m pytest tests/integration/test_feed.py -k resume`).
"""

from __future__ import annotations

import collections
import os
import random
import textwrap
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from resolver.config.tables import ChangeSettings
from resolver.erase import erase
from resolver.errors import SequenceOutOfRange
from resolver.feed import Watch, WatchFilter
from resolver.retention import sweep_changes
from resolver.store import uuid_bytes
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import TEST_BLUEPRINT, status_details
from tests.integration.helpers import phone, upsert_req

WRITES = int(os.environ.get("FEED_WRITES", "1000"))
WRITERS = 4

# the test blueprint, with one sensitive attribute
BLUEPRINT = TEST_BLUEPRINT + textwrap.dedent(
    """
    [attributes.ssn]
    type = "string"
    sensitive = true
    """
)


@pytest.fixture
def blueprint_text() -> str:
    return BLUEPRINT


def last_seq(server) -> int:  # noqa: ANN001
    with server.service.store.read() as view:
        return view.last_change_seq()


def watch_until(stub, last: int, **request) -> list[pb.ChangeEvent]:  # noqa: ANN001, ANN003
    """The events of one WatchChanges call up to and including sequence `last` (which must pass its filter)."""
    call = stub.WatchChanges(pb.WatchRequest(**request), timeout=60)  # the deadline only stops a broken test
    events = []
    for ev in call:
        events.append(ev)
        if ev.sequence >= last:
            break
    call.cancel()
    return events


def merge(stub, survivor: str, *merged: str) -> pb.MergeResponse:  # noqa: ANN001
    return stub.Merge(pb.MergeRequest(idempotency_key=f"m-{survivor}-{merged}", survivor_uuid=survivor,
                                      merged_uuids=list(merged)))


# -- resume: nothing missed, nothing twice --------------------------------------------------------------------


def test_resume_misses_nothing_and_sees_nothing_twice(server, stub):  # noqa: ANN001
    """4 writer threads Upsert through gRPC while one watcher keeps dropping its call (cancelling it after a
    random number of events, letting a short deadline end it, closing its channel) and resuming from the last
    sequence it got: it sees every commit once, in order, and each Upsert's (customer, version) exactly once."""
    acked: list[tuple[str, int]] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for i in range(WRITES // WRITERS):
                r = stub.Upsert(upsert_req(external_id=f"FEED-{w}-{i % 25}", attributes={"tier": f"t{w}-{i}"}))
                with lock:
                    acked.append((r.customer_uuid, r.version))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for t in writers:
        t.start()
    rng = random.Random(15)
    seen: list[int] = []
    events: list[tuple[str, int, str]] = []
    next_seq = 1
    final = 0  # known once the writers are done
    calls = empty = 0  # empty: calls in a row that ended at their deadline with nothing (a busy machine)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    while not final or next_seq <= final:
        if final == 0 and not any(t.is_alive() for t in writers):
            final = last_seq(server)
            continue
        calls += 1
        if calls % 7 == 0:  # a new connection now and then
            channel.close()
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        watcher = resolver_pb2_grpc.IdentityResolverStub(channel)
        budget = rng.randint(1, 200)  # so at least WRITES / 200 calls
        deadline = min(30.0, rng.uniform(0.2, 2.0) * 2**empty)
        call = watcher.WatchChanges(pb.WatchRequest(from_sequence=next_seq), timeout=deadline)
        got = len(seen)
        try:
            for ev in call:
                seen.append(ev.sequence)
                events.append((ev.customer_uuid, ev.version, ev.action))
                next_seq = ev.sequence + 1
                budget -= 1
                if budget == 0 or (final and next_seq > final):
                    call.cancel()
                    break
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise
        empty = empty + 1 if len(seen) == got else 0
    channel.close()
    for t in writers:
        t.join()
    assert not failures, failures[0]
    assert final == WRITES == len(acked)
    assert seen == list(range(1, WRITES + 1))  # in order, no gap, no repeat, across every reconnection
    assert calls >= WRITES // 200
    assert collections.Counter((c, v) for c, v, _ in events) == collections.Counter(acked)
    assert all(action == ("CREATED" if v == 1 else "UPDATED") for _, v, action in events)


# -- retention -----------------------------------------------------------------------------------------------


def test_retention_then_out_of_range_naming_the_oldest(make_server, settings):  # noqa: ANN001
    server = make_server(settings.with_overrides(retention_count=10))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        uuids = [stub.Upsert(upsert_req(external_id=f"RET-{i}", emails=(f"ret{i}@example.com",),
                                        attributes={"tier": str(i)})).customer_uuid for i in range(30)]
        assert server.service.sweep_changes() == 20
        assert server.service.sweep_changes() == 0
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.WatchChanges(pb.WatchRequest(from_sequence=20))))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "21" in err.value.details()
        info, _ = status_details(err.value)
        assert info is not None and info.reason == "SEQUENCE_NOT_RETAINED"
        assert info.metadata["oldest_sequence"] == "21" and info.metadata["next_sequence"] == "31"
        assert [ev.sequence for ev in watch_until(stub, 30, from_sequence=21)] == list(range(21, 31))
        with pytest.raises(grpc.RpcError) as err:  # past the next commit: a position from another store
            next(iter(stub.WatchChanges(pb.WatchRequest(from_sequence=32))))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert status_details(err.value)[0].reason == "SEQUENCE_AHEAD"
    with server.service.store.read() as view:  # the deleted entries' pii_refs went with them
        assert view.count("changes") == 10
        for u in uuids:
            assert all(seq > 20 for seq in view.pii_refs(uuid_bytes(u))[0])


def test_retention_by_age_keeps_the_newest_entry_and_the_sequence(make_server, settings):  # noqa: ANN001
    server = make_server(settings.with_overrides(retention_days=1))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        for i in range(5):
            stub.Upsert(upsert_req(external_id=f"AGE-{i}"))
        assert server.service.sweep_changes() == 0  # nothing is a day old
        two_days_on = time.time_ns() // 1000 + 2 * 86_400_000_000
        assert server.service.sweep_changes(now=two_days_on) == 4  # the newest stays: it carries the sequence
        stub.Upsert(upsert_req(external_id="AGE-5"))
        assert [ev.sequence for ev in watch_until(stub, 6, from_sequence=5)] == [5, 6]


def test_a_watcher_overtaken_by_retention_is_out_of_range(server):  # noqa: ANN001
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        for i in range(8):
            stub.Upsert(upsert_req(external_id=f"LAG-{i}"))
    service = server.service
    watch = Watch(service.store, service.schema, WatchFilter(), next_seq=1)
    changes, _ = watch.poll(limit=3)
    assert [c.seq for c in changes] == [1, 2, 3]
    sweep_changes(service.store, ChangeSettings(retention_count=2), now_us=0)
    with pytest.raises(SequenceOutOfRange) as err:
        watch.poll()
    assert err.value.oldest == 7 and "oldest retained is 7" in err.value.message


def test_unmerge_after_retention_keeps_what_was_written_since_the_merge(make_server, settings):  # noqa: ANN001
    """The post-merge write's change-log entry is deleted by retention; Unmerge still knows it was written."""
    server = make_server(settings.with_overrides(retention_count=1))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        a = stub.Upsert(upsert_req(external_id="UR-A", attributes={"tier": "gold"})).customer_uuid
        c = stub.Upsert(upsert_req(external_id="UR-C", attributes={"tier": "silver", "name": "Cy"})).customer_uuid
        merge(stub, a, c)  # the survivor takes C's newer tier and name
        stub.Upsert(upsert_req(customer_uuid=a, attributes={"tier": "platinum"}))  # written since the merge
        stub.Upsert(upsert_req(external_id="UR-D"))
        assert server.service.sweep_changes() == 4
        stub.Unmerge(pb.UnmergeRequest(idempotency_key="ur-1", survivor_uuid=a, merged_uuid=c))
        after = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=a))
        assert dict(after.attributes) == {"tier": "platinum"}  # kept; the name C brought left with C
        assert dict(stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=c)).attributes) == {"tier": "silver",
                                                                                            "name": "Cy"}


# -- filters ----------------------------------------------------------------------------------------------------


def test_filters_by_customer_and_field(server, stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="FA-1", attributes={"name": "Ann", "tier": "gold"})).customer_uuid  # 1
    b = stub.Upsert(upsert_req(external_id="FB-1", attributes={"name": "Bob"})).customer_uuid  # 2
    c = stub.Upsert(upsert_req(external_id="FC-1", attributes={"tier": "silver"})).customer_uuid  # 3
    stub.Upsert(upsert_req(customer_uuid=a, attributes={"tier": "platinum"}))  # 4
    stub.Upsert(upsert_req(customer_uuid=b, phones=(phone(5),)))  # 5: identifiers only
    stub.Upsert(upsert_req(customer_uuid=b, attributes={"name": "Bobby"}))  # 6
    merge(stub, a, c)  # 7: MERGED into a, naming c; takes nothing (a's tier is newer)
    stub.Upsert(upsert_req(customer_uuid=b, attributes={"name": "Robert", "tier": "bronze"}))  # 8
    assert last_seq(server) == 8

    every = watch_until(stub, 8, from_sequence=1)
    assert [(e.sequence, e.action) for e in every] == [(1, "CREATED"), (2, "CREATED"), (3, "CREATED"), (4, "UPDATED"),
                                                       (5, "UPDATED"), (6, "UPDATED"), (7, "MERGED"), (8, "UPDATED")]
    assert list(every[6].merged_uuids) == [c] and every[6].customer_uuid == a

    by_customer = watch_until(stub, 8, from_sequence=1, customer_uuids=[c, b.upper()])
    assert [e.sequence for e in by_customer] == [2, 3, 5, 6, 7, 8]  # 7: c was merged away

    by_field = watch_until(stub, 8, from_sequence=1, fields=["tier"])
    assert [e.sequence for e in by_field] == [1, 3, 4, 8]
    assert {f.name for e in by_field for f in e.fields} == {"tier"}  # only the fields asked for
    assert [(f.old_value.string_value, f.new_value.string_value) for f in by_field[2].fields] == [("gold", "platinum")]
    assert not by_field[0].fields[0].HasField("old_value")  # absent before

    both = watch_until(stub, 8, from_sequence=1, customer_uuids=[b], fields=["name"])
    assert [e.sequence for e in both] == [2, 6, 8]
    assert [[f.name for f in e.fields] for e in both] == [["name"], ["name"], ["name"]]


def test_filters_are_validated(stub):  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        next(iter(stub.WatchChanges(pb.WatchRequest(customer_uuids=["not-a-uuid"], fields=["tier", "nope"]))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status_details(err.value)[1] == [("customer_uuids[0]", "INVALID"), ("fields[1]", "UNKNOWN_ATTRIBUTE")]


def test_from_zero_sees_only_what_is_committed_from_now_on(server, stub):  # noqa: ANN001
    stub.Upsert(upsert_req(external_id="NOW-1"))
    call = stub.WatchChanges(pb.WatchRequest(), timeout=60)
    got: list[pb.ChangeEvent] = []
    reader = threading.Thread(target=lambda: got.append(next(iter(call))))
    reader.start()
    # the call is admitted once the server has started it; until then a write may land before its start
    while reader.is_alive():
        stub.Upsert(upsert_req(external_id="NOW-2", attributes={"tier": str(time.monotonic_ns())}))
        reader.join(0.05)
    call.cancel()
    assert got[0].sequence >= 2


def test_erased_entries_stream_without_values(server, stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="ERASE-A1", emails=("erase.me@example.com",), attributes={"name": "Eve"}))
    c = stub.Upsert(upsert_req(external_id="ERASE-C1", attributes={"tier": "gold"})).customer_uuid
    merge(stub, a.customer_uuid, c)

    def forget(view, uid: bytes):  # noqa: ANN001, ANN202
        return erase(view, view.record(uid), source_system="TEST", deleted_us=1, now_us=time.time_ns() // 1000)

    server.service.writer.submit(forget, uuid_bytes(a.customer_uuid))
    events = watch_until(stub, 4, from_sequence=1)
    assert [e.action for e in events] == ["CREATED", "CREATED", "MERGED", "DELETED"]
    for e in events[:3]:  # redacted: who, when, what kind of change; no value, no identifier
        assert not e.fields and not e.added and not e.removed and e.customer_uuid
    assert list(events[2].merged_uuids) == [c]
    # a watcher of the merged-away customer learns of the erasure; a field watcher too (every field is gone)
    assert [e.sequence for e in watch_until(stub, 4, from_sequence=1, customer_uuids=[c])] == [2, 3, 4]
    assert [e.sequence for e in watch_until(stub, 4, from_sequence=1, fields=["tier"])] == [4]


# -- masking --------------------------------------------------------------------------------------------------------


def test_no_raw_identifier_or_sensitive_value_in_any_event(server, stub):  # noqa: ANN001
    raw = {"ALPHA-EXTERNAL-0001", "BRAVO-EXTERNAL-0002", "jane.doe@example.com", "john.roe@example.org", phone(11),
           phone(12), "123-45-6789", "987-65-4321"}
    a = stub.Upsert(upsert_req(external_id="ALPHA-EXTERNAL-0001", emails=("jane.doe@example.com",), phones=(phone(11),),
                               attributes={"name": "Jane", "ssn": "123-45-6789"})).customer_uuid
    b = stub.Upsert(upsert_req(external_id="BRAVO-EXTERNAL-0002", emails=("john.roe@example.org",), phones=(phone(12),),
                               attributes={"ssn": "987-65-4321"})).customer_uuid
    stub.Upsert(upsert_req(customer_uuid=a, attributes={"ssn": None}, remove_identifiers=pb.Identifiers(
        phones=[phone(11)])))
    merge(stub, a, b)
    stub.Unmerge(pb.UnmergeRequest(idempotency_key="mask-u", survivor_uuid=a, merged_uuid=b))
    events = watch_until(stub, 5, from_sequence=1)
    assert [e.action for e in events] == ["CREATED", "CREATED", "UPDATED", "MERGED", "UNMERGED"]
    for e in events:
        wire, text = e.SerializeToString(), str(e)
        for value in raw:
            assert value.encode() not in wire and value not in text, (e.action, value)
            assert value.lstrip("+").encode() not in wire
        for f in e.fields:
            assert f.masked == (f.name == "ssn")
    ssn = [f for e in events for f in e.fields if f.name == "ssn"]
    assert ssn and all(f.masked for f in ssn)
    assert ssn[0].new_value.string_value == "12***89"
    assert [r.masked_value for r in events[0].added] == ["AL***01", "j***@example.com", "+165******11"]
    assert [(r.kind, r.masked_value) for r in events[2].removed] == [(pb.MATCH_KIND_PHONE, "+165******11")]
    assert events[3].added and all("***" in r.masked_value for r in events[3].added)


# -- slow consumers -------------------------------------------------------------------------------------------------


# The stalled client's window: no BDP probing, 16 KiB per stream, so the server's sends block within ~100 events.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16 * 1024)]


def _refused(call: Iterator[pb.ChangeEvent]) -> str:
    """'' when the call was admitted (it yields an event), else the reason it was refused."""
    try:
        next(call)
        return ""
    except grpc.RpcError as exc:
        info, _ = status_details(exc)
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info is not None, exc
        return info.reason


def test_a_watcher_that_stops_reading_is_cut_off_while_writes_go_on(make_server, settings):  # noqa: ANN001
    """max_watchers = 1, so the stalled watcher's slot says when the server let it go: a probe is refused
    (TOO_MANY_WATCHERS) until then. Writers Upsert the whole time; the stalled client then reads what it had
    buffered, a gap-free run from 1, and RESOURCE_EXHAUSTED."""
    server = make_server(settings.with_overrides(stall_timeout_s=0.5, max_watchers=1))
    address = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(address) as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        for i in range(300):  # a backlog larger than the stalled client's window
            stub.Upsert(upsert_req(external_id=f"STALL-{i}", attributes={"tier": "x" * 40}))
        stop = threading.Event()
        writes = [0]
        failures: list[BaseException] = []

        def write() -> None:
            try:
                i = 0
                while not stop.is_set():
                    stub.Upsert(upsert_req(external_id=f"LIVE-{i % 20}", attributes={"tier": f"{i}"}))
                    writes[0] += 1
                    i += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        stalled_channel = grpc.insecure_channel(address, options=SMALL_WINDOW)
        stalled = resolver_pb2_grpc.IdentityResolverStub(stalled_channel).WatchChanges(
            pb.WatchRequest(from_sequence=1), timeout=120)  # never read until it is over
        # the server has taken it (its first events are on their way) before any probe can race it for the slot
        stalled.initial_metadata()
        writers = [threading.Thread(target=write) for _ in range(2)]
        for t in writers:
            t.start()
        refusals = writes_when_held = 0
        probe_stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        while True:
            probe = probe_stub.WatchChanges(pb.WatchRequest(from_sequence=1), timeout=60)
            reason = _refused(probe)
            if not reason:
                break
            assert reason == "TOO_MANY_WATCHERS"
            refusals += 1
            if refusals == 1:
                writes_when_held = writes[0]
            time.sleep(0.05)
        writes_at_cut = writes[0]
        stop.set()
        for t in writers:
            t.join()
        assert not failures, failures[0]

        received = []
        with pytest.raises(grpc.RpcError) as err:
            for ev in stalled:
                received.append(ev.sequence)
        stalled_channel.close()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "changes.stall_timeout_s" in err.value.details()
        assert received == list(range(1, len(received) + 1)) and 0 < len(received) < 300
        if refusals:  # the writers went on while the stalled watcher held its slot
            assert writes_at_cut > writes_when_held
        # the feed serves the next watcher whole (the probe admitted once the stalled one was let go)
        rest = [ev.sequence for _, ev in zip(range(299), probe, strict=False)]
        probe.cancel()
        assert rest == list(range(2, 301))


def test_watchers_beyond_the_limit_are_refused(make_server, settings):  # noqa: ANN001
    server = make_server(settings.with_overrides(max_watchers=2))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        stub.Upsert(upsert_req(external_id="LIM-0"))
        held = [stub.WatchChanges(pb.WatchRequest(from_sequence=1), timeout=60) for _ in range(2)]
        assert [next(c).sequence for c in held] == [1, 1]  # both admitted
        with pytest.raises(grpc.RpcError) as err:
            next(stub.WatchChanges(pb.WatchRequest(from_sequence=1), timeout=60))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, _ = status_details(err.value)
        assert info.reason == "TOO_MANY_WATCHERS" and info.metadata["limit"] == "changes.max_watchers"
        held[0].cancel()
        while True:  # the slot frees once the server has seen the cancellation
            call = stub.WatchChanges(pb.WatchRequest(from_sequence=1), timeout=60)
            if not _refused(call):
                call.cancel()
                break
            time.sleep(0.05)
        held[1].cancel()


def test_stopping_the_server_ends_watchers_with_unavailable(make_server, settings):  # noqa: ANN001
    """A watcher never finishes by itself: the drain ends it first (else it would hold the whole grace period)."""
    server = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        stub.Upsert(upsert_req(external_id="STOP-1"))
        call = stub.WatchChanges(pb.WatchRequest(from_sequence=1), timeout=60)
        assert next(call).sequence == 1
        server.stop()
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "stopping" in err.value.details()
