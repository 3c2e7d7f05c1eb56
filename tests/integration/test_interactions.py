"""RecordInteraction and ListInteractions (contract §7, §5b): a call id recorded once against the resolved customer,
last_interaction_date only forward, bounded history, erasure. Real server on 127.0.0.1:0, real LMDB."""

from __future__ import annotations

import random
import textwrap
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from resolver import history
from resolver.check import find_problems
from resolver.config import Settings, load_settings
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc
from tests.conftest import TEST_BLUEPRINT, status_details
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.test_events import start_server  # noqa: F401  (a fixture)

ACTIVITY = textwrap.dedent(
    """
    [activity]
    record_type = "Task"
    subject = "Inbound {channel} call - {queue} - {disposition}"
    owners = { agent-7 = "005xx000001AbcD" }
    default_owner = "005xx000000Queue"
    """
)


@pytest.fixture
def blueprint_text() -> str:
    return TEST_BLUEPRINT + ACTIVITY


def at(text: str) -> int:
    """µs since the epoch of an ISO 8601 instant."""
    return (datetime.fromisoformat(text) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def record(stub, interaction_id: str, occurred: str = "2024-05-01T10:00:00Z", *, customer_uuid: str = "",  # noqa: ANN001
           details: dict[str, Any] | None = None, timeout: float = 10, **ids_and_fields: Any) -> pb.RecordInteractionResponse:
    ids = {k: ids_and_fields.pop(k) for k in ("external_id", "emails", "phones") if k in ids_and_fields}
    req = pb.RecordInteractionRequest(interaction_id=interaction_id, customer_uuid=customer_uuid,
                                      channel=ids_and_fields.pop("channel", "voice"),
                                      queue=ids_and_fields.pop("queue", "billing"),
                                      disposition=ids_and_fields.pop("disposition", "resolved"),
                                      agent_id=ids_and_fields.pop("agent_id", "agent-7"), **ids_and_fields)
    if ids:
        req.identifiers.CopyFrom(pb.Identifiers(**ids))
    req.occurred_at.FromMicroseconds(at(occurred))
    if details is not None:
        s = struct_pb2.Struct()
        s.update(details)
        req.details.CopyFrom(s)
    return stub.RecordInteraction(req, timeout=timeout)


def listed(stub, uuid: str, limit: int = 0) -> list[pb.Interaction]:  # noqa: ANN001
    return list(stub.ListInteractions(pb.ListInteractionsRequest(customer_uuid=uuid, limit=limit), timeout=5).interactions)


def customer(stub, uuid: str) -> pb.Customer:  # noqa: ANN001
    return stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuid), timeout=5)


def changes(running, action: str = "INTERACTION_RECORDED") -> list[dict[str, Any]]:  # noqa: ANN001
    with running.service.store.read() as view:
        return [c for c in view.iter_changes() if c["action"] == action]


