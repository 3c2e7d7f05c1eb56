"""`resolver import FILE` of a `resolver export` file (resolver.export): load its customers into an EMPTY store, to
the same customers: same uuids, versions, identifiers and their provenance, attributes (sensitive ones as sealed),
field and event times, and aliases (a merged-away uuid resolves to its survivor).

All or nothing: the whole file is loaded in ONE write transaction, committed (and synced) only after every line
was read and checked, the trailer's counts matched, and `resolver check`'s verification (resolver.check
.find_problems) found nothing wrong inside that same transaction. A refused file, or an import killed part way,
leaves the store as empty as it was. Records go in with sorted appends (the file is in uuid order, which this
verifies); index entries are made through `Txn.index_add`, so their keys are the importing store's hash.

Into a store that holds anything (customers, aliases, index entries, tombstones, change-log or ledger entries) it
refuses: merging an export into existing customers is not supported. Exit codes: 0 loaded, 2 refused (nothing
written).

Rows are copied, not re-validated against the importing blueprint (they were valid where they were exported);
what is checked: the shape of each line, the uuid order, that every sealed value names a key id the importing
blueprint's `[encryption] keys` hold (the values themselves are not decrypted), and the consistency `check` sees.
"""

from __future__ import annotations

import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from resolver.bootstrap import open_store
from resolver.check import find_problems
from resolver.config import Settings
from resolver.crypto import Sealer, is_sealed, key_id_of
from resolver.errors import StoreError
from resolver.export import CUSTOMER_FIELDS, EXPORT_VERSION, HEADER_KEY, TRAILER_KEY
from resolver.records import Record
from resolver.store import Txn, uuid_bytes, uuid_text

RECORDS_PER_PUT = 4096
MAX_PROBLEMS_SHOWN = 10
_SNIFF_BYTES = 1 << 16
_U64 = struct.Struct(">Q")
# a store holding an entry in any of these is not empty
_CONTENT_DBS = ("records", "aliases", "ix_external", "ix_email", "ix_phone", "changes", "ledger", "ev_tombs",
                "ev_tomb_ext", "interactions")
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "uuid": (str,), "external_id": (str, type(None)), "emails": (list,), "phones": (list,),
    "merged_external_ids": (list,), "attributes": (dict,), "version": (int,), "created_us": (int,),
    "updated_us": (int,), "field_us": (dict,), "held": (dict,), "slot_us": (dict,), "aliases": (list,),
    "event_us": (dict,),
}


