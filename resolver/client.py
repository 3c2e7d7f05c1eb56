"""Client helper: a deadline on every call, idempotency keys generated once per write, safe retries.

Retries: the channel's service config (`service_config`) has gRPC retry, within the call's deadline, what failed
for want of capacity: UNAVAILABLE, a worker's overload refusal (RESOURCE_EXHAUSTED, after the delay the server
pushes back) and a call gRPC's core dropped from a full backlog (CANCELLED), throttled so that an overloaded
server is not sent its excess again. On top of that every call is re-sent after DEADLINE_EXCEEDED or
UNAVAILABLE up to `max_attempts` times, each attempt with its own deadline. An Upsert is re-sent with the
*same* idempotency key, so the server executes it at most once (contract §4.2); reads are naturally idempotent.

TLS: `root_certificates` (the PEM CA bundle that signed the server's certificate; None: plaintext, the default),
and for mTLS `client_cert` + `client_key` (PEM); `tls_credentials` builds the same for a raw grpc channel.
"""

from __future__ import annotations

import json
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from resolver.address import parse_address
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc

T = TypeVar("T")
SERVICE = "resolver.v1.IdentityResolver"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def service_config(max_attempts: int, round_robin: bool = False, *, backoff: float = 0.02,
                   retry_refused: bool = True) -> str:
    """The gRPC service config: gRPC's own retry policy (gRFC A6) with exponential backoff from `backoff` seconds,
    throttled per channel (once more than half its retry tokens are spent, failures are returned at once rather
    than retried: an overloaded server is not sent the excess again); with `round_robin`, calls spread over every
    address of the target (one subchannel each).

    Retried: UNAVAILABLE, and with `retry_refused` the calls an overloaded worker refused (RESOURCE_EXHAUSTED,
    after the server's pushback: resolver.api.status.pushback_ms; a full map's refusal says "never") or gRPC's core
    dropped before any handler took them (CANCELLED from the server; a call this client cancels is never retried).
    Safe for every method: a write is re-sent with its idempotency key (contract §4.2), reads change nothing, and
    gRPC does not retry a call once an answer message has arrived. Load generators pass `retry_refused=False` to
    count refusals rather than hide them."""
    codes = ["UNAVAILABLE", *(("RESOURCE_EXHAUSTED", "CANCELLED") if retry_refused else ())]
    return json.dumps(
        {
            **({"loadBalancingConfig": [{"round_robin": {}}]} if round_robin else {}),
            "methodConfig": [
                {
                    "name": [{"service": SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(max_attempts, 5)),
                        "initialBackoff": f"{backoff:.6f}s",
                        "maxBackoff": f"{max(backoff, 0.5):.6f}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": codes,
                    },
                }
            ],
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }
    )


def workers_target(target: str, credentials: grpc.ChannelCredentials | None = None,
                   timeout: float = 1.0, token: str = "") -> str | None:
    """A target naming every worker of the server at `target` on its own port (`ipv4:A:P1,A:P2`), for a
    round_robin channel; None when there is nothing to spread over (one process, an older server, no answer, or
    a target that is not HOST:PORT). A connection is served by one worker: without this, one channel gets one
    worker's share of the server. `token`: the bearer token to ask with (GetServerInfo needs scope resolve)."""
    try:
        address = parse_address(target)
        family, *_, sockaddr = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)[0]
    except (ValueError, OSError):
        return None
    channel = grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
    try:
        info = resolver_pb2_grpc.IdentityResolverStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout,
                                                                        metadata=bearer(token))
    except grpc.RpcError:
        return None
    finally:
        channel.close()
    if len(info.worker_ports) < 2:
        return None
    host = sockaddr[0]
    if family == socket.AF_INET6:
        return "ipv6:" + ",".join(f"[{host}]:{p}" for p in info.worker_ports)
    return "ipv4:" + ",".join(f"{host}:{p}" for p in info.worker_ports)


