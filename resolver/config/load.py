"""Reading the blueprint: TOML, then the schema, then the settings and their cross-field rules, all at once.

No other module reads the environment or the blueprint: everything flows from `Settings`. With no file at
all the service runs on the defaults (embedded LMDB in ./data, plaintext on 127.0.0.1, open attribute
schema). Secrets are referenced (environment variable or file), never written inline.
"""

from __future__ import annotations

import base64
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema

from resolver.config.schema import BLUEPRINT_SCHEMA, PRECEDENCE
from resolver.config.settings import TABLES, Settings, check_settings, convert
from resolver.config.tables import (
    ActivitySettings,
    AttributeSpec,
    EncryptionKey,
    InteractionSettings,
    OutboundSpec,
    SourceSpec,
)
from resolver.errors import ConfigError


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Read and validate the blueprint at `path` (None: defaults only), then apply overrides (`with_overrides`).

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
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise ConfigError([f"{p}: arrays or inline tables nested too deeply to read"]) from None
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

    tables = {name: dict(doc.get(name, {})) for name in TABLES}  # each table's keys present, as given
    if "secret" in tables["index"]:
        tables["index"]["secret"], problem = _read_secret(tables["index"]["secret"], environ, "index.secret")
        if problem:
            problems.append(problem)
    if "keys" in tables["encryption"]:
        tables["encryption"]["keys"] = _encryption_keys(tables["encryption"]["keys"], environ, problems)
    sources = {name: _source(name, spec, environ, problems) for name, spec in doc.get("sources", {}).items()}
    outbound = {name: _outbound(name, spec, environ, problems) for name, spec in doc.get("outbound", {}).items()}
    tables["events"].setdefault("enabled", bool(sources))  # declaring a source turns events on
    tracked = InteractionSettings().last_interaction_attribute
    if doc.get("attributes") and tracked not in doc["attributes"]:  # the default attribute only where declared
        tables["interactions"].setdefault("last_interaction_attribute", "")
    if tuple(tables["matching"].pop("precedence", PRECEDENCE)) != PRECEDENCE:
        problems.append("matching.precedence: only external_id > email > phone is supported (contract §3)")
    settings = Settings(
        blueprint_path=blueprint_path,
        name=doc.get("name"),
        attributes={name: _attribute(name, spec) for name, spec in doc.get("attributes", {}).items()},
        views={name: tuple(v["fields"]) for name, v in doc.get("views", {}).items()},
        sources=sources,
        outbound=outbound,
        activity=ActivitySettings(**doc["activity"]) if "activity" in doc else None,
        **{name: cls(**{k: convert(k, v) for k, v in tables[name].items()}) for name, cls in TABLES.items()},
    )
    problems += check_settings(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _attribute(name: str, spec: Mapping[str, Any]) -> AttributeSpec:
    sequences = {k: tuple(spec[k]) for k in ("enum", "input_formats") if k in spec}
    return AttributeSpec(name=name, **{k: v for k, v in spec.items() if k != "description"} | sequences)


def _source(name: str, spec: Mapping[str, Any], environ: Mapping[str, str], problems: list[str]) -> SourceSpec:
    """A source with the secrets that could be read; a malformed one is a problem, an unset one `unresolved`."""
    secrets, unresolved = _webhook_secrets(spec.get("secrets", ()), environ, f"sources.{name}.secrets", problems)
    return SourceSpec(name, dict(spec.get("field_map", {})), dict(spec.get("identifiers", {})),
                      spec.get("default_region"), secrets, unresolved)


def _webhook_secrets(refs: Any, environ: Mapping[str, str], where: str,
                     problems: list[str]) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """The Standard Webhooks keys of `refs` that could be read, and the references that could not."""
    secrets: list[bytes] = []
    unresolved: list[str] = []
    for i, ref in enumerate(refs):
        value, _ = _read_secret(ref, environ, f"{where}[{i}]")
        if value is None:
            unresolved.append(f"env {ref['env']}" if "env" in ref else f"file {ref['file']}")
            continue
        key, problem = _webhook_key(value, f"{where}[{i}]")
        if problem:
            problems.append(problem)
        else:
            secrets.append(key)
    return tuple(secrets), tuple(unresolved)


def _outbound(name: str, spec: Mapping[str, Any], environ: Mapping[str, str], problems: list[str]) -> OutboundSpec:
    """An [outbound.NAME] destination, its signing secrets read as a source's are."""
    secrets, unresolved = _webhook_secrets(spec["secrets"], environ, f"outbound.{name}.secrets", problems)
    given = {k: v for k, v in spec.items() if k not in ("secrets", "events", "fields")}  # url, numbers: as given
    return OutboundSpec(name=name, events=tuple(spec["events"]), fields=tuple(spec.get("fields", ())),
                        secrets=secrets, unresolved=unresolved, **{"source_system": name} | given)


def _encryption_keys(refs: Any, environ: Mapping[str, str], problems: list[str]) -> tuple[EncryptionKey, ...]:
    """`[encryption] keys`: each a base64 AES-256 key (32 bytes) read from its reference. A key that cannot be read
    is a problem at load: without it, what it encrypted cannot be read back."""
    keys = []
    for i, ref in enumerate(refs):
        where = f"encryption.keys[{i}].key"
        value, problem = _read_secret(ref["key"], environ, where)
        if value is None:
            problems.append(problem)
            continue
        try:
            key = base64.b64decode(value, validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            problems.append(f"{where}: must be 32 bytes in base64 (`resolver key new` makes one)")
            continue
        keys.append(EncryptionKey(ref["id"], key))
    return tuple(keys)


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
