"""`resolver serve`: run the application built by resolver.bootstrap in one process or N workers sharing the port.

Each worker opens the LMDB environment itself after it has started (spawned, never forked with an open
environment), binds the same port with SO_REUSEPORT, and serves health, reflection and the API. A worker that
dies is restarted on the same ports (bounded, with a backoff: resolver.restarts); its replacement frees the dead
one's LMDB reader slots.
With events enabled, the webhook endpoint and the applier run in one more child, the events process
(resolver.events.process, at a lowered CPU priority), so they never compete with Resolve for a GIL; the gRPC
workers keep `IngestEvents` and the DLQ admin RPCs. With `[outbound]` destinations, the deliverer runs in one more
child, the outbound process (resolver.outbound.process), supervised the same way. A cluster node (`[cluster]`) has
neither child: its events applier and deliverer write through its one applier, which answers only its own process,
so they run as threads of its one worker.
With `[metrics] listen`, every one of these processes records metrics into a directory made for the run, and the
supervisor answers `GET /metrics` with their sum (resolver.metrics, resolver.metrics_endpoint).
On SIGTERM/SIGINT (one sequence, `_shutdown`): webhook intake stops, each worker's health goes NOT_SERVING and
its in-flight calls get `grace_period_s`, storage closes, then the events process finishes its applier batch and
the outbound process its attempts in flight.
On SIGHUP (resolver.reload): the supervisor reloads its in-process parts (one worker) and forwards SIGHUP to every
worker, the events process and the outbound process; each re-reads its certificates, tokens and webhook secrets
between two calls (a bad file keeps the previous one, logged), so no call is dropped.

Secure by default (contract §8): off loopback, `serve` refuses to start without TLS and tokens, and a secret that
cannot be read stops it, unless `[server] insecure = true` (then one warning at start-up).
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import multiprocessing
import os
import queue
import select
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

from resolver import datalock, metrics
from resolver.address import parse_address
from resolver.bootstrap import Running, WorkerPorts, build_server
from resolver.config import Settings
from resolver.events.process import EventsProcess, EventsProcessError
from resolver.logs import setup_logging
from resolver.metrics_endpoint import MetricsEndpoint
from resolver.outbound.process import OutboundProcess
from resolver.reload import accept_sighup, sighup_blocked
from resolver.restarts import Restarts
from resolver.tls import read_material

log = logging.getLogger("resolver.server")


@contextmanager
def reserve_port(listen: str) -> Iterator[int]:
    """Hold the address with SO_REUSEPORT so every worker binds the same port (port 0: pick one)."""
    address = parse_address(listen)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def settle() -> None:
    """Call once a serving process has loaded everything it keeps (phone tables, descriptors, the store):
    those objects move to the collector's permanent generation, so its full collections stop walking them
    while calls are being answered (bench/README.md has what that saves)."""
    gc.collect()
    gc.freeze()


class _Signals:
    """The signals a process waits for (those that stop it, SIGHUP that reloads), awaited with no lock taken in a
    signal handler.

    A handler runs in the main thread between two bytecodes. One that sets a threading.Event can deadlock with
    the main thread's own Event.wait (both take the Event's non-reentrant lock): the process then ignores
    SIGTERM for good. Here the handler does nothing; the interpreter writes the signal number to a socket
    (signal.set_wakeup_fd), and `wait` selects on it. Installed before start-up, so a signal that arrives while
    the server starts is answered once it serves, not by dying halfway.
    """

    def __init__(self, *signums: signal.Signals) -> None:
        self.signums = signums
        self._read, self._write = socket.socketpair()
        for sock in (self._read, self._write):
            sock.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, lambda *_: None) for s in signums}

    def wait(self, tick: Callable[[], bool | None] | None = None, every: float = 0.5) -> int | None:
        """Block until one of the signals (its number) or until `tick`, called every `every` seconds, returns
        True (None)."""
        while True:
            readable, _, _ = select.select([self._read], [], [], every if tick is not None else None)
            if readable:
                got = [n for n in self._read.recv(64) if n in self.signums]
                if got:
                    return got[0]
            elif tick is not None and tick():
                return None

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._read.close()
        self._write.close()


def _worker(settings: Settings, ready: Any, index: int, ports: tuple[int, ...]) -> None:
    """A spawned worker: serve gRPC on the shared port and on its own (`ports[index]`; no webhook endpoint, no
    applier), stop gracefully on SIGTERM."""
    metrics.inherit(settings)  # before anything that counts is built
    setup_logging(settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM for us
    signals = _Signals(signal.SIGTERM, signal.SIGHUP)
    accept_sighup()  # spawned with SIGHUP blocked: one sent while we start waits for `signals`
    try:
        running = build_server(settings, sweeper=index == 0, events_in_process=False,
                               worker_ports=WorkerPorts(ports, index))
    except Exception as exc:
        ready.put((index, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    settle()
    ready.put((index, None))
    parent = os.getppid()

    def orphaned() -> bool:  # the supervisor was killed: do not keep serving its port as an orphan
        if os.getppid() == parent:
            return False
        log.warning("worker %d: the supervisor is gone; stopping", index)
        return True

    while signals.wait(orphaned, every=1.0) == signal.SIGHUP:
        running.reload()  # between calls: handler threads keep serving while the files are read
    running.stop()
    signals.close()


class _Workers(Protocol):
    """The gRPC side of `serve`: started once, stopped once; `port` is where it serves."""

    port: int

    def start(self) -> str | None:
        """Start serving; None, or why it could not (the serve command exits 1 with that)."""

    def stop(self, grace: float | None = None) -> bool:
        """Drain and stop within the blueprint's grace period (`grace=0`: at once, as after a failed start);
        whether every part stopped cleanly."""

    def reload(self) -> None:
        """SIGHUP: re-read certificates, tokens and webhook secrets where the gRPC side serves."""

    def check(self) -> None:
        """Called from the supervisor's loop: restart a worker process that died (none to restart in process)."""


