"""Commands on the wire: every replicated command type, its stable name, its bytes and its apply function.

A command is encoded as JSON `[name, [field values in declaration order]]` (orjson, insertion order kept: the
same command always gives the same bytes, and `decode(encode(c)) == c`). The name, not a Python path, is what
the log carries, so a module can move without breaking a stream; a field added to a command needs a new name.

Each entry's `apply(txn, command, settings)` is the use case's own apply: deterministic (contract §10: the clock,
new uuids and every setting it reads are fixed in the command or shared by every node's blueprint), so every node
that applies the same log reaches the same state. A command's type selects its entry: the local closures that
call these same functions (resolver.service, the RPC handlers) need no name of their own.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import orjson

from resolver import forget, interactions, merge, unmerge, upsert
from resolver.cluster import retention
from resolver.config import Settings
from resolver.errors import ClusterError
from resolver.events import command as event_command
from resolver.identifiers import Identifiers, Skipped
from resolver.normalize import Kind
from resolver.outbound import admin as outbound_admin
from resolver.outbound import settle
from resolver.store import Txn

Apply = Callable[[Txn, Any, Settings], Any]


@dataclass(frozen=True)
class FieldCodec:
    """How one field that JSON cannot carry as it is goes to plain values and back."""

    plain: Callable[[Any], Any]
    value: Callable[[Any], Any]


def _ids_plain(ids: Identifiers) -> list[Any]:
    return [ids.external_id, list(ids.emails), list(ids.phones)]


def _ids_value(plain: list[Any]) -> Identifiers:
    return Identifiers(plain[0], list(plain[1]), list(plain[2]))


IDENTIFIERS = FieldCodec(_ids_plain, _ids_value)
SKIPPED = FieldCodec(lambda s: [[int(x.kind), x.masked, x.reason, x.detail] for x in s],
                     lambda p: tuple(Skipped(Kind(k), m, r, d) for k, m, r, d in p))
STRINGS = FieldCodec(list, tuple)
BYTES = FieldCodec(lambda b: base64.b64encode(b).decode(), base64.b64decode)


@dataclass(frozen=True)
class Op:
    """One replicated command type: its name on the wire, its class, its apply function, the idempotency-key
    field (the JetStream message id derives from it) and the codecs of its non-JSON fields."""

    name: str
    type: type[Any]
    apply: Apply
    key_field: str
    special: dict[str, FieldCodec]

    def encode(self, command: Any) -> bytes:
        values = [self.special[f.name].plain(v) if f.name in self.special else v
                  for f in fields(self.type) for v in (getattr(command, f.name),)]
        return orjson.dumps([self.name, values])

    def decode(self, values: list[Any]) -> Any:
        names = [f.name for f in fields(self.type)]
        if len(values) != len(names):
            raise ClusterError(f"command {self.name}: {len(values)} fields, this version has {len(names)}")
        return self.type(**{n: self.special[n].value(v) if n in self.special else v
                            for n, v in zip(names, values, strict=True)})


OPS: tuple[Op, ...] = (
    Op("upsert.v1", upsert.UpsertCommand, upsert.apply, "idempotency_key",
       {"add": IDENTIFIERS, "remove": IDENTIFIERS, "skipped": SKIPPED}),
    Op("merge.v1", merge.MergeCommand, lambda txn, cmd, _s: merge.apply(txn, cmd), "idempotency_key",
       {"merged_uuids": STRINGS}),
    Op("unmerge.v1", unmerge.UnmergeCommand, lambda txn, cmd, _s: unmerge.apply(txn, cmd), "idempotency_key", {}),
    Op("interaction.v1", interactions.InteractionCommand, interactions.apply, "interaction_id",
       {"identifiers": IDENTIFIERS, "skipped": SKIPPED}),
    Op("forget.v1", forget.ForgetCommand, forget.apply, "idempotency_key", {}),
    Op("event.v1", event_command.EventCommand, event_command.replicated_apply, "key", {"body": BYTES}),
    Op("outbound.settle.v1", settle.Settle, settle.replicated_apply, "key", {}),
    Op("outbound.requeue.v1", outbound_admin.Requeue, outbound_admin.replicated_apply, "key", {}),
    Op("retention.v1", retention.RetentionCommand, lambda txn, cmd, _s: retention.apply(txn, cmd), "key", {}),
)
_BY_TYPE = {op.type: op for op in OPS}
_BY_NAME = {op.name: op for op in OPS}


def op_for(command: Any) -> Op:
    """The registered entry of `command`'s type (ClusterError: a command that cannot be replicated)."""
    op = _BY_TYPE.get(type(command))
    if op is None:
        raise ClusterError(f"{type(command).__name__} is not a replicated command (resolver.cluster.codec.OPS)")
    return op


def encode(command: Any) -> bytes:
    """The command's bytes on the log."""
    return op_for(command).encode(command)


def decode(data: bytes) -> tuple[Op, Any]:
    """The entry and the command that `encode` made these bytes from (ClusterError: not a command of ours)."""
    try:
        name, values = orjson.loads(data)
        op = _BY_NAME[name]
    except (ValueError, TypeError, KeyError):
        raise ClusterError(f"not a resolver command: {data[:40]!r}") from None
    return op, op.decode(values)


def message_id(command: Any) -> str:
    """The JetStream message id: the command's name, idempotency key and request fingerprint, hashed.

    The fingerprint is in it so that only a true retry (same key, same request) is de-duplicated by the stream; a
    key reused with a different request still reaches the ledger, which refuses it (IDEMPOTENCY_KEY_REUSED) as on
    one node. Hashed to keep the header short whatever the key's length.
    """
    op = op_for(command)
    digest = hashlib.blake2b(digest_size=16)
    for part in (op.name, getattr(command, op.key_field), command.fingerprint):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()
