"""One frozen dataclass per blueprint table, each default stated once, here; and the attribute and source specs.

Field names are the blueprint's keys (`[server] listen` is `settings.server.listen`). A table built from
TOML passes only the keys present, so an absent key takes the default below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class AttributeSpec:
    """One declared attribute: its type and constraints, sensitivity and owning source system."""

    name: str
    type: str
    max_length: int | None = None
    min_length: int | None = None
    pattern: str | None = None
    enum: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    input_formats: tuple[str, ...] = ()
    sensitive: bool = False
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A CRM source system: how its field names map to attributes and to identifier kinds, and its webhook
    secrets (resolved).

    `identifiers` maps CRM fields to "phone" or "email" (several fields may map to one kind: each is a slot of
    its own, contract §5); `default_region` reads the national phone numbers this source sends (else the
    server's `matching.default_region`). `secrets` are the raw HMAC keys (a `whsec_<base64>` value is
    decoded); `unresolved` names the references that could not be read at load time (the source's webhooks
    are then refused, 401).
    """

    name: str
    field_map: Mapping[str, str] = field(default_factory=dict)
    identifiers: Mapping[str, str] = field(default_factory=dict)
    default_region: str | None = None
    secrets: tuple[bytes, ...] = field(default=(), repr=False)
    unresolved: tuple[str, ...] = ()


OUTBOUND_EVENTS = ("interaction.recorded", "customer.created", "customer.updated", "customer.merged",
                   "customer.unmerged", "customer.deleted")


@dataclass(frozen=True, slots=True)
class OutboundSpec:
    """`[outbound.NAME]`: a destination of signed webhooks back to the CRM (contract §5b; resolver.outbound).

    `events`: the event types it subscribes to. `fields`: the attributes it is sent (empty: every attribute but
    the sensitive ones); customer.updated is sent only when one of them changed. `source_system`: the source
    this destination is (default: NAME); changes that came from it are not echoed back. `rate_per_s` 0: no
    limit. A message older than `max_age_s` is dead-lettered. `secrets` sign every message (a `whsec_` value is
    decoded; several: one signature each, for rotation); `unresolved` as for SourceSpec (nothing is sent then).
    Across destinations the deliverer also follows the events applier's adaptive pace (`[events] rate_per_s`,
    `min_rate_per_s`, `idle_cpu`, `busy_cpu`: one rule for the server's background work).
    """

    name: str
    url: str
    events: tuple[str, ...] = OUTBOUND_EVENTS
    fields: tuple[str, ...] = ()
    source_system: str = ""
    rate_per_s: float = 100.0
    max_age_s: float = 24 * 3600.0
    timeout_s: float = 10.0
    concurrency: int = 16  # customers in flight at once (each customer's messages go one at a time)
    backoff_initial_s: float = 1.0  # the first retry's delay (5xx, timeouts, resets), doubled per attempt ...
    backoff_max_s: float = 300.0  # ... up to this, each with jitter (a random 50-100% of it)
    secrets: tuple[bytes, ...] = field(default=(), repr=False)
    unresolved: tuple[str, ...] = ()


