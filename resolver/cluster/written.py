"""The stream sequence the current call's write was applied at: from the replicated writer to the call's answer.

ReplicatedWriter.submit records, in the calling thread's context, the sequence of the command whose result it
returns; the gRPC edge clears the record before a write method runs and answers what was recorded as `log_sequence`
(0: nothing went through the log, as on one machine). A client passes it as `ResolveRequest.min_sequence` to read
its write on another node. A context variable rather than a field of each use case's result: the use cases answer
the same on one machine and in a cluster, and one place (resolver.api.servicer) fills in every write answer.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol, TypeVar

_SEQUENCE: ContextVar[int] = ContextVar("resolver_log_sequence", default=0)


def clear() -> None:
    """Forget what an earlier call in this thread recorded (a handler thread serves call after call)."""
    _SEQUENCE.set(0)


def record(sequence: int) -> None:
    """This call's command was applied at `sequence` (a call that writes twice answers the later one)."""
    _SEQUENCE.set(max(sequence, _SEQUENCE.get()))


def recorded() -> int:
    """The sequence recorded since `clear` (0: none)."""
    return _SEQUENCE.get()


class Sequenced(Protocol):
    """A write answer: every write method's response message has this field (proto: `log_sequence`)."""

    log_sequence: int


S = TypeVar("S", bound=Sequenced)
