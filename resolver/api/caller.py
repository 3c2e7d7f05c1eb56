"""Who is calling: the scopes of the current call's token, for the handlers that answer by scope.

The auth interceptor (resolver.api.interceptors) sets the caller around each call's handler, in the thread that
runs it. Without `[auth]` there are no tokens: every caller holds every scope (the server then listens on
loopback only, or the blueprint says `[server] insecure = true`; resolver.server refuses anything else).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

SCOPES = ("resolve", "write", "events", "admin", "sensitive", "metrics")  # metrics: GET /metrics, no method


@dataclass(frozen=True, slots=True)
class Caller:
    """A call's token name ("" without [auth]) and the scopes it holds."""

    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes


ANYONE = Caller("", frozenset(SCOPES))  # no [auth]: every scope
_current: ContextVar[Caller] = ContextVar("resolver_caller", default=ANYONE)


def current() -> Caller:
    """The caller of the call this thread is answering (ANYONE outside a call, or without [auth])."""
    return _current.get()


def sees_sensitive() -> bool:
    """Whether the current caller may read sensitive attributes (decrypted); others get them omitted."""
    return _current.get().may("sensitive")


def enter(caller: Caller) -> object:
    """Make `caller` current for this thread's call; pass the result to `leave` when the call ends."""
    return _current.set(caller)


def leave(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
