"""Attribute values: normalization (trim + NFC, ISO 8601 dates, exact numbers) and schema validation.

Each declared attribute gets its own compiled JSON Schema (fastjsonschema), so one request's every bad
field is reported, not just the first. With no attributes declared the schema is open: any well-named
scalar attribute is accepted and normalized the same way.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from typing import Any

import fastjsonschema

from resolver.config import AttributeSpec, Settings
from resolver.errors import FieldViolation

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INT64 = 2**63  # integers are stored exactly, as 64-bit values
OPEN_SCHEMA_MAX_TEXT = 4096


class _Bad(ValueError):
    """A value that cannot be normalized to its declared type."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be text, not {_type_name(value)}")
    return unicodedata.normalize("NFC", value.strip())


def _integer(value: Any) -> int:
    # Struct carries every number as a double: an integral double is the integer it came from.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"must be an integer, not {_type_name(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise _Bad("must be an integer")
        value = int(value)
    if not -_INT64 <= value < _INT64:
        raise _Bad("integer out of the 64-bit range")
    return value


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"must be a number, not {_type_name(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad("must be a finite number")
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
    elif not -_INT64 <= value < _INT64:
        raise _Bad("integer out of the 64-bit range (send it as a decimal number)")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, not {_type_name(value)}")
    return value


def _date(formats: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _text(value)
        try:
            return date.fromisoformat(text).isoformat()
        except ValueError:
            pass
        for fmt in formats:
            try:
                return datetime.strptime(text, fmt).date().isoformat()
            except ValueError:
                continue
        raise _Bad("must be a date (YYYY-MM-DD" + "".join(f" or {f}" for f in formats) + ")")

    return parse


def _datetime(formats: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _text(value)
        parsed: datetime | None = None
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            for fmt in formats:
                try:
                    parsed = datetime.strptime(text, fmt)
                    break
                except ValueError:
                    continue
        if parsed is None:
            raise _Bad("must be an ISO 8601 date-time with a UTC offset")
        if parsed.tzinfo is None:
            # A wall-clock time without an offset is a guess about the sender's time zone: refuse it.
            raise _Bad("date-time needs a UTC offset (e.g. 2023-10-27T14:30:00Z)")
        try:
            return parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")
        except OverflowError:  # an offset that moves year 1 or 9999 past the calendar's end
            raise _Bad("date-time out of range once converted to UTC") from None

    return parse


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", str: "text", int: "number", float: "number", dict: "object", list: "list"}.get(
        type(value), type(value).__name__
    )


def _json_schema(spec: AttributeSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    if spec.type == "string":
        schema["type"] = "string"
        if spec.max_length is not None:
            schema["maxLength"] = spec.max_length
        if spec.min_length is not None:
            schema["minLength"] = spec.min_length
        if spec.pattern is not None:
            schema["pattern"] = spec.pattern
    elif spec.type in ("integer", "number"):
        schema["type"] = spec.type
        if spec.minimum is not None:
            schema["minimum"] = spec.minimum
        if spec.maximum is not None:
            schema["maximum"] = spec.maximum
    if spec.enum is not None:
        schema["enum"] = list(spec.enum)
    return schema


_CONVERTERS: dict[str, Callable[[AttributeSpec], Callable[[Any], Any]]] = {
    "string": lambda spec: _text,
    "integer": lambda spec: _integer,
    "number": lambda spec: _number,
    "boolean": lambda spec: _boolean,
    "date": lambda spec: _date(spec.input_formats),
    "date-time": lambda spec: _datetime(spec.input_formats),
}


class AttributeSchema:
    """Validates and normalizes a partial attribute update against the blueprint."""

    def __init__(self, settings: Settings) -> None:
        self.specs: Mapping[str, AttributeSpec] = settings.attributes
        self._convert = {name: _CONVERTERS[spec.type](spec) for name, spec in self.specs.items()}
        self._validate = {name: fastjsonschema.compile(_json_schema(spec)) for name, spec in self.specs.items()}
        self._owners = {name: spec.owner for name, spec in self.specs.items() if spec.owner}

    @property
    def open(self) -> bool:
        return not self.specs

    def normalize(self, values: Mapping[str, Any], prefix: str = "attributes") -> tuple[dict[str, Any], list[FieldViolation]]:
        """Normalized values (None kept: it clears the field) and every violation found, in input order."""
        out: dict[str, Any] = {}
        violations: list[FieldViolation] = []
        for name, value in values.items():
            where = f"{prefix}.{name}"
            if value is None:
                if self.open and not _NAME.fullmatch(name):
                    violations.append(FieldViolation(where, "not a valid attribute name", "UNKNOWN_ATTRIBUTE"))
                elif not self.open and name not in self.specs:
                    violations.append(FieldViolation(where, "unknown attribute (not in the blueprint)", "UNKNOWN_ATTRIBUTE"))
                else:
                    out[name] = None
                continue
            try:
                out[name] = self._normalize_one(name, value)
            except _Bad as exc:
                violations.append(FieldViolation(where, str(exc), "INVALID_ATTRIBUTE"))
            except KeyError:
                violations.append(FieldViolation(where, "unknown attribute (not in the blueprint)", "UNKNOWN_ATTRIBUTE"))
        return out, violations

    def _normalize_one(self, name: str, value: Any) -> Any:
        if self.open:
            if not _NAME.fullmatch(name):
                raise _Bad("not a valid attribute name (letters, digits, _; at most 64)")
            if isinstance(value, str):
                text = _text(value)
                if len(text) > OPEN_SCHEMA_MAX_TEXT:
                    raise _Bad(f"text longer than {OPEN_SCHEMA_MAX_TEXT} characters")
                return text
            if isinstance(value, bool):
                return value
            if isinstance(value, int | float):
                return _number(value)
            raise _Bad(f"must be text, a number or true/false, not {_type_name(value)}")
        normalized = self._convert[name](value)  # KeyError: unknown attribute
        try:
            self._validate[name](normalized)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise _Bad(exc.message.replace("data", "value", 1)) from None
        return normalized

    def owned_by_others(self, names: list[str], source_system: str) -> list[str]:
        """The attributes among `names` that another source system owns (contract §4.4)."""
        owners = self._owners
        return [n for n in names if (owner := owners.get(n)) and owner != source_system] if owners else []

    def project(self, attributes: Mapping[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
        """The attributes to show for `fields` (None: all of them)."""
        if fields is None:
            return dict(attributes)
        return {f: attributes[f] for f in fields if f in attributes}
