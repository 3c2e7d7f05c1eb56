"""The blueprint (contract §9): one TOML file, validated once at start-up into a frozen Settings object.

No other module reads the environment or the blueprint: everything flows from `Settings`. With no file at
all the service runs on the defaults below (embedded LMDB in ./data, plaintext on 127.0.0.1, open attribute
schema). Secrets are referenced (environment variable or file), never written inline.
"""

from __future__ import annotations

import base64
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema

from resolver.errors import ConfigError

PRECEDENCE = ("external_id", "email", "phone")
ATTRIBUTE_TYPES = ("string", "integer", "number", "boolean", "date", "date-time")
DEFAULT_VIEW = "default"

_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
_SECRET_REF = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"env": {"type": "string", "minLength": 1}, "file": {"type": "string", "minLength": 1}},
    "minProperties": 1,
    "maxProperties": 1,
}

# The blueprint's shape. Semantic checks (a view naming an unknown attribute, ...) follow in `_check`.
BLUEPRINT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "version": {"const": 1},
        "name": {"type": "string"},
        "server": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "listen": {"type": "string", "pattern": r"^[^\s:]*:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$"},
                "data_dir": {"type": "string", "minLength": 1},
                "workers": {"type": "integer", "minimum": 1, "maximum": 64},
                "threads": {"type": "integer", "minimum": 1, "maximum": 256},
                "max_concurrent_rpcs": {"type": "integer", "minimum": 1},
                "grace_period_s": {"type": "number", "minimum": 0},
            },
        },
        "storage": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "map_size_mb": {"type": "integer", "minimum": 16},
                "max_readers": {"type": "integer", "minimum": 16},
                "sweep_interval_s": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "index": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "hash": {"enum": ["xxh3-128", "blake2b"]},
                "key_id": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,32}$"},
                "secret": _SECRET_REF,
            },
        },
        "matching": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "precedence": {"type": "array", "items": {"enum": list(PRECEDENCE)}},
                "write_keys": {"type": "array", "items": {"enum": ["external_id", "email"]}, "uniqueItems": True},
                "default_region": {"type": "string", "pattern": "^[A-Za-z]{2}$"},
                "phone_acceptance": {"enum": ["valid", "possible"]},
                "max_fanout": {"type": "integer", "minimum": 2},
                "max_candidates": {"type": "integer", "minimum": 1, "maximum": 100},
                "blocked_values": {"type": "array", "items": {"type": "string", "minLength": 1}},
                "blocked_patterns": {"type": "array", "items": {"type": "string", "minLength": 1}},
            },
        },
        "attributes": {
            "type": "object",
            "propertyNames": {"pattern": _NAME},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type"],
                "properties": {
                    "type": {"enum": list(ATTRIBUTE_TYPES)},
                    "description": {"type": "string"},
                    "max_length": {"type": "integer", "minimum": 1},
                    "min_length": {"type": "integer", "minimum": 0},
                    "pattern": {"type": "string"},
                    "enum": {"type": "array", "minItems": 1},
                    "minimum": {"type": "number"},
                    "maximum": {"type": "number"},
                    "input_formats": {"type": "array", "items": {"type": "string", "minLength": 2}},
                    "sensitive": {"type": "boolean"},
                    "owner": {"type": "string", "minLength": 1},
                },
            },
        },
        "views": {
            "type": "object",
            "propertyNames": {"pattern": _NAME},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["fields"],
                "properties": {
                    "fields": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    "description": {"type": "string"},
                },
            },
        },
        "reliability": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "peak_rps": {"type": "number", "exclusiveMinimum": 0},
                "latency_target_ms": {"type": "number", "exclusiveMinimum": 0},
                "idempotency_retention_s": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "logging": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"payload": {"enum": ["masked", "none"]}, "level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]}},
        },
        "sources": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "field_map": {"type": "object", "additionalProperties": {"type": "string"}},
                    "secrets": {"type": "array", "items": _SECRET_REF},
                },
            },
        },
        "events": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "http_listen": {"type": "string", "pattern": r"^$|^[^\s:]*:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$"},
                "rate_per_s": {"type": "number", "exclusiveMinimum": 0},
                "batch": {"type": "integer", "minimum": 1, "maximum": 10000},
                "high_water": {"type": "integer", "minimum": 1},
                "timestamp_tolerance_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                "max_body_bytes": {"type": "integer", "minimum": 256, "maximum": 16 * 1024 * 1024},
                "commit_window_ms": {"type": "number", "minimum": 0, "maximum": 1000},
                "process_nice": {"type": "integer", "minimum": 0, "maximum": 19},
                "process_sched_idle": {"type": "boolean"},
            },
        },
    },
}


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
    """A CRM source system: how its field names map to attributes, and its webhook secrets (resolved).

    `secrets` are the raw HMAC keys (a `whsec_<base64>` value is decoded); `unresolved` names the
    references that could not be read at load time (the source's webhooks are then refused, 401).
    """

    name: str
    field_map: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[bytes, ...] = field(default=(), repr=False)
    unresolved: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EventSettings:
    """CRM change events (contract §5): the HTTP endpoint, admission and the applier's pace."""

    enabled: bool = False  # a blueprint turns it on by declaring a source (`_events`): no source, no port opened
    http_listen: str = "127.0.0.1:8081"  # "" : no HTTP endpoint (gRPC IngestEvents only)
    # Events applied per second at most. Once the inbox is full, intake follows this pace too (429s hold the
    # senders back), so it sets how much CPU the events process takes from Resolve during a bulk push: on 2
    # cores, Resolve's p99 during a 20,000-event drain was 0.81-1.29x its p99 without one at 100/s (median 1.13x,
    # 9 runs), 1.08-2.13x at 250/s (median 1.35x, 8 runs; bench/README.md). Raise it where cores are to spare.
    rate_per_s: float = 100.0
    batch: int = 100  # events per applier write transaction
    high_water: int = 10_000  # inbox entries above which admission answers 429 / RESOURCE_EXHAUSTED
    timestamp_tolerance_s: float = 300.0  # webhook-timestamp skew accepted, past and future
    max_body_bytes: int = 256 * 1024
    # Admissions arriving within this window of the first one waiting share one synced transaction. Every commit
    # is two disk flushes (data, then meta page), and each costs the other processes on a small machine
    # scheduling delay: with the window, Resolve's p99 during a burst of webhooks was 15-20% lower on 2 cores,
    # about 3x lower when the sender did not share the cores (bench/README.md). The price is at most this much
    # added to each 202; 0 commits whatever is waiting at once.
    commit_window_ms: float = 5.0
    # `resolver serve` runs the webhook endpoint and the applier in their own process, this much nicer than the
    # serving workers (os.nice increment, 0..19), so the kernel prefers Resolve, and under Linux's SCHED_IDLE
    # policy: it then runs only on CPU the workers leave, and a waking worker always preempts it at once. A
    # nice level alone does not give that: the scheduler lets the running task finish its slice first. With 280
    # bursts/s of 300 µs (the webhook work), Resolve's p99 rose 1.9x at nice +10 and 1.2x under SCHED_IDLE on
    # 2 cores (bench/README.md). The cost: when Resolve saturates every core, intake and the applier wait, and
    # the inbox's high-water mark answers the CRM 429, which is the order of priority this product promises.
    process_nice: int = 10
    process_sched_idle: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service needs, validated. Build with `load_settings`; never mutate."""

    blueprint_path: Path | None = None
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("./data")
    workers: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)))
    threads: int = 16
    max_concurrent_rpcs: int = 256
    grace_period_s: float = 5.0
    map_size_mb: int = 64 * 1024
    max_readers: int = 1024
    sweep_interval_s: float = 60.0
    hash_algorithm: str = "xxh3-128"
    hash_key_id: str = ""
    hash_secret: bytes | None = field(default=None, repr=False)
    write_keys: tuple[str, ...] = ("external_id", "email")
    default_region: str | None = None
    phone_acceptance: str = "valid"
    max_fanout: int = 25
    max_candidates: int = 10
    blocked_values: frozenset[str] = frozenset()
    blocked_patterns: tuple[str, ...] = ()
    attributes: Mapping[str, AttributeSpec] = field(default_factory=dict)
    views: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    peak_rps: float = 2000.0
    latency_target_ms: float = 1.0
    idempotency_retention_s: float = 24 * 3600.0
    log_payload: str = "masked"
    log_level: str = "INFO"
    sources: Mapping[str, SourceSpec] = field(default_factory=dict)
    events: EventSettings = field(default_factory=EventSettings)

    @property
    def open_schema(self) -> bool:
        """No attributes declared: any well-named scalar attribute is accepted (the no-config default)."""
        return not self.attributes

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with command-line overrides (None values are ignored), re-validated."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        updated = replace(self, **values)
        problems = _check_settings(updated)
        if problems:
            raise ConfigError(problems)
        return updated


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Read and validate the blueprint at `path` (None: defaults only), then apply overrides.

    Raises ConfigError listing every problem found, never just the first.
    """
    env = os.environ if environ is None else environ
    if path is None:
        return Settings().with_overrides(**overrides)
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
    return settings_from_document(doc, env, blueprint_path=p).with_overrides(**overrides)


