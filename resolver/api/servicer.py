"""The gRPC edge: proto <-> domain, deadlines, and errors -> status. No business rules here.

Requests arrive decoded and within the blueprint's limits (resolver.api.handlers, resolver.api.wire). On a cluster
node, reads pass its read gate first (resolver.cluster.reads: min_sequence, stale data refused) and every write
answer carries the log sequence its command was applied at (resolver.cluster.written).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from resolver import metrics
from resolver._rwire import encode_resolve
from resolver._rwire_py import raw_identifiers, resolve_input, resolve_response, skipped_pb
from resolver.api.feed_rpc import FeedRpcs
from resolver.api.forget_rpc import ForgetRpcs
from resolver.api.interactions_rpc import InteractionRpcs
from resolver.api.outbound_rpc import OutboundRpcs
from resolver.api.status import internal_status, to_rpc_status, to_status
from resolver.api.wire import plain_struct
from resolver.cluster import written
from resolver.cluster.written import S
from resolver.errors import DeadlineExceeded, FailedPrecondition, ResolverError
from resolver.events.runtime import Events
from resolver.identifiers import Identifiers
from resolver.resolve import ResolveInput, ResolveResult
from resolver.service import Service
from resolver.upsert import UpsertInput, UpsertResult
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc

if TYPE_CHECKING:
    from resolver.cluster.reads import ReadGate

log = logging.getLogger("resolver.api")
STREAM_BATCH = 256  # requests resolved together in one read transaction
STREAM_QUEUE = 1024  # requests read ahead of the responses at most: past it, HTTP/2 flow control pushes back
_END = object()
T = TypeVar("T")

_ACTIONS = {"CREATED": pb.ACTION_CREATED, "UPDATED": pb.ACTION_UPDATED, "UNCHANGED": pb.ACTION_UNCHANGED}


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _ids_pb(ids: Identifiers) -> pb.Identifiers:
    return pb.Identifiers(external_id=ids.external_id or "", emails=ids.emails, phones=ids.phones)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if values:
        s.update(values)
    return s


def _error_response(exc: ResolverError) -> pb.ResolveResponse:
    """A ResolveStream item's answer when that item failed: its error, nothing else."""
    return pb.ResolveResponse(error=to_rpc_status(exc))


def _encoded_error(exc: ResolverError) -> bytes:
    return _error_response(exc).SerializeToString()


def upsert_response(r: UpsertResult) -> pb.UpsertResponse:
    return pb.UpsertResponse(
        customer_uuid=r.customer_uuid,
        action=_ACTIONS[r.action],
        version=r.version,
        replayed=r.replayed,
        potential_duplicates=r.potential_duplicates,
        identifiers=_ids_pb(r.identifiers),
        skipped=skipped_pb(r.skipped),
    )


def upsert_input(req: pb.UpsertRequest) -> UpsertInput:
    return UpsertInput(
        idempotency_key=req.idempotency_key,
        identifiers=raw_identifiers(req.identifiers),
        attributes=plain_struct(req.attributes) if req.HasField("attributes") else {},
        customer_uuid=req.customer_uuid,
        source_system=req.source_system,
        expected_version=req.expected_version,
        remove_identifiers=raw_identifiers(req.remove_identifiers),
        default_region=req.default_region,
    )


def dead_letter_pb(meta: dict[str, Any], body: bytes | None = None) -> pb.DeadLetter:
    """A dead letter for the API: masked payload; the original bytes only when asked for."""
    from resolver.events.dlq import masked_payload

    d = pb.DeadLetter(id=meta["id"], source=meta["source"], reason=meta["reason"], detail=meta.get("detail", ""),
                      webhook_id=meta["webhook_id"], headers=meta.get("headers", {}),
                      masked_payload=meta.get("masked_payload") or (masked_payload(body) if body is not None else ""),
                      attempts=meta.get("attempts", 1), origin=meta.get("origin", ""))
    d.dead_lettered_at.FromMicroseconds(meta["dead_lettered_us"])
    if body is not None:
        d.body = body
    return d


def read_gate(service: Service) -> ReadGate | None:
    """What admits a read on a cluster node (resolver.cluster.reads); None on one machine, where every acknowledged
    write is visible to every read: a `min_sequence` there is satisfied at once."""
    if not service.settings.cluster.nats:
        return None
    from resolver.cluster.writer import read_gate as gate_of  # the NATS client loads only where a cluster is set

    return gate_of(service.writer)


