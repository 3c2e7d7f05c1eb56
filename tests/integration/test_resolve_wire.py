"""Resolve over the real server, on the wire codec (resolver._rwire): the answers and the errors are what the server
gave before it, when protobuf decoded every request and built every response.

"Before" is computed in process, beside the server, from the same store: protobuf's decoding, then
resolve_input, Resolver.resolve and resolve_response; an error is the status the Decoder's or the use case's
exception maps to. Requests go out as raw bytes (no client serializer), so the server meets them as sent.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from resolver._rwire import decode_resolve
from resolver._rwire_py import resolve_input, resolve_response
from resolver.api.status import to_rpc_status
from resolver.api.wire import Decoder, Limits
from resolver.errors import InvalidInput, ResolverError
from resolver.v1 import resolver_pb2 as pb
from tests.integration.helpers import phone, resolve_req, upsert_req
from tests.rawproto import varint

RESOLVE = "/resolver.v1.IdentityResolver/Resolve"


@pytest.fixture
def people(stub):  # noqa: ANN001, ANN201
    """Alice with every kind of attribute value; Bob and Carol sharing a phone; attributes with non-ASCII text."""
    stub.Upsert(upsert_req(external_id="A-1", emails=("alice@example.com",), phones=(phone(1),), source_system="SALESFORCE",
                           attributes={"name": "Alice Ünal 😀", "status": "Active", "tier": "gold",
                                       "birth_date": "07/04/1990", "last_interaction_date": "2026-01-02T03:04:05Z"}))
    stub.Upsert(upsert_req(external_id="A-1", attributes={"credit_limit": 250.5}, source_system="BILLING"))
    for ext, name in (("B-2", "Bob"), ("C-3", "Çarol")):
        stub.Upsert(upsert_req(external_id=ext, phones=(phone(2),), attributes={"name": name, "tier": "silver"}))


def _call(channel: grpc.Channel, data: bytes) -> bytes | grpc.RpcError:
    try:
        return channel.unary_unary(RESOLVE)(data, timeout=30)
    except grpc.RpcError as err:
        return err


def _before(server: Any, data: bytes) -> pb.ResolveResponse | Any:
    """The answer before the wire codec: the response message, or the google.rpc.Status of the error."""
    try:
        req = Decoder(pb.ResolveRequest, Limits(server.service.settings.limits))(data)
        return resolve_response(server.service.resolve(resolve_input(req)))
    except ResolverError as exc:
        return to_rpc_status(exc)


MATCHES = [
    resolve_req(external_id="A-1"),  # the default view
    resolve_req(external_id="A-1", fields=["name", "credit_limit", "birth_date", "last_interaction_date", "tier"]),
    resolve_req(external_id="A-1", view="billing"),
    resolve_req(phones=(phone(2),), fields=["name", "tier"]),  # AMBIGUOUS: candidates with attributes
    resolve_req(external_id="A-1", phones=(phone(2),), explain=True),  # conflicts and probes
    resolve_req(emails=("not-an-email",), phones=("+16502530099", phone(1)), explain=True),  # skipped
    resolve_req(external_id="nobody"),
    resolve_req(emails=tuple(f"alice{i}@example.com" for i in range(30)) + ("alice@example.com",)),  # large
]


def test_answers_are_as_before(server, channel, people):  # noqa: ANN001
    within = Limits(server.service.settings.limits).always_within
    fast = 0
    for req in MATCHES:
        data = req.SerializeToString()
        fast += decode_resolve(data, within) is not None
        got = _call(channel, data)
        assert isinstance(got, bytes), (req, got)
        want = _before(server, data)
        assert pb.ResolveResponse.FromString(got) == want, req
        assert want.outcome != pb.OUTCOME_UNSPECIFIED
    assert fast == len(MATCHES) - 1  # all but the large one decoded by the codec, not by the Decoder
    alice = pb.ResolveResponse.FromString(_call(channel, MATCHES[1].SerializeToString()))  # type: ignore[arg-type]
    assert alice.outcome == pb.OUTCOME_MATCHED and alice.attributes["name"] == "Alice Ünal 😀"
    assert alice.attributes["credit_limit"] == 250.5


def _ld(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


ERRORS = [
    _ld(1, _ld(1, b"\xff\xfe")),  # invalid UTF-8: MALFORMED_REQUEST
    resolve_req(external_id="A-1", explain=True).SerializeToString()[:-1],  # truncated
    varint(9 << 3 | 3) + varint(9 << 3 | 4),  # a group: decodes (to no identifier), left to the Decoder
    resolve_req(emails=tuple(f"x{i}@example.com" for i in range(101))).SerializeToString(),  # over the limit
    resolve_req(external_id="x" * 5000).SerializeToString(),
    b"",  # no identifier
    resolve_req(external_id="A-1", view="nope").SerializeToString(),
    resolve_req(external_id="A-1", view="billing", fields=["name"]).SerializeToString(),
    resolve_req(external_id="A-1", fields=["no_such_attribute"]).SerializeToString(),
    resolve_req(external_id="A-1", default_region="ZZZ").SerializeToString(),
]


def test_errors_are_as_before(server, channel, people):  # noqa: ANN001
    for data in ERRORS:
        err = _call(channel, data)
        assert isinstance(err, grpc.RpcError), data
        want = _before(server, data)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_status.from_call(err) == want, data
    with pytest.raises(InvalidInput):  # the list above holds decoding errors as well as the use case's
        Decoder(pb.ResolveRequest, Limits(server.service.settings.limits))(ERRORS[0])
