"""`resolver rekey`: re-encrypt, under the first `[encryption]` key, every stored value and event body that is not
under it, while `resolver serve` runs on the same data directory.

What it walks (resolver.crypto says how each is sealed): the records' sensitive attributes, the change log's
(`attributes`, `attributes_old`, an event's `conflicts`), the merge journal's records, and the bodies in the events
inbox and dead-letter queue. A sealed value under another key is decrypted and sealed again under the first key;
a sensitive attribute's value stored in clear (written before the attribute was declared sensitive, or before
there was a key) is sealed; a sealed value of an attribute the blueprint no longer declares sensitive is stored in
clear, as the next write of its customer would store it (the blueprint decides). Nothing else changes: a record
keeps its version and no change-log entry is written (re-encryption is no customer change, and no watcher or
outbound destination hears of it).

Online: each batch of entries is read and rewritten in one short write transaction, and LMDB serializes it with the
server's writers (in whatever process). A server already writes under the first key once it runs with the new
blueprint, so a pass leaves nothing under an old key; run it again at any time, it rewrites nothing more.
A value that cannot be decrypted (its key is not in the blueprint, or it was altered or moved) is left as it is and
counted: the exit status is then 1, and the old key must not be dropped.

Rotation: put the new key first in `[encryption] keys` (keep the old one after it), restart the servers, run
`resolver rekey`, then drop the old key. The bytes of the old ciphertexts stay in LMDB's free pages until they are
reused; `resolver compact` (servers stopped) removes them.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resolver.config import Settings
from resolver.crypto import Sealer, is_sealed, key_id_of, new_key
from resolver.errors import DecryptionFailed
from resolver.events import envelope
from resolver.records import decode_json, encode_json
from resolver.store import Store

BATCH = 256  # entries per write transaction: short, so the server's writers wait at most a few milliseconds
PARTS = (("records", "records"), ("changes", "change log"), ("merges", "merge journal"),
         ("ev_inbox", "events inbox"), ("ev_dlq", "event dead letters"))


@dataclass
class PartReport:
    """What a pass did to one database."""

    entries: int = 0  # entries read
    rewritten: int = 0  # entries written back
    reencrypted: int = 0  # values or bodies moved from another key to the first
    encrypted: int = 0  # values or bodies that were stored in clear
    decrypted: int = 0  # values of attributes no longer declared sensitive
    unreadable: Counter[str] = field(default_factory=Counter)  # by key id: left as they are


@dataclass
class RekeyReport:
    key_id: str  # the first key: everything readable is now under it
    parts: dict[str, PartReport]

    @property
    def unreadable(self) -> int:
        return sum(sum(p.unreadable.values()) for p in self.parts.values())


class _Pass:
    """One database's re-encryption: `fix(raw)` is the entry's new bytes, or None when it is already right."""

    def __init__(self, sealer: Sealer, report: PartReport) -> None:
        self.sealer = sealer
        self.report = report

    def value(self, customer_uuid: str, name: str, value: Any) -> Any:
        """The value as it must be stored: a sensitive one under the first key, any other in clear (unreadable: as
        it is)."""
        sealer = self.sealer
        sensitive = sealer.sensitive(name)
        if is_sealed(value):
            key_id = key_id_of(value)
            if key_id == sealer.ring.current and sensitive:
                return value
            try:
                plain = sealer.open_value(customer_uuid, name, value)
            except DecryptionFailed:
                self.report.unreadable[key_id or "(malformed)"] += 1
                return value
            if not sensitive:
                self.report.decrypted += 1
                return plain
            self.report.reencrypted += 1
            return sealer.seal_value(customer_uuid, name, plain)
        if value is not None and sensitive:
            self.report.encrypted += 1
            return sealer.seal_value(customer_uuid, name, value)
        return value

    def attributes(self, customer_uuid: str, values: dict[str, Any] | None) -> bool:
        """Fix a map of attribute values in place; whether anything changed."""
        if not values:
            return False
        changed = False
        for name, value in values.items():
            new = self.value(customer_uuid, name, value)
            if new is not value:
                values[name] = new  # an existing key: the dict's size does not change while it is iterated
                changed = True
        return changed

    def record(self, raw: bytes) -> bytes | None:
        d = decode_json(raw)
        return encode_json(d) if self.attributes(d["uuid"], d.get("attributes")) else None

    def change(self, raw: bytes) -> bytes | None:
        d = decode_json(raw)
        customer = d.get("customer_uuid") or ""
        changed = self.attributes(customer, d.get("attributes"))
        changed = self.attributes(customer, d.get("attributes_old")) or changed
        for conflict in d.get("conflicts") or ():
            name = conflict.get("field", "")
            for key in ("expected_old", "stored"):
                if name and (self.sealer.sensitive(name) or is_sealed(conflict.get(key))):
                    new = self.value(customer, name, conflict.get(key))
                    if new is not conflict.get(key):
                        conflict[key] = new
                        changed = True
        return encode_json(d) if changed else None

    def journal(self, raw: bytes) -> bytes | None:
        d = decode_json(raw)
        changed = False
        for rec in (d["survivor_before"], *d["merged"]):
            changed = self.attributes(rec["uuid"], rec.get("attributes")) or changed
        return encode_json(d) if changed else None

    def event(self, raw: bytes) -> bytes | None:
        ring = self.sealer.ring
        key_id = envelope.sealed_by(raw)
        if key_id == ring.current:
            return None
        try:
            meta, body = envelope.decode(raw, ring)
        except DecryptionFailed:
            self.report.unreadable[key_id or "(malformed)"] += 1
            return None
        if key_id is None:
            self.report.encrypted += 1
        else:
            self.report.reencrypted += 1
        return envelope.encode(meta, body, ring)


def rekey(store: Store, *, batch: int = BATCH, progress: Callable[[str, PartReport], None] | None = None) -> RekeyReport:
    """Re-encrypt the store under the first key of `store.sealer` (module docstring); what it did, per part.
    RuntimeError when the blueprint has no `[encryption]` key."""
    sealer = store.sealer
    if not sealer.ring.enabled:
        raise RuntimeError("the blueprint has no [encryption] keys: there is no key to re-encrypt under")
    report = RekeyReport(sealer.ring.current, {})
    for name, _ in PARTS:
        part = report.parts[name] = PartReport()
        if name not in store.db:
            continue  # a store written before events existed
        p = _Pass(sealer, part)
        fix = {"records": p.record, "changes": p.change, "merges": p.journal}.get(name, p.event)
        _walk(store, name, fix, part, batch)
        if progress is not None:
            progress(name, part)
    return report


def _walk(store: Store, name: str, fix: Callable[[bytes], bytes | None], part: PartReport, batch: int) -> None:
    """Every entry of database `name`, in key order, `batch` per write transaction; entries written by others
    meanwhile are met or not, and need nothing: they are written under the first key."""
    db = store.db[name]
    after: bytes | None = None
    while True:
        rewrites: list[tuple[bytes, bytes]] = []
        seen = 0
        with store.write() as view:
            txn = view.txn
            with txn.cursor(db=db) as cur:
                found = cur.set_range(after) if after is not None else cur.first()
                if found and after is not None and cur.key() == after:
                    found = cur.next()
                while found and seen < batch:
                    key, raw = cur.key(), cur.value()
                    new = fix(raw)
                    if new is not None:
                        rewrites.append((key, new))
                    seen += 1
                    after = key
                    found = cur.next()
            for key, raw in rewrites:
                txn.put(key, raw, db=db)
        part.entries += seen
        part.rewritten += len(rewrites)
        if seen < batch:
            return


def add_parsers(sub: Any, store_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """`resolver rekey` and `resolver key new` (subparsers of the command line's `sub`)."""
    p = sub.add_parser("rekey", help="re-encrypt sensitive attributes and event bodies under the first [encryption] "
                                     "key (safe while the server runs)")
    store_args(p)
    p.add_argument("--batch", type=int, default=BATCH, metavar="N", help="entries per write transaction")
    key = sub.add_parser("key", help="encryption keys")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    key_sub.add_parser("new", help="print a fresh random AES-256 key (base64) for [encryption] keys")


def run_key(args: argparse.Namespace) -> int:
    """`resolver key new`: the key alone on stdout (to pipe into a secret store), how to use it on stderr."""
    print(new_key())
    print("resolver: put it in a secret (env or file), then first in [encryption] keys, e.g. "
          '{ id = "k2", key = { env = "RESOLVER_ENCRYPTION_KEY_K2" } }; restart the servers, then `resolver rekey`',
          file=sys.stderr)
    return 0


def run_rekey(settings: Settings, args: argparse.Namespace) -> int:
    """`resolver rekey`: 0 when everything is under the first key, 1 when some value could not be decrypted."""
    from resolver.bootstrap import open_store

    store = open_store(settings)
    try:
        try:
            report = rekey(store, batch=args.batch, progress=_print_part)
        except RuntimeError as exc:
            print(f"resolver: {exc}", file=sys.stderr)
            return 2
    finally:
        store.close()
    if report.unreadable:
        print(f"rekey: {report.unreadable} value(s) could not be decrypted and stay as they are: keep their key in "
              "[encryption] keys (or restore it), then run `resolver rekey` again", file=sys.stderr)
        return 1
    print(f"rekey: everything is under key {report.key_id!r}; keys after it in [encryption] keys may be dropped")
    return 0


def _print_part(name: str, part: PartReport) -> None:
    label = dict(PARTS)[name]
    unreadable = ", ".join(f"{n} under {k!r}" for k, n in sorted(part.unreadable.items())) or "0"
    print(f"rekey: {label}: {part.entries} entries read, {part.rewritten} rewritten ({part.reencrypted} re-encrypted, "
          f"{part.encrypted} encrypted from clear, {part.decrypted} no longer sensitive); unreadable: {unreadable}",
          flush=True)
