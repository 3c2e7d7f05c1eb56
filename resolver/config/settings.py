"""`Settings`: one instance per blueprint table, the flat-name overrides, and the rules across fields.

The tables and their defaults are in `tables.py`; JSON Schema (`schema.py`) has checked each value's shape
before these rules run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints

from resolver.address import parse_address
from resolver.config import tables
from resolver.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service needs, validated: one instance per blueprint table. Build with `load_settings`."""

    blueprint_path: Path | None = None
    name: str | None = None  # the blueprint's own `name`
    server: tables.ServerSettings = field(default_factory=tables.ServerSettings)
    tls: tables.TlsSettings = field(default_factory=tables.TlsSettings)
    auth: tables.AuthSettings = field(default_factory=tables.AuthSettings)
    encryption: tables.EncryptionSettings = field(default_factory=tables.EncryptionSettings)
    storage: tables.StorageSettings = field(default_factory=tables.StorageSettings)
    index: tables.IndexSettings = field(default_factory=tables.IndexSettings)
    matching: tables.MatchingSettings = field(default_factory=tables.MatchingSettings)
    attributes: Mapping[str, tables.AttributeSpec] = field(default_factory=dict)
    views: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    reliability: tables.ReliabilitySettings = field(default_factory=tables.ReliabilitySettings)
    logging: tables.LoggingSettings = field(default_factory=tables.LoggingSettings)
    limits: tables.LimitSettings = field(default_factory=tables.LimitSettings)
    sources: Mapping[str, tables.SourceSpec] = field(default_factory=dict)
    events: tables.EventSettings = field(default_factory=tables.EventSettings)
    metrics: tables.MetricsSettings = field(default_factory=tables.MetricsSettings)
    changes: tables.ChangeSettings = field(default_factory=tables.ChangeSettings)
    cluster: tables.ClusterSettings = field(default_factory=tables.ClusterSettings)
    interactions: tables.InteractionSettings = field(default_factory=tables.InteractionSettings)
    activity: tables.ActivitySettings | None = None  # None: no [activity] table (interactions carry no CRM activity)
    outbound: Mapping[str, tables.OutboundSpec] = field(default_factory=dict)  # [outbound.NAME] destinations

    @property
    def open_schema(self) -> bool:
        """No attributes declared: any well-named scalar attribute is accepted (the no-config default)."""
        return not self.attributes

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with overrides, re-validated (ConfigError); None values are ignored.

        A key's own name overrides it in its table (`data_dir=`, `max_fanout=`, `rate_per_s=`); a table's or
        another top-level field's name replaces it whole (`events=EventSettings(...)`).
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        top = {k: v for k, v in given.items() if k not in TABLE_OF}
        for key, value in given.items():
            if key in TABLE_OF:
                table = TABLE_OF[key]
                top[table] = replace(top.get(table, getattr(self, table)), **{key: convert(key, value)})
        updated = replace(self, **top)
        problems = check_settings(updated)
        if problems:
            raise ConfigError(problems)
        return updated


# The tables: the fields of Settings whose type is one of the dataclasses of tables.py.
TABLES: dict[str, type[Any]] = {
    name: t for name, t in get_type_hints(Settings).items() if isinstance(t, type) and is_dataclass(t)
}
# Each key's table, for flat overrides; a key in two tables (or named like a table) would make them ambiguous.
# A table of WHOLE_ONLY is overridden whole only (`metrics=MetricsSettings(...)`): [metrics] listen is not [server]'s.
WHOLE_ONLY = frozenset({"metrics"})
TABLE_OF: dict[str, str] = {f.name: table for table, cls in TABLES.items() if table not in WHOLE_ONLY
                            for f in fields(cls)}
assert len(TABLE_OF) == sum(len(fields(cls)) for t, cls in TABLES.items() if t not in WHOLE_ONLY), \
    "a key is declared in two tables"
assert not TABLE_OF.keys() & {f.name for f in fields(Settings)}, "a key is named like a top-level field"

# Keys whose TOML or command-line value is not yet the field's type; every other value is used as given.
_CONVERT: dict[str, Callable[[Any], Any]] = {
    "data_dir": Path, "grace_period_s": float, "sweep_interval_s": float, "max_queue_wait_ms": float,
    "switch_interval_ms": float, "shutdown_notice_s": float, "refusal_share": float,
    "write_keys": tuple, "default_region": str.upper, "blocked_values": frozenset, "blocked_patterns": tuple,
    "peak_rps": float, "latency_target_ms": float, "idempotency_retention_s": float,
    "rate_per_s": float, "timestamp_tolerance_s": float, "commit_window_ms": float,
    "min_rate_per_s": float, "idle_cpu": float, "busy_cpu": float,
    "retention_days": float, "stall_timeout_s": float,
    "nats": tuple, "stream_max_age_s": float, "dedupe_window_s": float, "apply_timeout_s": float,
    "connect_timeout_s": float, "lease_s": float,
}
assert _CONVERT.keys() <= TABLE_OF.keys()