def error(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, dict[str, str], list[tuple[str, str]]]:
    """A failed call's code, ErrorInfo reason and metadata, and its BadRequest (field, reason) pairs."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    info, bad = status_details(err.value)
    assert info is not None
    return err.value.code(), info.reason, dict(info.metadata), bad


def settings_with(tmp_path: Path, extra: str, name: str) -> Settings:
    path = tmp_path / f"{name}.toml"
    path.write_text(TEST_BLUEPRINT + extra)
    return load_settings(path, data_dir=str(tmp_path / name), listen="127.0.0.1:0")


def stub_of(running) -> resolver_pb2_grpc.IdentityResolverStub:  # noqa: ANN001
    return resolver_pb2_grpc.IdentityResolverStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))


# -- exactly once -----------------------------------------------------------------------------------------------

def test_twenty_concurrent_retries_record_once(stub, server) -> None:  # noqa: ANN001
    uuid = stub.Upsert(upsert_req(external_id="CRM-1", phones=(phone(1),))).customer_uuid
    answers: list[pb.RecordInteractionResponse] = []
    start = threading.Barrier(20)

    def call() -> None:
        start.wait()
        answers.append(record(stub, "call-0001", phones=[phone(1)], details={"duration_s": 125, "wrap_up": "refund"}))

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 20
    first = [a for a in answers if not a.replayed]
    assert len(first) == 1
    assert first[0].customer_uuid == uuid and not first[0].customer_created
    for a in answers:
        if a.replayed:
            copy = pb.RecordInteractionResponse()
            copy.CopyFrom(a)
            copy.replayed = False
            assert copy == first[0]
    assert [i.interaction_id for i in listed(stub, uuid)] == ["call-0001"]
    entries = changes(server)
    assert len(entries) == 1
    entry = entries[0]
    assert {k: entry[k] for k in ("customer_uuid", "action", "version", "source_system", "interaction_id")} == {
        "customer_uuid": uuid, "action": "INTERACTION_RECORDED", "version": 2, "source_system": "",
        "interaction_id": "call-0001"}
    assert entry["interaction"] == {"channel": "voice", "occurred_us": at("2024-05-01T10:00:00Z"), "agent_id": "agent-7",
                                    "queue": "billing", "disposition": "resolved",
                                    "details": {"duration_s": 125, "wrap_up": "refund"}}
    assert entry["activity"] == {"record_type": "Task", "subject": "Inbound voice call - billing - resolved",
                                 "owner": "005xx000001AbcD", "customer_uuid": uuid, "external_id": "CRM-1",
                                 "occurred_at": "2024-05-01T10:00:00Z", "channel": "voice", "disposition": "resolved"}
    assert entry["attributes"] == {"last_interaction_date": "2024-05-01T10:00:00Z"}
    assert entry["attributes_old"] == {"last_interaction_date": None}
    assert first[0].last_interaction_date.ToMicroseconds() == at("2024-05-01T10:00:00Z")


def test_the_same_id_with_other_content_is_refused(stub, server) -> None:  # noqa: ANN001
    uuid = stub.Upsert(upsert_req(external_id="CRM-2")).customer_uuid
    record(stub, "call-2", customer_uuid=uuid, disposition="resolved")
    code, reason, _, bad = error(lambda: record(stub, "call-2", customer_uuid=uuid, disposition="escalated"))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REUSED")
    assert bad == [("interaction_id", "IDEMPOTENCY_KEY_REUSED")]
    # the same content in another notation is the same request; an Upsert key spelled like it is another key
    again = record(stub, "call-2", customer_uuid=uuid.upper(), disposition=" resolved ")
    assert again.replayed and again.customer_uuid == uuid
    assert stub.Upsert(upsert_req("interaction:call-2", customer_uuid=uuid, attributes={"tier": "x"})).action \
        == pb.ACTION_UPDATED
    assert len(listed(stub, uuid)) == 1 and len(changes(server)) == 1
    # once the ledger has forgotten the key (retention), the stored interaction still answers a late retry
    assert server.service.sweep_ledger(now=2**62) > 0
    assert record(stub, "call-2", customer_uuid=uuid).replayed
    assert error(lambda: record(stub, "call-2", customer_uuid=uuid, queue="other"))[1] == "IDEMPOTENCY_KEY_REUSED"
    assert len(listed(stub, uuid)) == 1 and len(changes(server)) == 1


# -- last_interaction_date ---------------------------------------------------------------------------------------

def test_last_interaction_date_never_moves_back(stub, server) -> None:  # noqa: ANN001
    uuid = stub.Upsert(upsert_req(external_id="CRM-3", attributes={"name": "Ada"})).customer_uuid
    newest = record(stub, "c-new", "2024-06-01T12:30:00.250000+02:00", external_id="CRM-3")
    after_newest = customer(stub, uuid)
    assert after_newest.attributes["last_interaction_date"] == "2024-06-01T10:30:00.250000Z"
    assert after_newest.version == 2
    older = record(stub, "c-old", "2024-05-01T08:00:00Z", external_id="CRM-3")
    assert older.last_interaction_date == newest.last_interaction_date  # what the customer holds after it
    after_older = customer(stub, uuid)
    assert after_older.version == 2 and after_older.attributes["last_interaction_date"] == "2024-06-01T10:30:00.250000Z"
    entries = {c["interaction_id"]: c for c in changes(server)}
    assert "attributes" not in entries["c-old"] and entries["c-old"]["version"] == 2
    assert entries["c-new"]["attributes_old"] == {"last_interaction_date": None}
    later = record(stub, "c-later", "2024-06-02T00:00:00Z", customer_uuid=uuid)
    assert customer(stub, uuid).version == 3
    assert later.last_interaction_date.ToMicroseconds() == at("2024-06-02T00:00:00Z")
    assert changes(server)[-1]["attributes_old"] == {"last_interaction_date": "2024-06-01T10:30:00.250000Z"}
    assert [i.interaction_id for i in listed(stub, uuid)] == ["c-later", "c-new", "c-old"]


def test_a_date_attribute_takes_the_utc_day(tmp_path: Path, make_server) -> None:  # noqa: ANN001
    blueprint = TEST_BLUEPRINT.replace('last_interaction_date = { type = "date-time" }',
                                       'last_contact = { type = "date" }')
    path = tmp_path / "date.toml"
    path.write_text(blueprint + '[interactions]\nlast_interaction_attribute = "last_contact"\n')
    stub = stub_of(make_server(load_settings(path, data_dir=str(tmp_path / "d"), listen="127.0.0.1:0")))
    uuid = stub.Upsert(upsert_req(external_id="D-1")).customer_uuid
    record(stub, "d1", "2024-03-01T23:30:00-05:00", customer_uuid=uuid)
    assert customer(stub, uuid).attributes["last_contact"] == "2024-03-02"
    v = customer(stub, uuid).version
    record(stub, "d2", "2024-03-02T01:00:00Z", customer_uuid=uuid)  # the same day: nothing moves
    assert customer(stub, uuid).version == v


# -- which customer ------------------------------------------------------------------------------------------------

def test_the_customer_by_uuid_identifiers_alias_or_nobody(stub, server) -> None:  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="A-1", emails=("ann@example.com",), phones=(phone(10),))).customer_uuid
    b = stub.Upsert(upsert_req(external_id="B-1", phones=(phone(11),))).customer_uuid
    assert record(stub, "i-uuid", customer_uuid=b).customer_uuid == b
    # Resolve's precedence: the external_id decides over the phone of someone else
    assert record(stub, "i-prec", external_id="A-1", phones=[phone(11)]).customer_uuid == a
    assert record(stub, "i-email", emails=["ANN@example.com"]).customer_uuid == a
    # a merged-away uuid is recorded against its survivor, whose list shows both customers' interactions
    stub.Merge(pb.MergeRequest(idempotency_key="m-1", survivor_uuid=a, merged_uuids=[b]))
    assert record(stub, "i-alias", "2024-05-02T00:00:00Z", customer_uuid=b).customer_uuid == a
    assert {i.interaction_id for i in listed(stub, b)} == {"i-uuid", "i-prec", "i-email", "i-alias"}
    # nobody: recorded unassociated, no customer made
    lost = record(stub, "i-none", phones=[phone(99)])
    assert (lost.customer_uuid, lost.customer_created) == ("", False) and not lost.HasField("last_interaction_date")
    assert stub.Resolve(resolve_req(phones=(phone(99),))).outcome == pb.OUTCOME_NOT_FOUND
    entry = changes(server)[-1]
    assert (entry["interaction_id"], entry["customer_uuid"], entry["version"]) == ("i-none", "", 0)
    assert entry["activity"]["customer_uuid"] == "" and entry["activity"]["external_id"] is None
    assert record(stub, "i-none", phones=[phone(99)]).replayed
    # a withheld number is skipped, and the call still recorded
    anon = record(stub, "i-anon", phones=["anonymous"])
    assert anon.customer_uuid == "" and [s.reason for s in anon.skipped] == ["BLOCKED_VALUE"]
    # unknown customer
    code, reason, _, _ = error(lambda: record(stub, "i-unknown", customer_uuid="0190a000-0000-7000-8000-000000000000"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND")


def test_an_ambiguous_caller_names_the_candidates(stub) -> None:  # noqa: ANN001
    family = [stub.Upsert(upsert_req(external_id=f"F-{i}", phones=(phone(20),))).customer_uuid for i in range(2)]
    code, reason, metadata, _ = error(lambda: record(stub, "i-amb", phones=[phone(20)]))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AMBIGUOUS_TARGET")
    assert sorted(metadata["candidates"].split(",")) == sorted(family)
    # nothing was recorded: naming the customer records it
    assert record(stub, "i-amb", phones=[phone(20)], customer_uuid=family[1]).customer_uuid == family[1]
    # a switchboard (more holders than max_fanout) never decides: reported, and the call recorded unassociated
    for i in range(5):
        stub.Upsert(upsert_req(external_id=f"S-{i}", phones=(phone(21),)))
    board = record(stub, "i-board", phones=[phone(21)])
    assert board.customer_uuid == "" and [s.reason for s in board.skipped] == ["FAN_OUT_LIMIT"]


def test_create_customer_for_an_unknown_caller(tmp_path: Path, make_server) -> None:  # noqa: ANN001
    running = make_server(settings_with(tmp_path, ACTIVITY + "[interactions]\ncreate_customer = true\n", "create"))
    stub = stub_of(running)
    made = record(stub, "new-1", phones=["(650) 253-0042"], emails=["new@example.com"])
    assert made.customer_created and made.customer_uuid
    found = stub.Resolve(resolve_req(phones=(phone(42),)))
    assert (found.outcome, found.customer_uuid) == (pb.OUTCOME_MATCHED, made.customer_uuid)
    got = customer(stub, made.customer_uuid)
    assert got.attributes["last_interaction_date"] == "2024-05-01T10:00:00Z" and got.version == 2
    again = record(stub, "new-1", phones=["+16502530042"], emails=["new@example.com"])
    assert again.replayed and again.customer_uuid == made.customer_uuid and again.customer_created
    assert [c["action"] for c in changes(running, "CREATED")] == ["CREATED"]
    assert changes(running, "CREATED")[0]["source_system"] == "interaction"
    # a known caller is not created again
    assert not record(stub, "new-2", phones=[phone(42)]).customer_created


# -- the history -------------------------------------------------------------------------------------------------

def test_list_is_bounded_and_newest_first(tmp_path: Path, make_server) -> None:  # noqa: ANN001
    stub = stub_of(make_server(settings_with(tmp_path, ACTIVITY + "[interactions]\nhistory = 3\n", "hist")))
    uuid = stub.Upsert(upsert_req(external_id="H-1")).customer_uuid
    days = [f"2024-01-{d:02d}T09:00:00Z" for d in range(1, 7)]
    order = list(range(6))
    random.Random(7).shuffle(order)
    for d in order:
        record(stub, f"h-{d}", days[d], customer_uuid=uuid, details={"n": d})
    got = listed(stub, uuid)
    assert [i.interaction_id for i in got] == ["h-5", "h-4", "h-3"]
    assert json_format.MessageToDict(got[0].details) == {"n": 5}
    assert got[0].occurred_at.ToMicroseconds() == at(days[5]) and got[0].customer_uuid == uuid
    assert [i.interaction_id for i in listed(stub, uuid, limit=2)] == ["h-5", "h-4"]
    assert record(stub, "h-0", days[0], customer_uuid=uuid, details={"n": 0}).replayed  # dropped, still known
    assert len(listed(stub, uuid, limit=1000)) == 3  # never more than the history
    assert customer(stub, uuid).attributes["last_interaction_date"] == days[5]
    code, reason, _, _ = error(lambda: listed(stub, "0190a000-0000-7000-8000-000000000000"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND")
    code, _, _, bad = error(lambda: listed(stub, "nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and bad == [("customer_uuid", "INVALID")]


# -- validation ------------------------------------------------------------------------------------------------------

def test_unassociated_interactions_are_bounded(stub, server, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(history, "UNASSOCIATED_KEPT", 3)
    for d in (5, 1, 4, 2, 3):
        record(stub, f"u-{d}", f"2024-02-0{d}T00:00:00Z", phones=[phone(50 + d)])
    store = server.service.store
    with store.read() as view, view.txn.cursor(db=store.db["interactions"]) as cur:
        kept = sorted(bytes(k)[9:].decode() for k in cur.iternext(values=False) if bytes(k)[:1] == b"U")
        assert history.problems(view) == []
    assert kept == ["u-3", "u-4", "u-5"]
    assert [c["interaction_id"] for c in changes(server)] == ["u-5", "u-1", "u-4", "u-2", "u-3"]


def test_validation_lists_every_bad_field(stub) -> None:  # noqa: ANN001
    req = pb.RecordInteractionRequest(interaction_id="", customer_uuid="nope", channel="v" * 65, agent_id="a\x07b",
                                      default_region="XX", identifiers=pb.Identifiers(phones=["12"]))
    code, _, _, bad = error(lambda: stub.RecordInteraction(req, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(f for f, _ in bad) == sorted(["interaction_id", "customer_uuid", "occurred_at", "channel", "agent_id",
                                                "default_region", "identifiers.phones[0]"])
    far = pb.RecordInteractionRequest(interaction_id="x" * 256, customer_uuid="0190a000-0000-7000-8000-000000000000")
    far.occurred_at.FromMicroseconds(at("2999-01-01T00:00:00Z"))
    far.details.update({"notes": "n" * 4000, "more": "m" * 1000})
    _, _, _, bad = error(lambda: stub.RecordInteraction(far, timeout=5))
    assert bad == [("interaction_id", "INVALID"), ("occurred_at", "INVALID"), ("details", "LIMIT_EXCEEDED")]
    nothing = pb.RecordInteractionRequest(interaction_id="i")
    nothing.occurred_at.FromMicroseconds(at("2024-01-01T00:00:00Z"))
    assert error(lambda: stub.RecordInteraction(nothing, timeout=5))[3] == [("identifiers", "REQUIRED")]


# -- erasure ---------------------------------------------------------------------------------------------------------

def test_a_deleted_customers_interactions_are_gone(tmp_path: Path, start_server) -> None:  # noqa: ANN001, F811
    from tests.integration.test_events import blueprint, drained, event, make_settings, post, signed

    srv = start_server(make_settings(tmp_path, blueprint() + ACTIVITY))
    assert post(srv.http_port, body := event("del-9", {"Tier__c": "gold"}, event_type="CREATE"), signed(body))[0] == 202
    drained(srv)
    uuid = srv.stub.Resolve(resolve_req(external_id="del-9"), timeout=5).customer_uuid
    kept = srv.stub.Upsert(upsert_req(external_id="keep-9"), timeout=5).customer_uuid
    # a duplicate with a call of its own, merged into the customer: its interactions follow it
    dup = srv.stub.Upsert(upsert_req(external_id="dup-9"), timeout=5).customer_uuid
    record(srv.stub, "gone-0", customer_uuid=dup, details={"notes": "Secret-Walrus-Dup"})
    srv.stub.Merge(pb.MergeRequest(idempotency_key="m-9", survivor_uuid=uuid, merged_uuids=[dup]), timeout=5)
    record(srv.stub, "gone-1", customer_uuid=uuid, details={"notes": "Secret-Walrus-Notes"})
    assert {i.interaction_id for i in listed(srv.stub, dup)} == {"gone-0", "gone-1"}
    record(srv.stub, "gone-2", "2024-05-02T00:00:00Z", external_id="del-9", details={"notes": "Secret-Walrus-2"})
    record(srv.stub, "kept-1", customer_uuid=kept, details={"notes": "Kept-Notes"})
    assert post(srv.http_port, body := event("del-9", {}, event_type="DELETE", ts="2024-09-01T00:00:00Z"),
                signed(body))[0] == 202
    drained(srv)
    code, reason, _, _ = error(lambda: listed(srv.stub, uuid))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_DELETED")
    code, reason, _, _ = error(lambda: record(srv.stub, "gone-3", customer_uuid=uuid))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CUSTOMER_DELETED")
    store = srv.running.service.store
    with store.read() as view:
        with view.txn.cursor(db=store.db["interactions"]) as cur:
            blob = b"".join(k + v for k, v in cur)
        entries = {c["interaction_id"]: c for c in view.iter_changes() if c["action"] == "INTERACTION_RECORDED"}
    assert b"Secret-Walrus" not in blob and b"gone-" not in blob and b"Kept-Notes" in blob
    for gone in ("gone-0", "gone-1", "gone-2"):  # the change log keeps who, when and which call; no content
        assert entries[gone]["customer_uuid"] in (uuid, dup) and "redacted_us" in entries[gone]
        assert not {"interaction", "activity", "attributes"} & entries[gone].keys()
    assert entries["kept-1"]["interaction"]["details"] == {"notes": "Kept-Notes"}
    assert [i.interaction_id for i in listed(srv.stub, kept)] == ["kept-1"]
    with store.read() as view:
        assert find_problems(view) == []
