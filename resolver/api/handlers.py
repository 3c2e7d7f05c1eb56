"""The IdentityResolver service's method handlers, on raw bytes: every request is decoded by us.

The generated `add_IdentityResolverServicer_to_server` hands grpcio a deserializer; a request that does not
decode then fails inside grpcio (INTERNAL, a traceback logged per call, memory kept per call). Here each method
takes the bytes, decodes them with resolver.api.wire (INVALID_ARGUMENT for anything malformed or over a limit)
and calls the servicer's method with the message, as the generated code would. The service, its methods and
messages are the proto's: clients, stubs and reflection see no difference.

Resolve and ResolveStream, the lookups, are bytes both ways: a small request (below `Limits.always_within`, so
within every limit) is decoded straight into the use case's input and the answer encoded straight to bytes
(resolver._rwire); any other request takes the Decoder, as every method does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from resolver._rwire import decode_resolve
from resolver._rwire_py import resolve_input
from resolver.api.status import to_status
from resolver.api.wire import Decoder, Limits
from resolver.config import LimitSettings
from resolver.errors import InvalidInput
from resolver.resolve import ResolveInput
from resolver.v1 import resolver_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["IdentityResolver"]


def method_handlers(servicer: Any, limits: LimitSettings) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per method of the service, by method name, calling `servicer`'s method of that name."""
    checks = Limits(limits)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        decode: Decoder[Any] = Decoder(getattr(pb, method.input_type.name), checks)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        impl = getattr(servicer, method.name)
        if method.name == "Resolve":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _resolve(servicer, decode, checks.always_within), request_deserializer=None,
                response_serializer=None)
        elif method.name == "ResolveStream":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _resolve_stream(servicer, decode, checks.always_within), request_deserializer=None,
                response_serializer=None)
        elif method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream(impl, decode), request_deserializer=None, response_serializer=serialize)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(impl, decode), request_deserializer=None, response_serializer=serialize)
        elif method.server_streaming:  # one request, a stream of answers (WatchChanges)
            handle = _unary(impl, decode)
            # a long-lived stream may run on a pool of its own (grpcio takes a behaviour's experimental_thread_pool),
            # so its calls never hold the threads the unary methods are served from
            pool = servicer.stream_thread_pool(method.name) if hasattr(servicer, "stream_thread_pool") else None
            if pool is not None:
                handle.experimental_thread_pool = pool  # type: ignore[attr-defined]
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                handle, request_deserializer=None, response_serializer=serialize)
        else:  # the proto has none; a new one must be wired here, not served with grpcio's deserializer
            raise TypeError(f"{method.full_name}: client-streaming methods are not wired")
    return handlers


def register(server: grpc.Server, servicer: Any, limits: LimitSettings) -> None:
    """Serve `servicer` as resolver.v1.IdentityResolver on `server` (what the generated add_..._to_server does)."""
    handlers = method_handlers(servicer, limits)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _unary(impl: Callable[[Any, grpc.ServicerContext], Any],
           decode: Decoder[Any]) -> Callable[[bytes, grpc.ServicerContext], Any]:
    def handle(data: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = decode(data)
        except InvalidInput as exc:
            context.abort_with_status(to_status(exc))
        return impl(request, context)

    return handle


def _resolve_input(data: bytes, decode: Decoder[Any], within: int) -> ResolveInput:
    """A ResolveRequest's bytes as the use case's input: the fast decoding first, else the general path (too large
    to skip the limits, or not decodable), which raises its InvalidInput."""
    inp = decode_resolve(data, within)
    return inp if inp is not None else resolve_input(decode(data))


def _resolve(servicer: Any, decode: Decoder[Any], within: int) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    """Resolve on bytes: `servicer.resolve_encoded` on the request's ResolveInput."""

    def handle(data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            inp = _resolve_input(data, decode, within)
        except InvalidInput as exc:
            context.abort_with_status(to_status(exc))
        return servicer.resolve_encoded(inp, context)

    return handle


def _resolve_stream(servicer: Any, decode: Decoder[Any],
                    within: int) -> Callable[[Iterable[bytes], grpc.ServicerContext], Iterator[bytes]]:
    """ResolveStream on bytes, as Resolve: each request decoded as Resolve's (one that does not decode reaches the
    servicer as its InvalidInput, answered in its place), each answer encoded (`servicer.resolve_stream_encoded`)."""

    def inputs(data_iterator: Iterable[bytes]) -> Iterator[ResolveInput | InvalidInput]:
        for data in data_iterator:
            try:
                yield _resolve_input(data, decode, within)
            except InvalidInput as exc:
                yield exc

    def handle(data_iterator: Iterable[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        return servicer.resolve_stream_encoded(inputs(data_iterator), context)

    return handle


def _stream(impl: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]],
            decode: Decoder[Any]) -> Callable[[Iterable[bytes], grpc.ServicerContext], Iterator[Any]]:
    """A bidirectional stream gets its requests decoded one by one; one that does not decode reaches the servicer
    as the InvalidInput it raised, so it is answered in its place and the stream goes on."""

    def decoded(data_iterator: Iterable[bytes]) -> Iterator[Any]:
        for data in data_iterator:
            try:
                yield decode(data)
            except InvalidInput as exc:
                yield exc

    def handle(data_iterator: Iterable[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        return impl(decoded(data_iterator), context)

    return handle
