"""Bearer tokens with scopes on a real server: every (scope, method) pair, the open health and reflection services,
request ids in the trailing metadata, the access log line, the caller seen by a handler, reload of the file."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from resolver.api import caller
from resolver.api.caller import SCOPES
from resolver.api.interceptors import ACCESS_FIELDS, ACCESS_LINES, REQUEST_ID, CallInterceptor
from resolver.auth import NewToken, TokenSet, new_token
from resolver.client import ResolverClient
from resolver.v1 import resolver_pb2 as pb
from tests.conftest import TEST_BLUEPRINT
from tests.integration.helpers import resolve_req, upsert_req, with_tokens, write_tokens

SERVICE = pb.DESCRIPTOR.services_by_name["IdentityResolver"]
# The table, written out here rather than read from the code under test; a method not named needs admin.
SCOPE_OF = {"Resolve": "resolve", "ResolveStream": "resolve", "GetCustomer": "resolve", "ListInteractions": "resolve",
            "WatchChanges": "resolve", "GetServerInfo": "resolve", "Upsert": "write", "RecordInteraction": "write",
            "IngestEvents": "events"}
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, NewToken]:
    """One token per scope (named t-SCOPE) and one with two (t-both: resolve, write), in tmp_path/tokens."""
    return write_tokens(tmp_path / "tokens", {**{scope: scope for scope in SCOPES}, "both": "resolve,write"})


@pytest.fixture
def blueprint_text(tmp_path: Path, tokens: dict[str, NewToken]) -> str:
    return with_tokens(TEST_BLUEPRINT, tmp_path / "tokens")


@pytest.fixture
def access_log() -> Iterator[list[logging.LogRecord]]:
    """Every record of the "resolver.access" logger while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("resolver.access")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def call_method(channel: grpc.Channel, method: Any, metadata: tuple[tuple[str, str], ...] | None) -> grpc.StatusCode:
    """Call `method` of the service with a minimal request (raw bytes); the status code it ends with."""
    path = f"/{SERVICE.full_name}/{method.name}"
    # a feed position far ahead of the log: WatchChanges then ends at once (OUT_OF_RANGE) instead of watching
    request = pb.WatchRequest(from_sequence=2**40).SerializeToString() if method.name == "WatchChanges" else b""
    try:
        if method.client_streaming:
            list(channel.stream_stream(path)(iter([request]), metadata=metadata, timeout=10))
        elif method.server_streaming:
            list(channel.unary_stream(path)(request, metadata=metadata, timeout=10))
        else:
            channel.unary_unary(path)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_token_and_method_pair_gets_the_right_code(channel: grpc.Channel, tokens: dict[str, NewToken]) -> None:
    wrong = []
    for method in SERVICE.methods:
        needed = SCOPE_OF.get(method.name, "admin")
        for metadata, label in ((None, "no token"), (bearer("rsv_not-a-token-of-the-file"), "unknown token")):
            code = call_method(channel, method, metadata)
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"{method.name} with {label}: {code.name}")
        for scope, token in tokens.items():
            code = call_method(channel, method, bearer(token.token))
            allowed = needed in token.line.split()[1].split(",")
            if allowed and code in AUTH_CODES or not allowed and code != grpc.StatusCode.PERMISSION_DENIED:
                wrong.append(f"{method.name} ({needed}) with scope {scope}: {code.name}")
    assert wrong == []


def test_an_auth_error_names_the_scope_needed_and_never_the_token(stub: Any, tokens: dict[str, NewToken]) -> None:
    with pytest.raises(grpc.RpcError) as denied:
        stub.Merge(pb.MergeRequest(), metadata=bearer(tokens["resolve"].token), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'admin'" in denied.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Resolve(resolve_req(emails=("a@example.com",)), metadata=bearer("rsv_leaked-guess"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    everything = unknown.value.details() + denied.value.details() + repr(unknown.value.trailing_metadata())
    assert "rsv_" not in everything


def test_health_and_reflection_need_no_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name),
                                                      timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert SERVICE.full_name in names


