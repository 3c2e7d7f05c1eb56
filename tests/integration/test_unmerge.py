"""Unmerge (contract §7): a merge undone exactly, from the merge journal; blocked when something depends on it."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from resolver.v1 import resolver_pb2 as pb
from tests.integration.helpers import phone, resolve_req, upsert_req


def merge(stub, key: str, survivor: str, *merged: str) -> pb.MergeResponse:  # noqa: ANN001
    return stub.Merge(pb.MergeRequest(idempotency_key=key, survivor_uuid=survivor, merged_uuids=list(merged)))


def unmerge(stub, key: str, survivor: str, merged: str) -> pb.UnmergeResponse:  # noqa: ANN001
    return stub.Unmerge(pb.UnmergeRequest(idempotency_key=key, survivor_uuid=survivor, merged_uuid=merged))


def customer(stub, uuid: str) -> dict:  # noqa: ANN001
    """GetCustomer field by field, versions and times aside."""
    c = json_format.MessageToDict(stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=uuid)))
    for volatile in ("version", "updatedAt"):
        c.pop(volatile, None)
    return c


def error_of(call) -> tuple[grpc.StatusCode, str, list[error_details_pb2.PreconditionFailure.Violation]]:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        call()
    status = rpc_status.from_call(err.value)
    reason, blockers = "", []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
        elif d.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pf = error_details_pb2.PreconditionFailure()
            d.Unpack(pf)
            blockers = list(pf.violations)
    return err.value.code(), reason, blockers


@pytest.fixture
def trio(stub):  # noqa: ANN001, ANN201
    """A and B share phone 1 (A held it before any merge); B also has its own email, phone and attributes."""
    a = stub.Upsert(upsert_req(external_id="U-A", emails=("a@example.com",), phones=(phone(1),),
                               attributes={"name": "Ann", "tier": "gold"}))
    b = stub.Upsert(upsert_req(external_id="U-B", emails=("b@example.com",), phones=(phone(1), phone(2)),
                               attributes={"name": "Ann B.", "birth_date": "1990-01-02"}))
    return a.customer_uuid, b.customer_uuid


def test_merge_then_unmerge_restores_both_exactly(stub, trio):  # noqa: ANN001
    a, b = trio
    before = {a: customer(stub, a), b: customer(stub, b)}
    merge(stub, "m-1", a, b)
    assert customer(stub, b)["customerUuid"] == a
    r = unmerge(stub, "u-1", a, b)
    assert (r.survivor_uuid, r.merged_uuid, r.replayed) == (a, b, False)
    assert r.merged_version == 2 and r.survivor_version == 3
    assert customer(stub, a) == before[a] and customer(stub, b) == before[b]
    for req, who in ((resolve_req(external_id="U-B"), b), (resolve_req(emails=("b@example.com",)), b),
                     (resolve_req(phones=(phone(2),)), b), (resolve_req(external_id="U-A"), a)):
        got = stub.Resolve(req)
        assert (got.outcome, got.customer_uuid) == (pb.OUTCOME_MATCHED, who)
    assert stub.Resolve(resolve_req(phones=(phone(1),))).outcome == pb.OUTCOME_AMBIGUOUS  # shared again
    # a retry with the same key does it once; the same key for another request is refused
    again = unmerge(stub, "u-1", a, b)
    assert again.replayed and (again.survivor_version, again.merged_version) == (3, 2)
    code, reason, _ = error_of(lambda: unmerge(stub, "u-2", a, b))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_MERGED")


def test_what_was_written_to_the_survivor_since_the_merge_stays(stub, trio):  # noqa: ANN001
    a, b = trio
    merge(stub, "m-1", a, b)
    stub.Upsert(upsert_req(customer_uuid=a, phones=(phone(3),), attributes={"tier": "platinum"}))
    stub.Upsert(upsert_req(customer_uuid=a, emails=("b@example.com",), source_system="CCAAS"))  # re-held since
    unmerge(stub, "u-1", a, b)
    got = customer(stub, a)
    assert got["attributes"] == {"name": "Ann", "tier": "platinum"}  # birth_date was B's; tier written since
    assert sorted(got["identifiers"]["phones"]) == [phone(1), phone(3)]
    assert sorted(got["identifiers"]["emails"]) == ["a@example.com", "b@example.com"]
    assert customer(stub, b)["identifiers"]["emails"] == ["b@example.com"]


def test_blocked_unmerges_name_their_blocker(stub, trio):  # noqa: ANN001
    a, b = trio
    c = stub.Upsert(upsert_req(external_id="U-C", phones=(phone(4),))).customer_uuid
    merge(stub, "m-1", a, b)
    # an identifier the merge brought was removed since
    stub.Upsert(upsert_req(customer_uuid=a, remove_identifiers=pb.Identifiers(phones=[phone(2)])))
    code, reason, blockers = error_of(lambda: unmerge(stub, "u-1", a, b))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "UNMERGE_BLOCKED")
    assert [v.type for v in blockers] == ["IDENTIFIER_CHANGE"] and "phone" in blockers[0].description
    assert phone(2) not in blockers[0].subject  # masked
    # the survivor merged into another customer since
    merge(stub, "m-2", c, a)
    code, reason, blockers = error_of(lambda: unmerge(stub, "u-2", a, b))
    assert (code, reason, [v.type for v in blockers]) == (grpc.StatusCode.FAILED_PRECONDITION, "UNMERGE_BLOCKED",
                                                         ["MERGE"])
    assert blockers[0].subject == c
    # undo the later merge first; the first one is still blocked by the identifier change, and says so
    unmerge(stub, "u-3", c, a)
    assert error_of(lambda: unmerge(stub, "u-4", a, b))[1] == "UNMERGE_BLOCKED"


def test_unmerge_validates_every_field(stub):  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        stub.Unmerge(pb.UnmergeRequest(idempotency_key="", survivor_uuid="nope", merged_uuid=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = [d for d in rpc_status.from_call(err.value).details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)][0]
    br = error_details_pb2.BadRequest()
    bad.Unpack(br)
    assert sorted(v.field for v in br.field_violations) == ["idempotency_key", "merged_uuid", "survivor_uuid"]
