"""Domain errors, defined once. The gRPC edge (resolver.api.status) maps each to a status code.

Nothing here knows about gRPC: use cases raise these, the servicer translates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: `field` is a path such as ``identifiers.phones[1]``."""

    field: str
    description: str
    reason: str = ""


class ResolverError(Exception):
    """Base of every error the service reports to a caller. `reason` is a stable UPPER_SNAKE code."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class IdentifierError(ResolverError):
    """An identifier that cannot be normalized (reason INVALID_PHONE, INVALID_EMAIL, INVALID_EXTERNAL_ID)
    or that is a placeholder never to be indexed (reason BLOCKED_VALUE)."""

    reason = "INVALID_IDENTIFIER"


class BlockedIdentifier(IdentifierError):
    """A withheld or placeholder value (``anonymous``, ``noemail@...``): never indexed, never matched."""

    reason = "BLOCKED_VALUE"


class InvalidInput(ResolverError):
    """The request is malformed; every bad field is listed. Nothing was written."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], message: str | None = None) -> None:
        self.violations = list(violations)
        fields = ", ".join(v.field[:64] for v in self.violations[:_FIELDS_NAMED])
        more = len(self.violations) - _FIELDS_NAMED
        fields += f" and {more} more" if more > 0 else ""
        super().__init__(message or f"invalid request: {len(self.violations)} bad field(s): {fields}")


_FIELDS_NAMED = 5  # in InvalidInput's message; the BadRequest detail lists more (resolver.api.status)


class IdempotencyKeyReused(ResolverError):
    """The idempotency key was already used for a different request. Never retried. `field`: the request field
    that carries the key (an interaction's is its `interaction_id`)."""

    reason = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self, message: str, *, field: str = "idempotency_key") -> None:
        super().__init__(message)
        self.field = field


class NotFound(ResolverError):
    reason = "CUSTOMER_NOT_FOUND"