def test_the_request_id_comes_back_on_success_and_on_every_error(stub: Any, channel: grpc.Channel,
                                                                 tokens: dict[str, NewToken]) -> None:
    reader = bearer(tokens["resolve"].token)
    _, call = stub.Resolve.with_call(resolve_req(emails=("a@example.com",)), metadata=reader, timeout=5)
    generated = dict(call.trailing_metadata())[REQUEST_ID]
    _, call = stub.Resolve.with_call(resolve_req(emails=("a@example.com",)), metadata=reader, timeout=5)
    assert dict(call.trailing_metadata())[REQUEST_ID] not in ("", generated)  # one per call

    _, call = stub.Resolve.with_call(resolve_req(emails=("a@example.com",)),
                                     metadata=(*reader, (REQUEST_ID, "ivr-4711")), timeout=5)
    assert dict(call.trailing_metadata())[REQUEST_ID] == "ivr-4711"

    errors = [  # the handler aborts (NOT_FOUND), the interceptor does (UNAUTHENTICATED, PERMISSION_DENIED)
        lambda md: stub.GetCustomer(pb.GetCustomerRequest(customer_uuid="0" * 32), metadata=reader + md, timeout=5),
        lambda md: stub.Resolve(resolve_req(), metadata=md, timeout=5),
        lambda md: stub.Upsert(upsert_req(), metadata=reader + md, timeout=5),
        # a stream whose handler raises on its first response (OUT_OF_RANGE)
        lambda md: list(stub.WatchChanges(pb.WatchRequest(from_sequence=2**40), metadata=reader + md, timeout=5)),
    ]
    for fail in errors:
        for given in ((), ((REQUEST_ID, "ivr-4712"),), ((REQUEST_ID, "ann@example.com"),)):
            with pytest.raises(grpc.RpcError) as caught:
                fail(given)
            assert caught.value.code() != grpc.StatusCode.OK
            trailing = dict(caught.value.trailing_metadata())
            if given and given[0][1] == "ivr-4712":
                assert trailing[REQUEST_ID] == "ivr-4712"
            else:  # none given, or one that is no short token (an email): one is made
                assert trailing[REQUEST_ID] and "@" not in trailing[REQUEST_ID]
            if caught.value.code() != grpc.StatusCode.UNAUTHENTICATED:
                assert "grpc-status-details-bin" in trailing  # the error's details are kept beside the id

    # a stream that ends well carries it too
    answers = stub.ResolveStream(iter([resolve_req(emails=("a@example.com",))]), metadata=(*reader, (REQUEST_ID, "s-1")),
                                 timeout=5)
    assert len(list(answers)) == 1
    assert dict(answers.trailing_metadata())[REQUEST_ID] == "s-1"


