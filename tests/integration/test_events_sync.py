"""CRM sync, inbound, complete (contract §5): identifier slots in change sets with provenance, and DELETE
that erases. Real server on 127.0.0.1:0, real webhook endpoint, real LMDB, real phonenumbers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from resolver.check import find_problems
from resolver.v1 import resolver_pb2 as pb
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.integration.test_events import (  # noqa: F401  (start_server is a fixture)
    Client,
    blueprint,
    changes_for,
    drained,
    event,
    make_settings,
    post,
    signed,
    start_server,
)

IDENTIFIERS = ('identifiers = { Phone = "phone", MobilePhone = "phone", Email = "email", phone_number = "phone", '
               'email_address = "email" }\ndefault_region = "US"\n')
A, B, C = phone(1), phone(2), phone(3)


def sync_blueprint() -> str:
    text = blueprint()
    head, sep, tail = text.partition('secrets = [{ env = "SF_SECRET_OLD" }, { env = "SF_SECRET_NEW" }]\n')
    assert sep, "the events blueprint changed shape"
    return head + sep + IDENTIFIERS + tail


@pytest.fixture
def srv(tmp_path: Path, start_server: Callable[..., Client]) -> Client:  # noqa: F811
    return start_server(make_settings(tmp_path, sync_blueprint()))


def send(c: Client, *bodies: bytes) -> pb.EventCounters:
    for body in bodies:
        assert post(c.http_port, body, signed(body))[0] == 202
    return drained(c)


def who(c: Client, **ids: Any) -> tuple[int, str]:
    r = c.stub.Resolve(resolve_req(**ids), timeout=5)
    return r.outcome, r.customer_uuid


def matched(c: Client, uuid: str, **ids: Any) -> bool:
    return who(c, **ids) == (pb.OUTCOME_MATCHED, uuid)


def not_found(c: Client, **ids: Any) -> bool:
    return who(c, **ids)[0] == pb.OUTCOME_NOT_FOUND


def create(c: Client, record_id: str, ts: str = "2024-01-01T00:00:00Z", **fields: Any) -> str:
    send(c, event(record_id, fields, event_type="CREATE", ts=ts))
    outcome, uuid = who(c, external_id=record_id)
    assert outcome == pb.OUTCOME_MATCHED
    return uuid


def dead_letters(c: Client) -> list[pb.DeadLetter]:
    return list(c.stub.ListDeadLetters(pb.ListDeadLettersRequest(), timeout=5).dead_letters)


def no_problems(c: Client) -> None:
    with c.running.service.store.read() as view:
        assert find_problems(view) == []


# -- identifiers in change sets ---------------------------------------------------------------------------

def test_phone_and_email_move_with_the_crm(srv: Client) -> None:
    uuid = create(srv, "rec-1", Phone="(650) 253-0001", Email="Ann@Example.com", Customer_Status__c="Active")
    assert matched(srv, uuid, phones=(A,)) and matched(srv, uuid, emails=("ann@example.com",))
    send(srv, event("rec-1", {"Phone": ("+1 650 253 0001", "650-253-0002"), "Email": ("ann@example.com", "ann@new.org")},
                    ts="2024-02-01T00:00:00Z"))
    assert matched(srv, uuid, phones=(B,)) and not_found(srv, phones=(A,))
    assert matched(srv, uuid, emails=("ann@new.org",)) and not_found(srv, emails=("ann@example.com",))
    moved = [ch for ch in changes_for(srv) if ch["action"] == "UPDATED"][-1]
    assert sorted(moved["added"]) == [[2, "ann@new.org"], [3, B]] and sorted(moved["removed"]) == [
        [2, "ann@example.com"], [3, A]]
    assert moved["conflicts"] == []
    no_problems(srv)


def test_a_phone_another_slot_or_an_upsert_holds_stays(srv: Client) -> None:
    uuid = create(srv, "rec-2", Phone=A, MobilePhone=A, Email="bo@example.com")
    send(srv, event("rec-2", {"Phone": (A, B)}, ts="2024-02-01T00:00:00Z"))
    assert matched(srv, uuid, phones=(A,)) and matched(srv, uuid, phones=(B,))  # MobilePhone still holds A
    # the CCaaS side adds C by Upsert; then the CRM's slot moves onto C and away again: C stays
    r = srv.stub.Upsert(upsert_req(customer_uuid=uuid, phones=(C,), source_system="CCAAS"), timeout=5)
    assert r.action == pb.ACTION_UPDATED
    send(srv, event("rec-2", {"MobilePhone": (A, C)}, ts="2024-03-01T00:00:00Z"),
         event("rec-2", {"MobilePhone": (C, None)}, ts="2024-04-01T00:00:00Z"))
    assert not_found(srv, phones=(A,)) and matched(srv, uuid, phones=(C,)) and matched(srv, uuid, phones=(B,))
    record = srv.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuid), timeout=5)
    assert sorted(record.identifiers.phones) == [B, C]
    no_problems(srv)


def test_shared_line_one_customer_moves_away(srv: Client) -> None:
    one = create(srv, "fam-1", Phone=A)
    two = create(srv, "fam-2", Phone=A)
    assert who(srv, phones=(A,))[0] == pb.OUTCOME_AMBIGUOUS
    dup = [ch for ch in changes_for(srv) if ch["customer_uuid"] == two][0]
    assert dup["potential_duplicates"] == [one]  # the change log names who else holds the line
    send(srv, event("fam-1", {"Phone": (A, B)}, ts="2024-02-01T00:00:00Z"))
    assert matched(srv, two, phones=(A,)) and matched(srv, one, phones=(B,))
    no_problems(srv)


def test_out_of_order_per_slot_newest_wins_with_one_conflict(srv: Client) -> None:
    uuid = create(srv, "ooo-9", Phone=A)
    newer = event("ooo-9", {"Phone": (A, C)}, ts="2024-03-01T00:00:00Z")
    older = event("ooo-9", {"Phone": (A, B)}, ts="2024-02-01T00:00:00Z")
    snap = send(srv, newer, older)
    assert matched(srv, uuid, phones=(C,)) and not_found(srv, phones=(B,)) and not_found(srv, phones=(A,))
    assert snap.counters["stale_fields"] == 1
    # the older event is stale (newest wins) ; an UPDATE whose old_value is not what the slot holds: a conflict
    snap = send(srv, event("ooo-9", {"Phone": (B, A)}, ts="2024-04-01T00:00:00Z"))
    assert matched(srv, uuid, phones=(A,)) and not_found(srv, phones=(C,))
    conflicts = [c for ch in changes_for(srv) for c in ch.get("conflicts", [])]
    assert conflicts == [{"field": "Phone", "expected_old": conflicts[0]["expected_old"],
                          "stored": conflicts[0]["stored"]}]
    assert "253" not in str(conflicts)  # masked
    assert snap.counters["conflicts"] == 1


def test_an_invalid_phone_dead_letters_the_whole_event(srv: Client) -> None:
    uuid = create(srv, "bad-1", Phone=A, Customer_Status__c="Active")
    before = srv.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuid), timeout=5)
    body = event("bad-1", {"Customer_Status__c": "Churned", "Email": "x@new.org", "Phone": "12"},
                 ts="2024-02-01T00:00:00Z")
    status, answer, _ = post(srv.http_port, body, signed(body))  # checked at admission: 400, kept in the DLQ
    assert status == 400 and answer["error"] == "INVALID_VALUE"
    snap = drained(srv)
    after = srv.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuid), timeout=5)
    assert after == before  # nothing applied: not the status, not the email
    [dead] = dead_letters(srv)
    assert dead.reason == "INVALID_VALUE" and "change_set.Phone.new_value" in dead.detail
    assert snap.counters["dead_lettered"] == 1 and snap.conserved


def test_placeholder_empties_the_slot_and_is_reported(srv: Client) -> None:
    uuid = create(srv, "ph-1", Phone=A)
    send(srv, event("ph-1", {"Phone": (A, "anonymous")}, ts="2024-02-01T00:00:00Z"))
    assert not_found(srv, phones=(A,)) and matched(srv, uuid, external_id="ph-1")
    last = changes_for(srv)[-1]
    assert last["skipped"] and last["skipped"][0][2] == "BLOCKED_VALUE" and last["removed"] == [[3, A]]


def test_import_then_webhook_moves_the_exported_phone(srv: Client) -> None:
    """A store loaded from the CRM's export (Upsert, same source), kept in step by its webhooks: the slot takes
    over the exported phone when the event names it as old_value."""
    r = srv.stub.Upsert(upsert_req(external_id="exp-1", phones=(A,), source_system="SALESFORCE"), timeout=5)
    send(srv, event("exp-1", {"Phone": (A, B)}, ts="2024-02-01T00:00:00Z"))
    assert not_found(srv, phones=(A,)) and matched(srv, r.customer_uuid, phones=(B,))
    # another source's phone is not taken over
    srv.stub.Upsert(upsert_req(customer_uuid=r.customer_uuid, phones=(C,), source_system="CCAAS"), timeout=5)
    send(srv, event("exp-1", {"MobilePhone": (C, A)}, ts="2024-02-01T00:00:00Z"))
    assert matched(srv, r.customer_uuid, phones=(C,)) and matched(srv, r.customer_uuid, phones=(A,))
    no_problems(srv)


# -- DELETE -------------------------------------------------------------------------------------------------

def test_delete_erases_and_refuses_older_events(srv: Client) -> None:
    uuid = create(srv, "del-1", Phone=A, Email="gone@example.com", Customer_Status__c="Active", Tier__c="Zanzibar")
    merged_in = srv.stub.Upsert(upsert_req(external_id="del-1-dup", phones=(B,), attributes={"segment": "Quokka"}),
                                timeout=5).customer_uuid
    srv.stub.Merge(pb.MergeRequest(idempotency_key="m-del", survivor_uuid=uuid, merged_uuids=[merged_in]), timeout=5)
    send(srv, event("del-1", {}, event_type="DELETE", ts="2024-03-01T00:00:00Z"))
    for ids in ({"external_id": "del-1"}, {"external_id": "del-1-dup"}, {"phones": (A,)}, {"phones": (B,)},
                {"emails": ("gone@example.com",)}):
        assert not_found(srv, **ids), ids
    for gone in (uuid, merged_in):  # the merged alias follows its survivor
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=gone), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info = [d for d in rpc_status.from_call(err.value).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        unpacked = error_details_pb2.ErrorInfo()
        info[0].Unpack(unpacked)
        assert unpacked.reason == "CUSTOMER_DELETED"
    no_problems(srv)
    # an older UPDATE replayed after the DELETE, and a CREATE not newer than it: RECORD_DELETED
    send(srv, event("del-1", {"Tier__c": "B"}, ts="2024-02-01T00:00:00Z"),
         event("del-1", {"Tier__c": "B"}, ts="2024-04-01T00:00:00Z"),
         event("del-1", {"Phone": A}, event_type="CREATE", ts="2024-03-01T00:00:00Z"))
    assert [d.reason for d in dead_letters(srv)] == ["RECORD_DELETED"] * 3
    # a newer CREATE: a new customer
    fresh = create(srv, "del-1", ts="2024-05-01T00:00:00Z", Phone=A)
    assert fresh != uuid and matched(srv, fresh, phones=(A,))
    no_problems(srv)


def test_delete_leaves_no_pii_in_the_data_files_after_compaction(tmp_path: Path,
                                                                 start_server: Callable[..., Client]) -> None:  # noqa: F811
    from resolver.cli import main as cli_main

    settings = make_settings(tmp_path, sync_blueprint())
    srv = start_server(settings)
    secrets = ["+16502530077", "erased.person@example.org", "Xylophone-Tier-Zebra", "crm-id-Quetzal-42"]
    keep = ["+16502530088", "kept.person@example.org", "Kept-Tier-Walrus", "crm-id-Kept-43"]
    for (ph, em, tier, rid) in (secrets, keep):
        create(srv, rid, Phone=ph, Email=em, Tier__c=tier)
        srv.stub.Upsert(upsert_req(external_id=rid, emails=(em.replace("@", ".u@"),), source_system="CCAAS",
                                   attributes={"segment": tier + "-Seg"}), timeout=5)
    send(srv, event(secrets[3], {}, event_type="DELETE", ts="2024-06-01T00:00:00Z"))
    srv.close()
    srv.running.stop(grace=0)
    data = Path(settings.server.data_dir)
    assert cli_main(["check", "--data-dir", str(data)]) == 0
    assert cli_main(["compact", "--data-dir", str(data)]) == 0
    assert cli_main(["check", "--data-dir", str(data)]) == 0
    blob = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
    for value in secrets + [secrets[1].replace("@", ".u@"), secrets[2] + "-Seg"]:
        assert value.encode() not in blob, value
    for value in keep:
        assert value.encode() in blob, value


def test_deleting_a_record_merged_into_another_detaches_only_it(srv: Client) -> None:
    """A CRM deletes the losing records of its own merges: the surviving customer must stay."""
    keep = create(srv, "win-1", Phone=A, Email="win@example.com")
    loser = create(srv, "lose-1", Phone=B, MobilePhone=A, Email="lose@example.com")
    srv.stub.Merge(pb.MergeRequest(idempotency_key="m-crm", survivor_uuid=keep, merged_uuids=[loser]), timeout=5)
    send(srv, event("lose-1", {}, event_type="DELETE", ts="2024-03-01T00:00:00Z"))
    assert matched(srv, keep, external_id="win-1") and matched(srv, keep, phones=(A,))  # A: win-1's Phone holds it
    assert matched(srv, keep, emails=("win@example.com",))
    for gone in ({"external_id": "lose-1"}, {"phones": (B,)}, {"emails": ("lose@example.com",)}):
        assert not_found(srv, **gone), gone
    send(srv, event("lose-1", {"Phone": B}, ts="2024-02-01T00:00:00Z"))
    assert [d.reason for d in dead_letters(srv)] == ["RECORD_DELETED"]
    no_problems(srv)
