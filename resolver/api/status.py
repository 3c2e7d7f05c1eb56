"""Domain errors -> google.rpc.Status with details (the one place that knows the mapping)."""

from __future__ import annotations

import collections

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from resolver import errors
from resolver.redact import redact

DOMAIN = "resolver.v1"

_CODES: list[tuple[type[Exception], int]] = [
    (errors.InvalidInput, code_pb2.INVALID_ARGUMENT),
    (errors.IdempotencyKeyReused, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.VersionMismatch, code_pb2.ABORTED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.ScopeMissing, code_pb2.PERMISSION_DENIED),
    (errors.DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.InboxFull, code_pb2.RESOURCE_EXHAUSTED),
    (errors.EventRejected, code_pb2.INVALID_ARGUMENT),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.DecryptionFailed, code_pb2.DATA_LOSS),
    (errors.SequenceOutOfRange, code_pb2.OUT_OF_RANGE),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
]


def _pack(msg: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)  # type: ignore[arg-type]
    return packed


# The error a client gets must fit its default metadata limit (16 KiB for grpc-status-details-bin and the rest):
# so many violations listed, each field path and description clipped (tests/integration/test_hostile.py holds
# the worst case under 8 KiB).
MAX_VIOLATIONS = 10
MAX_FIELD = 96
MAX_DESCRIPTION = 160
MAX_TEXT = 512  # the message, an ErrorInfo metadata value


def _clip(text: str, limit: int) -> str:
    """Every text a client gets passes here: through the masking choke point (resolver.redact), then clipped.
    A number alone (a sequence, a version, an id of ours in ErrorInfo metadata) is ours, never a value: kept."""
    text = text if text.isdigit() else redact(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad_request(violations: list[errors.FieldViolation]) -> error_details_pb2.BadRequest:
    """The bad fields of a request, as the BadRequest detail clients read: the first MAX_VIOLATIONS, then one
    entry (field "") saying how many more there were."""
    listed = [
        error_details_pb2.BadRequest.FieldViolation(field=_clip(v.field, MAX_FIELD),
                                                    description=_clip(v.description, MAX_DESCRIPTION),
                                                    reason=_clip(v.reason, 64))
        for v in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:
        listed.append(error_details_pb2.BadRequest.FieldViolation(
            description=f"and {len(violations) - MAX_VIOLATIONS} more violation(s) not listed", reason="MORE"))
    return error_details_pb2.BadRequest(field_violations=listed)


# gRFC A6's server pushback: the trailer a client's gRPC retry policy reads (Go, Java, Node, C++ and Python alike)
# to wait exactly that long before its next attempt; a negative value tells it not to retry at all.
PUSHBACK = "grpc-retry-pushback-ms"


def pushback_ms(exc: errors.ResolverError) -> int | None:
    """The pushback a refusal carries: its retry delay when the same call will succeed later (overload, a full
    inbox), -1 when no retry can (a full map or disk waits for an operator), None for every other error (a retry
    policy then applies its own backoff, if it retries that code at all)."""
    if isinstance(exc, (errors.Overloaded, errors.InboxFull)):
        return max(0, round(exc.retry_after_s * 1000))
    if isinstance(exc, errors.StorageFull):
        return -1
    return None


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def to_status(exc: errors.ResolverError) -> grpc.Status:
    """The gRPC status for a domain error: code, message, ErrorInfo and (when fields are bad) BadRequest; and the
    retry pushback of one that says when to come back (`pushback_ms`)."""
    status = rpc_status.to_status(to_rpc_status(exc))
    ms = pushback_ms(exc)
    if ms is None:
        return status
    return _Status(status.code, status.details, (*status.trailing_metadata, (PUSHBACK, str(ms))))


def to_rpc_status(exc: errors.ResolverError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error (also carried per item in ResolveStream responses)."""
    code = next((c for t, c in _CODES if isinstance(exc, t)), code_pb2.INTERNAL)
    metadata: dict[str, str] = {}
    details = []
    if isinstance(exc, errors.InvalidInput):
        details.append(_bad_request(exc.violations))
    elif isinstance(exc, errors.IdempotencyKeyReused):
        details.append(_bad_request([errors.FieldViolation(exc.field, exc.message, exc.reason)]))
    elif isinstance(exc, errors.AlreadyExists):
        metadata["holder"] = exc.holder
    elif isinstance(exc, errors.UnmergeBlocked):
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type=b.kind, subject=_clip(b.subject, MAX_FIELD),
                                                            description=_clip(b.description, MAX_DESCRIPTION))
            for b in exc.blockers[:MAX_VIOLATIONS]]))
    elif isinstance(exc, errors.FailedPrecondition) and exc.candidates:
        metadata["candidates"] = ",".join(exc.candidates)
    elif isinstance(exc, errors.VersionMismatch):
        metadata["current_version"] = str(exc.current)
    elif isinstance(exc, errors.ScopeMissing):
        metadata["scope"] = exc.scope
    elif isinstance(exc, errors.PermissionDenied):
        metadata["fields"] = ",".join(exc.fields)
    elif isinstance(exc, errors.InboxFull):
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=exc.retry_after_s)))
    elif isinstance(exc, errors.SequenceOutOfRange):
        metadata["oldest_sequence"] = str(exc.oldest)
        metadata["next_sequence"] = str(exc.next_sequence)
    elif isinstance(exc, errors.NodeBehind):
        metadata["position"] = str(exc.position)
        if exc.min_sequence:
            metadata["min_sequence"] = str(exc.min_sequence)
        if exc.stream_sequence:
            metadata["stream_sequence"] = str(exc.stream_sequence)
    elif isinstance(exc, errors.Overloaded):
        metadata["limit"] = exc.limit
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(exc.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    elif isinstance(exc, errors.ResourceExhausted) and exc.limit:
        metadata["limit"] = exc.limit
    elif isinstance(exc, errors.EventRejected):
        if exc.dlq_id:
            metadata["dead_letter_id"] = str(exc.dlq_id)
        if exc.violations:
            details.append(_bad_request(exc.violations))
    metadata = {k: _clip(v, MAX_TEXT) for k, v in metadata.items()}
    details.insert(0, error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata))
    return status_pb2.Status(code=code, message=_clip(exc.message, MAX_TEXT), details=[_pack(d) for d in details])


def internal_status() -> grpc.Status:
    """For a bug: the caller learns nothing of the internals (the server log has the traceback)."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN)
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[_pack(info)])
    )