def convert(key: str, value: Any) -> Any:
    """`value` as the field `key` holds it (`data_dir="x"` -> Path("x"), `peak_rps=100` -> 100.0)."""
    conv = _CONVERT.get(key)
    return value if conv is None else conv(value)


def check_settings(s: Settings) -> list[str]:
    """Every cross-field problem in `s`, as `table.key: what is wrong` lines (empty: valid)."""
    problems: list[str] = []
    index, matching = s.index, s.matching
    if index.hash == "blake2b":
        if not index.secret:
            problems.append("index.secret: blake2b needs a secret (env or file)")
        elif len(index.secret) > 64:
            problems.append("index.secret: a blake2b key is at most 64 bytes")
        if not index.key_id:
            problems.append("index.key_id: blake2b needs a key id, so a store hashed with another key is refused")
    elif index.secret:
        problems.append("index.secret: only used with hash = \"blake2b\"")
    if matching.default_region is not None:
        import phonenumbers

        if matching.default_region not in phonenumbers.SUPPORTED_REGIONS:
            problems.append(f"matching.default_region: {matching.default_region!r} is not a region phonenumbers knows")
    for pattern in matching.blocked_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"matching.blocked_patterns: {pattern!r} is not a regular expression: {exc}")
    for name, spec in s.attributes.items():
        problems += _check_attribute(name, spec)
    for source in s.sources.values():
        targets = list(source.field_map.values())
        problems += [
            f"sources.{source.name}.field_map: {crm} maps to {attr!r}, which is not a declared attribute"
            for crm, attr in source.field_map.items()
            if s.attributes and attr not in s.attributes
        ]
        problems += [
            f"sources.{source.name}.field_map: several CRM fields map to {attr!r}"
            for attr in sorted({a for a in targets if targets.count(a) > 1})
        ]
        problems += [
            f"sources.{source.name}: {crm} is mapped both to an attribute (field_map) and to an identifier "
            "(identifiers); a CRM field is one or the other"
            for crm in sorted(set(source.field_map) & set(source.identifiers))
        ]
        if source.default_region is not None:
            import phonenumbers

            if source.default_region not in phonenumbers.SUPPORTED_REGIONS:
                problems.append(f"sources.{source.name}.default_region: {source.default_region!r} is not a region "
                                "phonenumbers knows")
    for view, names in s.views.items():
        unknown = [f for f in names if s.attributes and f not in s.attributes]
        if unknown:
            problems.append(f"views.{view}.fields: unknown attribute(s) {', '.join(unknown)}")
    problems += _check_security(s)
    if s.events.enabled and s.events.max_body_bytes + 64 * 1024 > s.limits.message_bytes:
        problems.append("limits.message_bytes: must exceed events.max_body_bytes by 64 KiB (IngestEvents carries "
                        "a whole webhook body and its headers)")
    if s.server.worker_port_base and s.server.worker_port_base + s.server.workers - 1 > 65535:
        problems.append(f"server.worker_port_base: {s.server.workers} workers from port {s.server.worker_port_base} "
                        "run past 65535")
    for dest in s.outbound.values():
        problems += _check_outbound(dest, s)
    problems += _check_interactions(s)
    problems += _check_cluster(s)
    problems += _check_address("server.listen", s.server.listen)
    if s.events.http_listen:  # "": no HTTP endpoint
        problems += _check_address("events.http_listen", s.events.http_listen)
    if s.metrics.listen:  # "": no metrics endpoint
        problems += _check_address("metrics.listen", s.metrics.listen)
    return problems


MIN_SILENCE_S = 2.0


def _check_cluster(s: Settings) -> list[str]:
    """`[cluster]`: NATS URLs, one worker, and stream limits that fit together (resolver.cluster: writes, change
    events, outbound decisions and change-log retention all go through the replicated log)."""
    if not s.cluster.nats:
        return []
    problems = [f"cluster.nats: {url!r} is not a nats:// URL" for url in s.cluster.nats if not url.startswith("nats://")]
    # one applier per data directory, in the serving process: its answers reach only that process's handlers
    if s.server.workers != 1:
        problems.append("server.workers: a cluster node serves with one worker (the applier answers its own writes)")
    if s.cluster.dedupe_window_s > s.cluster.stream_max_age_s:
        problems.append("cluster.dedupe_window_s: longer than the stream keeps its commands (stream_max_age_s)")
    # an idle applier looks at the stream about once a second (resolver.cluster.applier): a shorter limit would refuse
    # reads on a healthy node between two looks
    if 0 < s.cluster.max_silence_s < MIN_SILENCE_S:
        problems.append(f"cluster.max_silence_s: at least {MIN_SILENCE_S:g} (or 0: no limit)")
    return problems