class AlreadyExists(ResolverError):
    """A unique identifier (external_id) is held by another customer."""

    reason = "EXTERNAL_ID_HELD"

    def __init__(self, message: str, *, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class FailedPrecondition(ResolverError):
    """The write cannot pick its target safely (e.g. an email shared by several customers)."""

    reason = "AMBIGUOUS_TARGET"

    def __init__(self, message: str, *, candidates: list[str] | None = None, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.candidates = list(candidates or [])


@dataclass(frozen=True, slots=True)
class Blocker:
    """Why an operation cannot run: `kind` (MERGE, DELETE, IDENTIFIER_CHANGE), `subject` (a uuid, a masked
    identifier) and a sentence."""

    kind: str
    subject: str
    description: str


class UnmergeBlocked(FailedPrecondition):
    """A later merge, delete or identifier change depends on the merge to undo; each is named."""

    reason = "UNMERGE_BLOCKED"

    def __init__(self, blockers: list[Blocker]) -> None:
        named = "; ".join(b.description for b in blockers[:3])
        more = f" and {len(blockers) - 3} more" if len(blockers) > 3 else ""
        super().__init__(f"the merge cannot be undone: {named}{more}")
        self.blockers = list(blockers)


class VersionMismatch(ResolverError):
    reason = "VERSION_MISMATCH"

    def __init__(self, message: str, *, current: int) -> None:
        super().__init__(message)
        self.current = current


class PermissionDenied(ResolverError):
    """A field owned by another source system."""

    reason = "FIELD_OWNED_BY_OTHER_SOURCE"

    def __init__(self, message: str, *, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = list(fields)


class DeadlineExceeded(ResolverError):
    """The caller's deadline passed before the work was done; nothing was written. `stage`: where it was seen,
    "prepare" (validating, normalizing or reading, before any write was queued) or "queued" (the write waited in the
    writer's queue past it, and was skipped: resolver.writer). Counted by stage (resolver.metrics)."""

    reason = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, *, stage: str = "prepare") -> None:
        super().__init__(message)
        self.stage = stage


class Unauthenticated(ResolverError):
    """A change event without a valid signature (missing headers, bad signature, stale or future timestamp)."""

    reason = "INVALID_SIGNATURE"


class TokenRejected(Unauthenticated):
    """A call to the API (with `[auth]`) without a bearer token, or with one the tokens file does not hold
    (reason TOKEN_MISSING or TOKEN_UNKNOWN). The message never holds the token."""

    reason = "TOKEN_UNKNOWN"


class ScopeMissing(ResolverError):
    """A known token without the scope the method needs; `scope` names that scope."""

    reason = "SCOPE_MISSING"

    def __init__(self, scope: str) -> None:
        super().__init__(f"this method needs a token with the {scope!r} scope")
        self.scope = scope


class UnknownSource(NotFound):
    """A change event for a source system the blueprint does not declare."""

    reason = "UNKNOWN_SOURCE"


class InboxFull(ResolverError):
    """The event inbox is above its high-water mark: retry after `retry_after_s` (back off)."""

    reason = "INBOX_FULL"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SequenceOutOfRange(ResolverError):
    """A change-feed position outside the retained log: older than `oldest` (retention deleted it; reason
    SEQUENCE_NOT_RETAINED) or past `next_sequence`, the sequence the next commit gets (SEQUENCE_AHEAD)."""

    reason = "SEQUENCE_NOT_RETAINED"

    def __init__(self, message: str, *, oldest: int, next_sequence: int, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.oldest = oldest
        self.next_sequence = next_sequence


class ResourceExhausted(ResolverError):
    """A per-process resource is used up (TOO_MANY_WATCHERS) or a caller holds one without using it
    (WATCHER_STALLED); `limit` names the blueprint key that sets it."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str, limit: str = "") -> None:
        super().__init__(message, reason=reason)
        self.limit = limit


class Overloaded(ResourceExhausted):
    """A worker at its admission limit refused the call before doing any of its work (resolver.api.admission):
    retry after `retry_after_s` seconds, preferably on another worker (reason OVERLOADED)."""

    def __init__(self, message: str, *, retry_after_s: float, limit: str) -> None:
        super().__init__(message, reason="OVERLOADED", limit=limit)
        self.retry_after_s = retry_after_s


class StorageFull(ResourceExhausted):
    """The data directory has no room for a write: the LMDB map is full (reason MAP_FULL, `limit` names
    `[storage] map_size_mb`) or the filesystem holding it is (DISK_FULL). Nothing of the write was stored and reads
    go on; the message says what the operator does (resolver.store makes it, README "Reliability")."""


class EventRejected(ResolverError):
    """A signed change event that cannot be applied: schema, mapping, value or apply failure.

    `reason` is SCHEMA_INVALID, MAPPING_FAILED, INVALID_VALUE, UNKNOWN_RECORD, FIELD_OWNED_BY_OTHER_SOURCE,
    RECORD_DELETED, ...; `dlq_id` is the dead letter it became (0 until stored).
    """

    reason = "EVENT_REJECTED"

    def __init__(self, message: str, *, reason: str, violations: list[FieldViolation] | None = None,
                 dlq_id: int = 0) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations or [])
        self.dlq_id = dlq_id


class DeadLetterNotFound(NotFound):
    reason = "DEAD_LETTER_NOT_FOUND"


class Unavailable(ResolverError):
    """The server is shutting down or cannot take the request now; retry (with the same key / webhook-id)."""

    reason = "UNAVAILABLE"


class NodeBehind(Unavailable):
    """A cluster node that will not answer a read from data it cannot vouch for (contract §10; resolver.cluster.reads):
    it stopped applying the log, lags the stream by more than `[cluster] max_lag`, has not heard from the stream
    within `max_silence_s`, or had not applied `min_sequence` (the sequence the caller asked to read at; 0: none) in
    time. `position`: the last sequence it applied; `stream_sequence`: the stream's last as it last saw it (0: never).
    Retry on another node."""

    reason = "NODE_BEHIND"

    def __init__(self, message: str, *, position: int, min_sequence: int = 0, stream_sequence: int = 0) -> None:
        super().__init__(message)
        self.position = position
        self.min_sequence = min_sequence
        self.stream_sequence = stream_sequence


class DecryptionFailed(ResolverError):
    """A stored sensitive value or event body cannot be decrypted (resolver.crypto): its key id is not among
    `[encryption] keys` (ENCRYPTION_KEY_UNKNOWN), or it was altered or moved to another customer, attribute or
    event (DECRYPTION_FAILED). Never answered with a guess: the data is unreadable until the key is restored."""

    reason = "DECRYPTION_FAILED"


class ConfigError(Exception):
    """The blueprint (or command line) is invalid; `problems` lists every one, for a readable report."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class StoreError(Exception):
    """The data directory cannot be used as asked (hash algorithm changed, newer format, ...)."""


class ClusterError(Exception):
    """The replicated log (resolver.cluster) cannot be used: NATS unreachable, the stream refused, or this store
    applied another stream or has fallen behind what the stream still holds."""
