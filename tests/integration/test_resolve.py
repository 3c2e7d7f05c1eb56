"""Resolve against the real server: every row of the contract §3 table, projection, explain, deadline."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import json_format

from resolver.v1 import resolver_pb2 as pb
from tests.conftest import status_details
from tests.integration.helpers import phone, resolve_req, upsert_req


def attrs(msg) -> dict:  # noqa: ANN001
    return json_format.MessageToDict(msg)


@pytest.fixture
def people(stub):  # noqa: ANN001, ANN201
    """Alice (ext A-1, email, own phone), Bob and Carol sharing a family phone, Dave with a shared email."""
    out = {}
    for name, kw in [
        ("alice", dict(external_id="A-1", emails=("alice@example.com",), phones=(phone(1),))),
        ("bob", dict(external_id="B-2", emails=("bob@example.com",), phones=(phone(2),))),
        ("carol", dict(external_id="C-3", phones=(phone(2),))),
        ("dave", dict(external_id="D-4", emails=("family@example.com",), phones=(phone(4),))),
        ("erin", dict(external_id="E-5", emails=("family@example.com",))),
    ]:
        r = stub.Upsert(upsert_req(**kw, attributes={"name": name.title(), "status": "Active", "tier": "gold"},
                                   source_system="SALESFORCE"))
        out[name] = r.customer_uuid
    return out


def test_external_id_hit_matches(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(external_id="  A-1 "))
    assert r.outcome == pb.OUTCOME_MATCHED
    assert r.matched_on == pb.MATCH_KIND_EXTERNAL_ID
    assert r.customer_uuid == people["alice"]
    assert r.version == 1
    assert attrs(r.attributes) == {"name": "Alice", "status": "Active"}  # the default view


def test_external_id_miss_falls_to_email(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(external_id="NOPE", emails=(" Alice@EXAMPLE.com",)))
    assert (r.outcome, r.matched_on, r.customer_uuid) == (pb.OUTCOME_MATCHED, pb.MATCH_KIND_EMAIL, people["alice"])


@pytest.mark.parametrize(
    "ani,region",
    [
        (phone(1), ""),
        ("+1 (650) 253-0001", ""),
        ("(650) 253-0001", ""),  # national form, the server's default region (US)
        ("650.253.0001", "US"),
        ("001 650 253 0001", ""),
        ("011 1 650 253 0001", ""),
        ("tel:+1-650-253-0001", ""),
        ("sip:+16502530001@carrier.example;user=phone", ""),
    ],
)
def test_phone_hit_matches_in_every_notation(stub, people, ani, region):  # noqa: ANN001
    r = stub.Resolve(resolve_req(phones=(ani,), default_region=region))
    assert (r.outcome, r.matched_on, r.customer_uuid) == (pb.OUTCOME_MATCHED, pb.MATCH_KIND_PHONE, people["alice"])


def test_shared_phone_is_ambiguous_never_a_guess(stub, people):  # noqa: ANN001
    # Carol was written after Bob: most recently active first.
    r = stub.Resolve(resolve_req(phones=(phone(2),), fields=["name"]))
    assert r.outcome == pb.OUTCOME_AMBIGUOUS
    assert r.customer_uuid == ""
    assert [c.customer_uuid for c in r.candidates] == [people["carol"], people["bob"]]
    assert [attrs(c.attributes) for c in r.candidates] == [{"name": "Carol"}, {"name": "Bob"}]


def test_shared_email_is_ambiguous(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(emails=("family@example.com",), phones=(phone(4),)))
    assert r.outcome == pb.OUTCOME_AMBIGUOUS
    assert r.matched_on == pb.MATCH_KIND_EMAIL
    assert {c.customer_uuid for c in r.candidates} == {people["dave"], people["erin"]}


def test_candidates_are_bounded(stub):  # noqa: ANN001
    for i in range(4):  # max_candidates = 3, max_fanout = 4 in the test blueprint
        stub.Upsert(upsert_req(external_id=f"S-{i}", phones=(phone(50),)))
    r = stub.Resolve(resolve_req(phones=(phone(50),)))
    assert r.outcome == pb.OUTCOME_AMBIGUOUS
    assert len(r.candidates) == 3


def test_nothing_hits_is_not_found(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(external_id="X-9", emails=("nobody@example.com",), phones=(phone(9),)))
    assert r.outcome == pb.OUTCOME_NOT_FOUND
    assert r.customer_uuid == "" and not r.candidates


def test_lower_kind_on_someone_else_is_a_conflict(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(external_id="A-1", emails=("bob@example.com",), phones=(phone(4),)))
    assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, people["alice"])
    assert list(r.conflicts) == [people["bob"], people["dave"]]


def test_shared_line_that_includes_the_match_is_no_conflict(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(external_id="B-2", phones=(phone(2),)))
    assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, people["bob"])
    assert list(r.conflicts) == []


def test_unnormalizable_identifier_is_skipped_and_others_count(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(emails=("not-an-email",), phones=("anonymous", "12", phone(1))))
    assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, people["alice"])
    reasons = sorted((s.kind, s.reason) for s in r.skipped)
    assert reasons == [
        (pb.MATCH_KIND_EMAIL, "INVALID_EMAIL"),
        (pb.MATCH_KIND_PHONE, "BLOCKED_VALUE"),
        (pb.MATCH_KIND_PHONE, "INVALID_PHONE"),
    ]
    assert all("not-an-email" not in s.masked_value for s in r.skipped)


def test_only_placeholders_is_not_found_with_skipped(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(phones=("Restricted", "+16502530099")))  # built-in and configured placeholders
    assert r.outcome == pb.OUTCOME_NOT_FOUND
    assert [s.reason for s in r.skipped] == ["BLOCKED_VALUE", "BLOCKED_VALUE"]


def test_fanned_out_phone_never_decides(stub, people):  # noqa: ANN001
    for i in range(5):  # max_fanout = 4
        stub.Upsert(upsert_req(external_id=f"SW-{i}", phones=(phone(77),)))
    r = stub.Resolve(resolve_req(phones=(phone(77),), explain=True))
    assert r.outcome == pb.OUTCOME_NOT_FOUND
    assert [s.reason for s in r.skipped] == ["FAN_OUT_LIMIT"]
    assert [(p.result, p.hits) for p in r.probes] == [(pb.PROBE_RESULT_FAN_OUT, 5)]
    # ...and a usable identifier beside it still decides
    r = stub.Resolve(resolve_req(phones=(phone(77), phone(1))))
    assert (r.outcome, r.customer_uuid) == (pb.OUTCOME_MATCHED, people["alice"])


def test_explain_reports_each_probe_masked(stub, people):  # noqa: ANN001
    r = stub.Resolve(resolve_req(external_id="NOPE-123", emails=("alice@example.com",), phones=(phone(2),),
                                 explain=True))
    got = [(p.kind, p.result, p.hits) for p in r.probes]
    assert got == [
        (pb.MATCH_KIND_EXTERNAL_ID, pb.PROBE_RESULT_MISS, 0),
        (pb.MATCH_KIND_EMAIL, pb.PROBE_RESULT_HIT, 1),
        (pb.MATCH_KIND_PHONE, pb.PROBE_RESULT_SHARED, 2),
    ]
    for p in r.probes:
        assert p.masked_value and p.masked_value not in ("NOPE-123", "alice@example.com", phone(2))
    assert not stub.Resolve(resolve_req(external_id="A-1")).probes  # no explain, no probes


def test_projection_fields_and_views(stub, people):  # noqa: ANN001
    stub.Upsert(upsert_req(external_id="A-1", attributes={"credit_limit": 250.5}, source_system="BILLING"))
    r = stub.Resolve(resolve_req(external_id="A-1", fields=["tier", "credit_limit"]))
    assert attrs(r.attributes) == {"tier": "gold", "credit_limit": 250.5}
    r = stub.Resolve(resolve_req(external_id="A-1", view="billing"))
    assert attrs(r.attributes) == {"name": "Alice", "credit_limit": 250.5}


@pytest.mark.parametrize(
    "req,fields",
    [
        (resolve_req(external_id="A-1", view="nope"), ["view"]),
        (resolve_req(external_id="A-1", fields=["name", "shoe_size"]), ["fields[1]"]),
        (resolve_req(external_id="A-1", fields=["name"], view="billing"), ["view"]),
        (resolve_req(), ["identifiers"]),
        (resolve_req(phones=(phone(1),), default_region="XX"), ["default_region"]),
    ],
)
def test_bad_resolve_requests_are_invalid_argument(stub, people, req, fields):  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        stub.Resolve(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, violations = status_details(e.value)
    assert [f for f, _ in violations] == fields


def test_reads_see_every_acknowledged_write(stub):  # noqa: ANN001
    for i in range(20):
        w = stub.Upsert(upsert_req(external_id=f"RW-{i}", phones=(phone(100 + i),), attributes={"tier": f"t{i}"}))
        r = stub.Resolve(resolve_req(phones=(phone(100 + i),), fields=["tier"]))
        assert (r.customer_uuid, r.version, attrs(r.attributes)) == (w.customer_uuid, w.version, {"tier": f"t{i}"})


def test_expired_deadline_starts_no_work(server, people):  # noqa: ANN001
    from resolver.errors import DeadlineExceeded
    from resolver.identifiers import RawIdentifiers
    from resolver.resolve import ResolveInput

    with pytest.raises(DeadlineExceeded):
        server.service.resolve(ResolveInput(RawIdentifiers(external_id="A-1")), deadline=time.monotonic() - 0.001)


def test_get_customer_returns_the_full_normalized_record(stub, people):  # noqa: ANN001
    c = stub.GetCustomer(pb.GetCustomerRequest(customer_uuid=people["alice"]))
    assert c.identifiers.external_id == "A-1"
    assert list(c.identifiers.emails) == ["alice@example.com"]
    assert list(c.identifiers.phones) == [phone(1)]
    assert attrs(c.attributes) == {"name": "Alice", "status": "Active", "tier": "gold"}
    assert c.version == 1 and c.created_at.seconds > 0 and c.updated_at == c.created_at
    with pytest.raises(grpc.RpcError) as e:
        stub.GetCustomer(pb.GetCustomerRequest(customer_uuid="00000000-0000-4000-8000-000000000000"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.GetCustomer(pb.GetCustomerRequest(customer_uuid="nope"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
