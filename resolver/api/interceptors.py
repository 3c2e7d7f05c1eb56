"""What every call of the IdentityResolver service goes through: bearer-token auth, the request id, the access log.

Health and reflection are not intercepted (load balancers and grpcurl reach them without a token, and their
probes do not flood the access log): the interceptor matches on the method's service name.

grpcio runs interceptors in its one polling thread, before a call reaches the pool; so `intercept_service` only
hands back the method's handler with its behaviour wrapped (built once per method), and all the work (metadata,
token check, the log line) runs in the thread that answers the call. Each call runs in a contextvars.Context of
its own (grpcio's), which is why resolver.api.caller can hold the caller in a ContextVar.

- Auth (with `[auth]`, a TokenSet): `authorization: Bearer TOKEN` metadata; no token or an unknown one is
  UNAUTHENTICATED, a known token without the method's scope (METHOD_SCOPES; a method not listed needs admin) is
  PERMISSION_DENIED naming the scope. Messages never hold the token.
- Request id: the client's `x-request-id` if it is a short token (letters, digits, `.`, `_`, `:`, `-`; up to
  64), else one generated here; always returned in the trailing metadata `x-request-id`, on success and on every
  error (context.abort_with_status replaces the trailing metadata, so it is added again after the handler).
- Access log: one line per call on the logger "resolver.access" at INFO, with the `extra` fields of ACCESS_FIELDS
  and nothing else: never a payload, never the token. The call queues the line; a thread of the process writes it
  within resolver.api.access_lines.INTERVAL (the cost of a line made in the call: that module's docstring).
- Metrics: the same duration, by method and code, into resolver.metrics' latency histogram (with `[metrics]` on).
- Admission (resolver.api.admission), first of all: an overloaded worker answers a call RESOURCE_EXHAUSTED
  (OVERLOADED) before any of the above, from a thread of its own: no request id, no access line (a WARNING line
  counts refusals every few seconds), counted in the metrics.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from time import perf_counter, time
from typing import Any, NamedTuple

import grpc

from resolver import errors, metrics
from resolver.api import caller
from resolver.api.access_lines import FIELDS, AccessLines, Line
from resolver.api.admission import Admission
from resolver.api.status import to_status
from resolver.auth import TokenSet

ACCESS = logging.getLogger("resolver.access")
ACCESS_LINES = AccessLines(ACCESS)  # written in batches, off the call's path (resolver.api.access_lines)
ACCESS_FIELDS = FIELDS
REQUEST_ID = "x-request-id"
FAIL_CLOSED = "admin"  # the scope of a method METHOD_SCOPES does not name (one added later)

METHOD_SCOPES: Mapping[str, str] = {
    **dict.fromkeys(("Resolve", "ResolveStream", "GetCustomer", "ListInteractions", "WatchChanges", "GetServerInfo"),
                    "resolve"),
    **dict.fromkeys(("Upsert", "RecordInteraction"), "write"),
    "IngestEvents": "events",
    **dict.fromkeys(("Merge", "Unmerge", "Forget", "ListDeadLetters", "GetDeadLetter", "ReplayDeadLetter",
                     "DiscardDeadLetter", "GetEventCounters", "ListOutboundDeadLetters", "GetOutboundDeadLetter",
                     "ReplayOutboundDeadLetter", "DiscardOutboundDeadLetter", "GetOutboundCounters"), "admin"),
}

_GOOD_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # no '@', '+' or spaces: an email is no request id
_BEARER = "bearer "

Behaviour = Callable[[Any, grpc.ServicerContext], Any]


def scope_for(method: str) -> str:
    """The scope a token needs to call `method` (a method name such as "Resolve")."""
    return METHOD_SCOPES.get(method, FAIL_CLOSED)


class Presented(NamedTuple):
    """What a call's metadata says about it: its request id (None: none usable) and bearer token (None: none)."""

    request_id: str | None
    token: str | None


def presented(metadata: Any) -> Presented:
    """Read the `x-request-id` and `authorization: Bearer` of a call's invocation metadata."""
    request_id = token = None
    for key, value in metadata or ():
        if key == "authorization":
            if value[:7].lower() == _BEARER:
                token = value[7:].strip() or None
        elif key == REQUEST_ID and _GOOD_REQUEST_ID.fullmatch(value):
            request_id = value
    return Presented(request_id, token)


