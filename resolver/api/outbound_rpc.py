"""The servicer's methods for the outbound dead-letter list and counters (contract §5b; resolver.outbound): a mixin of
resolver.api.servicer.IdentityResolverServicer, which provides `service`, `_call` and the rest."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from resolver.outbound import admin
from resolver.v1 import resolver_pb2 as pb

if TYPE_CHECKING:
    from resolver.service import Service

T = TypeVar("T")


def outbound_message_pb(meta: dict[str, Any], body: bytes | None = None) -> pb.OutboundMessage:
    """An outbound message for the API: masked payload; the body only when given (include_body)."""
    m = pb.OutboundMessage(id=meta["id"], destination=meta["destination"], webhook_id=meta["webhook_id"],
                           event_type=meta["event_type"], customer_uuid=meta["customer_uuid"],
                           change_sequence=meta["change_seq"], attempts=meta["attempts"],
                           last_error=meta["last_error"], masked_payload=meta["masked_payload"])
    m.committed_at.FromMicroseconds(meta["at_us"])
    if body is not None:
        m.body = body
    return m


class OutboundRpcs:
    """Mixed into IdentityResolverServicer."""

    if TYPE_CHECKING:
        service: Service

        def _call(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T: ...

    def ListOutboundDeadLetters(self, request: pb.ListOutboundDeadLettersRequest,
                                context: grpc.ServicerContext) -> pb.ListOutboundDeadLettersResponse:
        def run() -> pb.ListOutboundDeadLettersResponse:
            items = admin.list_dead(self.service.store, request.after_id, request.limit or 100)
            return pb.ListOutboundDeadLettersResponse(messages=[outbound_message_pb(m) for m in items])

        return self._call(context, "ListOutboundDeadLetters", run)

    def GetOutboundDeadLetter(self, request: pb.GetOutboundDeadLetterRequest,
                              context: grpc.ServicerContext) -> pb.OutboundMessage:
        def run() -> pb.OutboundMessage:
            meta, body = admin.get_dead(self.service.store, request.id)
            return outbound_message_pb(meta, body if request.include_body else None)

        return self._call(context, "GetOutboundDeadLetter", run)

    def ReplayOutboundDeadLetter(self, request: pb.ReplayOutboundDeadLetterRequest,
                                 context: grpc.ServicerContext) -> pb.ReplayOutboundDeadLetterResponse:
        def run() -> pb.ReplayOutboundDeadLetterResponse:
            admin.replay(self.service.store, request.id, self.service.writer)
            return pb.ReplayOutboundDeadLetterResponse(requeued=True)

        return self._call(context, "ReplayOutboundDeadLetter", run)

    def DiscardOutboundDeadLetter(self, request: pb.DiscardOutboundDeadLetterRequest,
                                  context: grpc.ServicerContext) -> pb.DiscardOutboundDeadLetterResponse:
        def run() -> pb.DiscardOutboundDeadLetterResponse:
            admin.discard(self.service.store, request.id, self.service.writer)
            return pb.DiscardOutboundDeadLetterResponse()

        return self._call(context, "DiscardOutboundDeadLetter", run)

    def GetOutboundCounters(self, request: pb.GetOutboundCountersRequest,
                            context: grpc.ServicerContext) -> pb.OutboundCounters:
        def run() -> pb.OutboundCounters:
            snap = admin.counters(self.service.store)
            return pb.OutboundCounters(counters=snap["counters"], pending=snap["pending"], dead=snap["dead"],
                                       conserved=snap["conserved"])

        return self._call(context, "GetOutboundCounters", run)
