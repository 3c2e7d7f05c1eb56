"""The events subsystem of one server process: admission (both transports), the applier, DLQ administration.

Which parts run where is the caller's choice (`start(applier=..., http=...)`): `resolver serve` runs the webhook
endpoint and the applier in the events process (resolver.events.process) and only gRPC admission and the DLQ
RPCs in the serving workers; `resolver.bootstrap.build_server()` can run everything as threads of one process (tests,
and a cluster node, whose applier goes through the replicated log: resolver.events.applier.drain_through_log).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from resolver.errors import DeadLetterNotFound
from resolver.events import counters, dlq
from resolver.events.applier import Applier, ReplayResult, replay
from resolver.events.http import COUNTER_FLUSH_S, HttpEndpoint
from resolver.events.inbox import Admission, Ingestor
from resolver.reload import Reloadable
from resolver.service import Service
from resolver.writer import Writer

log = logging.getLogger("resolver.events")


class Events:
    """Built by the server from the Service; `start(applier=..., http=...)` / `stop()` with it."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.store = service.store
        self.settings = service.settings
        self.ingestor = Ingestor(self.store, self.settings, service.schema)
        self.applier: Applier | None = None
        self.http: HttpEndpoint | None = None
        # what SIGHUP reloads here: the sources' webhook secrets, and the endpoint's certificate where it serves
        self.reloadables: list[Reloadable] = [self.ingestor.secrets]
        self._flusher: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    def start(self, *, applier: bool, http: bool = True) -> None:
        """Start the webhook endpoint (if `http` and `events.http_listen` is set) and the applier (if `applier`:
        one per data directory). Without an endpoint here, a thread flushes the refused-request counts of
        gRPC admissions every second (the endpoint's own loop does it otherwise)."""
        serve_http = http and bool(self.settings.events.http_listen)
        if serve_http or applier:
            for src in self.settings.sources.values():
                if src.unresolved or not src.secrets:
                    log.warning("source %s has no usable webhook secret (unresolved: %s): its events are refused",
                                src.name, ", ".join(src.unresolved) or "none configured")
        if serve_http:
            tls = None
            if self.settings.tls.enabled:
                from resolver.tls import WebhookTls

                tls = WebhookTls(self.settings.tls)
                self.reloadables.insert(0, tls)  # certificate first, as in the gRPC workers (bootstrap)
            self.http = HttpEndpoint(self.ingestor, self.settings.events.http_listen, self.settings.events.max_body_bytes,
                                     tls)
            self.http.start()
        else:
            self._flusher = threading.Thread(target=self._flush_loop, name="event-counters", daemon=True)
            self._flusher.start()
        if applier:
            self.applier = Applier(self.store, self.settings, self.service.schema, on_idle=self.ingestor.flush,
                                   writer=self._log_writer)
            self.applier.start()

    def _flush_loop(self) -> None:
        while not self._stopping.wait(COUNTER_FLUSH_S):
            try:
                self.ingestor.flush()
            except Exception:
                log.exception("flushing event counters failed")

    def stop_intake(self) -> None:
        """Stop accepting webhooks (before the gRPC server stops)."""
        if self.http is not None:
            self.http.stop()

    def stop(self) -> None:
        """Intake first, then the admissions already queued, then the applier (after its current batch)."""
        self.stop_intake()
        self.ingestor.close()
        self._stopping.set()
        if self._flusher is not None:
            self._flusher.join(COUNTER_FLUSH_S + 5)
        if self.applier is not None:
            self.applier.stop()
        self.ingestor.flush()

    # -- the use cases the transports and the CLI share ---------------------------------------------------------
    def admit(self, source: str, headers: dict[str, str], body: bytes) -> Admission:
        return self.ingestor.admit(source, headers, body)

    @property
    def _log_writer(self) -> Writer | None:
        """A cluster node's writer (events are applied through the replicated log); None on one machine."""
        return self.service.writer if self.settings.cluster.nats else None

    def replay(self, dlq_id: int) -> ReplayResult:
        return replay(self.store, self.settings, self.service.schema, dlq_id, self._log_writer)

    def discard(self, dlq_id: int) -> None:
        with self.store.write() as view:
            dlq.discard(view.txn, self.store, dlq_id)

    def list_dead_letters(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        out = []
        with self.store.read() as view:
            for meta, body in dlq.iterate(view.txn, self.store.db["ev_dlq"], after, ring=self.store.sealer.ring):
                out.append({**meta, "masked_payload": dlq.masked_payload(body), "size": len(body)})
                if len(out) >= limit:
                    break
        return out

    def get_dead_letter(self, dlq_id: int) -> tuple[dict[str, Any], bytes]:
        with self.store.read() as view:
            if "ev_dlq" not in self.store.db:
                raise DeadLetterNotFound(f"no dead letter {dlq_id}")
            return dlq.get(view.txn, self.store.db["ev_dlq"], dlq_id, ring=self.store.sealer.ring)

    def counters(self) -> dict[str, Any]:
        self.ingestor.flush()
        with self.store.read() as view:
            return counters.snapshot(view.txn, self.store)