def _one_worker_per_core() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """`[server]`: the gRPC endpoint, the data directory and the serving processes."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("./data")
    workers: int = field(default_factory=_one_worker_per_core)
    threads: int = 16
    # Calls in progress per worker (any service, streams included) past which gRPC itself refuses a new one,
    # RESOURCE_EXHAUSTED with no details: the cheapest refusal there is (no handler thread, no Python call
    # object), the bound that holds when even refusing by max_queue_wait_ms falls behind (resolver.api.admission).
    max_concurrent_rpcs: int = 128
    # Admission (resolver.api.admission): while the oldest call of the API waiting for a handler thread of a worker
    # has waited this long, that worker refuses new calls at once, RESOURCE_EXHAUSTED (OVERLOADED) with RetryInfo,
    # instead of queueing them until their deadlines. Health checks are never refused by it.
    max_queue_wait_ms: float = 50.0
    # The backlog gate (resolver.api.backlog): once a worker's handler pool holds `threads + max_queued_calls` calls
    # of the API, it leaves further calls waiting in gRPC's core (no Python spent on them) until one finishes. gRPC
    # drops a new call of a method with `max_backlog_calls` already waiting, and ends one
    # that waited past its deadline or `max_backlog_s` (whole seconds, gRPC's granularity); either way the client
    # sees CANCELLED. Once calls have waited there `max_queue_wait_ms`, the worker refuses at most `refusal_share`
    # of a call (OVERLOADED, RetryInfo) per call it answers: what refusing costs stays a bounded share of the CPU
    # the answers need.
    max_queued_calls: int = 4
    max_backlog_calls: int = 128
    max_backlog_s: int = 1
    refusal_share: float = 0.1
    # How long a worker thread may hold the GIL while another waits for it (sys.setswitchinterval; Python's default
    # is 5 ms). grpcio's one polling thread needs the GIL between every step of every call (taking a call,
    # handing it its request, finishing it); with the handler threads busy it waits a whole interval each time,
    # so under overload a worker answered a small fraction of what it answers at its knee (bench/README.md).
    switch_interval_ms: float = 0.5
    # Each of several workers also listens on a port of its own, so a client's one channel can spread its calls
    # over all of them (round_robin; GetServerInfo names the ports): worker i on worker_port_base + i, or on a
    # free port chosen at start when 0.
    worker_port_base: int = 0
    grace_period_s: float = 5.0
    # SIGTERM: for the first shutdown_notice_s of the grace period (at most half of it) health answers NOT_SERVING
    # while calls are still taken, so load balancers and clients watching health move away before the port closes.
    shutdown_notice_s: float = 1.0
    # Secure by default (contract §8): off loopback, `serve` refuses to start without TLS and tokens, and any
    # secret reference that does not resolve stops the start-up. True (the demo, a lab) allows both, with one
    # warning at start-up.
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """`[tls]`: TLS 1.2+ on the gRPC port and the webhook endpoint ("" : plaintext). `client_ca_file`: mTLS,
    client certificates required and verified against it. Re-read on SIGHUP (resolver.tls)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """`[auth]`: bearer tokens with scopes (resolver.auth). `tokens_file`: one `NAME SCOPES sha256:HEX` per line
    ("" : no token is asked for). Re-read on SIGHUP."""

    tokens_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file)


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    """One AES-256 key of `[encryption] keys`: its id (stored beside each ciphertext) and its 32 bytes."""

    id: str
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EncryptionSettings:
    """`[encryption]`: the keys sensitive attributes are encrypted with (AES-256-GCM, resolver.crypto): the first
    encrypts, all decrypt (rotation: put the new key first, run `resolver rekey`, then drop the old one)."""

    keys: tuple[EncryptionKey, ...] = ()


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """`[storage]`: the LMDB environment, and how often expired ledger entries are swept."""

    map_size_mb: int = 64 * 1024
    max_readers: int = 1024
    sweep_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class IndexSettings:
    """`[index]`: how identifiers become index keys."""

    hash: str = "xxh3-128"
    key_id: str = ""
    secret: bytes | None = field(default=None, repr=False)  # read from its env/file reference at load time


