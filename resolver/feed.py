"""The change feed (contract §7, WatchChanges): the committed change-log entries from a position on, gap-free and in
order, filtered per watcher and masked for agent desktops. No gRPC here (resolver.api.feed_rpc maps to the proto;
resolver.watchers wakes and polices the calls of one process).

Position: sequences are 1, 2, ... without a gap (`Txn.append_change` takes the last one + 1 inside the write's own
transaction, and LMDB commits one writer at a time, whichever process it is in), and a read transaction sees a
prefix of the log. So a read that asks for `next` and finds a later sequence first knows that retention deleted
`next` (resolver.retention): the watcher is out of range, never silently past a gap.

What a watcher sees of an entry (`Change`):
- identifiers added or removed: always masked (resolver.normalize.mask): the feed goes to agent desktops;
- attribute values as stored (new from `attributes`, old from `attributes_old`; an entry written before
  `attributes_old` existed has no old values), except a sensitive attribute's (blueprint `sensitive = true`):
  masked by resolver.normalize.mask_value and flagged (the log stores it encrypted, resolver.crypto: it is
  decrypted only to be masked; one that cannot be decrypted shows as "***");
- a redacted entry (erased, `redacted_us`): who, when, what kind of change, never a value.

Filters (both given: an entry must pass both):
- customer_uuids: the entry's customer, or a customer it names: MERGED's merged_uuids, UNMERGED's restored_uuid,
  DELETED's erased_uuids (so a watcher of a merged-away customer learns where it went, and of its erasure);
- fields: an entry whose attributes touch one of them (its field changes then limited to those), and every
  DELETED (each field is gone). Never: an entry that changes identifiers only, an interaction that moves no
  attribute, a redacted entry (the names of the attributes it changed are erased with their values).
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from resolver.attributes import AttributeSchema
from resolver.crypto import Sealer
from resolver.errors import DecryptionFailed, FieldViolation, InvalidInput, SequenceOutOfRange
from resolver.normalize import Kind, mask, mask_value
from resolver.records import decode_json
from resolver.store import Store, Txn

_U64 = struct.Struct(">Q")
BATCH = 256  # entries read per read transaction (kept short: a long reader pins pages the writer would reuse)


# FieldDiff and Change are made once per event a watcher gets: plain slotted classes (a frozen dataclass's
# __init__ costs a microsecond more per instance, through object.__setattr__).


@dataclass(slots=True)
class FieldDiff:
    """One attribute a change touched. `old` None: absent before (or not recorded); `new` None: cleared."""

    name: str
    old: Any
    new: Any
    masked: bool  # a sensitive attribute: old and new are masked forms


@dataclass(slots=True)
class Change:
    """A change-log entry as a watcher may see it: identifiers masked, sensitive values masked."""

    seq: int
    customer_uuid: str
    action: str  # CREATED, UPDATED, MERGED, UNMERGED, DELETED, INTERACTION_RECORDED
    at_us: int
    version: int
    fields: tuple[FieldDiff, ...]
    added: tuple[tuple[Kind, str], ...]  # (kind, masked value)
    removed: tuple[tuple[Kind, str], ...]
    merged_uuids: tuple[str, ...]
    restored_uuid: str
    interaction_id: str
    source_system: str


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which entries a watcher gets (empty sets: no filter)."""

    customers: frozenset[str] = frozenset()
    fields: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, customer_uuids: Iterable[str], fields: Iterable[str], schema: AttributeSchema) -> WatchFilter:
        """The filter of a WatchRequest: uuids in canonical form, fields known to the blueprint (InvalidInput
        listing every bad one)."""
        violations: list[FieldViolation] = []
        customers: set[str] = set()
        for i, text in enumerate(customer_uuids):
            try:
                customers.add(str(uuidlib.UUID(text)))
            except ValueError:
                violations.append(FieldViolation(f"customer_uuids[{i}]", "not a UUID", "INVALID"))
        names = list(fields)
        if not schema.open:
            violations += [FieldViolation(f"fields[{i}]", "unknown attribute", "UNKNOWN_ATTRIBUTE")
                           for i, name in enumerate(names) if name not in schema.specs]
        if violations:
            raise InvalidInput(violations)
        return cls(frozenset(customers), frozenset(names))

    def matches(self, entry: Mapping[str, Any]) -> bool:
        if self.customers and not self.customers & _customers_named(entry):
            return False
        if self.fields and entry.get("action") != "DELETED":
            return not self.fields.isdisjoint(entry.get("attributes") or ())
        return True


def _customers_named(entry: Mapping[str, Any]) -> set[str]:
    named = {entry.get("customer_uuid") or "", entry.get("restored_uuid") or ""}
    named.update(entry.get("merged_uuids") or ())
    named.update(entry.get("erased_uuids") or ())
    named.discard("")
    return named