class _InProcess:
    """One worker: the gRPC server runs in the supervisor's own process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self.running: Running | None = None

    def start(self) -> str | None:
        # errors propagate: nothing started. A cluster node's events applier and deliverer run here (serve says why)
        self.running = build_server(self.settings, events_in_process=bool(self.settings.cluster.nats))
        self.port = self.running.port
        settle()
        return None

    def stop(self, grace: float | None = None) -> bool:
        if self.running is not None:
            self.running.stop(grace)
        return True

    def reload(self) -> None:
        if self.running is not None:
            self.running.reload()

    def check(self) -> None:
        pass  # the worker is this process


class _Spawned:
    """N worker processes binding the port the supervisor holds with SO_REUSEPORT, each also on its own port."""

    def __init__(self, settings: Settings, ctx: Any, port: int, worker_ports: tuple[int, ...]) -> None:
        self.settings = settings.with_overrides(listen=str(parse_address(settings.server.listen).with_port(port)))
        self.port = port
        self.worker_ports = worker_ports
        self.ctx = ctx
        self.procs: list[Any] = []
        self._ready: Any = None  # the workers' "started" queue: (index, None or why it failed)
        self._restarts: list[Restarts] = []  # per worker
        self._stopping = False

    def _process(self, index: int) -> Any:
        return self.ctx.Process(target=_worker, args=(self.settings, self._ready, index, self.worker_ports),
                                name=f"resolver-worker-{index}")

    def start(self) -> str | None:
        self._ready = self.ctx.Queue()
        count = self.settings.server.workers
        self.procs = [self._process(i) for i in range(count)]
        self._restarts = [Restarts() for _ in range(count)]
        with sighup_blocked():  # each worker takes SIGHUP once its handler is in place
            for p in self.procs:
                p.start()
        failures = [err for _, err in (self._ready.get(timeout=60) for _ in self.procs) if err]
        return f"a worker failed to start: {failures[0]}" if failures else None

    def check(self) -> None:
        """Restart a worker that died (kill -9, the OOM killer), on its own ports, after a growing backoff, at most
        MAX_RESTARTS times in a row (resolver.restarts). Its replacement opens the store, which frees the LMDB
        reader slots the dead one held (resolver.store: a stale slot pins old pages, so the file would grow);
        worker 0 also brings the sweepers back. Never blocks: a replacement's start-up is logged when it reports."""
        while True:
            try:
                index, error = self._ready.get_nowait()
            except queue.Empty:
                break
            if error:
                log.error("worker %d failed to restart: %s", index, error)
            else:
                log.info("worker %d restarted (pid %d)", index, self.procs[index].pid)
        for index, p in enumerate(self.procs):
            policy = self._restarts[index]
            if self._stopping or p.is_alive():
                policy.running()
                continue
            if policy.pending:
                if policy.due():
                    self.procs[index] = self._process(index)
                    policy.started()
                    with sighup_blocked():
                        self.procs[index].start()
                continue
            if policy.gave_up:
                continue  # the other workers serve the port
            delay = policy.died()
            if delay is None:
                log.error("worker %d (pid %s) died (exit code %s) %d times in a row: not restarting it; the other "
                          "workers serve the port", index, p.pid, p.exitcode, policy.failures)
                continue
            log.error("worker %d (pid %s) died unexpectedly (exit code %s); restarting it in %gs (restart %d of at "
                      "most %d in a row)", index, p.pid, p.exitcode, delay, policy.failures, policy.max_restarts)

    def stop(self, grace: float | None = None) -> bool:
        self._stopping = True  # no restart from here on
        if grace == 0:
            for p in self.procs:
                p.terminate()
            return False
        for p in self.procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each worker drains gracefully
        limit = self.settings.server.grace_period_s + 10
        for p in self.procs:
            p.join(limit)
            if p.is_alive():  # wedged: never leave it for multiprocessing's unbounded join at exit
                log.error("worker %s did not stop within %.0fs of SIGTERM; killing it", p.name, limit)
                p.kill()
                p.join(5)
        return all(p.exitcode == 0 for p in self.procs)

    def reload(self) -> None:
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGHUP)