@dataclass(frozen=True, slots=True)
class MatchingSettings:
    """`[matching]`: which keys select a record on write, phone parsing, and the limits of a probe."""

    write_keys: tuple[str, ...] = ("external_id", "email")
    default_region: str | None = None
    phone_acceptance: str = "valid"
    max_fanout: int = 25
    max_candidates: int = 10
    blocked_values: frozenset[str] = frozenset()
    blocked_patterns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReliabilitySettings:
    """`[reliability]`: the load the deployment expects, and how long an idempotency key is remembered."""

    peak_rps: float = 2000.0
    latency_target_ms: float = 1.0
    idempotency_retention_s: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """`[limits]`: what one request may hold (contract §8b), checked before any work is done for it.

    A request over a limit is refused whole (INVALID_ARGUMENT naming the limit as `limits.KEY`); a message
    or metadata over its size is refused by gRPC itself before it is read (RESOURCE_EXHAUSTED).
    """

    message_bytes: int = 1024 * 1024  # one request message (a ResolveStream item, an IngestEvents body + headers)
    metadata_bytes: int = 8 * 1024  # a call's request metadata, names and values together
    identifiers_per_request: int = 100  # external_id + emails + phones, in each identifier set of a request
    identifiers_per_customer: int = 100  # emails + phones one customer may hold after an Upsert
    attributes_per_request: int = 100  # attribute keys of an Upsert, fields of a Resolve
    items_per_list: int = 1000  # any other repeated field or map (merged_uuids, headers, a list value)
    string_chars: int = 4096  # any one string: an identifier, a key, an attribute value
    struct_depth: int = 4  # nesting of attribute values (a scalar is depth 1)


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """`[logging]`: the level; `format` "json" (one object per line), "text", or "auto" (json unless stderr is a
    terminal); `payload` "masked" (identifiers and values appear masked) or "none" (not even masked)."""

    level: str = "INFO"
    payload: str = "masked"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class EventSettings:
    """`[events]`: CRM change events (contract §5): the HTTP endpoint, admission and the applier's pace.

    The applier's pace adapts (resolver.events.pace): `rate_per_s` events per second while the serving processes
    (the gRPC workers) use at most `idle_cpu` of the machine's CPU, `min_rate_per_s` once they use `busy_cpu` or
    more, geometric in between (each step of load divides the rate by the same factor). The floor keeps the inbox
    draining under a server that is never idle; a `min_rate_per_s` at or above `rate_per_s` gives a fixed pace of
    `rate_per_s`, and a `busy_cpu` at or below `idle_cpu` a step at `busy_cpu`. A full inbox paces intake to the
    applier (429 with the delay of its current pace), so the pace also caps what a bulk push costs Resolve.
    The figures behind these defaults, `commit_window_ms` and the process priority are in bench/README.md.
    """

    enabled: bool = False  # the loader turns it on when a source is declared: no source, no port opened
    http_listen: str = "127.0.0.1:8081"  # "" : no HTTP endpoint (gRPC IngestEvents only)
    rate_per_s: float = 2000.0  # the ceiling: applied per second while the serving processes are idle
    min_rate_per_s: float = 100.0  # the floor: applied per second while they are busy (at most rate_per_s)
    idle_cpu: float = 0.03  # serving processes' share of the machine's CPU (0-1) at or below which: rate_per_s
    busy_cpu: float = 0.15  # ... at or above which: min_rate_per_s
    batch: int = 100  # events per applier write transaction
    high_water: int = 10_000  # inbox entries above which admission answers 429 / RESOURCE_EXHAUSTED
    timestamp_tolerance_s: float = 300.0  # webhook-timestamp skew accepted, past and future
    unknown_record_wait_s: float = 30.0  # an UPDATE/DELETE for a record nobody holds waits this long for its CREATE
    max_body_bytes: int = 256 * 1024
    commit_window_ms: float = 5.0  # admissions within it share one synced commit, at most this much added to a 202
    process_nice: int = 10  # the events process yields the CPU to the serving workers (os.nice increment)
    process_sched_idle: bool = True  # ... and runs only on CPU they leave: a waking worker preempts it at once


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """`[metrics]`: Prometheus metrics (resolver.metrics). `listen`: where `resolver serve` answers `GET /metrics`
    ("" : no endpoint, and nothing is recorded). Like the gRPC port: HTTPS with [tls]'s certificate, a bearer token
    with the `metrics` scope when [auth] is on, and off loopback only with both (or `[server] insecure = true`)."""

    listen: str = ""


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """`[cluster]`: writes through a replicated log (contract §10; resolver.cluster). `nats`: the NATS servers'
    URLs (empty: one machine, writes applied directly). Every write is published to the JetStream stream `stream`
    (created with `replicas` copies, its commands kept `stream_max_age_s` and at most `stream_max_mb`, retries
    de-duplicated within `dedupe_window_s`); this node applies the stream to its own store, and a write is
    answered once applied here, or UNAVAILABLE after `apply_timeout_s` (retried with the same key, it is not
    applied twice).

    Reads (resolver.cluster.reads): a read with `min_sequence` waits for this node to apply it at most `read_wait_s`
    (and within its deadline); a node more than `max_lag` commands behind the stream's last sequence, or whose
    applier has not heard from the stream for `max_silence_s` (0: no such limit), refuses reads (NODE_BEHIND).

    Outbound delivery (resolver.cluster.lease): one node at a time delivers, the one holding a lease of `lease_s`
    seconds in the JetStream key-value bucket `<stream>-leases`; it renews it four times per `lease_s` and stops
    sending once half of it passed without a renewal, so it stops before another node can take the lease over."""

    nats: tuple[str, ...] = ()
    stream: str = "resolver"
    replicas: int = 3
    stream_max_age_s: float = 7 * 86400.0
    stream_max_mb: int = 1024
    dedupe_window_s: float = 120.0
    apply_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    read_wait_s: float = 2.0
    max_lag: int = 1000
    max_silence_s: float = 10.0
    lease_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ChangeSettings:
    """`[changes]`: the change log's retention and the change feed (WatchChanges; resolver.feed, resolver.retention).

    Retention, applied by the sweeper every `storage.sweep_interval_s` (on a cluster, as a command published by the
    lease holder: resolver.cluster.retention): entries older than `retention_days` and
    entries beyond the newest `retention_count` are deleted, whichever removes more (unset: no such limit; both
    unset: the log is kept whole). The newest entry is always kept. `max_watchers`: WatchChanges calls served at
    once by each serving process (RESOURCE_EXHAUSTED beyond). `stall_timeout_s`: a watcher whose client has not
    taken an event for this long while one waits to be sent is cut off (RESOURCE_EXHAUSTED).
    """

    retention_days: float | None = None
    retention_count: int | None = None
    max_watchers: int = 8
    stall_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class InteractionSettings:
    """`[interactions]`: RecordInteraction (contract §7; resolver.interactions).

    `last_interaction_attribute`: the attribute set to an interaction's occurred_at when that is later than its value
    (a date-time or date attribute; "": none). Left out, it is "last_interaction_date" when that attribute is
    declared (or no attribute is: the open schema), else "" (the loader decides). `create_customer`: an interaction
    whose identifiers match nobody creates a customer with them, instead of being recorded unassociated.
    `history`: the interactions kept per customer (the oldest dropped beyond it; ListInteractions' largest page).
    """

    create_customer: bool = False
    last_interaction_attribute: str = "last_interaction_date"
    history: int = 100


DEFAULT_SUBJECT = "{channel} interaction - {disposition}"


@dataclass(frozen=True, slots=True)
class ActivitySettings:
    """`[activity]`: the CRM activity an interaction becomes (contract §5b; resolver.activity): its record type, a
    subject template over the interaction's fields, and its owner: `owners[agent_id]`, else `default_owner`."""

    record_type: str = "Task"
    subject: str = DEFAULT_SUBJECT
    owners: Mapping[str, str] = field(default_factory=dict)
    default_owner: str = ""  # required by the blueprint check: no interaction may land unowned