def test_one_access_line_per_call_with_its_fields_and_nothing_else(stub: Any, channel: grpc.Channel,
                                                                   tokens: dict[str, NewToken],
                                                                   access_log: list[logging.LogRecord]) -> None:
    reader = tokens["resolve"]
    email = "ann.lee@example.com"
    stub.Resolve(resolve_req(emails=(email,)), metadata=(*bearer(reader.token), (REQUEST_ID, "r-1")), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Upsert(upsert_req(emails=(email,)), metadata=(*bearer(reader.token), (REQUEST_ID, "r-2")), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.GetCustomer(pb.GetCustomerRequest(customer_uuid="0" * 32), metadata=((REQUEST_ID, "r-3"),), timeout=5)
    list(stub.ResolveStream(iter([resolve_req(emails=(email,))] * 2),
                            metadata=(*bearer(reader.token), (REQUEST_ID, "r-4")), timeout=5))
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)  # not logged
    ACCESS_LINES.flush()  # lines are written in batches, off the calls' path: what the calls queued, now

    assert [(r.rpc, r.code, r.caller, r.request_id) for r in access_log] == [  # type: ignore[attr-defined]
        ("Resolve", "OK", "t-resolve", "r-1"),
        ("Upsert", "PERMISSION_DENIED", "t-resolve", "r-2"),
        ("GetCustomer", "UNAUTHENTICATED", "", "r-3"),
        ("ResolveStream", "OK", "t-resolve", "r-4"),
    ]
    standard = set(vars(logging.LogRecord("x", logging.INFO, "f", 1, "m", None, None))) | {"message"}
    for record in access_log:
        assert record.levelno == logging.INFO
        assert set(vars(record)) - standard == set(ACCESS_FIELDS)
        assert isinstance(record.duration_ms, float) and record.duration_ms >= 0  # type: ignore[attr-defined]
        assert record.peer.startswith(("ipv4:127.0.0.1:", "ipv6:"))  # type: ignore[attr-defined]
        text = record.getMessage() + repr(vars(record))
        assert email not in text and reader.token not in text and "ann" not in text


def test_the_client_sends_its_token_on_every_call(server: Any, tokens: dict[str, NewToken]) -> None:
    target = f"127.0.0.1:{server.port}"
    with ResolverClient(target, token=tokens["both"].token) as client:
        written = client.upsert(emails=("ann.lee@example.com",), attributes={"name": "Ann"})
        assert client.resolve(emails=("ann.lee@example.com",)).customer_uuid == written.customer_uuid
        assert client.get_customer(written.customer_uuid).customer_uuid == written.customer_uuid
    with ResolverClient(target, max_attempts=1) as anonymous, pytest.raises(grpc.RpcError) as caught:
        anonymous.resolve(emails=("ann.lee@example.com",))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reload_swaps_the_tokens_and_a_bad_file_keeps_the_previous_ones(server: Any, stub: Any, tmp_path: Path,
                                                                       tokens: dict[str, NewToken]) -> None:
    old, new = tokens["resolve"], new_token("t-new", "resolve")
    request = resolve_req(emails=("a@example.com",))
    stub.Resolve(request, metadata=bearer(old.token), timeout=5)
    (tmp_path / "tokens").write_text(new.line + "\n")
    assert server.reload() == []
    with pytest.raises(grpc.RpcError) as caught:
        stub.Resolve(request, metadata=bearer(old.token), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stub.Resolve(request, metadata=bearer(new.token), timeout=5)

    (tmp_path / "tokens").write_text(new.line + "\n" + old.line.replace("sha256:", "sha256:zz") + "\n")
    failures = server.reload()
    assert len(failures) == 1 and "line 2" in failures[0] and str(tmp_path / "tokens") in failures[0]
    stub.Resolve(request, metadata=bearer(new.token), timeout=5)  # the previous set, still in force
    with pytest.raises(grpc.RpcError):
        stub.Resolve(request, metadata=bearer(old.token), timeout=5)


def test_a_handler_sees_the_caller_of_its_call(tmp_path: Path) -> None:
    """A real gRPC server with the interceptor over a small service of this test: each call's handler sees its own
    token's caller (unary and streaming), calls of another service see no one."""
    reader, viewer = new_token("reader", "resolve"), new_token("viewer", "resolve,sensitive")
    (tmp_path / "tokens").write_text(f"{reader.line}\n{viewer.line}\n")

    def who(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        current = caller.current()
        return f"{current.name}:{caller.sees_sensitive()}".encode()

    def who_each(_request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield who(b"", context)
        yield who(b"", context)

    handlers = {"Resolve": grpc.unary_unary_rpc_method_handler(who),
                "WatchChanges": grpc.unary_stream_rpc_method_handler(who_each)}
    server = grpc.server(ThreadPoolExecutor(max_workers=4),
                         interceptors=[CallInterceptor("test.Probe", TokenSet(tmp_path / "tokens"))])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Probe", handlers),
                                     grpc.method_handlers_generic_handler("test.Open", handlers)))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            unary, stream = ch.unary_unary("/test.Probe/Resolve"), ch.unary_stream("/test.Probe/WatchChanges")
            assert unary(b"", metadata=bearer(reader.token), timeout=5) == b"reader:False"
            assert unary(b"", metadata=bearer(viewer.token), timeout=5) == b"viewer:True"
            assert list(stream(b"", metadata=bearer(viewer.token), timeout=5)) == [b"viewer:True"] * 2
            # without [auth] on that service (not intercepted), everyone may do everything, as caller.ANYONE
            assert ch.unary_unary("/test.Open/Resolve")(b"", timeout=5) == b":True"
    finally:
        server.stop(0).wait()