def is_export(path: Path) -> bool:
    """Whether `path` starts with a `resolver export` header line (False for anything else, or no such file)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(_SNIFF_BYTES)
        head = orjson.loads(first)
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(head, dict) and HEADER_KEY in head


@dataclass(frozen=True)
class Loaded:
    """What an import of an export wrote."""

    customers: int
    aliases: int
    index_entries: int


def run_export_import(settings: Settings, path: Path) -> int:
    """Load the export file `path` into the empty store of `settings`; print a summary line. 0 loaded; 2 refused
    (the reason on stderr; nothing written)."""
    started = time.monotonic()
    if not path.is_file():
        return _fail(f"{path}: no such file")
    store = open_store(settings)
    try:
        with open(path, "rb") as f, store.write() as view:
            loaded = load(view, f, path, Sealer.from_settings(settings))
    except StoreError as exc:
        return _fail(str(exc))
    finally:
        store.close()
    print(f"import: {path} (export): {loaded.customers} customers, {loaded.aliases} aliases, "
          f"{loaded.index_entries} index entries; check OK; in {time.monotonic() - started:.1f}s", flush=True)
    return 0


def load(view: Txn, lines: Any, path: Path, sealer: Sealer) -> Loaded:
    """Write every customer of the export read from `lines` (a binary file) in the write transaction `view`, then
    verify the result; StoreError (the caller's transaction then aborts) for anything that stops the import."""
    _refuse_unless_empty(view)
    ev_fields = view.store.db["ev_fields"]
    aliases_db = view.store.db["aliases"]
    records: list[tuple[bytes, bytes]] = []
    prev = b""
    customers = aliases = entries = 0
    trailer: dict[str, Any] | None = None
    n = 0
    for n, raw in enumerate(lines, start=1):
        where = f"{path} line {n}"
        if trailer is not None:
            raise StoreError(f"{where}: a line after the export's last line; nothing was imported")
        d = _json(raw, where)
        if n == 1:
            if d.get(HEADER_KEY) != EXPORT_VERSION:
                raise StoreError(f"{where}: not a resolver export of version {EXPORT_VERSION} "
                                 f"({HEADER_KEY} {d.get(HEADER_KEY)!r}); nothing was imported")
            continue
        if TRAILER_KEY in d:
            trailer = d[TRAILER_KEY] if isinstance(d[TRAILER_KEY], dict) else {}
            continue
        rec, merged, event_us = _customer(d, where)
        uid = uuid_bytes(rec.uuid)
        if uid <= prev:
            raise StoreError(f"{where}: customer {rec.uuid} is out of uuid order (or repeated); an export lists "
                             "each customer once, in uuid order; nothing was imported")
        prev = uid
        _check_keys(rec, sealer, where)
        records.append((uid, rec.encode()))  # as exported: sealed values stay sealed, nothing is re-encrypted
        if len(records) >= RECORDS_PER_PUT:
            view.put_many("records", records, append=True)
            records = []
        for kind, value in dict.fromkeys(rec.identifiers()):
            view.index_add(kind, value, uid)
            entries += 1
        for text in merged:
            if not view.txn.put(uuid_bytes(text), uid, db=aliases_db, overwrite=False):
                raise StoreError(f"{where}: alias {text} is listed twice; nothing was imported")
        aliases += len(merged)
        for name, us in event_us.items():
            view.txn.put(uid + name.encode("utf-8"), _U64.pack(us), db=ev_fields)
        customers += 1
    if records:
        view.put_many("records", records, append=True)
    if n == 0:
        raise StoreError(f"{path}: empty file: not a resolver export; nothing was imported")
    if trailer != {"aliases": aliases, "customers": customers}:
        raise StoreError(f"{path}: the export is incomplete (its last line, which counts the customers, is "
                         f"{'missing' if trailer is None else 'different'}: {customers} customers read); "
                         "nothing was imported")
    problems = find_problems(view)
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        raise StoreError(f"{path}: the loaded customers fail `resolver check` ({len(problems)} problem(s): {shown}); "
                         "nothing was imported")
    return Loaded(customers, aliases, entries)


def _refuse_unless_empty(view: Txn) -> None:
    held = {name: view.count(name) for name in _CONTENT_DBS if name in view.store.db}
    if any(held.values()):
        what = ", ".join(f"{name} {n}" for name, n in held.items() if n)
        raise StoreError(f"{view.store.path} is not empty ({what}): an export is imported only into an empty store "
                         "(merging an export into existing customers is not supported); import it into a new "
                         "--data-dir; nothing was imported")


def _json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StoreError(f"{where}: not JSON; nothing was imported") from None
    if not isinstance(d, dict):
        raise StoreError(f"{where}: not a JSON object; nothing was imported")
    return d


def _customer(d: dict[str, Any], where: str) -> tuple[Record, list[str], dict[str, int]]:
    """The record, the aliases and the event times of one customer line; StoreError naming what is wrong (no
    identifier or attribute value in the message)."""
    missing = sorted(CUSTOMER_FIELDS - d.keys())
    extra = sorted(d.keys() - CUSTOMER_FIELDS)
    if missing or extra:
        raise StoreError(f"{where}: not a customer line (missing {', '.join(missing) or 'nothing'}, unexpected "
                         f"{', '.join(extra) or 'nothing'}); nothing was imported")
    wrong = [k for k, types in _RECORD_TYPES.items() if not isinstance(d[k], types) or type(d[k]) is bool]
    wrong += [k for k in ("emails", "phones", "merged_external_ids", "aliases") if k not in wrong
              and not all(isinstance(v, str) for v in d[k])]
    wrong += [k for k in ("field_us", "slot_us", "event_us") if k not in wrong and not _times(d[k])]
    if "held" not in wrong and not all(isinstance(v, dict) and _times(v) for v in d["held"].values()):
        wrong.append("held")
    if not wrong:
        wrong += [k for k in ("uuid", *(["aliases"] if d["aliases"] else [])) if not _uuids(d[k])]
    if wrong:
        raise StoreError(f"{where}: malformed field(s) {', '.join(sorted(set(wrong)))}; nothing was imported")
    merged = d.pop("aliases")
    event_us = d.pop("event_us")
    return Record.from_json(d), merged, event_us


def _times(m: dict[str, Any]) -> bool:
    return all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in m.items())


def _uuids(value: str | list[str]) -> bool:
    """Every uuid in canonical text form (the form records and aliases are stored under)."""
    for text in [value] if isinstance(value, str) else value:
        try:
            if uuid_text(uuid_bytes(text)) != text:
                return False
        except ValueError:
            return False
    return True


def _check_keys(rec: Record, sealer: Sealer, where: str) -> None:
    """Every sealed attribute value names a key id the importing blueprint holds (else it could never be read)."""
    for name, value in rec.attributes.items():
        if is_sealed(value) and key_id_of(value) not in sealer.ring.ids:
            held = ", ".join(sealer.ring.ids) or "none"
            raise StoreError(f"{where}: attribute {name} of customer {rec.uuid} is encrypted under key id "
                             f"{key_id_of(value)!r}, which the blueprint's [encryption] keys do not hold (held: "
                             f"{held}); import with the key it was sealed with; nothing was imported")


def _fail(message: str) -> int:
    print(f"resolver import: {message}", file=sys.stderr)
    return 2


__all__ = ["Loaded", "is_export", "load", "run_export_import"]
