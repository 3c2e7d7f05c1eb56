"""The backlog gate: an overloaded worker leaves the calls it cannot take waiting in gRPC's core, where they cost it
no Python, instead of taking each one only to refuse it.

Why: grpcio's sync server asks gRPC's core for the next call of a method as soon as it was handed one, so every call
that arrives reaches grpcio's one polling thread, which needs the GIL for it even to refuse it. Refusing costs that
thread about a third of what answering does, so at twice the knee a worker spent most of its CPU saying no
(goodput 54-60% of the knee; tests/reliability/test_overload.py, bench/README.md).

`Gate` holds back the next `request_call` of the API's methods while the handler pool holds `limit` calls (running
or queued for a thread) and asks again as soon as one finishes: past that, calls wait in gRPC's core, first in first
out, and the worker takes the oldest as soon as it has room. gRPC's core drops a new call of a method that already
has `grpc.server.max_pending_requests` waiting (the hard limit set to the same: no random early drop) and
ends one that waited past its deadline or `grpc.server_max_unrequested_time_in_server`, all without Python: the
client sees CANCELLED (or DEADLINE_EXCEEDED). So that callers still get an explicit "no" with a retry hint, the
worker refuses some of the calls it takes once calls have waited there a while (`refuses`): at most
`refusal_share` refusals per call answered, a budget that keeps what refusing costs to a bounded share of the CPU
the answers need.

Methods outside the gate (health, reflection, anything not of the API) keep asking at once: a load balancer's probe
is never held behind the API's backlog.

grpcio has no hook for this: `install` wraps its private `_request_registered_call` (grpcio is pinned in
pyproject.toml; the gate's tests in tests/reliability/test_overload.py fail if the wrapper stops holding calls
back). Without the names it needs it leaves the server ungated and logs why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from resolver.api.admission import HandlerPool
    from resolver.config import ServerSettings

log = logging.getLogger("resolver.backlog")

try:
    from grpc import _server as _grpc_server
except ImportError:  # pragma: no cover - a grpcio without the module: no gate
    _grpc_server = None  # type: ignore[assignment]

_NEEDED = ("_request_registered_call", "_ServerStage")
_ORIGINAL: Callable[[Any, str], None] | None = None
_INSTALL_LOCK = threading.Lock()
TOKENS_MAX = 8.0  # refusals saved up while not overloaded: a burst's first refusals come at once


class Gate:
    """The held-back requests of one server.

    `busy` counts the calls in the worker's handler pool (resolver.api.admission.HandlerPool reports each one in and
    out); `held` are the API methods whose next request waits for room. Both are guarded by grpcio's server lock,
    which its polling thread holds whenever it asks for a call or runs the interceptors (so `refuses` runs under it).
    """

    def __init__(self, methods: Iterable[str], limit: int, refusal_share: float, window_s: float) -> None:
        self.methods = frozenset(methods)
        self.limit = limit
        self.share = refusal_share
        self.window = window_s
        self.busy = 0
        self.held: set[str] = set()
        self.tokens = 0.0
        # time.monotonic() of the start of the current streak of held requests, and of the last release
        self.streak_since = self.released = float("-inf")
        self._lock: Any = threading.RLock()  # grpcio's server lock once attached
        self._state: Any = None

    def attach(self, server: grpc.Server) -> bool:
        """Gate `server` (built, not yet started); False, and the server left as it is, if grpcio lacks what the
        gate needs."""
        state = getattr(server, "_state", None)
        if state is None or not install():
            return False
        state.resolver_gate = self
        self._lock, self._state = state.lock, state
        return True

    def started(self) -> None:
        """A call entered the handler pool."""
        with self._lock:
            self.busy += 1

    def finished(self) -> None:
        """A call left the handler pool: it earns `share` of a refusal, and what was held back is asked for once
        below the limit."""
        with self._lock:
            self.busy -= 1
            self.tokens = min(self.tokens + self.share, TOKENS_MAX)
            state = self._state
            if self.held and self.busy < self.limit and state is not None \
                    and state.stage is _grpc_server._ServerStage.STARTED:
                held, self.held = self.held, set()
                self.released = time.monotonic()
                for method in held:
                    _ORIGINAL(state, method)  # type: ignore[misc]

    def holds(self, method: str) -> bool:
        """Whether the next request for `method` waits (then it is remembered, and asked for by `finished`)."""
        if method not in self.methods or self.busy < self.limit:
            return False
        now = time.monotonic()
        if not self.held and now - self.released > self.window:  # nothing held for a while: a new streak
            self.streak_since = now
        self.held.add(method)
        return True

    def refuses(self) -> bool:
        """Whether the call being taken is refused: it comes right after a release (so it had been waiting in
        gRPC's core), requests have been held back, with no pause of `window_s`, for at least `window_s` (so calls
        have been waiting about that long: not a burst the threads drain in time), and the refusal budget has one
        left (then it is spent)."""
        now = time.monotonic()
        if self.tokens < 1.0 or now - self.released > self.window or now - self.streak_since < self.window:
            return False
        self.tokens -= 1.0
        return True


def gate_server(server: grpc.Server, pool: HandlerPool, methods: Iterable[str], settings: ServerSettings) -> Gate | None:
    """Gate `methods` of `server` (built, not started), whose handler pool is `pool`, as `settings` ([server]) say;
    None (the server left as it is) if grpcio lacks what the gate needs."""
    gate = Gate(methods, settings.threads + settings.max_queued_calls, settings.refusal_share,
                settings.max_queue_wait_ms / 1000)
    if not gate.attach(server):
        return None
    pool.gate = gate
    return gate


def _gated(state: Any, method: str) -> None:
    """grpcio's `_request_registered_call`, unless the server's gate holds the request back."""
    gate: Gate | None = getattr(state, "resolver_gate", None)
    if gate is not None and gate.holds(method):
        return
    _ORIGINAL(state, method)  # type: ignore[misc]


def install() -> bool:
    """Wrap grpcio's `_request_registered_call`, once per process; False if grpcio does not have it."""
    global _ORIGINAL
    with _INSTALL_LOCK:
        if _ORIGINAL is not None:
            return True
        if _grpc_server is None or not all(hasattr(_grpc_server, name) for name in _NEEDED):
            log.warning("grpcio %s lacks %s: overload is refused by taking each call (README \"Reliability\")",
                        grpc.__version__, ", ".join(_NEEDED))
            return False
        _ORIGINAL = _grpc_server._request_registered_call
        _grpc_server._request_registered_call = _gated
        return True