def settings_from_document(doc: Mapping[str, Any], environ: Mapping[str, str],
                           blueprint_path: Path | None = None) -> Settings:
    """Validate a parsed blueprint and build Settings (every problem reported at once)."""
    validator = jsonschema.Draft202012Validator(BLUEPRINT_SCHEMA)
    problems = [
        f"{'.'.join(str(x) for x in err.absolute_path) or '(top level)'}: {err.message}"
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems:
        raise ConfigError(problems)

    server = doc.get("server", {})
    storage = doc.get("storage", {})
    index = doc.get("index", {})
    matching = doc.get("matching", {})
    reliability = doc.get("reliability", {})
    logging_ = doc.get("logging", {})
    base = Settings()
    secret = None
    if "secret" in index:
        secret, problem = _read_secret(index["secret"], environ, "index.secret")
        if problem:
            problems.append(problem)
    sources: dict[str, SourceSpec] = {}
    for name, spec in doc.get("sources", {}).items():
        secrets: list[bytes] = []
        unresolved: list[str] = []
        for i, ref in enumerate(spec.get("secrets", ())):
            value, _ = _read_secret(ref, environ, f"sources.{name}.secrets[{i}]")
            if value is None:
                unresolved.append(f"env {ref['env']}" if "env" in ref else f"file {ref['file']}")
                continue
            key, problem = _webhook_key(value, f"sources.{name}.secrets[{i}]")
            if problem:
                problems.append(problem)
            else:
                secrets.append(key)
        sources[name] = SourceSpec(name, dict(spec.get("field_map", {})), tuple(secrets), tuple(unresolved))
    attributes = {
        name: AttributeSpec(
            name=name,
            type=spec["type"],
            max_length=spec.get("max_length"),
            min_length=spec.get("min_length"),
            pattern=spec.get("pattern"),
            enum=tuple(spec["enum"]) if "enum" in spec else None,
            minimum=spec.get("minimum"),
            maximum=spec.get("maximum"),
            input_formats=tuple(spec.get("input_formats", ())),
            sensitive=spec.get("sensitive", False),
            owner=spec.get("owner"),
        )
        for name, spec in doc.get("attributes", {}).items()
    }
    settings = Settings(
        blueprint_path=blueprint_path,
        listen=server.get("listen", base.listen),
        data_dir=Path(server.get("data_dir", base.data_dir)),
        workers=server.get("workers", base.workers),
        threads=server.get("threads", base.threads),
        max_concurrent_rpcs=server.get("max_concurrent_rpcs", base.max_concurrent_rpcs),
        grace_period_s=float(server.get("grace_period_s", base.grace_period_s)),
        map_size_mb=storage.get("map_size_mb", base.map_size_mb),
        max_readers=storage.get("max_readers", base.max_readers),
        sweep_interval_s=float(storage.get("sweep_interval_s", base.sweep_interval_s)),
        hash_algorithm=index.get("hash", base.hash_algorithm),
        hash_key_id=index.get("key_id", ""),
        hash_secret=secret,
        write_keys=tuple(matching.get("write_keys", base.write_keys)),
        default_region=matching["default_region"].upper() if "default_region" in matching else None,
        phone_acceptance=matching.get("phone_acceptance", base.phone_acceptance),
        max_fanout=matching.get("max_fanout", base.max_fanout),
        max_candidates=matching.get("max_candidates", base.max_candidates),
        blocked_values=frozenset(matching.get("blocked_values", ())),
        blocked_patterns=tuple(matching.get("blocked_patterns", ())),
        attributes=attributes,
        views={name: tuple(v["fields"]) for name, v in doc.get("views", {}).items()},
        peak_rps=float(reliability.get("peak_rps", base.peak_rps)),
        latency_target_ms=float(reliability.get("latency_target_ms", base.latency_target_ms)),
        idempotency_retention_s=float(reliability.get("idempotency_retention_s", base.idempotency_retention_s)),
        log_payload=logging_.get("payload", base.log_payload),
        log_level=logging_.get("level", base.log_level),
        sources=sources,
        events=_events(doc.get("events", {}), base.events, bool(sources)),
    )
    if "precedence" in matching and tuple(matching["precedence"]) != PRECEDENCE:
        problems.append("matching.precedence: only external_id > email > phone is supported (contract §3)")
    problems += _check_settings(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _read_secret(ref: Mapping[str, str], environ: Mapping[str, str], where: str) -> tuple[bytes | None, str]:
    if "env" in ref:
        value = environ.get(ref["env"])
        if not value:
            return None, f"{where}: environment variable {ref['env']} is not set"
        return value.encode("utf-8"), ""
    try:
        return Path(ref["file"]).read_bytes().strip(), ""
    except OSError as exc:
        return None, f"{where}: cannot read {ref['file']}: {exc.strerror}"


def _webhook_key(value: bytes, where: str) -> tuple[bytes, str]:
    """The HMAC key of a Standard Webhooks secret: `whsec_<base64>` is decoded, anything else used raw."""
    if value.startswith(b"whsec_"):
        try:
            return base64.b64decode(value[6:], validate=True), ""
        except ValueError:
            return b"", f"{where}: a whsec_ secret must be base64 after the prefix"
    return value, ""


def _events(doc: Mapping[str, Any], base: EventSettings, has_sources: bool) -> EventSettings:
    """Event settings; enabled by default only when a source is declared (no port opened otherwise)."""
    return EventSettings(
        enabled=doc.get("enabled", has_sources),
        http_listen=doc.get("http_listen", base.http_listen),
        rate_per_s=float(doc.get("rate_per_s", base.rate_per_s)),
        batch=doc.get("batch", base.batch),
        high_water=doc.get("high_water", base.high_water),
        timestamp_tolerance_s=float(doc.get("timestamp_tolerance_s", base.timestamp_tolerance_s)),
        max_body_bytes=doc.get("max_body_bytes", base.max_body_bytes),
        commit_window_ms=float(doc.get("commit_window_ms", base.commit_window_ms)),
        process_nice=doc.get("process_nice", base.process_nice),
        process_sched_idle=doc.get("process_sched_idle", base.process_sched_idle),
    )


def _check_settings(s: Settings) -> list[str]:
    """Cross-field rules the JSON Schema cannot express."""
    problems: list[str] = []
    if s.hash_algorithm == "blake2b":
        if not s.hash_secret:
            problems.append("index.secret: blake2b needs a secret (env or file)")
        elif len(s.hash_secret) > 64:
            problems.append("index.secret: a blake2b key is at most 64 bytes")
        if not s.hash_key_id:
            problems.append("index.key_id: blake2b needs a key id, so a store hashed with another key is refused")
    elif s.hash_secret:
        problems.append("index.secret: only used with hash = \"blake2b\"")
    if s.default_region is not None:
        import phonenumbers

        if s.default_region not in phonenumbers.SUPPORTED_REGIONS:
            problems.append(f"matching.default_region: {s.default_region!r} is not a region phonenumbers knows")
    for pattern in s.blocked_patterns:
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
    for view, fields in s.views.items():
        unknown = [f for f in fields if s.attributes and f not in s.attributes]
        if unknown:
            problems.append(f"views.{view}.fields: unknown attribute(s) {', '.join(unknown)}")
    host, _, port = s.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        problems.append(f"server.listen: {s.listen!r} is not HOST:PORT")
    return problems


def _check_attribute(name: str, spec: AttributeSpec) -> list[str]:
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


def describe(s: Settings) -> str:
    """A readable summary of the settings, for `resolver blueprint check` (secrets never shown)."""
    lines = [
        f"blueprint: {s.blueprint_path or '(none: built-in defaults)'}",
        f"server: listen {s.listen}, {s.workers} worker(s) x {s.threads} threads, "
        f"max {s.max_concurrent_rpcs} concurrent RPCs, grace {s.grace_period_s:g}s",
        f"storage: {s.data_dir} (map size {s.map_size_mb} MiB, {s.max_readers} readers)",
        f"index keys: {s.hash_algorithm}" + (f" (key id {s.hash_key_id}, secret set)" if s.hash_secret else ""),
        f"matching: {' > '.join(PRECEDENCE)}; writes select by {', '.join(s.write_keys) or 'nothing'}; "
        f"phones must be {s.phone_acceptance}; default region {s.default_region or '(none)'}; "
        f"fan-out limit {s.max_fanout}; up to {s.max_candidates} candidates",
        f"blocked: {len(s.blocked_values)} value(s), {len(s.blocked_patterns)} pattern(s) beyond the built-ins",
    ]
    if s.attributes:
        lines.append(f"attributes ({len(s.attributes)}):")
        for spec in s.attributes.values():
            extras = [f"owner {spec.owner}"] if spec.owner else []
            extras += ["sensitive"] if spec.sensitive else []
            lines.append(f"  {spec.name}: {spec.type}" + (f" ({', '.join(extras)})" if extras else ""))
    else:
        lines.append("attributes: open schema (no attributes declared)")
    views = dict(s.views) or {DEFAULT_VIEW: ("(all attributes)",)}
    lines.append("views: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in views.items()))
    lines.append(
        f"reliability: peak {s.peak_rps:g} Resolve/s, p99 target {s.latency_target_ms:g} ms, "
        f"idempotency retention {s.idempotency_retention_s:g}s"
    )
    lines.append(f"logging: payload {s.log_payload}, level {s.log_level}")
    for src in sorted(s.sources.values(), key=lambda x: x.name):
        missing = f"; UNRESOLVED: {', '.join(src.unresolved)} (its webhooks are refused)" if src.unresolved else ""
        lines.append(f"source {src.name}: {len(src.field_map)} mapped field(s), {len(src.secrets)} secret(s){missing}")
    ev = s.events
    lines.append(
        f"events: {'on' if ev.enabled else 'off'}; http {ev.http_listen or '(none)'}; apply {ev.rate_per_s:g}/s "
        f"in batches of {ev.batch}; inbox high-water {ev.high_water}; timestamp tolerance {ev.timestamp_tolerance_s:g}s; "
        f"commit window {ev.commit_window_ms:g} ms; "
        f"events process nice +{ev.process_nice}{' (SCHED_IDLE)' if ev.process_sched_idle else ''}"
    )
    return "\n".join(lines)
