"""The PostgreSQL peer's gRPC server: resolver.v1 Resolve (same semantics) and grpc.health.v1, served the way
resolver.server serves (grpc.server with a ThreadPoolExecutor of `threads`, SO_REUSEPORT, `workers` processes).

    python -m bench.peers.postgres.server --dsn DSN [--config BLUEPRINT] [--listen 127.0.0.1:PORT] [--workers N]

Each identifier is one prepared, indexed lookup (psycopg 3, one connection per handler thread, autocommit):
external_id by the unique key, emails and phones by their normalized value joined to the customer row. The
precedence (external_id, email, phone), AMBIGUOUS for shared keys (most recently updated first), fan-out limit,
conflicts, skipped identifiers and the view projection follow resolver's contract §3. Only Resolve is served.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from resolver.address import parse_address
from resolver.config import Settings, load_settings
from resolver.identifiers import RawIdentifiers, normalize_identifiers, policy_from
from resolver.v1 import resolver_pb2 as pb
from resolver.v1 import resolver_pb2_grpc

COLUMNS = "c.id, c.uuid::text, c.attrs, c.version, c.updated_at"
QUERIES = {
    pb.MATCH_KIND_EXTERNAL_ID: f"SELECT {COLUMNS} FROM customers c WHERE c.external_id = %s LIMIT %s",
    pb.MATCH_KIND_EMAIL: f"SELECT {COLUMNS} FROM ix_email i JOIN customers c ON c.id = i.customer "
                         "WHERE i.email = %s ORDER BY c.updated_at DESC LIMIT %s",
    pb.MATCH_KIND_PHONE: f"SELECT {COLUMNS} FROM ix_phone i JOIN customers c ON c.id = i.customer "
                         "WHERE i.phone = %s ORDER BY c.updated_at DESC LIMIT %s",
}
Row = tuple[int, str, dict[str, Any], int, int]


class PeerResolver:
    """Resolve over PostgreSQL; no gRPC here (the handler time is measured on this alone)."""

    def __init__(self, dsn: str, settings: Settings) -> None:
        self.dsn = dsn
        self.settings = settings
        self.policy = policy_from(settings)
        self.local = threading.local()
        self.default_fields = settings.views.get("default")

    def _cursor(self) -> psycopg.Cursor[Any]:
        """This thread's cursor on its own connection (autocommit; statements prepared on first use)."""
        cur = getattr(self.local, "cur", None)
        if cur is None:
            conn = psycopg.connect(self.dsn, autocommit=True, prepare_threshold=0)
            cur = self.local.cur = conn.cursor()
        return cur

    def resolve(self, req: pb.ResolveRequest) -> pb.ResolveResponse:
        s = self.settings
        ids = req.identifiers
        raw = RawIdentifiers(ids.external_id, tuple(ids.emails), tuple(ids.phones))
        norm, failures = normalize_identifiers(raw, req.default_region or s.matching.default_region, self.policy, "identifiers")
        resp = pb.ResolveResponse(outcome=pb.OUTCOME_NOT_FOUND)
        for f in failures:
            resp.skipped.add(kind=int(f.kind.value) if hasattr(f.kind, "value") else 0, reason=f.error.reason)
        fields = tuple(req.fields) or (s.views.get(req.view) if req.view else self.default_fields)
        cur = self._cursor()
        limit = s.matching.max_fanout + 1
        kinds = ((pb.MATCH_KIND_EXTERNAL_ID, [norm.external_id] if norm.external_id else []),
                 (pb.MATCH_KIND_EMAIL, norm.emails), (pb.MATCH_KIND_PHONE, norm.phones))
        decided: list[Row] | None = None
        for kind, values in kinds:
            holders: dict[int, Row] = {}
            for value in values:
                rows: list[Row] = cur.execute(QUERIES[kind], (value, limit), prepare=True).fetchall()
                if len(rows) > s.matching.max_fanout:
                    resp.skipped.add(kind=kind, reason="FAN_OUT_LIMIT")
                    continue
                holders.update((r[0], r) for r in rows)
            if not holders:
                continue
            if decided is None:
                decided = sorted(holders.values(), key=lambda r: -r[4])
                if len(decided) == 1:
                    r = decided[0]
                    resp.outcome, resp.customer_uuid, resp.matched_on, resp.version = pb.OUTCOME_MATCHED, r[1], kind, r[3]
                    resp.attributes.CopyFrom(_struct(r[2], fields))
                else:
                    resp.outcome, resp.matched_on = pb.OUTCOME_AMBIGUOUS, kind
                    for r in decided[: s.matching.max_candidates]:
                        resp.candidates.add(customer_uuid=r[1], attributes=_struct(r[2], fields))
            elif resp.outcome == pb.OUTCOME_MATCHED and decided[0][0] not in holders:
                resp.conflicts.extend(r[1] for r in holders.values() if r[1] not in resp.conflicts)
        return resp


def _struct(attrs: dict[str, Any], fields: Sequence[str] | None) -> struct_pb2.Struct:
    st = struct_pb2.Struct()
    st.update({k: v for k, v in attrs.items() if fields is None or k in fields})
    return st


class PeerServicer(resolver_pb2_grpc.IdentityResolverServicer):
    def __init__(self, resolver: PeerResolver) -> None:
        self.resolver = resolver

    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.ResolveResponse:  # noqa: N802
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # as resolver does: no work starts past the deadline
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the work started")
        return self.resolver.resolve(request)


def start(dsn: str, settings: Settings, listen: str) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=settings.server.threads, thread_name_prefix="rpc"),
                         maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs, options=[("grpc.so_reuseport", 1)])
    resolver_pb2_grpc.add_IdentityResolverServicer_to_server(PeerServicer(PeerResolver(dsn, settings)), server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port(listen)
    server.start()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


def _worker(dsn: str, settings: Settings, listen: str, ready: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server, _ = start(dsn, settings, listen)
    ready.put(True)
    stop.wait()
    server.stop(1).wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.postgres.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", required=True)
    p.add_argument("--config", help="blueprint (threads, workers, views, matching)")
    p.add_argument("--listen", default="127.0.0.1:50052")
    p.add_argument("--workers", type=int, help="processes sharing the port (default: the blueprint's)")
    a = p.parse_args(argv)
    settings = load_settings(a.config)
    workers = a.workers or settings.server.workers
    from resolver.server import reserve_port

    ctx = multiprocessing.get_context("spawn")
    with reserve_port(a.listen) as port:
        listen = str(parse_address(a.listen).with_port(port))
        ready = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(a.dsn, settings, listen, ready), name=f"peer-{i}")
                 for i in range(workers)]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=60)
        print(f"peer: serving on {listen} ({workers} workers)", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
