"""The blueprint's shape (contract §9) as JSON Schema; the rules it cannot express are in `settings.py`."""

from __future__ import annotations

from typing import Any

from resolver.config.tables import OUTBOUND_EVENTS

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



def _table(properties: dict[str, Any]) -> dict[str, Any]:
    """A blueprint table: exactly these keys, each optional."""
    return {"type": "object", "additionalProperties": False, "properties": properties}


# Semantic checks (a view naming an unknown attribute, ...) follow in `settings.check_settings`.
BLUEPRINT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "version": {"const": 1},
        "name": {"type": "string"},
        "server": _table({
            "listen": {"type": "string", "pattern": r"^[^\s:]*:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$"},
            "data_dir": {"type": "string", "minLength": 1},
            "workers": {"type": "integer", "minimum": 1, "maximum": 64},
            "threads": {"type": "integer", "minimum": 1, "maximum": 256},
            "max_concurrent_rpcs": {"type": "integer", "minimum": 1},
            "max_queue_wait_ms": {"type": "number", "minimum": 1},
            "max_queued_calls": {"type": "integer", "minimum": 1, "maximum": 1024},
            "refusal_share": {"type": "number", "minimum": 0, "maximum": 10},
            "max_backlog_s": {"type": "integer", "minimum": 1, "maximum": 3600},
            "max_backlog_calls": {"type": "integer", "minimum": 2, "maximum": 100000},
            "switch_interval_ms": {"type": "number", "minimum": 0.05, "maximum": 100},
            "worker_port_base": {"type": "integer", "minimum": 0, "maximum": 65535},
            "grace_period_s": {"type": "number", "minimum": 0},
            "shutdown_notice_s": {"type": "number", "minimum": 0},
            "insecure": {"type": "boolean"},
        }),
        "tls": _table({
            "cert_file": {"type": "string", "minLength": 1},
            "key_file": {"type": "string", "minLength": 1},
            "client_ca_file": {"type": "string", "minLength": 1},
        }),
        "auth": _table({"tokens_file": {"type": "string", "minLength": 1}}),
        "encryption": _table({
            "keys": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["id", "key"],
                "properties": {"id": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,32}$"}, "key": _SECRET_REF},
            }},
        }),
        "storage": _table({
            "map_size_mb": {"type": "integer", "minimum": 16},
            "max_readers": {"type": "integer", "minimum": 16},
            "sweep_interval_s": {"type": "number", "exclusiveMinimum": 0},
        }),
        "index": _table({
            "hash": {"enum": ["xxh3-128", "blake2b"]},
            "key_id": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,32}$"},
            "secret": _SECRET_REF,
        }),
        "matching": _table({
            "precedence": {"type": "array", "items": {"enum": list(PRECEDENCE)}},
            "write_keys": {"type": "array", "items": {"enum": ["external_id", "email"]}, "uniqueItems": True},
            "default_region": {"type": "string", "pattern": "^[A-Za-z]{2}$"},
            "phone_acceptance": {"enum": ["valid", "possible"]},
            "max_fanout": {"type": "integer", "minimum": 2},
            "max_candidates": {"type": "integer", "minimum": 1, "maximum": 100},
            "blocked_values": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "blocked_patterns": {"type": "array", "items": {"type": "string", "minLength": 1}},
        }),
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
        "reliability": _table({
            "peak_rps": {"type": "number", "exclusiveMinimum": 0},
            "latency_target_ms": {"type": "number", "exclusiveMinimum": 0},
            "idempotency_retention_s": {"type": "number", "exclusiveMinimum": 0},
        }),
        "limits": _table({
            "message_bytes": {"type": "integer", "minimum": 4096, "maximum": 64 * 1024 * 1024},
            "metadata_bytes": {"type": "integer", "minimum": 1024, "maximum": 16 * 1024},
            "identifiers_per_request": {"type": "integer", "minimum": 1, "maximum": 100_000},
            "identifiers_per_customer": {"type": "integer", "minimum": 1, "maximum": 100_000},
            "attributes_per_request": {"type": "integer", "minimum": 1, "maximum": 100_000},
            "items_per_list": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "string_chars": {"type": "integer", "minimum": 256, "maximum": 1024 * 1024},
            "struct_depth": {"type": "integer", "minimum": 1, "maximum": 32},
        }),
        "logging": _table({"payload": {"enum": ["masked", "none"]}, "level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
                            "format": {"enum": ["auto", "json", "text"]}}),
        "sources": {
            "type": "object",
            "additionalProperties": _table({
                "field_map": {"type": "object", "additionalProperties": {"type": "string"}},
                "identifiers": {"type": "object", "additionalProperties": {"enum": ["phone", "email"]}},
                "default_region": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "secrets": {"type": "array", "items": _SECRET_REF},
            }),
        },
        "outbound": {
            "type": "object",
            "propertyNames": {"pattern": r"^[A-Za-z0-9_-]{1,64}$"},
            "additionalProperties": {**_table({
                "url": {"type": "string", "pattern": r"^https?://[^\s/]+"},
                "secrets": {"type": "array", "items": _SECRET_REF, "minItems": 1},
                "events": {"type": "array", "items": {"enum": list(OUTBOUND_EVENTS)}, "minItems": 1,
                           "uniqueItems": True},
                "fields": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                "source_system": {"type": "string"},
                "rate_per_s": {"type": "number", "minimum": 0},
                "max_age_s": {"type": "number", "exclusiveMinimum": 0},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
                "concurrency": {"type": "integer", "minimum": 1, "maximum": 1024},
                "backoff_initial_s": {"type": "number", "exclusiveMinimum": 0},
                "backoff_max_s": {"type": "number", "exclusiveMinimum": 0},
            }), "required": ["url", "secrets", "events"]},
        },
        "interactions": _table({
            "create_customer": {"type": "boolean"},
            "last_interaction_attribute": {"type": "string", "pattern": r"^$|" + _NAME},
            # ListInteractions answers up to a whole history in one message: 500 interactions with the largest
            # details (resolver.interactions.MAX_DETAILS_BYTES) stay under a client's default 4 MiB
            "history": {"type": "integer", "minimum": 1, "maximum": 500},
        }),
        "activity": _table({
            "record_type": {"type": "string", "minLength": 1, "maxLength": 64},
            "subject": {"type": "string", "minLength": 1, "maxLength": 255},
            "owners": {"type": "object", "additionalProperties": {"type": "string", "minLength": 1}},
            "default_owner": {"type": "string"},
        }),
        "changes": _table({
            "retention_days": {"type": "number", "exclusiveMinimum": 0},
            "retention_count": {"type": "integer", "minimum": 1},
            "max_watchers": {"type": "integer", "minimum": 1, "maximum": 1024},
            "stall_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        }),
        "events": _table({
            "enabled": {"type": "boolean"},
            "http_listen": {"type": "string", "pattern": r"^$|^[^\s:]*:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$"},
            "rate_per_s": {"type": "number", "exclusiveMinimum": 0},
            "min_rate_per_s": {"type": "number", "exclusiveMinimum": 0},
            "idle_cpu": {"type": "number", "minimum": 0, "maximum": 1},
            "busy_cpu": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "batch": {"type": "integer", "minimum": 1, "maximum": 10000},
            "high_water": {"type": "integer", "minimum": 1},
            "timestamp_tolerance_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
            "unknown_record_wait_s": {"type": "number", "minimum": 0, "maximum": 86400},
            "max_body_bytes": {"type": "integer", "minimum": 256, "maximum": 16 * 1024 * 1024},
            "commit_window_ms": {"type": "number", "minimum": 0, "maximum": 1000},
            "process_nice": {"type": "integer", "minimum": 0, "maximum": 19},
            "process_sched_idle": {"type": "boolean"},
        }),
        "cluster": _table({
            "nats": {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True},
            "stream": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 5},
            "stream_max_age_s": {"type": "number", "exclusiveMinimum": 0},
            "stream_max_mb": {"type": "integer", "minimum": 1},
            "dedupe_window_s": {"type": "number", "exclusiveMinimum": 0},
            "apply_timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
            "connect_timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
            "read_wait_s": {"type": "number", "minimum": 0, "maximum": 600},
            "max_lag": {"type": "integer", "minimum": 0},
            "max_silence_s": {"type": "number", "minimum": 0},
            "lease_s": {"type": "number", "minimum": 1, "maximum": 600},
        }),
        "metrics": _table({
            "listen": {"type": "string", "pattern": r"^$|^[^\s:]*:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$"},
        }),
    },
}
