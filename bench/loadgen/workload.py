"""Scenarios: what each request is. Built inside a client process from a picklable spec.

- `health`: grpc.health.v1 Check (the transport floor: the cheapest call the same server answers).
- `call-setup`: Resolve requests replayed from the dataset's lookup mix (proto3 JSON ResolveRequest lines).
- `crm-sync`: Upserts from the dataset's update mix, each with a fresh idempotency key; 5% are retries that
  re-send an earlier (key, request) pair unchanged, as a CRM connector does after a timeout.
- `mixed`: 95% call-setup, 5% crm-sync.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from resolver.v1 import resolver_pb2 as pb

SCENARIOS = ("health", "call-setup", "crm-sync", "mixed")
HEALTH = "/grpc.health.v1.Health/Check"
RESOLVE = "/resolver.v1.IdentityResolver/Resolve"
UPSERT = "/resolver.v1.IdentityResolver/Upsert"
# method -> (serializer, deserializer)
CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    HEALTH: (health_pb2.HealthCheckRequest.SerializeToString, health_pb2.HealthCheckResponse.FromString),
    RESOLVE: (pb.ResolveRequest.SerializeToString, pb.ResolveResponse.FromString),
    UPSERT: (pb.UpsertRequest.SerializeToString, pb.UpsertResponse.FromString),
}
RETRY_SHARE = 0.05
CRM_SHARE = 0.05


@dataclass(frozen=True)
class Data:
    """Where the dataset's request mixes are (written by bench/dataset.py)."""

    queries: str = ""  # JSONL of ResolveRequest (proto3 JSON)
    upserts: str = ""  # JSONL of UpsertRequest without idempotency keys


def resolve_request(d: dict[str, Any]) -> pb.ResolveRequest:
    """A ResolveRequest from its proto3 JSON dict (the few fields the lookup mix uses; fast path)."""
    ids = d.get("identifiers", {})
    return pb.ResolveRequest(
        identifiers=pb.Identifiers(external_id=ids.get("externalId", ""), emails=ids.get("emails", ()),
                                   phones=ids.get("phones", ())),
        default_region=d.get("defaultRegion", ""),
    )


def _lines(path: str, part: int, parts: int) -> list[str]:
    """Every `parts`-th non-blank line starting at `part`, so client processes replay different requests."""
    if not path:
        raise ValueError("this scenario needs the dataset's request mix (--queries / --upserts)")
    with Path(path).open(encoding="utf-8") as f:
        lines = [line for i, line in enumerate(f) if i % parts == part and line.strip()]
    if not lines:
        raise ValueError(f"{path}: no requests for client {part} of {parts}")
    return lines


def _resolves(data: Data, part: int, parts: int) -> Iterator[tuple[str, Any]]:
    reqs = [resolve_request(json.loads(line)) for line in _lines(data.queries, part, parts)]
    return ((RESOLVE, r) for r in itertools.cycle(reqs))


def _upserts(data: Data, part: int, parts: int, run_id: str, seed: int) -> Iterator[tuple[str, Any]]:
    # Parsed now, not at the first Upsert sent: a generator's body runs at its first next(), and parsing a
    # client's share of the templates there stalled that client's whole timeline for 1-2 s inside the first
    # window with writes (every later send late, counted as latency: bench.run's "mixed collapse").
    templates = [json_format.Parse(line, pb.UpsertRequest()) for line in _lines(data.upserts, part, parts)]
    return _upsert_stream(templates, run_id, part, seed)


def _upsert_stream(templates: list[pb.UpsertRequest], run_id: str, part: int, seed: int) -> Iterator[tuple[str, Any]]:
    rng = random.Random(seed)
    sent: list[pb.UpsertRequest] = []
    for i in itertools.count():
        if sent and rng.random() < RETRY_SHARE:
            yield UPSERT, rng.choice(sent[-1000:])  # the same key and request again: a replay
            continue
        req = pb.UpsertRequest()
        req.CopyFrom(templates[i % len(templates)])
        req.idempotency_key = f"bench-{run_id}-{part}-{i}"
        sent.append(req)
        if len(sent) > 2000:
            del sent[:1000]
        yield UPSERT, req


def requests(scenario: str, data: Data, *, part: int = 0, parts: int = 1, run_id: str = "0",
             seed: int = 0) -> Iterator[tuple[str, Any]]:
    """An endless stream of (method, request) for one client process."""
    if scenario == "health":
        req = health_pb2.HealthCheckRequest(service="")
        return itertools.repeat((HEALTH, req))
    if scenario == "call-setup":
        return _resolves(data, part, parts)
    if scenario == "crm-sync":
        return _upserts(data, part, parts, run_id, seed)
    if scenario == "mixed":
        resolves, upserts = _resolves(data, part, parts), _upserts(data, part, parts, run_id, seed)
        rng = random.Random(seed + 1)
        return (next(upserts) if rng.random() < CRM_SHARE else next(resolves) for _ in itertools.count())
    raise ValueError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