@contextmanager
def _events_process(settings: Settings, ctx: Any) -> Iterator[tuple[Settings, EventsProcess | None, str]]:
    """The events process for `serve` (None with events off), the settings with the webhook port pinned (port 0
    picks one here, held with SO_REUSEPORT so a restarted child binds the same one), and the announce suffix."""
    if not settings.events.enabled:
        yield settings, None, ""
        return
    if not settings.events.http_listen:
        yield settings, EventsProcess(settings, ctx), ""
        return
    http = parse_address(settings.events.http_listen)
    with ExitStack() as stack:
        try:
            http_port = stack.enter_context(reserve_port(settings.events.http_listen))
        except OSError as exc:
            raise OSError(f"cannot listen for webhooks on {settings.events.http_listen}: {exc.strerror}") from None
        pinned = settings.with_overrides(http_listen=str(http.with_port(http_port)))
        scheme = "https" if settings.tls.enabled else "http"
        yield pinned, EventsProcess(pinned, ctx), f", webhooks on {scheme}://{http.host}:{http_port}"


def _start_failed(what: str) -> int:
    print(f"resolver: {what}", file=sys.stderr)
    return 1


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name could resolve anywhere: not loopback


def _exposure(settings: Settings) -> str | None:
    """What `serve` would expose off loopback without TLS and tokens (None: nothing)."""
    listening = [settings.server.listen]
    if settings.events.enabled and settings.events.http_listen:
        listening.append(settings.events.http_listen)
    if settings.metrics.listen:
        listening.append(settings.metrics.listen)
    exposed = [a for a in listening if not _loopback(parse_address(a).host)]
    missing = [what for what, on in (("TLS", settings.tls.enabled), ("tokens", settings.auth.enabled)) if not on]
    if not exposed or not missing:
        return None
    return f"serving {' and '.join(exposed)} off loopback without {' and '.join(missing)}"


def _unreadable_secrets(settings: Settings) -> str | None:
    """The secret references of sources and outbound destinations that could not be read (None: none)."""
    unread = [f"source {s.name} ({', '.join(s.unresolved)})" for s in settings.sources.values() if s.unresolved]
    unread += [f"outbound {d.name} ({', '.join(d.unresolved)})" for d in settings.outbound.values() if d.unresolved]
    return f"the secrets of {' and '.join(unread)} cannot be read" if unread else None


def secure_by_default(settings: Settings) -> str | None:
    """Contract §8: the one sentence `serve` refuses to start with (None: it may start). With `[server] insecure =
    true`, None, after one warning that says what is allowed."""
    exposure, secrets = _exposure(settings), _unreadable_secrets(settings)
    if settings.server.insecure:
        relaxed = ", ".join(x for x in (exposure, secrets) if x) or "plaintext off loopback and unread secrets allowed"
        log.warning("[server] insecure = true: %s; never use it in production", relaxed)
        return None
    if exposure:
        return (f"refusing to start: {exposure}; set [tls] cert_file and key_file and [auth] tokens_file, or "
                "[server] insecure = true to allow it")
    if secrets:
        return f"refusing to start: {secrets}; provide them, or set [server] insecure = true to start without them"
    return None


