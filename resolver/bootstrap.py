"""The composition root: the one place that builds the application from a validated Settings.

    Settings -> Store -> Service (use cases, the writer thread) -> Events (admission, applier)
             -> servicers -> gRPC server (health, reflection) -> Running

Every entry point builds what it needs here: `resolver serve` and its workers (resolver.server), the events
process, `import`, `check`, `dlq`, the tests and the benches. A cross-cutting part (TLS, auth, metrics) is
wired in here once, not in each of them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from resolver.address import parse_address
from resolver.attributes import AttributeSchema
from resolver.config import Settings
from resolver.identifiers import policy_from
from resolver.reload import Reloadable, reload_all
from resolver.service import Service
from resolver.store import Store
from resolver.writer import Writer

# gRPC, the servicers and the events runtime (aiohttp) are imported by the functions that build them: the
# commands that only need the store (import, check) and the events process start without loading gRPC.
if TYPE_CHECKING:
    import grpc
    from grpc_health.v1 import health

    from resolver.api.backlog import Gate
    from resolver.cluster.lease import Lease
    from resolver.cluster.retention_publisher import RetentionPublisher
    from resolver.events.runtime import Events
    from resolver.outbound.deliverer import Deliverer


def open_store(settings: Settings, *, readonly: bool = False, durable: bool = True) -> Store:
    """The LMDB store named in `settings` alone (`resolver check`, inspection); the caller closes it.
    `readonly=True` creates nothing: StoreError if there is no store there. `durable=False`: commits are not
    synced (an initial load's staging copy only: resolver.importer.staged)."""
    return Store(settings, readonly=readonly, durable=durable)


def build_service(settings: Settings, *, writer: bool = True, readonly: bool = False, outbox: bool = True,
                  durable: bool = True) -> Service:
    """Open the store named in `settings` and the use cases over it; the caller closes the service.

    `writer=False`: no writer thread (a bulk loader commits its own transactions; Upsert and Merge then raise).
    `readonly=True` opens LMDB read-only (and implies no writer).
    `outbox`: with `[outbound]` destinations, every change this process commits queues its outbound messages in
    the same transaction (resolver.outbound.outbox); `resolver import` says False: an initial load is not sent.
    `durable`: as open_store's.
    """
    store = open_store(settings, readonly=readonly, durable=durable)
    if outbox and settings.outbound and not readonly:
        from resolver.outbound.outbox import Outbox

        store.change_listeners.append(Outbox(settings))
    try:
        return Service(settings, store, AttributeSchema(settings), policy_from(settings),
                       _writer(store, settings) if writer and not readonly else None)
    except BaseException:
        store.close()
        raise


def _writer(store: Store, settings: Settings) -> Writer:
    """The store's writer: commands applied here directly, or, with `[cluster] nats`, through the replicated log
    (resolver.cluster: same interface; this node's applier starts with it)."""
    if not settings.cluster.nats:
        return Writer(store)
    from resolver.cluster.writer import ReplicatedWriter

    return cast(Writer, ReplicatedWriter(store, settings))  # Writer's interface: submit, submit_nowait, close


def _cluster_lease(service: Service) -> Lease:
    """A cluster node's one election (resolver.cluster.lease): its holder delivers the outbound messages and
    publishes change-log retention."""
    from resolver.cluster.lease import Lease
    from resolver.cluster.writer import ReplicatedWriter

    writer = cast(ReplicatedWriter, service.writer)
    return Lease(writer.log, service.settings.cluster, lambda: writer.position)


def _cluster_deliverer(service: Service, lease: Lease) -> Deliverer:
    """A cluster node's deliverer: its decisions go through the replicated log (every node's outbox follows them),
    and it sends only while this node holds `lease`."""
    from resolver.outbound.deliverer import Deliverer

    return Deliverer(service.store, service.settings, writer=service.writer, turn=lease)


def _cluster_retention(service: Service, lease: Lease | None) -> RetentionPublisher | None:
    """With `[changes]` retention, a cluster node's publisher of its cutoffs (resolver.cluster.retention), started,
    sharing `lease` with the deliverer (a lease of its own if None); None without retention."""
    from resolver.cluster.retention_publisher import RetentionPublisher
    from resolver.cluster.writer import ReplicatedWriter
    from resolver.retention import configured

    if not configured(service.settings.changes):
        return None
    writer = cast(ReplicatedWriter, service.writer)
    publisher = RetentionPublisher(service.store, service.settings, writer, lease or _cluster_lease(service))
    publisher.start()
    return publisher


def build_events(service: Service) -> Events:
    """The events subsystem over `service` (nothing started: `Events.start` says which parts run here)."""
    from resolver.events.runtime import Events

    return Events(service)


@dataclass(frozen=True)
class WorkerPorts:
    """`resolver serve`'s workers' own ports (worker i on ports[i], beside the shared port), and which worker
    this is: served by GetServerInfo so a client can spread one channel over all the workers."""

    ports: tuple[int, ...]
    index: int


@dataclass
class Running:
    """A gRPC server serving in this process, and what it serves."""

    server: grpc.Server
    service: Service
    health: health.HealthServicer
    port: int
    events: Events | None = None
    deliverer: Deliverer | None = None  # outbound delivery, when it runs in this process (tests, embedding)
    retention: RetentionPublisher | None = None  # a cluster node's change-log retention (where the sweeper runs)
    end_streams: Callable[[], None] | None = None  # ends the calls that never finish by themselves (WatchChanges)
    reloadables: list[Reloadable] = field(default_factory=list)  # what SIGHUP re-reads here (resolver.reload)
    gate: Gate | None = None  # the backlog gate, when grpcio let it attach (resolver.api.backlog)

    @property
    def http_port(self) -> int:
        """The webhook endpoint's port (0: none here)."""
        return self.events.http_port if self.events is not None else 0

    def reload(self) -> list[str]:
        """Re-read every reloadable part (SIGHUP): certificates, tokens, webhook secrets; a part whose files are
        bad keeps what it had (logged). The failures, as "WHAT: REASON"."""
        return reload_all(self.reloadables)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING and webhook intake closed; calls still taken for the notice (`[server]
        shutdown_notice_s`, at most half of `grace`), then in-flight calls finish within the rest of `grace`
        (default: the blueprint's grace period), then the events parts after their current batch, then storage."""
        server = self.service.settings.server
        grace = server.grace_period_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self.end_streams is not None:  # else a change-feed watcher holds the drain for the whole grace period
            self.end_streams()
        if self.events is not None:
            self.events.stop_intake()
        # Health says NOT_SERVING while calls are still answered, so the clients and load balancers that watch or
        # poll it move their calls away before the port closes, instead of learning it from refused calls.
        notice = min(server.shutdown_notice_s, grace / 2)
        if notice > 0:
            time.sleep(notice)
        self.server.stop(grace - notice).wait()
        if self.events is not None:
            self.events.stop()
        if self.deliverer is not None:
            self.deliverer.stop()
        if self.retention is not None:  # after the deliverer: it gave up the lease they share (closing it again is nothing)
            self.retention.stop()
        self.service.close()


def build_server(settings: Settings, *, sweeper: bool = True, applier: bool | None = None,
                 events_in_process: bool = True, worker_ports: WorkerPorts | None = None,
                 deliverer: bool | None = None) -> Running:
    """Open the store and serve on `server.listen` in this process (port 0 picks a free port).

    With events enabled, gRPC IngestEvents and the DLQ RPCs are served here. `events_in_process=True` (tests,
    embedding): the webhook endpoint starts here too, as a thread, and the applier runs where the sweeper runs
    (one per data directory) unless `applier` says otherwise. `events_in_process=False` (the workers of
    `resolver serve`): neither runs here (no applier unless `applier=True`); the events process has them.
    `worker_ports`: this worker also listens on its own port, and GetServerInfo names every worker's.
    `deliverer`: run outbound delivery here, as a thread (one per data directory; default: with
    `events_in_process` where the sweeper runs; `resolver serve` runs it in a process of its own).
    """
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from resolver.api import handlers
    from resolver.api.admission import Admission, HandlerPool
    from resolver.api.backlog import gate_server
    from resolver.api.interceptors import CallInterceptor
    from resolver.api.self_decoding import SelfDecoding
    from resolver.api.servicer import IdentityResolverServicer
    from resolver.auth import TokenSet
    from resolver.v1 import resolver_pb2

    service_descriptor = resolver_pb2.DESCRIPTOR.services_by_name["IdentityResolver"]
    service_name = service_descriptor.full_name
    # What SIGHUP re-reads in this process (Running.reload): every part that keeps a file in memory joins here.
    reloadables: list[Reloadable] = []
    tls = None
    if settings.tls.enabled:  # read and checked before anything opens: a bad file is a ConfigError naming it
        from resolver.tls import GrpcTls

        tls = GrpcTls(settings.tls)
        reloadables.append(tls)
    tokens = TokenSet(settings.auth.tokens_file) if settings.auth.enabled else None  # a bad file: ConfigError
    if tokens is not None:
        reloadables.append(tokens)
    service = build_service(settings)
    events = build_events(service) if settings.events.enabled else None
    limits = settings.limits
    sys.setswitchinterval(settings.server.switch_interval_ms / 1000)  # the polling thread's turn (ServerSettings)
    pool = HandlerPool(settings.server.threads)  # knows its queue's wait: past the admission limit, refused at once
    server = grpc.server(
        pool,
        maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
        # admission, auth, request ids, access log; not health
        # (health and reflection decode their requests in the call: SelfDecoding)
        interceptors=[CallInterceptor(service_name, tokens, Admission(pool, settings.server.max_queue_wait_ms)),
                      SelfDecoding()],
        # gRPC refuses larger messages and metadata itself (RESOURCE_EXHAUSTED) before reading them; the soft
        # and hard metadata limits are one, so the answer does not depend on chance between the two.
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", limits.message_bytes),
                 ("grpc.max_metadata_size", limits.metadata_bytes),
                 ("grpc.absolute_max_metadata_size", limits.metadata_bytes),
                 # the backlog gate's bounds on calls waiting in gRPC's core (resolver.api.backlog)
                 ("grpc.server_max_unrequested_time_in_server", settings.server.max_backlog_s),
                 # soft limit = hard limit: no random early drop, so a burst within the bound is never dropped
                 ("grpc.server.max_pending_requests", settings.server.max_backlog_calls),
                 ("grpc.server.max_pending_requests_hard_limit", settings.server.max_backlog_calls)],
    )
    # the API's calls past the pool's room wait in gRPC's core (resolver.api.backlog)
    gate = gate_server(server, pool, (f"/{service_name}/{method.name}" for method in service_descriptor.methods),
                       settings.server)
    info = (resolver_pb2.ServerInfo(worker_ports=worker_ports.ports, worker_index=worker_ports.index)
            if worker_ports is not None else resolver_pb2.ServerInfo())
    servicer = IdentityResolverServicer(service, events, info)
    handlers.register(server, servicer, limits)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    listen = [settings.server.listen]
    if worker_ports is not None:
        listen.append(str(parse_address(settings.server.listen).with_port(worker_ports.ports[worker_ports.index])))
    try:
        port, *_ = [server.add_secure_port(address, tls.credentials()) if tls is not None
                    else server.add_insecure_port(address) for address in listen]
    except RuntimeError as exc:
        service.close()
        raise OSError(f"cannot listen on {' and '.join(listen)}: {exc}") from None
    if events is not None:
        try:
            if events_in_process:
                events.start(applier=sweeper if applier is None else applier)
            else:
                events.start(applier=bool(applier), http=False)
        except BaseException:
            events.stop()
            service.close()
            raise
    outbound = None
    lease = None
    if settings.outbound and (events_in_process and sweeper if deliverer is None else deliverer):
        from resolver.outbound.deliverer import Deliverer

        lease = _cluster_lease(service) if settings.cluster.nats else None
        outbound = Deliverer(service.store, settings) if lease is None else _cluster_deliverer(service, lease)
        outbound.start()
    server.start()
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.cluster.nats:  # a node the stream left behind serves stale data: out of rotation (resolver.cluster)
        from resolver.cluster.writer import on_behind

        def not_serving(_: str) -> None:
            for name in ("", service_name):
                health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        on_behind(service.writer, not_serving)
    retention = None
    if sweeper:
        service.start_sweeper()
        if settings.cluster.nats:  # a cluster's change-log retention is a replicated command, not the sweeper's
            retention = _cluster_retention(service, lease)
    if events is not None:
        reloadables.extend(events.reloadables)
    return Running(server, service, health_servicer, port, events, outbound, retention,
                   end_streams=servicer.end_streams, reloadables=reloadables, gate=gate)