class IdentityResolverServicer(InteractionRpcs, OutboundRpcs, FeedRpcs, ForgetRpcs,
                               resolver_pb2_grpc.IdentityResolverServicer):
    def __init__(self, service: Service, events: Events | None = None, info: pb.ServerInfo | None = None) -> None:
        self.service = service
        self.events = events
        self.info = info if info is not None else pb.ServerInfo()
        self.reads = read_gate(service)

    def _events(self) -> Events:
        if self.events is None:
            raise FailedPrecondition("change events are disabled in this server's blueprint ([events] enabled)",
                                     reason="EVENTS_DISABLED")
        return self.events

    def _call(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ResolverError as exc:
            if isinstance(exc, DeadlineExceeded):  # counted here, once for every stage that can see it
                metrics.deadline_expired(method, exc.stage)
            context.abort_with_status(to_status(exc))
        except Exception:
            # No payload in the log line: request fields may hold PII.
            log.exception("%s failed with an internal error", method)
            context.abort_with_status(internal_status())
        raise AssertionError("unreachable: abort_with_status raises")

    def _write(self, context: grpc.ServicerContext, method: str, fn: Callable[[], S]) -> S:
        """A write method: `_call`, and its answer's `log_sequence`, the replicated-log sequence its command was
        applied at (resolver.cluster.written; 0 on one machine)."""
        written.clear()
        answer = self._call(context, method, fn)
        answer.log_sequence = written.recorded()
        return answer

    def _admit(self, min_sequence: int, deadline: float | None) -> None:
        """On a cluster node: return once it may answer a read at `min_sequence`, else NodeBehind (ReadGate)."""
        if self.reads is not None:
            self.reads.admit(min_sequence, deadline)

    def _resolve(self, inp: ResolveInput, context: grpc.ServicerContext, answer: Callable[[ResolveResult], T]) -> T:
        deadline = _deadline(context)

        def run() -> T:
            self._admit(inp.min_sequence, deadline)
            return answer(self.service.resolve(inp, deadline))

        return self._call(context, "Resolve", run)

    def _resolve_batch(self, reqs: list[ResolveInput], deadline: float | None) -> list[ResolveResult | ResolverError]:
        """One batch of ResolveStream, admitted at the highest `min_sequence` it asks for."""
        self._admit(max((r.min_sequence for r in reqs), default=0), deadline)
        return self.service.resolve_many(reqs, deadline)

    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.ResolveResponse:
        return self._resolve(resolve_input(request), context, resolve_response)

    def resolve_encoded(self, inp: ResolveInput, context: grpc.ServicerContext) -> bytes:
        """Resolve answered as serialized ResolveResponse bytes (what the server's Resolve handler sends)."""
        return self._resolve(inp, context, encode_resolve)

    def ResolveStream(self, request_iterator: Iterator[pb.ResolveRequest | ResolverError],
                      context: grpc.ServicerContext) -> Iterator[pb.ResolveResponse]:
        """Bulk Resolve on messages (the generated servicer's method): `resolve_stream` answering ResolveResponses."""
        inputs = (r if isinstance(r, ResolverError) else resolve_input(r) for r in request_iterator)
        return self.resolve_stream(inputs, context, resolve_response, _error_response)

    def resolve_stream_encoded(self, inputs: Iterator[ResolveInput | ResolverError],
                               context: grpc.ServicerContext) -> Iterator[bytes]:
        """ResolveStream answered as serialized ResolveResponse bytes (what the server's ResolveStream handler
        sends, as its Resolve handler does)."""
        return self.resolve_stream(inputs, context, encode_resolve, _encoded_error)

    def resolve_stream(self, inputs: Iterator[ResolveInput | ResolverError], context: grpc.ServicerContext,
                       answer: Callable[[ResolveResult], T], error: Callable[[ResolverError], T]) -> Iterator[T]:
        """Bulk Resolve: one answer per input, in input order; batches through one read transaction each.

        An input that is a ResolverError (a request that did not decode) is answered with `error` of it in its
        place. A reader thread moves inputs into a bounded queue; when the client stops reading answers, this
        generator stops, the queue fills, the reader stops reading, and HTTP/2 flow control holds the client:
        memory stays bounded on both sides.
        """
        pending: queue.Queue[Any] = queue.Queue(maxsize=STREAM_QUEUE)

        def put(item: Any) -> bool:
            """Queue `item`; False once the call has ended (nobody will take it). The queue is seldom full, so
            the call's state (a lock of grpcio's) is only asked while it is."""
            try:
                pending.put_nowait(item)
                return True
            except queue.Full:
                pass
            while context.is_active():
                try:
                    pending.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for item in inputs:
                    if not put(item):
                        return
            except Exception:  # the client cancelled or broke the stream: end it
                pass
            finally:
                put(_END)

        threading.Thread(target=read, name="resolve-stream-reader", daemon=True).start()
        while True:
            batch = [pending.get()]
            while len(batch) < STREAM_BATCH and batch[-1] is not _END:
                try:
                    batch.append(pending.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is _END
            items = [r for r in batch if r is not _END]  # a request that did not decode is its InvalidInput
            reqs = [r for r in items if not isinstance(r, ResolverError)]
            answers = iter(self._call(context, "ResolveStream",
                                      functools.partial(self._resolve_batch, reqs, _deadline(context))))
            for item in items:
                result = item if isinstance(item, ResolverError) else next(answers)
                yield error(result) if isinstance(result, ResolverError) else answer(result)
            if done:
                return

    def Upsert(self, request: pb.UpsertRequest, context: grpc.ServicerContext) -> pb.UpsertResponse:
        deadline = _deadline(context)

        def run() -> pb.UpsertResponse:
            result = self.service.upsert(upsert_input(request), deadline)
            metrics.upserted(result.action, result.replayed)
            return upsert_response(result)

        return self._write(context, "Upsert", run)

    def GetCustomer(self, request: pb.GetCustomerRequest, context: grpc.ServicerContext) -> pb.Customer:
        deadline = _deadline(context)

        def run() -> pb.Customer:
            self._admit(request.min_sequence, deadline)
            rec = self.service.get_customer(request.customer_uuid)
            c = pb.Customer(
                customer_uuid=rec.uuid,
                identifiers=pb.Identifiers(external_id=rec.external_id or "", emails=rec.emails, phones=rec.phones),
                attributes=_struct(rec.attributes),
                version=rec.version,
            )
            c.created_at.FromMicroseconds(rec.created_us)
            c.updated_at.FromMicroseconds(rec.updated_us)
            return c

        return self._call(context, "GetCustomer", run)

    def Merge(self, request: pb.MergeRequest, context: grpc.ServicerContext) -> pb.MergeResponse:
        deadline = _deadline(context)

        def run() -> pb.MergeResponse:
            r = self.service.merge(request.idempotency_key, request.survivor_uuid, list(request.merged_uuids),
                                   request.source_system, deadline)
            if r.replayed:
                metrics.ledger_replayed("Merge")
            return pb.MergeResponse(customer_uuid=r.customer_uuid, version=r.version, replayed=r.replayed,
                                    merged_uuids=r.merged_uuids, identifiers=_ids_pb(r.identifiers))

        return self._write(context, "Merge", run)

    def Unmerge(self, request: pb.UnmergeRequest, context: grpc.ServicerContext) -> pb.UnmergeResponse:
        deadline = _deadline(context)

        def run() -> pb.UnmergeResponse:
            r = self.service.unmerge(request.idempotency_key, request.survivor_uuid, request.merged_uuid, deadline)
            if r.replayed:
                metrics.ledger_replayed("Unmerge")
            return pb.UnmergeResponse(survivor_uuid=r.survivor_uuid, survivor_version=r.survivor_version,
                                      merged_uuid=r.merged_uuid, merged_version=r.merged_version, replayed=r.replayed)

        return self._write(context, "Unmerge", run)

    def IngestEvents(self, request: pb.IngestRequest, context: grpc.ServicerContext) -> pb.IngestResponse:
        def run() -> pb.IngestResponse:
            adm = self._events().admit(request.source, dict(request.headers), request.body)
            return pb.IngestResponse(webhook_id=adm.webhook_id, duplicate=adm.duplicate,
                                     inbox_sequence=adm.inbox_sequence)

        return self._call(context, "IngestEvents", run)

    def ListDeadLetters(self, request: pb.ListDeadLettersRequest,
                        context: grpc.ServicerContext) -> pb.ListDeadLettersResponse:
        def run() -> pb.ListDeadLettersResponse:
            items = self._events().list_dead_letters(request.after_id, request.limit or 100)
            return pb.ListDeadLettersResponse(dead_letters=[dead_letter_pb(m) for m in items])

        return self._call(context, "ListDeadLetters", run)

    def GetDeadLetter(self, request: pb.GetDeadLetterRequest, context: grpc.ServicerContext) -> pb.DeadLetter:
        def run() -> pb.DeadLetter:
            meta, body = self._events().get_dead_letter(request.id)
            d = dead_letter_pb(meta, body)
            if not request.include_body:
                d.ClearField("body")
            return d

        return self._call(context, "GetDeadLetter", run)

    def ReplayDeadLetter(self, request: pb.ReplayDeadLetterRequest,
                         context: grpc.ServicerContext) -> pb.ReplayDeadLetterResponse:
        def run() -> pb.ReplayDeadLetterResponse:
            r = self._events().replay(request.id)
            return pb.ReplayDeadLetterResponse(applied=r.applied, reason=r.reason, detail=r.detail,
                                               customer_uuid=r.customer_uuid)

        return self._call(context, "ReplayDeadLetter", run)

    def DiscardDeadLetter(self, request: pb.DiscardDeadLetterRequest,
                          context: grpc.ServicerContext) -> pb.DiscardDeadLetterResponse:
        def run() -> pb.DiscardDeadLetterResponse:
            self._events().discard(request.id)
            return pb.DiscardDeadLetterResponse()

        return self._call(context, "DiscardDeadLetter", run)

    def GetEventCounters(self, request: pb.GetEventCountersRequest, context: grpc.ServicerContext) -> pb.EventCounters:
        def run() -> pb.EventCounters:
            snap = self._events().counters()
            return pb.EventCounters(counters=snap["counters"], in_inbox=snap["in_inbox"], in_dlq=snap["in_dlq"],
                                    conserved=snap["conserved"])

        return self._call(context, "GetEventCounters", run)

    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        return self.info