def _check_security(s: Settings) -> list[str]:
    """[tls] needs its certificate and key together; [encryption] key ids are unique; a sensitive attribute is
    stored encrypted, so it needs a key, unless the blueprint says `[server] insecure = true` (stored in clear)."""
    problems = []
    tls = s.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        problems.append("tls: cert_file and key_file go together")
    if tls.client_ca_file and not tls.cert_file:
        problems.append("tls.client_ca_file: mTLS needs the server's own cert_file and key_file")
    ids = [k.id for k in s.encryption.keys]
    problems += [f"encryption.keys: id {i!r} is given twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    sensitive = sorted(name for name, spec in s.attributes.items() if spec.sensitive)
    if sensitive and not s.encryption.keys and not s.server.insecure:
        problems.append(f"attributes.{sensitive[0]}: sensitive attributes are stored encrypted: declare [encryption] "
                        "keys (or `[server] insecure = true` to store them in clear)")
    return problems


def _check_outbound(dest: tables.OutboundSpec, s: Settings) -> list[str]:
    """An [outbound.NAME] destination: a URL with a host, known attributes in `fields`, sane back-off."""
    from urllib.parse import urlsplit

    where = f"outbound.{dest.name}"
    problems = []
    try:
        parts = urlsplit(dest.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"{where}.url: an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            problems.append(f"{where}.url: no credentials in the URL (the blueprint holds secrets by reference only)")
        parts.port  # noqa: B018 - ValueError for a port that is not a number or out of range
    except ValueError as exc:
        problems.append(f"{where}.url: {exc}")
    problems += [f"{where}.fields: {name!r} is not a declared attribute" for name in dest.fields
                 if s.attributes and name not in s.attributes]
    problems += [f"{where}.fields: {name!r} is sensitive: it is stored encrypted and never leaves in a message "
                 "(drop it from fields)" for name in dest.fields if name in s.attributes and s.attributes[name].sensitive]
    if dest.backoff_max_s < dest.backoff_initial_s:
        problems.append(f"{where}.backoff_max_s: below backoff_initial_s")
    return problems


def _check_address(where: str, text: str) -> list[str]:
    try:
        parse_address(text)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    return []


def _check_attribute(name: str, spec: tables.AttributeSpec) -> list[str]:
    where = f"attributes.{name}"
    problems = []
    text_only = ("max_length", "min_length", "pattern")
    if spec.type != "string":
        problems += [f"{where}.{k}: only for type string" for k in text_only if getattr(spec, k) is not None]
    if spec.type not in ("integer", "number"):
        problems += [f"{where}.{k}: only for numbers" for k in ("minimum", "maximum") if getattr(spec, k) is not None]
    if spec.input_formats and spec.type not in ("date", "date-time"):
        problems.append(f"{where}.input_formats: only for date and date-time")
    if spec.pattern is not None:
        try:
            re.compile(spec.pattern)
        except re.error as exc:
            problems.append(f"{where}.pattern: not a regular expression: {exc}")
    return problems


def _check_interactions(s: Settings) -> list[str]:
    """`[interactions]` and `[activity]`: a date attribute to track, a subject template that renders, an owner for
    every interaction, and an activity for every destination that sends interactions."""
    from resolver.activity import subject_problems

    problems = []
    name = s.interactions.last_interaction_attribute
    spec = s.attributes.get(name)
    where = "interactions.last_interaction_attribute"
    if name and s.attributes and spec is None:
        problems.append(f"{where}: {name!r} is not a declared attribute (declare it as a date-time or date, or set "
                        "\"\" to track none)")
    elif spec is not None and spec.type not in ("date-time", "date"):
        problems.append(f"{where}: attributes.{name} is a {spec.type}; it must be a date-time or a date")
    elif spec is not None and spec.sensitive:
        problems.append(f"{where}: attributes.{name} is sensitive; the interaction's answer would keep its value "
                        "in clear in the idempotency ledger (track a date attribute that is not sensitive, or set "
                        "\"\" to track none)")
    elif spec is not None and spec.owner:
        problems.append(f"{where}: attributes.{name} is owned by {spec.owner}; interactions would write it behind its "
                        "owner's back (drop the owner, or set \"\" to track none)")
    if s.activity is not None:
        if not s.activity.default_owner:
            problems.append("activity.default_owner: required: the owner of an interaction whose agent_id is not in "
                            "activity.owners (no activity may land unowned)")
        problems += [f"activity.subject: {p}" for p in subject_problems(s.activity.subject)]
    # [outbound.NAME] (resolver.outbound) may be absent from this Settings: read it by name
    for dest in getattr(s, "outbound", {}).values():
        if "interaction.recorded" in getattr(dest, "events", ()) and s.activity is None:
            problems.append(f"outbound.{getattr(dest, 'name', '?')}.events: sends interaction.recorded, but the "
                            "blueprint has no [activity] table (record_type, subject, owners, default_owner): the "
                            "CRM would get activities without an owner")
    return problems
