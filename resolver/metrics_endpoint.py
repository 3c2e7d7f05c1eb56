"""`GET /metrics` of `resolver serve` (`[metrics] listen`), in the supervisor: the Prometheus text format of every
serving process's metrics added up (resolver.metrics says what they record, and why the endpoint is here), and the
figures LMDB holds, read at scrape time (`StoreFigures`).

Bound when built (a port in use stops the start-up before anything is spawned; port 0 picks one: `port`), served
from `serve()` on by a small threaded HTTP server, one thread per connection, so a slow scraper holds only its own.
It answers like the gRPC port:
- with `[tls]`: HTTPS with the same certificate (TLS 1.2 at least; no client certificate asked for), handshakes in
  the connection's thread; a new certificate (SIGHUP, `reload`) serves the next connection.
- with `[auth]`: `Authorization: Bearer TOKEN` of a token holding the `metrics` scope (resolver.api.caller): none or
  an unknown one is 401, one without the scope 403. The tokens file is re-read on SIGHUP.
Any other path is 404; anything but GET and HEAD is refused by the HTTP server (501). No request is logged.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple

import lmdb

from resolver.address import parse_address
from resolver.auth import TokenSet
from resolver.config import Settings, TlsSettings
from resolver.errors import StoreError
from resolver.events import counters
from resolver.outbound import outbox
from resolver.reload import Reloadable, reload_all
from resolver.tls import read_material, server_context

# prometheus_client is imported where it is used, never here: this module is imported before `resolver serve` has
# exported its metrics directory, and prometheus_client picks multiprocess mode once, when it is first imported.

if TYPE_CHECKING:
    from resolver.store import Store

log = logging.getLogger("resolver.metrics")
SCOPE = "metrics"
PATH = "/metrics"
HANDSHAKE_TIMEOUT_S = 10.0


class _Tls:
    """The endpoint's certificate (a Reloadable): each connection is wrapped with `context` as it is then."""

    what = "the metrics endpoint's TLS certificate"

    def __init__(self, tls: TlsSettings) -> None:
        self.settings = tls
        self.context = server_context(read_material(tls))

    def reload(self) -> None:
        self.context = server_context(read_material(self.settings))  # a bad file raises: the old context stays


