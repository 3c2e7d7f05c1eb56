"""Merge: a merged-away customer's identifiers and uuid resolve to the survivor (contract §3 last row, §7)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format

from resolver.v1 import resolver_pb2 as pb
from tests.conftest import status_details
from tests.integration.helpers import phone, resolve_req, upsert_req


def merge_req(key: str, survivor: str, *merged: str) -> pb.MergeRequest:
    return pb.MergeRequest(idempotency_key=key, survivor_uuid=survivor, merged_uuids=list(merged))


@pytest.fixture
def pair(stub):  # noqa: ANN001, ANN201
    a = stub.Upsert(upsert_req(external_id="M-A", emails=("a@example.com",), phones=(phone(1),),
                               attributes={"name": "Ann", "tier": "gold"}))
    b = stub.Upsert(upsert_req(external_id="M-B", emails=("b@example.com",), phones=(phone(2),),
                               attributes={"name": "Ann B.", "birth_date": "1990-01-02"}))
    return a.customer_uuid, b.customer_uuid


def test_merged_away_identifiers_and_uuid_resolve_to_the_survivor(stub, server, pair):  # noqa: ANN001
    a, b = pair
    m = stub.Merge(merge_req("m-1", a, b))
    assert (m.customer_uuid, list(m.merged_uuids), m.version, m.replayed) == (a, [b], 2, False)
    for req in (resolve_req(external_id="M-B"), resolve_req(emails=("b@example.com",)), resolve_req(phones=(phone(2),))):
        r = stub.Resolve(req)
        assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, a)
    c = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=b))  # the uuid a caller once saw
    assert c.customer_uuid == a
    assert (c.identifiers.external_id, list(c.identifiers.emails), list(c.identifiers.phones)) == (
        "M-A", ["a@example.com", "b@example.com"], [phone(1), phone(2)])
    # per field the most recent value wins: B's name was written after A's
    assert json_format.MessageToDict(c.attributes) == {"name": "Ann B.", "tier": "gold", "birth_date": "1990-01-02"}
    # writes addressed to the merged-away customer land on the survivor
    w = stub.Upsert(upsert_req(customer_uuid=b, attributes={"tier": "silver"}))
    assert w.customer_uuid == a
    w = stub.Upsert(upsert_req(external_id="M-B", attributes={"tier": "platinum"}))
    assert w.customer_uuid == a and w.action == pb.ACTION_UPDATED
    with server.service.store.read() as v:
        assert v.count("records") == 1
        assert [c["action"] for c in v.iter_changes()][-3:] == ["MERGED", "UPDATED", "UPDATED"]


def test_merge_is_idempotent_and_validated(stub, pair):  # noqa: ANN001
    a, b = pair
    first = stub.Merge(merge_req("m-2", a, b))
    again = stub.Merge(merge_req("m-2", a, b))
    assert again.replayed and again.version == first.version
    with pytest.raises(grpc.RpcError) as e:
        stub.Merge(merge_req("m-2", b, a))
    assert status_details(e.value)[0].reason == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(grpc.RpcError) as e:
        stub.Merge(merge_req("", "nope", a, a))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(f for f, _ in status_details(e.value)[1]) == ["idempotency_key", "survivor_uuid"]
    with pytest.raises(grpc.RpcError) as e:
        stub.Merge(merge_req("m-3", a, "00000000-0000-4000-8000-000000000009"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
