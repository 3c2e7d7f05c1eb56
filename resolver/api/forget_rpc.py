"""The servicer's Forget method (contract §8; resolver.forget): a mixin of
resolver.api.servicer.IdentityResolverServicer, which provides `service`, `_call` and the rest.

Scope admin (resolver.api.interceptors maps the method by name); the caller's token name goes into the audit entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import grpc

from resolver import forget, metrics
from resolver.api import caller
from resolver.v1 import resolver_pb2 as pb

if TYPE_CHECKING:
    from resolver.cluster.written import S
    from resolver.service import Service

T = TypeVar("T")


class ForgetRpcs:
    """Mixed into IdentityResolverServicer."""

    if TYPE_CHECKING:
        service: Service

        def _call(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T: ...

        def _write(self, context: grpc.ServicerContext, method: str, fn: Callable[[], S]) -> S: ...

    def Forget(self, request: pb.ForgetRequest, context: grpc.ServicerContext) -> pb.ForgetResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        who = caller.current().name  # read in the call's thread: the writer thread answers no call

        def run() -> pb.ForgetResponse:
            r = forget.forget(self.service, request.idempotency_key, request.customer_uuid, request.reason, who,
                              deadline)
            if r.replayed:
                metrics.ledger_replayed("Forget")
            return pb.ForgetResponse(customer_uuid=r.customer_uuid, replayed=r.replayed,
                                     audit_sequence=r.audit_sequence, removed=r.removed)

        return self._write(context, "Forget", run)
