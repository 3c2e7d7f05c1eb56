"""The servicer's methods for RecordInteraction and ListInteractions (contract §7; resolver.interactions): a mixin of
resolver.api.servicer.IdentityResolverServicer, which provides `service`, `_call` and the rest."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from resolver import interactions, metrics
from resolver._rwire_py import raw_identifiers, skipped_pb
from resolver.api.wire import plain_struct
from resolver.errors import DeadlineExceeded, FieldViolation, InvalidInput
from resolver.interactions import InteractionInput, InteractionResult
from resolver.service import now_us
from resolver.v1 import resolver_pb2 as pb

if TYPE_CHECKING:
    from resolver.cluster.written import S
    from resolver.service import Service
    from resolver.store import Txn

T = TypeVar("T")


def _occurred_us(req: pb.RecordInteractionRequest) -> int | None:
    """occurred_at in microseconds (None: not given). A Timestamp that protobuf itself calls invalid (nanos outside
    0-999,999,999, a second outside the years 1-9999) is the caller's bad field, never an internal error."""
    if not req.HasField("occurred_at"):
        return None
    try:
        return req.occurred_at.ToMicroseconds()
    except ValueError:
        raise InvalidInput([FieldViolation("occurred_at", "not a valid Timestamp (nanos 0-999999999, years 1-9999)",
                                           "INVALID")]) from None


def interaction_input(req: pb.RecordInteractionRequest) -> InteractionInput:
    return InteractionInput(
        interaction_id=req.interaction_id,
        occurred_us=_occurred_us(req),
        customer_uuid=req.customer_uuid,
        identifiers=raw_identifiers(req.identifiers),
        channel=req.channel,
        agent_id=req.agent_id,
        queue=req.queue,
        disposition=req.disposition,
        details=plain_struct(req.details),
        default_region=req.default_region,
    )


def record_response(r: InteractionResult) -> pb.RecordInteractionResponse:
    out = pb.RecordInteractionResponse(interaction_id=r.interaction_id, customer_uuid=r.customer_uuid,
                                       replayed=r.replayed, customer_created=r.customer_created,
                                       skipped=skipped_pb(r.skipped))
    if r.last_interaction_us is not None:
        out.last_interaction_date.FromMicroseconds(r.last_interaction_us)
    return out


def interaction_pb(stored: dict[str, Any]) -> pb.Interaction:
    """An interaction as resolver.interactions stores it, for the API."""
    details = struct_pb2.Struct()
    details.update(stored["details"])
    out = pb.Interaction(interaction_id=stored["interaction_id"], customer_uuid=stored["customer_uuid"],
                         channel=stored["channel"], agent_id=stored["agent_id"], queue=stored["queue"],
                         disposition=stored["disposition"], details=details)
    out.occurred_at.FromMicroseconds(stored["occurred_us"])
    out.recorded_at.FromMicroseconds(stored["recorded_us"])
    return out


class InteractionRpcs:
    """Mixed into IdentityResolverServicer."""

    if TYPE_CHECKING:
        service: Service

        def _call(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T: ...

        def _write(self, context: grpc.ServicerContext, method: str, fn: Callable[[], S]) -> S: ...

    def RecordInteraction(self, request: pb.RecordInteractionRequest,
                          context: grpc.ServicerContext) -> pb.RecordInteractionResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        def run() -> pb.RecordInteractionResponse:
            service = self.service
            cmd = interactions.prepare(interaction_input(request), service.settings, service.schema, service.policy,
                                       now_us=now_us(), deadline=deadline)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the deadline passed before the write started; nothing was written")

            def apply(txn: Txn, command: interactions.InteractionCommand) -> InteractionResult:
                return interactions.apply(txn, command, service.settings)

            result = service.writer.submit(apply, cmd, deadline=deadline)
            if result.replayed:
                metrics.ledger_replayed("RecordInteraction")
            return record_response(result)

        return self._write(context, "RecordInteraction", run)

    def ListInteractions(self, request: pb.ListInteractionsRequest,
                         context: grpc.ServicerContext) -> pb.ListInteractionsResponse:
        def run() -> pb.ListInteractionsResponse:
            with self.service.store.read() as view:
                rows = interactions.list_interactions(view, request.customer_uuid, request.limit, self.service.settings)
            return pb.ListInteractionsResponse(interactions=[interaction_pb(r) for r in rows])

        return self._call(context, "ListInteractions", run)
