"""Upsert against the real server: every point of contract §4."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import json_format

from resolver.v1 import resolver_pb2 as pb
from tests.conftest import status_details
from tests.integration.helpers import phone, resolve_req, upsert_req


def counts(server) -> dict[str, int]:  # noqa: ANN001
    with server.service.store.read() as v:
        return {n: v.count(n) for n in ("records", "ledger", "changes", "ix_external", "ix_email", "ix_phone")}


def fail(call, *args):  # noqa: ANN001, ANN201
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value


# -- 1. validate everything first ------------------------------------------------------------------------
def test_invalid_upsert_lists_every_bad_field_and_writes_nothing(stub, server):  # noqa: ANN001
    before = counts(server)
    err = fail(stub.Upsert, upsert_req(
        "",
        external_id="x" * 300,
        emails=("ok@example.com", "bad@@example.com"),
        phones=(phone(1), "12345"),
        attributes={"name": "n" * 51, "status": "Unknown", "shoe_size": 42, "birth_date": "31.12.1990"},
        customer_uuid="not-a-uuid",
        default_region="ZZZ",
    ))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = status_details(err)
    assert info.reason == "INVALID_ARGUMENT" and info.domain == "resolver.v1"
    assert sorted(f for f, _ in violations) == sorted([
        "idempotency_key", "customer_uuid", "default_region", "identifiers.external_id", "identifiers.emails[1]",
        "identifiers.phones[1]", "attributes.name", "attributes.status", "attributes.shoe_size",
        "attributes.birth_date",
    ])
    assert counts(server) == before


def test_no_usable_identifier_is_rejected(stub):  # noqa: ANN001
    err = fail(stub.Upsert, upsert_req(phones=("anonymous",)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in status_details(err)[1]] == ["identifiers"]


def test_placeholders_are_skipped_not_stored(stub):  # noqa: ANN001
    r = stub.Upsert(upsert_req(external_id="P-1", emails=("noemail@example.com",), phones=("unknown", phone(1))))
    assert list(r.identifiers.emails) == [] and list(r.identifiers.phones) == [phone(1)]
    assert sorted(s.reason for s in r.skipped) == ["BLOCKED_VALUE", "BLOCKED_VALUE"]


def test_attributes_are_normalized(stub):  # noqa: ANN001
    r = stub.Upsert(upsert_req(external_id="N-1", attributes={
        "name": "  Zoe\u0308 ", "birth_date": "12/31/1990", "last_interaction_date": "2023-10-27T16:30:00+02:00",
        "credit_limit": 5000,
    }, source_system="BILLING"))
    c = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=r.customer_uuid))
    assert json_format.MessageToDict(c.attributes) == {
        "name": "Zo\u00eb", "birth_date": "1990-12-31", "last_interaction_date": "2023-10-27T14:30:00Z",
        "credit_limit": 5000.0,
    }
    err = fail(stub.Upsert, upsert_req(external_id="N-1", attributes={"last_interaction_date": "2023-10-27 16:30"}))
    assert [f for f, _ in status_details(err)[1]] == ["attributes.last_interaction_date"]


def test_explicit_null_clears_and_absent_keeps(stub):  # noqa: ANN001
    r = stub.Upsert(upsert_req(external_id="C-1", attributes={"name": "Cleo", "tier": "gold"}))
    r = stub.Upsert(upsert_req(external_id="C-1", attributes={"tier": None}))
    assert r.action == pb.ACTION_UPDATED and r.version == 2
    c = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=r.customer_uuid))
    assert json_format.MessageToDict(c.attributes) == {"name": "Cleo"}


# -- 2. idempotency ledger -------------------------------------------------------------------------------
def test_same_key_same_request_replays_and_writes_nothing(stub, server):  # noqa: ANN001
    req = upsert_req("key-1", external_id="I-1", phones=(phone(1),), attributes={"name": "Ida"})
    first = stub.Upsert(req)
    before = counts(server)
    # the same request in another notation is the same request (fingerprint of the normalized form)
    again = upsert_req("key-1", external_id=" I-1", phones=("(650) 253-0001",), attributes={"name": " Ida"})
    second = stub.Upsert(again)
    assert first.replayed is False and second.replayed is True
    assert (second.customer_uuid, second.action, second.version) == (first.customer_uuid, pb.ACTION_CREATED, 1)
    assert counts(server) == before


def test_same_key_different_request_is_refused(stub, server):  # noqa: ANN001
    stub.Upsert(upsert_req("key-2", external_id="I-2", attributes={"name": "Ivo"}))
    before = counts(server)
    err = fail(stub.Upsert, upsert_req("key-2", external_id="I-2", attributes={"name": "Ivan"}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = status_details(err)
    assert info.reason == "IDEMPOTENCY_KEY_REUSED"
    assert violations == [("idempotency_key", "IDEMPOTENCY_KEY_REUSED")]
    assert counts(server) == before


def test_validation_failures_are_not_stored(stub):  # noqa: ANN001
    fail(stub.Upsert, upsert_req("key-3", external_id="I-3", phones=("123",)))
    r = stub.Upsert(upsert_req("key-3", external_id="I-3", phones=(phone(3),)))
    assert r.action == pb.ACTION_CREATED and not r.replayed


def test_fifty_concurrent_upserts_with_one_key_execute_once(stub, server):  # noqa: ANN001
    req = upsert_req("same-key", external_id="CC-1", emails=("cc@example.com",), attributes={"name": "Conc"})
    before = counts(server)
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: stub.Upsert(req), range(50)))
    assert sum(not r.replayed for r in results) == 1
    assert sum(r.replayed for r in results) == 49
    assert {(r.customer_uuid, r.action, r.version) for r in results} == {(results[0].customer_uuid, pb.ACTION_CREATED, 1)}
    after = counts(server)
    assert after["records"] == before["records"] + 1
    assert after["changes"] == before["changes"] + 1
    assert after["ledger"] == before["ledger"] + 1


def test_fifty_concurrent_creates_of_one_email_make_one_customer(stub, server):  # noqa: ANN001
    before = counts(server)
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(
            lambda i: stub.Upsert(upsert_req(f"k-{i}", emails=("new.person@example.com",), attributes={"name": "New"})),
            range(50),
        ))
    assert len({r.customer_uuid for r in results}) == 1
    assert sorted(r.action for r in results).count(pb.ACTION_CREATED) == 1
    assert counts(server)["records"] == before["records"] + 1
    r = stub.Resolve(resolve_req(emails=("new.person@example.com",)))
    assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, results[0].customer_uuid)


def test_ledger_entries_expire_and_are_swept(make_server, settings):  # noqa: ANN001
    server = make_server(settings.with_overrides(idempotency_retention_s=0.5))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        from resolver.v1 import resolver_pb2_grpc

        stub = resolver_pb2_grpc.IdentityResolverStub(ch)
        first = stub.Upsert(upsert_req("exp-key", external_id="X-1", attributes={"name": "One"}))
        assert counts(server)["ledger"] == 1
        time.sleep(0.6)
        # past retention the key is free again: a different request under it executes
        second = stub.Upsert(upsert_req("exp-key", external_id="X-1", attributes={"name": "Two"}))
        assert (second.replayed, second.action, second.version) == (False, pb.ACTION_UPDATED, first.version + 1)
        time.sleep(0.6)
        assert server.service.sweep_ledger() == 1
        assert counts(server)["ledger"] == 0


# -- 3. target -------------------------------------------------------------------------------------------
def test_target_by_uuid_external_id_and_email(stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="T-1", emails=("t1@example.com",)))
    by_uuid = stub.Upsert(upsert_req(customer_uuid=a.customer_uuid, phones=(phone(11),)))
    by_ext = stub.Upsert(upsert_req(external_id="T-1", attributes={"tier": "gold"}))
    by_email = stub.Upsert(upsert_req(emails=("T1@example.com",), attributes={"name": "Tia"}))
    assert {by_uuid.customer_uuid, by_ext.customer_uuid, by_email.customer_uuid} == {a.customer_uuid}
    assert by_email.version == 4


def test_unknown_uuid_is_not_found(stub):  # noqa: ANN001
    err = fail(stub.Upsert, upsert_req(customer_uuid="00000000-0000-4000-8000-000000000001", phones=(phone(1),)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_phone_alone_never_selects_an_existing_customer(stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="PH-1", phones=(phone(21),)))
    b = stub.Upsert(upsert_req(phones=(phone(21),), attributes={"name": "Other"}))
    assert b.action == pb.ACTION_CREATED and b.customer_uuid != a.customer_uuid
    assert list(b.potential_duplicates) == [a.customer_uuid]


def test_ambiguous_email_target_fails_precondition_naming_candidates(stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="AM-1", emails=("shared@example.com",)))
    b = stub.Upsert(upsert_req(external_id="AM-2", emails=("shared@example.com",)))
    err = fail(stub.Upsert, upsert_req(emails=("shared@example.com",), attributes={"name": "Who"}))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = status_details(err)
    assert sorted(info.metadata["candidates"].split(",")) == sorted([a.customer_uuid, b.customer_uuid])


# -- 4. conflicts, versions, ownership: whole request, atomically ----------------------------------------
def test_external_id_held_by_another_is_already_exists(stub, server):  # noqa: ANN001
    stub.Upsert(upsert_req(external_id="U-1"))
    b = stub.Upsert(upsert_req(emails=("u2@example.com",)))
    before = counts(server)
    err = fail(stub.Upsert, upsert_req(customer_uuid=b.customer_uuid, external_id="U-1", phones=(phone(31),)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert counts(server) == before
    assert stub.Resolve(resolve_req(phones=(phone(31),))).outcome == pb.OUTCOME_NOT_FOUND


def test_expected_version_mismatch_is_aborted(stub, server):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="V-1", attributes={"name": "Vera"}))
    ok = stub.Upsert(upsert_req(external_id="V-1", attributes={"name": "Vera B"}, expected_version=a.version))
    assert ok.version == 2
    before = counts(server)
    err = fail(stub.Upsert, upsert_req(external_id="V-1", attributes={"name": "Stale"}, expected_version=1))
    assert err.code() == grpc.StatusCode.ABORTED
    assert status_details(err)[0].metadata["current_version"] == "2"
    assert counts(server) == before


def test_field_owned_by_another_source_is_permission_denied(stub, server):  # noqa: ANN001
    stub.Upsert(upsert_req(external_id="O-1", attributes={"status": "Active"}, source_system="SALESFORCE"))
    before = counts(server)
    err = fail(stub.Upsert, upsert_req(external_id="O-1", attributes={"name": "Ok", "status": "Churned"},
                                       source_system="BILLING"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert status_details(err)[0].metadata["fields"] == "status"
    assert counts(server) == before  # the allowed field was not written either


# -- 5. identifiers are added; removing is explicit --------------------------------------------------------
def test_identifiers_accumulate_and_removal_is_explicit(stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="ID-1", emails=("a@example.com",), phones=(phone(41),)))
    b = stub.Upsert(upsert_req(external_id="ID-1", emails=("b@example.com",), phones=(phone(42),)))
    assert list(b.identifiers.emails) == ["a@example.com", "b@example.com"]
    assert list(b.identifiers.phones) == [phone(41), phone(42)]
    c = stub.Upsert(upsert_req(external_id="ID-1", remove_identifiers=pb.Identifiers(phones=["(650) 253-0041"])))
    assert list(c.identifiers.phones) == [phone(42)] and c.version == 3
    assert stub.Resolve(resolve_req(phones=(phone(41),))).outcome == pb.OUTCOME_NOT_FOUND
    assert stub.Resolve(resolve_req(phones=(phone(42),))).customer_uuid == a.customer_uuid


def test_replacing_external_id_needs_explicit_removal(stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="R-1", emails=("r@example.com",)))
    err = fail(stub.Upsert, upsert_req(customer_uuid=a.customer_uuid, external_id="R-2"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    r = stub.Upsert(upsert_req(customer_uuid=a.customer_uuid, external_id="R-2",
                               remove_identifiers=pb.Identifiers(external_id="R-1")))
    assert r.identifiers.external_id == "R-2"
    assert stub.Resolve(resolve_req(external_id="R-1")).outcome == pb.OUTCOME_NOT_FOUND
    assert stub.Resolve(resolve_req(external_id="R-2")).customer_uuid == a.customer_uuid


def test_unchanged_write_keeps_version_and_logs_no_change(stub, server):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="UC-1", attributes={"name": "Uma"}))
    before = counts(server)
    b = stub.Upsert(upsert_req(external_id="UC-1", attributes={"name": "Uma"}))
    assert (b.action, b.version, b.replayed) == (pb.ACTION_UNCHANGED, a.version, False)
    assert counts(server)["changes"] == before["changes"]


# -- 6. one durable transaction -----------------------------------------------------------------------------
def test_acknowledged_write_survives_a_restart(make_server, settings, server, stub):  # noqa: ANN001
    a = stub.Upsert(upsert_req(external_id="D-1", phones=(phone(61),), attributes={"name": "Dur"}))
    with server.service.store.read() as v:
        changes = list(v.iter_changes())
    assert [(c["seq"], c["customer_uuid"], c["action"]) for c in changes] == [(1, a.customer_uuid, "CREATED")]
    server.stop(grace=0)
    again = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{again.port}") as ch:
        from resolver.v1 import resolver_pb2_grpc

        r = resolver_pb2_grpc.IdentityResolverStub(ch).Resolve(resolve_req(phones=(phone(61),)))
    assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, a.customer_uuid)


def test_concurrent_writes_fail_and_succeed_independently(stub, server):  # noqa: ANN001
    """Group commit: commands sharing a write transaction still succeed or fail each on its own."""
    holder = stub.Upsert(upsert_req(external_id="GC-HELD"))
    others = [stub.Upsert(upsert_req(emails=(f"gc{i}@example.com",))).customer_uuid for i in range(10)]
    before = counts(server)

    def write(i: int):  # noqa: ANN202
        if i % 3 == 0:  # tries to take an external_id held by another customer
            req = upsert_req(customer_uuid=others[i % 10], external_id="GC-HELD", attributes={"name": f"bad{i}"})
        else:
            req = upsert_req(external_id=f"GC-{i}", attributes={"name": f"ok{i}"})
        try:
            return stub.Upsert(req).action
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(write, range(60)))
    assert results.count(grpc.StatusCode.ALREADY_EXISTS) == 20
    assert results.count(pb.ACTION_CREATED) == 40
    after = counts(server)
    assert after["records"] == before["records"] + 40
    assert after["changes"] == before["changes"] + 40
    r = stub.Resolve(resolve_req(external_id="GC-HELD"))
    assert r.customer_uuid == holder.customer_uuid
    for uuid in others:  # none of the refused writes touched its target
        assert stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuid)).version == 1
