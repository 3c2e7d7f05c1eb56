"""Requests of the services grpcio decodes for us (health, reflection), decoded in the call instead (contract §8b).

The IdentityResolver handlers take raw bytes and decode them themselves (resolver.api.wire). The stock health and
reflection servicers come with grpcio's deserializer, which answers bytes that do not decode with INTERNAL and a
logged traceback, and, in reflection's bidirectional stream, leaves the call behind: the server then never
finishes stopping, and SIGTERM waits until a kill -9 (found by tests/reliability/test_fuzz_server.py). This
interceptor hands those handlers raw bytes and decodes them in the thread that answers the call, with the same
deserializer: what does not decode is INVALID_ARGUMENT (MALFORMED_REQUEST), as everywhere else in the API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from resolver.api.status import to_status
from resolver.errors import FieldViolation, InvalidInput

Deserializer = Callable[[bytes], Any]

_MALFORMED = to_status(InvalidInput(
    [FieldViolation("request", "not a valid message of the method's request type", "MALFORMED_REQUEST")],
    "the request does not decode (truncated, corrupt or invalid UTF-8)"))


def _decoded(deserialize: Deserializer, data: bytes, context: grpc.ServicerContext) -> Any:
    try:
        return deserialize(data)
    except Exception:  # noqa: BLE001 - whatever the deserializer raises, the bytes are the caller's mistake
        context.abort_with_status(_MALFORMED)
        raise AssertionError("unreachable: abort_with_status raises") from None


def _each_decoded(deserialize: Deserializer, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
    for data in requests:
        yield _decoded(deserialize, data, context)


def _self_decoding(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` taking raw bytes: its own deserializer runs inside the call, where a failure is answered."""
    deserialize: Deserializer = handler.request_deserializer  # type: ignore[assignment]
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(
            lambda data, context: unary_unary(_decoded(deserialize, data, context), context),
            response_serializer=serialize)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(
            lambda data, context: unary_stream(_decoded(deserialize, data, context), context),
            response_serializer=serialize)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: stream_unary(_each_decoded(deserialize, requests, context), context),
            response_serializer=serialize)
    stream_stream = handler.stream_stream
    return grpc.stream_stream_rpc_method_handler(
        lambda requests, context: stream_stream(_each_decoded(deserialize, requests, context), context),
        response_serializer=serialize)


class SelfDecoding(grpc.ServerInterceptor):
    """Every handler that comes with a request deserializer gets raw bytes instead and decodes them in the call.
    Handlers without one (the IdentityResolver service's) pass untouched. Wrapped handlers are built once per
    method (grpcio calls interceptors from its one polling thread)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _self_decoding(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
