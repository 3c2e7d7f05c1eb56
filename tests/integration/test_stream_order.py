"""The batch lookup loop probes each batch in index-key order (resolver.resolve.Resolver.resolve_many) and must
still answer in request order: every answer the one a single Resolve of that request gives, errors in their
places, through the domain call and through ResolveStream."""

from __future__ import annotations

import grpc

from resolver import resolve
from resolver.bootstrap import build_service
from resolver.config import Settings
from resolver.errors import InvalidInput
from resolver.identifiers import RawIdentifiers
from resolver.resolve import ResolveInput, ResolveResult
from resolver.upsert import UpsertInput
from resolver.v1 import resolver_pb2 as pb
from tests.integration.helpers import phone, resolve_req, upsert_req


def mixed_requests() -> list[ResolveInput]:
    """Found by external_id, email or phone, a shared phone (AMBIGUOUS), unknown ids, invalid requests."""
    reqs = []
    for i in range(60):
        match i % 6:
            case 0:
                reqs.append(ResolveInput(RawIdentifiers(external_id=f"O-{i}")))
            case 1:
                reqs.append(ResolveInput(RawIdentifiers(emails=(f"o{i}@example.com",))))
            case 2:
                reqs.append(ResolveInput(RawIdentifiers(phones=(phone(i),))))
            case 3:
                reqs.append(ResolveInput(RawIdentifiers(external_id=f"NOBODY-{i}", phones=(phone(9000 + i),))))
            case 4:
                reqs.append(ResolveInput(RawIdentifiers(phones=(phone(1000),))))  # shared by two
            case _:
                reqs.append(ResolveInput(RawIdentifiers(phones=(phone(i),)), view="nope"))  # invalid
    return reqs


def populate(settings: Settings) -> None:
    service = build_service(settings)
    try:
        for i in range(60):
            service.upsert(UpsertInput(f"o-{i}", RawIdentifiers(f"O-{i}", (f"o{i}@example.com",), (phone(i),))))
        for ext in ("SHARED-1", "SHARED-2"):
            service.upsert(UpsertInput(f"s-{ext}", RawIdentifiers(ext, phones=(phone(1000),))))
    finally:
        service.close()


def summary(r: ResolveResult | Exception) -> tuple[object, ...]:
    if isinstance(r, Exception):
        return (type(r).__name__,)
    return r.outcome, r.customer_uuid, r.matched_on, sorted(c.customer_uuid for c in r.candidates)


def test_a_sorted_batch_answers_each_request_in_its_place(settings: Settings) -> None:
    populate(settings)
    reqs = mixed_requests()
    service = build_service(settings, writer=False)
    try:
        resolver = service.resolver
        prepared = [resolver.prepare(r) for r in reqs if r.view != "nope"]
        sets = [(p.ids.external_id, p.ids.emails, p.ids.phones, p.explain) for p in prepared]
        order = resolve._probe_order(sets, service.store.hasher.key)
        assert sorted(order) == list(range(len(sets))) and order != sorted(order)  # the batch IS reordered
        answers = service.resolve_many(reqs)
        singles = []
        for r in reqs:
            try:
                singles.append(service.resolve(r))
            except InvalidInput as exc:
                singles.append(exc)
    finally:
        service.close()
    assert len(answers) == len(reqs)
    assert [summary(a) for a in answers] == [summary(s) for s in singles]
    outcomes = [summary(a)[0] for a in answers]
    assert {"MATCHED", "NOT_FOUND", "AMBIGUOUS", "InvalidInput"} <= set(outcomes)


def test_resolve_stream_answers_a_reordered_batch_in_request_order(settings: Settings, make_server) -> None:  # noqa: ANN001
    populate(settings)
    server = make_server(settings)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from resolver.v1 import resolver_pb2_grpc

        stub = resolver_pb2_grpc.IdentityResolverStub(channel)
        reqs = [resolve_req(external_id=r.identifiers.external_id, emails=r.identifiers.emails,
                            phones=r.identifiers.phones, view=r.view) for r in mixed_requests()]
        streamed = list(stub.ResolveStream(iter(reqs)))
        singles = []
        for req in reqs:
            try:
                singles.append(stub.Resolve(req))
            except grpc.RpcError as exc:
                singles.append(exc.code())
        stub.Upsert(upsert_req(external_id="AFTER"))  # the server still writes after the stream
    assert len(streamed) == len(reqs)
    for got, single in zip(streamed, singles, strict=True):
        if isinstance(single, grpc.StatusCode):
            assert got.error.code == single.value[0] and got.outcome == pb.OUTCOME_UNSPECIFIED
        else:
            assert (got.outcome, got.customer_uuid, got.matched_on) == (single.outcome, single.customer_uuid,
                                                                         single.matched_on)
            assert sorted(c.customer_uuid for c in got.candidates) == sorted(c.customer_uuid for c in single.candidates)
