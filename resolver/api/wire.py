"""A request as it comes off the wire: bytes -> message, within the blueprint's `[limits]` (contract §8b).

gRPC hands every handler the raw bytes (resolver.api.handlers), so a request that does not decode is answered
here, INVALID_ARGUMENT with a short reason, instead of by grpcio's deserializer (INTERNAL, a logged traceback
and a leak per call). A decoded request is then held to the limits before any work is done for it: string
lengths, list and map sizes, identifiers per set, attributes per request, nesting and finite numbers in
attribute values. Every violation is listed (resolver.api.status bounds how many reach the caller); no value is
ever echoed, only where it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from resolver.config import LimitSettings
from resolver.errors import FieldViolation, InvalidInput

M = TypeVar("M", bound=Message)

_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_LIST = struct_pb2.ListValue.DESCRIPTOR.full_name
_IDENTIFIERS = "resolver.v1.Identifiers"
_ID_LISTS = ("emails", "phones")
# Lists whose length is an attribute count, not a generic list length.
_ATTRIBUTE_LISTS = frozenset({"resolver.v1.ResolveRequest.fields", "resolver.v1.UpsertRequest.attributes",
                              "resolver.v1.WatchRequest.fields"})
MAX_NAME_SHOWN = 32  # characters of a map key or attribute name shown in a field path


def _limit(key: str, limits: LimitSettings) -> str:
    return f"{getattr(limits, key)} (limits.{key})"


def _name(key: str) -> str:
    """A map key or attribute name as a path component: clipped, never whole if it is long."""
    return key if len(key) <= MAX_NAME_SHOWN else key[:MAX_NAME_SHOWN] + "..."


def _holds_value_types(desc: Any, seen: set[str] | None = None) -> bool:
    """Whether a message of this type can hold a Struct/Value/ListValue (numbers that may be NaN, nesting)."""
    seen = seen if seen is not None else set()
    if desc.full_name in (_STRUCT, _VALUE, _LIST):
        return True
    seen.add(desc.full_name)
    return any(f.message_type is not None and f.message_type.full_name not in seen
               and _holds_value_types(f.message_type, seen) for f in desc.fields)


class Limits:
    """The `[limits]` checks over any decoded request message (one instance per server)."""

    def __init__(self, limits: LimitSettings) -> None:
        self.settings = limits
        # No string in a message of n bytes has more than n characters, and each entry of a list or map costs at
        # least 2 bytes (tag + length): a message smaller than both bounds cannot break a size or count limit.
        counts = min(limits.identifiers_per_request, limits.attributes_per_request, limits.items_per_list)
        self.always_within = min(limits.string_chars, 2 * counts + 1)

    def may_exceed(self, size: int, has_values: bool) -> bool:
        """Whether a message of `size` bytes needs the walk (a Struct may hold NaN however small it is)."""
        return has_values or size > self.always_within

    def violations(self, msg: Message) -> list[FieldViolation]:
        """Every limit `msg` breaks (empty: within all of them)."""
        out: list[FieldViolation] = []
        self._message(msg, "", out)
        return out

    def _message(self, msg: Message, path: str, out: list[FieldViolation]) -> None:
        # A list or map over its count is refused without a look at its items, and a path is only formatted
        # for a violation: refusing an oversized request costs no more than decoding it.
        lim = self.settings
        desc = msg.DESCRIPTOR
        if desc.full_name == _IDENTIFIERS:
            ids: Any = msg
            if len(ids.emails) + len(ids.phones) + (1 if ids.external_id else 0) > lim.identifiers_per_request:
                out.append(FieldViolation(path.rstrip("."), f"more than {_limit('identifiers_per_request', lim)} "
                                          "identifiers", "LIMIT_EXCEEDED"))
                return
        for fd, value in msg.ListFields():
            where = path + fd.name
            if fd.message_type is not None and fd.message_type.full_name == _STRUCT:
                self._struct(value, where, 1, fd.full_name in _ATTRIBUTE_LISTS, out)
            elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                if self._over(len(value), where, "items_per_list", out):
                    continue
                self._strings(value, where, out, named=True)
                for key in value:
                    item = value[key]
                    if isinstance(item, str):
                        self._string(item, f"{where}[{_name(key)}]", out)
                    elif isinstance(item, Message):
                        self._message(item, f"{where}[{_name(key)}].", out)
            elif fd.is_repeated:
                if fd.full_name in _ATTRIBUTE_LISTS:
                    if self._over(len(value), where, "attributes_per_request", out):
                        continue
                elif not (desc.full_name == _IDENTIFIERS and fd.name in _ID_LISTS):  # counted together above
                    if self._over(len(value), where, "items_per_list", out):
                        continue
                if fd.type == FieldDescriptor.TYPE_STRING:
                    self._strings(value, where, out)
                elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                    for i, item in enumerate(value):
                        self._message(item, f"{where}[{i}].", out)
            elif fd.type == FieldDescriptor.TYPE_STRING:
                self._string(value, where, out)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                self._message(value, where + ".", out)

    def _over(self, n: int, where: str, key: str, out: list[FieldViolation]) -> bool:
        if n <= getattr(self.settings, key):
            return False
        out.append(FieldViolation(where, f"more than {_limit(key, self.settings)} entries", "LIMIT_EXCEEDED"))
        return True

    def _strings(self, items: Any, where: str, out: list[FieldViolation], named: bool = False) -> None:
        """The strings of a repeated field (or a map's keys, `named`): one pass at C speed when none is too long."""
        limit = self.settings.string_chars
        if items and max(map(len, items)) > limit:
            for i, item in enumerate(items):
                if len(item) > limit:
                    self._string(item, f"{where}[{_name(item) if named else i}]", out)

    def _string(self, text: str, where: str, out: list[FieldViolation]) -> None:
        if len(text) > self.settings.string_chars:
            out.append(FieldViolation(where, f"longer than {_limit('string_chars', self.settings)} characters",
                                      "LIMIT_EXCEEDED"))

    def _struct(self, s: struct_pb2.Struct, where: str, depth: int, attributes: bool,
                out: list[FieldViolation]) -> None:
        if self._over(len(s.fields), where, "attributes_per_request" if attributes else "items_per_list", out):
            return
        for key, value in s.fields.items():
            here = f"{where}.{_name(key)}"
            self._string(key, here, out)
            self._value(value, here, depth, out)

    def _value(self, value: struct_pb2.Value, where: str, depth: int, out: list[FieldViolation]) -> None:
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            if not math.isfinite(value.number_value):
                out.append(FieldViolation(where, "not a finite number (NaN and infinities are refused)",
                                          "NON_FINITE_NUMBER"))
        elif kind == "string_value":
            self._string(value.string_value, where, out)
        elif kind in ("struct_value", "list_value"):
            if depth >= self.settings.struct_depth:
                out.append(FieldViolation(where, f"nested deeper than {_limit('struct_depth', self.settings)}",
                                          "LIMIT_EXCEEDED"))
            elif kind == "struct_value":
                self._struct(value.struct_value, where, depth + 1, False, out)
            else:
                items = value.list_value.values
                if self._over(len(items), where, "items_per_list", out):
                    return
                for i, item in enumerate(items):
                    self._value(item, f"{where}[{i}]", depth + 1, out)


class Decoder(Generic[M]):
    """Bytes -> one request type, within the limits; InvalidInput for anything else (nothing raised else)."""

    def __init__(self, message_type: type[M], limits: Limits) -> None:
        self.message_type = message_type
        self.limits = limits
        self._parse: Callable[[bytes], M] = message_type.FromString
        self._has_values = _holds_value_types(message_type.DESCRIPTOR)
        self._what = f"not a valid {message_type.DESCRIPTOR.full_name} message"

    def __call__(self, data: bytes) -> M:
        try:
            msg = self._parse(data)
        except (DecodeError, RuntimeError, ValueError) as exc:  # upb's DecodeError; its texts name no value
            detail = str(exc).rpartition("': ")[2] if "': " in str(exc) else "truncated or corrupt"
            raise InvalidInput([FieldViolation("request", f"{self._what}: {detail[:80]}", "MALFORMED_REQUEST")],
                               "the request does not decode (truncated, corrupt, invalid UTF-8 or nested "
                               "too deep)") from None
        if self.limits.may_exceed(len(data), self._has_values):
            bad = self.limits.violations(msg)
            if bad:
                raise InvalidInput(bad)
        return msg


def plain(value: struct_pb2.Value) -> Any:
    """A Struct Value as plain Python (numbers stay floats, as the Struct carries them)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [plain(v) for v in value.list_value.values]
    return None  # null_value, or no kind set


def plain_struct(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict (what json_format.MessageToDict gives for a finite one; it raises on NaN)."""
    return {k: plain(v) for k, v in s.fields.items()}