def _shutdown(workers: _Workers, children: list[EventsProcess]) -> int:
    """The one stop sequence: webhook intake, then the gRPC side drains, then the events process and the outbound
    process; exit code."""
    for child in children:
        child.stop_intake()
    clean = workers.stop()
    codes = [child.stop() for child in children]
    return 0 if clean and not any(codes) else 1


def serve(settings: Settings, announce: Callable[[str], Any] = print) -> int:
    """Serve until SIGTERM/SIGINT (SIGHUP reloads); the exit code (1: the start-up was refused or failed). One
    worker runs in this process; more are spawned processes. With events enabled, the webhook endpoint and the
    applier run in the events process (restarted if it dies)."""
    refusal = secure_by_default(settings)
    if refusal is not None:
        return _start_failed(refusal)
    if settings.tls.enabled:
        read_material(settings.tls)  # a file that cannot serve is a ConfigError naming it, before anything starts
    ctx = multiprocessing.get_context("spawn")
    listen = parse_address(settings.server.listen)
    with ExitStack() as stack:
        stack.enter_context(datalock.serving(settings.server.data_dir))  # `resolver compact` refuses while held
        signals = _Signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        stack.callback(signals.close)
        # Metrics: the run's directory, exported before any child is spawned (each one inherits it), and the
        # endpoint, here in the supervisor (resolver.metrics says why), bound now: a port in use stops the start-up.
        directory = stack.enter_context(metrics.exported(settings))
        endpoint = MetricsEndpoint(settings, directory) if directory else None
        if endpoint is not None:
            stack.callback(endpoint.stop)
        pinned, events, hooks = stack.enter_context(_events_process(settings, ctx))
        outbound = OutboundProcess(pinned, ctx) if settings.outbound else None
        # a cluster node applies the log in its one worker, which answers the writes of its events and deliveries
        # too (a second applier would take some of their answers): they run there as threads, not as children
        children = [child for child in (events, outbound) if child is not None and not settings.cluster.nats]
        workers: _Workers
        if settings.server.workers == 1:
            workers = _InProcess(pinned)
        else:
            port = stack.enter_context(reserve_port(settings.server.listen))
            base = settings.server.worker_port_base
            own = tuple(stack.enter_context(reserve_port(str(listen.with_port(base + i if base else 0))))
                        for i in range(settings.server.workers))
            workers = _Spawned(pinned, ctx, port, own)
        for child in children:
            child.launch()  # starts beside the gRPC side; waited for below
        try:
            failed = workers.start()
        except BaseException:
            for child in children:
                child.stop()
            raise
        for child in children:
            try:
                if failed is None:
                    child.wait_ready()
            except EventsProcessError as exc:
                failed = f"{child.what} failed to start: {exc}"
        if failed is not None:  # nothing was served: no drain, no intake to close
            workers.stop(grace=0)
            for child in children:
                child.stop()
            return _start_failed(failed)
        scrape = ""
        if endpoint is not None:
            local = workers.running if isinstance(workers, _InProcess) else None  # its store, or one of its own
            endpoint.serve(local.service.store if local is not None else None)
            scrape = f", metrics on {endpoint.url}"
        count = settings.server.workers
        own_ports = f" on ports {', '.join(map(str, workers.worker_ports))}" if isinstance(workers, _Spawned) else ""
        tls = (", mTLS" if settings.tls.client_ca_file else ", TLS") if settings.tls.enabled else ""
        announce(f"resolver: serving on {listen.host}:{workers.port} ({count} worker{'s' if count > 1 else ''}"
                 f"{own_ports}, data {settings.server.data_dir}{tls}){hooks}{scrape}")

        def check_children() -> None:  # restart a worker or a child that died
            workers.check()
            for child in children:
                child.check()

        while (signum := signals.wait(check_children)) == signal.SIGHUP:
            log.info("SIGHUP: reloading certificates, tokens and webhook secrets in %d worker(s)%s", count,
                     "".join(f", {child.what}" for child in children))
            workers.reload()
            for child in children:
                child.reload()
            if endpoint is not None:
                endpoint.reload()
        log.info("signal %d: shutting down %d worker(s) (grace %.1fs)", signum, count, settings.server.grace_period_s)
        if endpoint is not None:
            endpoint.stop()  # first: no scrape reads a store that is being closed
        return _shutdown(workers, children)
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions
