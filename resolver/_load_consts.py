"""The packed create: how one plain create of an import travels from a worker to the parent, as one bytes object.

Written by `RowPlanner` (a JSON line on the fast path) and by `resolver.bulk.pack` (a row the general path
planned), read by `CreateQueue` (resolver/_load_py.py and its compiled twin ext/_load_c.pyx). Integers are
big-endian; `HEADER`, a `KEY` per index key, the ledger key after its `KEY_LENGTH`, then each of `FIELDS` after its
`LENGTH`:

| field | what |
| --- | --- |
| line | the row's (first) line in the file |
| flags | `DERIVED`: its idempotency key was derived from its content (resolver.importer.prepare.Repeats) |
| now_us, expires_us | the command's clock reading and its ledger entry's expiry |
| uuid | the new customer's 16 bytes |
| keys | how many index keys follow, then per key its kind (resolver.normalize.Kind) and its `KEY_SIZE` bytes |
| ledger_key | the idempotency key (UTF-8) |
| record, change_head, change_tail, ledger_entry | what resolver.bulk.Planned holds under those names |
| raw | the line as read (UTF-8, no line end) when the command is to be rebuilt from it (the fast path); empty when
  the row's command travels beside the entry (the general path: resolver.importer.rows.Prepared.blob) |

One bytes object per row, not a tuple of them: pickling costs per object, and the parent reads the fields from C.
`pack` writes one and `unpack` reads one back.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

HEADER = struct.Struct(">QBQQ16sH")  # line, flags, now_us, expires_us, uuid, number of keys
KEY_SIZE = 16  # resolver._keys_py.KEY_SIZE: every index key
KEY = struct.Struct(">B16s")  # kind, key
KEY_LENGTH = struct.Struct(">H")  # the ledger key's length (at most resolver.ledger.MAX_KEY_BYTES)
LENGTH = struct.Struct(">I")  # the length of each field after it
FIELDS = ("record", "change_head", "change_tail", "ledger_entry", "raw")  # after the ledger key, in this order
DERIVED = 1
SEQ = struct.Struct(">Q")  # a change-log key (resolver.store: the sequence number)
LEDGER_REF = b"L"  # resolver.pii_refs.pii_ledger_ref: uuid + this + ledger key
CHANGE_REF = b"C"  # resolver.pii_refs.pii_change_ref: uuid + this + sequence number


class Entry(NamedTuple):
    """A packed create's fields (`unpack`): for the parent's rare paths (apply, a shared phone's answer)."""

    line: int
    derived: bool
    now_us: int
    expires_us: int
    uuid: bytes
    keys: tuple[tuple[int, bytes], ...]  # (kind, index key), in the order external_id, emails, phones
    ledger_key: bytes
    record: bytes
    change_head: bytes
    change_tail: bytes
    ledger_entry: bytes
    raw: bytes


def pack(line: int, derived: bool, now_us: int, expires_us: int, uid: bytes, keys: list[tuple[int, bytes]],
         ledger_key: bytes, record: bytes, change_head: bytes, change_tail: bytes, ledger_entry: bytes,
         raw: bytes) -> bytes:
    """One packed create."""
    parts = [HEADER.pack(line, DERIVED if derived else 0, now_us, expires_us, uid, len(keys))]
    parts += [KEY.pack(kind, key) for kind, key in keys]
    parts += [KEY_LENGTH.pack(len(ledger_key)), ledger_key]
    for field in (record, change_head, change_tail, ledger_entry, raw):
        parts += [LENGTH.pack(len(field)), field]
    return b"".join(parts)


def entry_head(entry: bytes) -> tuple[int, bool]:
    """A packed create's line, and whether its idempotency key was derived from its content."""
    line, flags = HEADER.unpack_from(entry)[:2]
    return line, bool(flags & DERIVED)


def entry_derived(entry: bytes) -> bool:
    """Whether a packed create's idempotency key was derived from its content."""
    return bool(entry[8] & DERIVED)


def unpack(entry: bytes) -> Entry:
    """The fields of a packed create."""
    line, flags, now, expires, uid, n = HEADER.unpack_from(entry)
    at = HEADER.size
    keys = []
    for _ in range(n):
        keys.append(KEY.unpack_from(entry, at))
        at += KEY.size
    (size,) = KEY_LENGTH.unpack_from(entry, at)
    at += KEY_LENGTH.size
    fields = [entry[at:at + size]]
    at += size
    for _ in FIELDS:
        (size,) = LENGTH.unpack_from(entry, at)
        at += LENGTH.size
        fields.append(entry[at:at + size])
        at += size
    return Entry(line, bool(flags & DERIVED), now, expires, uid, tuple(keys), *fields)