class CallInterceptor(grpc.ServerInterceptor):
    """Auth (when `tokens` is given), request ids and the access log for every call of `service` (a full service
    name such as "resolver.v1.IdentityResolver"); calls of other services pass untouched."""

    def __init__(self, service: str, tokens: TokenSet | None = None, admission: Admission | None = None) -> None:
        self._prefix = f"/{service}/"
        self._tokens = tokens
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._admission = admission  # None: every call is queued for the handler pool
        # request ids: a random prefix per server (each worker builds its own) and a counter, cheaper than a uuid
        self._id_prefix = secrets.token_hex(4) + "-"
        self._counter = itertools.count(1)
        self._no_token = to_status(errors.TokenRejected(
            "this method needs a bearer token: send the metadata `authorization: Bearer TOKEN`", reason="TOKEN_MISSING"))
        self._unknown_token = to_status(errors.TokenRejected("the bearer token is not valid here"))
        self._denied = {scope: to_status(errors.ScopeMissing(scope)) for scope in caller.SCOPES}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self._prefix):
            return handler
        if self._admission is not None and not self._admission.admits():  # overloaded: refused at once
            refusal = self._admission.refusal(method[len(self._prefix):], handler)
            if refusal is not None:
                return refusal
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method[len(self._prefix):], handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        scope = scope_for(rpc)
        args = {"request_deserializer": handler.request_deserializer,
                "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(rpc, scope, handler.unary_unary), **args)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(rpc, scope, handler.stream_unary), **args)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._streaming(rpc, scope, handler.unary_stream), **args)
        return grpc.stream_stream_rpc_method_handler(self._streaming(rpc, scope, handler.stream_stream), **args)

    def _unary(self, rpc: str, scope: str, behaviour: Behaviour) -> Behaviour:
        tokens = self._tokens

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = perf_counter()
            request_id, token = presented(context.invocation_metadata())
            request_id = request_id or self._new_request_id()
            name, failed = "", True
            try:
                if tokens is None:
                    response = behaviour(request, context)
                else:
                    who = self._identify(tokens, token, context)
                    name = who.name
                    self._require(who, scope, context)
                    entered = caller.enter(who)
                    try:
                        response = behaviour(request, context)
                    finally:
                        caller.leave(entered)
                failed = False
                return response
            finally:
                _stamp(context, request_id)
                _log(rpc, _code(context, "UNKNOWN" if failed else "OK"), started, context, request_id, name)

        return _same_pool(call, behaviour)

    def _streaming(self, rpc: str, scope: str, behaviour: Behaviour) -> Behaviour:
        """A stream's log line is written when its responses end (the last one sent, an error, or the stream
        closed early: CANCELLED); its caller stays entered for the whole stream, in the call's own Context."""
        tokens = self._tokens

        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = perf_counter()
            request_id, token = presented(context.invocation_metadata())
            request_id = request_id or self._new_request_id()
            name = ""
            try:
                if tokens is not None:
                    who = self._identify(tokens, token, context)
                    name = who.name
                    self._require(who, scope, context)
                    caller.enter(who)  # no leave: grpcio runs the whole stream, and only it, in this Context
                responses = behaviour(request, context)
            except BaseException:
                _stamp(context, request_id)
                _log(rpc, _code(context, "UNKNOWN"), started, context, request_id, name)
                raise
            return _follow(responses, rpc, started, context, request_id, name)

        return _same_pool(call, behaviour)

    def _identify(self, tokens: TokenSet, token: str | None, context: grpc.ServicerContext) -> caller.Caller:
        """The caller `token` belongs to; without a token, or with one `tokens` does not hold, the call is
        aborted UNAUTHENTICATED (raises)."""
        who = tokens.check(token) if token is not None else None
        if who is None:
            context.abort_with_status(self._no_token if token is None else self._unknown_token)
            raise AssertionError("abort_with_status returned")
        return who

    def _require(self, who: caller.Caller, scope: str, context: grpc.ServicerContext) -> None:
        """Abort the call PERMISSION_DENIED (raises) unless `who` holds `scope`."""
        if scope not in who.scopes:
            context.abort_with_status(self._denied[scope])

    def _new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._counter):x}"


def _follow(responses: Iterator[Any], rpc: str, started: float, context: grpc.ServicerContext, request_id: str,
            name: str) -> Iterator[Any]:
    outcome = "CANCELLED"  # closed before its end: the client went away, or the server is stopping
    try:
        yield from responses
        outcome = "OK"
    except GeneratorExit:
        raise
    except BaseException:
        outcome = "UNKNOWN"
        raise
    finally:
        _stamp(context, request_id)
        _log(rpc, _code(context, outcome), started, context, request_id, name)


def _same_pool(wrapper: Behaviour, behaviour: Behaviour) -> Behaviour:
    """Keep a behaviour's own thread pool (resolver.api.handlers gives long-lived streams one)."""
    pool = getattr(behaviour, "experimental_thread_pool", None)
    if pool is not None:
        wrapper.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return wrapper


def _stamp(context: grpc.ServicerContext, request_id: str) -> None:
    """Add the request id to the call's trailing metadata, keeping what the handler put there (an error's
    google.rpc.Status details)."""
    trailing = context.trailing_metadata()  # type: ignore[attr-defined]
    if not trailing:
        context.set_trailing_metadata(((REQUEST_ID, request_id),))
    elif all(key != REQUEST_ID for key, _ in trailing):
        context.set_trailing_metadata((*trailing, (REQUEST_ID, request_id)))


def _code(context: grpc.ServicerContext, otherwise: str) -> str:
    """The call's status code name: the one the handler set or aborted with, else `otherwise` (OK only while the
    call is still live: a client that went away or ran out of time is CANCELLED)."""
    code = context.code()  # type: ignore[attr-defined]
    if code is not None:
        return str(code.name)
    if otherwise == "OK" and not context.is_active():
        return "CANCELLED"
    return otherwise


def _log(rpc: str, code: str, started: float, context: grpc.ServicerContext, request_id: str, name: str) -> None:
    """The call's end: its server time counted (resolver.metrics, with [metrics] on), and its access line."""
    elapsed = perf_counter() - started
    metrics.rpc_done(rpc, code, elapsed)
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS_LINES.add(Line(time(), rpc, code, round(elapsed * 1000, 3), context.peer(), request_id, name))