def to_change(entry: Mapping[str, Any], flt: WatchFilter, sensitive: frozenset[str],
              sealer: Sealer | None = None) -> Change:
    """The watcher's view of one change-log entry (the one place the feed masks). `sealer` opens the sensitive
    values the log stores encrypted (None: they are in clear)."""
    redacted = "redacted_us" in entry
    new: Mapping[str, Any] = {} if redacted else entry.get("attributes") or {}
    old: Mapping[str, Any] = {} if redacted else entry.get("attributes_old") or {}
    fields = []
    for name in sorted(new):
        if flt.fields and name not in flt.fields:
            continue
        before, after = old.get(name), new[name]
        if name in sensitive:
            uid = entry.get("customer_uuid") or ""
            fields.append(FieldDiff(name, _masked_value(sealer, uid, name, before),
                                    _masked_value(sealer, uid, name, after), True))
        else:
            fields.append(FieldDiff(name, before, after, False))
    return Change(
        seq=entry["seq"],
        customer_uuid=entry.get("customer_uuid") or "",
        action=entry.get("action", ""),
        at_us=entry.get("at_us", 0),
        version=entry.get("version", 0),
        fields=tuple(fields),
        added=() if redacted else _masked_identifiers(entry.get("added")),
        removed=() if redacted else _masked_identifiers(entry.get("removed")),
        merged_uuids=tuple(entry.get("merged_uuids") or ()),
        restored_uuid=entry.get("restored_uuid") or "",
        interaction_id=entry.get("interaction_id") or "",
        source_system=entry.get("source_system") or "",
    )


def _masked_value(sealer: Sealer | None, customer_uuid: str, name: str, value: Any) -> str | None:
    """A sensitive value as a watcher sees it: masked (None stays None)."""
    if value is None:
        return None
    if sealer is not None:
        try:
            value = sealer.open_value(customer_uuid, name, value)
        except DecryptionFailed:
            return "***"  # the mask is a courtesy: an unreadable value must not stop the watcher's stream
    return mask_value(value)


def _masked_identifiers(pairs: Iterable[list[Any]] | None) -> tuple[tuple[Kind, str], ...]:
    out = []
    for kind_number, value in pairs or ():
        kind = Kind(kind_number)
        out.append((kind, mask(kind, value)))
    return tuple(out)


def bounds(view: Txn) -> tuple[int, int]:
    """The oldest retained sequence and the one the next commit gets (equal: the log is empty)."""
    with view.txn.cursor(db=view.store.db["changes"]) as cur:
        if not cur.first():
            return 1, 1
        oldest = _U64.unpack(cur.key())[0]
        cur.last()
        return oldest, _U64.unpack(cur.key())[0] + 1


def start(store: Store, from_sequence: int) -> int:
    """The first sequence a watcher gets for `from_sequence` (0: the next commit's). SequenceOutOfRange when it is
    older than the oldest retained entry, or later than the next commit's."""
    with store.read() as view:
        oldest, nxt = bounds(view)
    if from_sequence == 0:
        return nxt
    if from_sequence < oldest:
        raise SequenceOutOfRange(f"change {from_sequence} is no longer retained: the oldest retained is {oldest} "
                                 "(resynchronize, then watch from it)", oldest=oldest, next_sequence=nxt)
    if from_sequence > nxt:
        raise SequenceOutOfRange(f"change {from_sequence} is not committed yet: the next commit is {nxt}",
                                 oldest=oldest, next_sequence=nxt, reason="SEQUENCE_AHEAD")
    return from_sequence


class Watch:
    """One watcher's position and filter: `poll` reads on from where it stopped."""

    def __init__(self, store: Store, schema: AttributeSchema, flt: WatchFilter, next_seq: int) -> None:
        self.store = store
        self.filter = flt
        self.next = next_seq
        self._sensitive = frozenset(name for name, spec in schema.specs.items() if spec.sensitive)
        self._sealer = store.sealer

    def poll(self, limit: int = BATCH) -> tuple[list[Change], bool]:
        """The changes among the next `limit` committed entries that pass the filter, and whether any entry was
        read (False: caught up). SequenceOutOfRange when retention deleted the next entry first."""
        entries: list[dict[str, Any]] = []
        with self.store.read() as view, view.txn.cursor(db=view.store.db["changes"]) as cur:
            if cur.set_range(_U64.pack(self.next)):
                for key, raw in cur:
                    seq = _U64.unpack(key)[0]
                    if seq != self.next + len(entries):
                        oldest, nxt = bounds(view)
                        raise SequenceOutOfRange(
                            f"the watcher fell behind retention: change {self.next + len(entries)} was deleted; the "
                            f"oldest retained is {oldest} (resynchronize, then watch from it)",
                            oldest=oldest, next_sequence=nxt)
                    entries.append(decode_json(raw))
                    if len(entries) >= limit:
                        break
        self.next += len(entries)
        flt = self.filter
        return [to_change(e, flt, self._sensitive, self._sealer) for e in entries if flt.matches(e)], bool(entries)