def bearer(token: str) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that presents `token` (`authorization: Bearer TOKEN`); None without a token.

    Metadata on each call, not grpc.access_token_call_credentials: gRPC sends call credentials only over TLS (or
    local) channels, and a client of a loopback server without TLS needs its token all the same."""
    return (("authorization", f"Bearer {token}"),) if token else None


def tls_credentials(root_certificates: bytes | None = None, client_cert: bytes | None = None,
                    client_key: bytes | None = None) -> grpc.ChannelCredentials:
    """Channel credentials for a TLS server: trust `root_certificates` (PEM; None: the system's roots); present
    `client_cert` with `client_key` (PEM) where the server asks for client certificates (mTLS)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    return grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


class ResolverClient:
    """A small, safe client for resolver.v1.IdentityResolver.

    `resolve_timeout` is the call-setup budget for Resolve (seconds); `write_timeout` for Upsert and
    GetCustomer. With `spread` (the default) the one channel reaches every worker process of the server on its
    own port and round-robins calls over them (`workers_target`); `target` then only serves to find them.
    `root_certificates` (and `client_cert` + `client_key` for mTLS) connect over TLS (`tls_credentials`);
    `credentials` gives ready channel credentials instead. `metadata`: more call metadata sent on every call,
    after the token (`x-request-id`). Use as a context manager or call close().
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        resolve_timeout: float = 0.2,
        write_timeout: float = 2.0,
        max_attempts: int = 3,
        backoff: float = 0.02,
        credentials: grpc.ChannelCredentials | None = None,
        spread: bool = True,
        token: str = "",
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        if credentials is None and (root_certificates is not None or client_cert is not None):
            credentials = tls_credentials(root_certificates, client_cert, client_key)
        self.address, self.credentials, self.spread = target, credentials, spread
        self.token = token  # sent on every call ([auth] on the server)
        self.metadata = (*(bearer(token) or ()), *metadata) or None
        self.resolve_timeout = resolve_timeout
        self.write_timeout = write_timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.attempts_made = 0  # total attempts sent by this client (observability and tests)
        self._connect()

    def _connect(self) -> None:
        """Open the channel: over every worker's own port when the server names them (`spread`), else `address`.
        A channel it replaces is left to in-flight calls on other threads (closed when the last one drops it)."""
        workers = workers_target(self.address, self.credentials, token=self.token) if self.spread else None
        self.target = workers or self.address
        options: list[tuple[str, str | int]] = [
            ("grpc.service_config", service_config(self.max_attempts, round_robin=workers is not None,
                                                   backoff=self.backoff)),
            ("grpc.enable_retries", 1)]
        if workers is not None and self.credentials is not None:
            # the workers' addresses are one server: its certificate is checked against the name it was asked by
            options.append(("grpc.default_authority", self.address))
        self.channel = (
            grpc.secure_channel(self.target, self.credentials, options=options)
            if self.credentials is not None
            else grpc.insecure_channel(self.target, options=options)
        )
        self.stub = resolver_pb2_grpc.IdentityResolverStub(self.channel)

    def __enter__(self) -> ResolverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _with_retries(self, call: Callable[[float], T], timeout: float) -> T:
        for attempt in range(1, self.max_attempts + 1):
            self.attempts_made += 1
            try:
                return call(timeout)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.max_attempts:
                    raise
                if self.spread and exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # the workers may be elsewhere now (a restart with ports chosen at start) or newly spread
                    # (a client made while the server was down): ask the shared port again
                    self._connect()
                time.sleep(self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def resolve(
        self,
        *,
        external_id: str = "",
        emails: Iterable[str] = (),
        phones: Iterable[str] = (),
        default_region: str = "",
        fields: Iterable[str] = (),
        view: str = "",
        explain: bool = False,
        timeout: float | None = None,
    ) -> pb.ResolveResponse:
        request = pb.ResolveRequest(
            identifiers=pb.Identifiers(external_id=external_id, emails=list(emails), phones=list(phones)),
            default_region=default_region,
            fields=list(fields),
            view=view,
            explain=explain,
        )
        return self._with_retries(lambda t: self.stub.Resolve(request, timeout=t, metadata=self.metadata),
                                  timeout or self.resolve_timeout)

    def upsert(
        self,
        request: pb.UpsertRequest | None = None,
        *,
        idempotency_key: str | None = None,
        customer_uuid: str = "",
        external_id: str = "",
        emails: Iterable[str] = (),
        phones: Iterable[str] = (),
        attributes: dict[str, Any] | None = None,
        source_system: str = "",
        expected_version: int = 0,
        default_region: str = "",
        timeout: float | None = None,
    ) -> pb.UpsertResponse:
        """Send an Upsert (a ready request, or built from the keywords); the key is generated once if absent."""
        if request is None:
            request = pb.UpsertRequest(
                customer_uuid=customer_uuid,
                identifiers=pb.Identifiers(external_id=external_id, emails=list(emails), phones=list(phones)),
                source_system=source_system,
                expected_version=expected_version,
                default_region=default_region,
            )
            if attributes:
                s = struct_pb2.Struct()
                s.update(attributes)
                request.attributes.CopyFrom(s)
        else:
            request = pb.UpsertRequest.FromString(request.SerializeToString())
        if idempotency_key is not None:
            request.idempotency_key = idempotency_key
        if not request.idempotency_key:
            request.idempotency_key = new_idempotency_key()
        return self._with_retries(lambda t: self.stub.Upsert(request, timeout=t, metadata=self.metadata),
                                  timeout or self.write_timeout)

    def get_customer(self, customer_uuid: str, *, timeout: float | None = None) -> pb.Customer:
        request = pb.GetCustomerRequest(customer_uuid=customer_uuid)
        return self._with_retries(lambda t: self.stub.GetCustomer(request, timeout=t, metadata=self.metadata),
                                  timeout or self.write_timeout)