class _Server(ThreadingHTTPServer):
    # not daemon threads: server_close() waits for the scrapes in flight, so none reads a store being closed
    daemon_threads = False
    endpoint: MetricsEndpoint

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, peer = self.socket.accept()
        tls = self.endpoint.tls
        if tls is not None:  # the handshake runs in the connection's own thread (`_Handler.setup`), not here
            sock = tls.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, peer

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics endpoint: a connection failed", exc_info=True)  # a failed handshake, a reset: no traceback


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = HANDSHAKE_TIMEOUT_S  # every read on the connection, the handshake included
    # HTTP/1.0 (the base class's): one request per connection, so no idle keep-alive holds a thread or the stop

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        self._answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        endpoint = self.server.endpoint
        if self.path.split("?", 1)[0] != PATH:
            return self._send(404, b"not found: the metrics are at /metrics\n", with_body=with_body)
        refusal = endpoint.refusal(self.headers.get("Authorization"))
        if refusal is not None:
            status, text = refusal
            return self._send(status, text.encode() + b"\n", with_body=with_body,
                              headers=(("WWW-Authenticate", 'Bearer realm="metrics"'),) if status == 401 else ())
        body, content_type = endpoint.render()
        self._send(200, body, with_body=with_body, content_type=content_type)

    def _send(self, status: int, body: bytes, *, with_body: bool, content_type: str = "text/plain; charset=utf-8",
              headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # no access log here: a scrape every few seconds would drown the server's own


class MetricsEndpoint:
    """`GET /metrics` for one run of `resolver serve` over the metrics `directory` it exported."""

    def __init__(self, settings: Settings, directory: str) -> None:
        self.settings = settings
        self.directory = directory
        self.tls = _Tls(settings.tls) if settings.tls.enabled else None
        self.tokens = TokenSet(settings.auth.tokens_file) if settings.auth.enabled else None
        address = parse_address(settings.metrics.listen)
        server = type("_Server", (_Server,), {"address_family": address.family})
        try:
            self._server = server((address.host, address.port), _Handler)
        except OSError as exc:
            raise OSError(f"cannot listen for metrics on {settings.metrics.listen}: {exc.strerror}") from None
        self._server.endpoint = self
        self.host = address.host
        self.port: int = self._server.server_address[1]
        self._registry: Any = None
        self._store: Store | None = None
        self._own_store = False
        self._opening = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}{PATH}"

    @property
    def reloadables(self) -> list[Reloadable]:
        return [part for part in (self.tls, self.tokens) if part is not None]

    def serve(self, store: Store | None = None) -> None:
        """Answer scrapes from now on, reading LMDB figures from `store` (the in-process worker's), or with None
        from a read-only store of its own, opened at the first scrape (the workers have made the store by then)."""
        self._store, self._own_store = store, store is None
        self._registry = scrape_registry(self.directory, self.settings, self._figures_store)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="resolver-metrics", daemon=True)
        self._thread.start()

    def _figures_store(self) -> Store | None:
        with self._opening:
            if self._store is None and self._own_store:
                from resolver.bootstrap import open_store

                self._store = open_store(self.settings, readonly=True)
            return self._store

    def refusal(self, authorization: str | None) -> tuple[int, str] | None:
        """Why a scrape with this Authorization header is refused (status, text), None if it is not."""
        if self.tokens is None:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        who = self.tokens.check(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if who is None:
            return 401, "a bearer token with the metrics scope is needed: send `Authorization: Bearer TOKEN`"
        if SCOPE not in who.scopes:
            return 403, "this token lacks the metrics scope"
        return None

    def render(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def reload(self) -> list[str]:
        """SIGHUP: the certificate and the tokens file; the failures, as "WHAT: REASON"."""
        return reload_all(self.reloadables)

    def stop(self) -> None:
        """Stop answering (the store is never read after this returns) and close what this opened."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
        with self._opening:
            if self._own_store and self._store is not None:
                self._store.close()
            self._store, self._own_store = None, False


# -- read at scrape time ---------------------------------------------------------------------------------------

class ReaderSlots(NamedTuple):
    """LMDB's reader table: slots held by a process (a read transaction, or a spare kept for the next one), and
    those inside a read transaction now."""

    held: int
    active: int


def reader_slots(listing: str) -> ReaderSlots:
    """Count the reader table as `lmdb.Environment.readers()` lists it: a header, then `pid thread txnid` per held
    slot, txnid "-" for a spare one ("(no active readers)" when none is held)."""
    held = active = 0
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3:
            held += 1
            active += fields[2] != "-"
    return ReaderSlots(held, active)


# ev_counters names (resolver.events.counters) that only grow; dead_lettered does not (a replay moves one to applied)
_EVENT_TOTALS = ("received", "rejected_unsigned", "rejected_other", "throttled", "duplicates", "accepted", "applied",
                 "discarded", "conflicts", "stale_fields", "requeued")


class StoreFigures:
    """A collector of what LMDB holds, read at scrape time in one read transaction (never counted twice, never lost
    by a restart): the map and reader table, and with events on, the events counters and the inbox and dead-letter
    depths, and with `[outbound]` destinations, the outbound counters and the outbox depths.

    `store()` gives the store to read (the supervisor's own read-only one, or its in-process worker's); None, or a
    store that cannot be read (the server is stopping), leaves these figures out of that scrape."""

    def __init__(self, settings: Settings, store: Callable[[], Store | None]) -> None:
        self.settings = settings
        self.store = store

    def describe(self) -> list[Any]:
        return []  # nothing read at registration: the store may not exist yet

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            store = self.store()
            if store is None:
                return
            figures = self._read(store)
        except (lmdb.Error, StoreError):
            return
        for name, (kind, help_text, value) in figures.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=value)

    def _read(self, store: Store) -> dict[str, tuple[str, str, float]]:
        env = store.env
        env.reader_check()  # a slot left by a killed process is not in use
        info, slots = env.info(), reader_slots(env.readers())
        out: dict[str, tuple[str, str, float]] = {
            "resolver_lmdb_map_size_bytes": ("gauge", "LMDB map size ([storage] map_size_mb)", info["map_size"]),
            "resolver_lmdb_map_used_bytes": ("gauge", "LMDB map in use: pages up to the last one used, times the "
                                             "page size", (info["last_pgno"] + 1) * env.stat()["psize"]),
            "resolver_lmdb_readers_in_use": ("gauge", "LMDB reader slots held by processes (in a read transaction "
                                             "or kept spare)", slots.held),
            "resolver_lmdb_readers_active": ("gauge", "LMDB reader slots inside a read transaction now", slots.active),
            "resolver_lmdb_readers_max": ("gauge", "LMDB reader slots ([storage] max_readers)", info["max_readers"]),
        }
        with store.read() as view:
            if self.settings.events.enabled:
                events = counters.snapshot(view.txn, store)
                for name in _EVENT_TOTALS:
                    out[f"resolver_events_{name}"] = ("counter", f"CRM change events {name.replace('_', ' ')}",
                                                      events["counters"][name])
                out["resolver_events_dead_lettered"] = ("gauge", "CRM change events whose fate is the dead-letter "
                                                        "queue (a successful replay moves one to applied)",
                                                        events["counters"]["dead_lettered"])
                out["resolver_events_inbox_depth"] = ("gauge", "Accepted events waiting in the inbox",
                                                      events["in_inbox"])
                out["resolver_events_dlq_depth"] = ("gauge", "Events in the dead-letter queue", events["in_dlq"])
            if self.settings.outbound:
                sent = outbox.snapshot(view.txn, store)
                for name in outbox.COUNTERS:
                    out[f"resolver_outbound_{name}"] = ("counter", f"Outbound messages: {name.replace('_', ' ')}",
                                                        sent["counters"][name])
                out["resolver_outbound_pending"] = ("gauge", "Outbound messages waiting for delivery", sent["pending"])
                out["resolver_outbound_dead"] = ("gauge", "Outbound messages in the dead-letter list", sent["dead"])
        return out


def scrape_registry(directory: str, settings: Settings, store: Callable[[], Store | None]) -> Any:
    """What `GET /metrics` answers with: every process's files in `directory`, added up, and `StoreFigures`."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)
    registry.register(StoreFigures(settings, store))
    return registry
