"""`resolver export FILE`: every customer of the store as JSON lines, which `resolver import` loads into an empty
store to the same customers (resolver.importer.restore_rows).

The file, every line compact key-sorted JSON (resolver.records.encode_json), so the same store always gives the
same bytes:

    {"resolver_export": 1, "store_format": 1}                       the header: how the importer recognises it
    {"aliases": [...], "attributes": {...}, "created_us": ..., ...}  one customer per line, in uuid order
    {"resolver_export_end": {"aliases": M, "customers": N}}         the trailer: a file cut short is refused

A customer line is the stored record (`Record.to_json`: uuid, external_id, merged_external_ids, emails, phones,
their provenance `held` and `slot_us`, attributes, field_us, version, created_us, updated_us) plus
- `aliases`: the uuids merged into it, sorted (followed through chains of merges, so each names its final
  survivor): a merged-away uuid still resolves after the import;
- `event_us`: per attribute, the time of the CRM event that last set it (last writer wins by event time).
Sensitive attributes stay in their sealed stored form ({"enc": "v1:KEYID:..."}): they are bound to the customer's
uuid, which the import keeps, and the importing store needs the key they were sealed with. Nothing is decrypted.

Not exported (a backup copies them): the change log, the idempotency ledger, the merge journal (an imported merge
cannot be unmerged), tombstones of deleted CRM records and aliases leading to them, interactions, the events inbox,
dead letters and the outbox.

Everything is read from one read transaction (a consistent snapshot while the server serves; it keeps the pages
of that snapshot from reuse until it ends, so the store's file may grow under a write load meanwhile). Memory:
the aliases, grouped by survivor; the customers are streamed.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from resolver import datalock
from resolver.bootstrap import open_store
from resolver.config import Settings
from resolver.errors import StoreError
from resolver.records import Record, encode_json
from resolver.store import FORMAT_VERSION, Txn, uuid_text

EXPORT_VERSION = 1
HEADER_KEY = "resolver_export"
TRAILER_KEY = "resolver_export_end"
CUSTOMER_FIELDS = frozenset(Record(uuid="").to_json()) | {"aliases", "event_us"}
_U64 = struct.Struct(">Q")


def header() -> dict[str, Any]:
    """The export file's first line."""
    return {HEADER_KEY: EXPORT_VERSION, "store_format": FORMAT_VERSION}


def run_export(settings: Settings, target: Path) -> int:
    """Write every customer of the store of `settings` to `target` (which must not exist); print a summary: 0.
    StoreError (the CLI's exit 2) when the store or the file cannot be used; no partial file is left."""
    started = time.monotonic()
    if target.exists():
        raise StoreError(f"{target} exists: an export writes a new file (remove it or name another)")
    if not target.parent.is_dir():
        raise StoreError(f"{target.parent}: no such directory")
    store = open_store(settings, readonly=True)  # StoreError when there is no store: nothing is created
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with store.read() as view, open(tmp, "wb") as out:
            last_seq = view.last_change_seq()
            customers, aliases = 0, 0
            merged_into, dropped = _aliases(view)
            out.write(encode_json(header()) + b"\n")
            for line in customer_lines(view, merged_into):
                out.write(line.data)
                customers += 1
                aliases += line.aliases
            out.write(encode_json({TRAILER_KEY: {"aliases": aliases, "customers": customers}}) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        datalock.sync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        store.close()
    left_out = f"; {dropped} alias(es) of deleted customers left out" if dropped else ""
    print(f"export: {store.path} -> {target}: {customers} customers, {aliases} aliases (snapshot at change "
          f"{last_seq}){left_out} in {time.monotonic() - started:.1f}s")
    return 0


class Line(NamedTuple):
    """One customer's encoded line, and how many aliases it names."""

    data: bytes
    aliases: int


def customer_lines(view: Txn, merged_into: dict[bytes, list[str]]) -> Iterator[Line]:
    """Each customer of `view`'s snapshot as an export line, in uuid order (the records' key order)."""
    ev_fields = view.store.db.get("ev_fields")  # absent in a read-only open of a store older than events
    with view.txn.cursor(db=view.store.db["records"]) as cur:
        for uid, raw in cur:
            rec = Record.decode(raw)  # as stored: sensitive values stay sealed
            d = rec.to_json()
            d["aliases"] = sorted(merged_into.get(uid, ()))
            d["event_us"] = _event_times(view, ev_fields, uid) if ev_fields is not None else {}
            yield Line(encode_json(d) + b"\n", len(d["aliases"]))


def _aliases(view: Txn) -> tuple[dict[bytes, list[str]], int]:
    """The merged-away uuids by the customer they finally resolve to, and how many lead to no record (a deleted
    customer's tombstone)."""
    records = view.store.db["records"]
    out: dict[bytes, list[str]] = {}
    dropped = 0
    with view.txn.cursor(db=view.store.db["aliases"]) as cur:
        for merged, _ in cur.iternext(keys=True, values=True):
            survivor = view.survivor(merged)
            if view.txn.get(survivor, db=records) is None:
                dropped += 1
                continue
            out.setdefault(survivor, []).append(uuid_text(merged))
    return out, dropped


def _event_times(view: Txn, db: Any, uid: bytes) -> dict[str, int]:
    """Per attribute, the event time `ev_fields` holds for customer `uid` (resolver.events.apply)."""
    out: dict[str, int] = {}
    with view.txn.cursor(db=db) as cur:
        if cur.set_range(uid):
            for k, v in cur:
                if k[:16] != uid:
                    break
                out[k[16:].decode("utf-8")] = _U64.unpack(v)[0]
    return out
