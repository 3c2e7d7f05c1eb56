"""The HTTP transport: `POST /v1/webhooks/{source}` on its own port, served by aiohttp in a background thread
with its own event loop (uvloop where installed: a third less CPU per request than asyncio's own loop), so it
never holds the gRPC threads. The loop checks each request itself (signature, schema: tens of µs) and awaits
the inbox committer's group commit; the answer is sent only after that committed. No thread is held per
request: on a small machine every thread hop is CPU taken from Resolve.

With `[tls]` it serves HTTPS (resolver.tls.WebhookTls: TLS 1.2 at least, no client certificate asked for: senders
prove who they are by signature); a reload changes the certificate on this loop, between two handshakes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from resolver.address import parse_address
from resolver.errors import EventRejected, InboxFull, StorageFull, Unauthenticated, Unavailable, UnknownSource
from resolver.events.inbox import COMMIT_TIMEOUT_S, Ingestor
from resolver.redact import redact

if TYPE_CHECKING:
    from resolver.tls import WebhookTls

_new_loop: Callable[[], asyncio.AbstractEventLoop]
try:
    import uvloop

    _new_loop = uvloop.new_event_loop
except ImportError:  # pragma: no cover - a platform without uvloop serves on asyncio's loop
    _new_loop = asyncio.new_event_loop

log = logging.getLogger("resolver.events.http")
COUNTER_FLUSH_S = 1.0
RELOAD_TIMEOUT_S = 10.0


def _json(code: int, /, **body: Any) -> web.Response:
    """An answer; its error texts pass the masking choke point (resolver.redact), as the gRPC errors' do."""
    if "message" in body:
        body["message"] = redact(body["message"])
    if "violations" in body:
        body["violations"] = [{k: redact(x) for k, x in item.items()} for item in body["violations"]]
    return web.json_response(body, status=code)


class HttpEndpoint:
    """Start with `start()` (returns once listening; `port` is the bound port), stop with `stop()`. With `tls`,
    HTTPS; its reloads run on this endpoint's loop."""

    def __init__(self, ingestor: Ingestor, listen: str, max_body_bytes: int, tls: WebhookTls | None = None) -> None:
        self.ingestor = ingestor
        self.listen = listen
        self.max_body_bytes = max_body_bytes
        self.tls = tls
        if tls is not None:
            tls.run_change = self._on_loop
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        source = request.match_info["source"]
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json(413, error="TOO_LARGE", message=f"at most {self.max_body_bytes} bytes")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            committed = self.ingestor.submit(source, headers, body)
            adm = await asyncio.wait_for(asyncio.wrap_future(committed), COMMIT_TIMEOUT_S)
        except Unauthenticated as exc:
            return _json(401, error=exc.reason, message=exc.message)
        except UnknownSource as exc:
            return _json(404, error=exc.reason, message=exc.message)
        except Unavailable as exc:
            return _json(503, error=exc.reason, message=exc.message)
        except InboxFull as exc:
            resp = _json(429, error=exc.reason, message=exc.message, retry_after_s=exc.retry_after_s)
            resp.headers["Retry-After"] = str(exc.retry_after_s)
            return resp
        except StorageFull as exc:  # 507 Insufficient Storage: a 5xx, so the sender keeps the event and retries
            return _json(507, error=exc.reason, message=exc.message)
        except EventRejected as exc:
            return _json(413 if exc.reason == "TOO_LARGE" else 400, error=exc.reason, message=exc.message,
                         dead_letter_id=exc.dlq_id,
                         violations=[{"field": v.field, "reason": v.reason, "description": v.description}
                                     for v in exc.violations])
        except Exception:
            log.exception("webhook admission failed")
            return _json(500, error="INTERNAL", message="internal error")
        return _json(adm.http_status, status="duplicate" if adm.duplicate else "accepted", webhook_id=adm.webhook_id,
                     inbox_sequence=adm.inbox_sequence)

    async def _flush_counters(self) -> None:
        while True:
            await asyncio.sleep(COUNTER_FLUSH_S)
            try:
                await asyncio.to_thread(self.ingestor.flush)
            except Exception:
                log.exception("flushing event counters failed")

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        address = parse_address(self.listen)
        sock = socket.socket(address.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address.host, address.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen for webhooks on {self.listen}: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/webhooks/{source}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.SockSite(runner, sock, ssl_context=self.tls.context if self.tls is not None else None).start()
            flusher = asyncio.create_task(self._flush_counters())
            self._ready.set()
            await self._stopping.wait()
            flusher.cancel()
            try:
                await flusher
            except asyncio.CancelledError:
                pass
        finally:
            await runner.cleanup()
            sock.close()

    def _run(self) -> None:
        loop = _new_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    def _on_loop(self, change: Callable[[], None]) -> None:
        """Run `change` on the endpoint's loop and wait for it (at once, here, when the loop does not run)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            change()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                change()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result(RELOAD_TIMEOUT_S)

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise OSError(f"the webhook endpoint did not start within {timeout:g}s")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass  # the loop closed meanwhile
        if self._thread is not None:
            self._thread.join(timeout)
        self.ingestor.flush()
