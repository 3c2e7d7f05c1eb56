"""`resolver stats`: what a data directory holds, and how full LMDB is, read-only (safe while servers serve it).

Counts come from one read transaction (one consistent snapshot) and cost O(1) each: LMDB keeps every database's
entry count in its root, so nothing is scanned. The LMDB figures:

- map size: the one the store's last writer committed (read from the meta page), i.e. the server's
  `[storage] map_size_mb`, not this command's blueprint: opened read-only with map size 0, LMDB takes the stored one;
- pages used (the high-water mark: data.mdb never shrinks; `resolver compact` rewrites it) x page size = bytes used,
  and that as a percentage of the map: at 100 % writes fail with MDB_MAP_FULL;
- reader slots in use (held by a live process: a serving worker, a watcher, this command itself) of the maximum
  (the reader table's size, fixed by the process that created lock.mdb), and how many of them have a snapshot
  open right now with the oldest one's transaction id: a snapshot held long keeps LMDB from reusing the pages
  written since, so data.mdb grows;
- the last committed transaction id.

Opening read-only takes no lock a server needs and creates nothing (StoreError when there is no store). It shares
LMDB's reader table like any reader: while it runs it holds one slot, counted in "reader slots in use".
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from resolver.bootstrap import open_store
from resolver.config import Settings
from resolver.events import counters
from resolver.history import _UNASSOCIATED_COUNT
from resolver.normalize import Kind
from resolver.outbound import outbox
from resolver.store import INDEX_NAMES, Store, Txn

INDEX_LABELS = {"external_id": INDEX_NAMES[Kind.EXTERNAL_ID], "email": INDEX_NAMES[Kind.EMAIL],
                "phone": INDEX_NAMES[Kind.PHONE]}


def add_parser(sub: Any, store_args: Any) -> None:
    """The `stats` subcommand of `resolver` (`store_args` adds --config and --data-dir)."""
    p = sub.add_parser("stats", help="counts and LMDB figures of a data directory (read-only; works while serving)")
    store_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@dataclass(frozen=True, slots=True)
class Counts:
    """How many of each thing the store holds, in one snapshot."""

    customers: int  # records: live customers (a merged-away one is an alias, a deleted one a tombstone)
    aliases: int  # merged-away uuids, each leading to its survivor
    tombstones: int  # deleted customers (CRM DELETE, Forget): no PII, they keep older events from reviving them
    index_entries: dict[str, int]  # per identifier kind: (index key, customer) pairs
    ledger_entries: int  # idempotency answers kept (until `[reliability]` retention sweeps them)
    changes: int  # change-log entries retained
    last_change_sequence: int  # the newest change's sequence number (0: none yet)
    inbox: int  # CRM change events admitted, not yet applied
    dead_letters: int  # CRM change events in the dead-letter queue
    outbox_pending: int  # outbound messages waiting for delivery
    outbox_dead: int  # outbound messages that could not be delivered
    interactions: int  # interactions kept (each customer's bounded history, and unassociated ones)
    audit_entries: int  # erasures recorded (Forget)


@dataclass(frozen=True, slots=True)
class LmdbFigures:
    """How full the LMDB environment is, and who reads it."""

    map_size_bytes: int
    page_size: int
    pages_used: int
    bytes_used: int
    map_used_percent: float
    readers_in_use: int
    max_readers: int
    readers_with_snapshot: int
    oldest_snapshot_txn: int | None  # None: no snapshot open
    last_txn_id: int
    file_bytes: int  # data.mdb on disk (sparse files may report more than they occupy)


@dataclass(frozen=True, slots=True)
class Stats:
    """Everything `resolver stats` prints."""

    data_dir: str
    counts: Counts
    lmdb: LmdbFigures

    def to_json(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "counts": asdict(self.counts), "lmdb": asdict(self.lmdb)}


def run_stats(settings: Settings, *, as_json: bool = False) -> int:
    """Print the stats of the store named in `settings` (a table, or JSON); 0. StoreError when there is none."""
    stats = collect(settings)
    print(json.dumps(stats.to_json(), indent=2) if as_json else render(stats))
    return 0


def collect(settings: Settings) -> Stats:
    """Open the store read-only (map size 0: the stored one, see the module docstring), read, close."""
    store = open_store(replace(settings, storage=replace(settings.storage, map_size_mb=0)), readonly=True)
    try:
        with store.read() as view:
            counts = count(view)
            lmdb = figures(store)
    finally:
        store.close()
    return Stats(str(store.path), counts, lmdb)


def count(view: Txn) -> Counts:
    """Every count of `view`'s snapshot (a database a store written by an older version lacks counts 0)."""
    store = view.store

    def n(name: str) -> int:
        return view.count(name) if name in store.db else 0

    events = counters.snapshot(view.txn, store)
    sent = outbox.snapshot(view.txn, store)
    return Counts(
        customers=n("records"), aliases=n("aliases"), tombstones=n("ev_tombs"),
        index_entries={label: n(name) for label, name in INDEX_LABELS.items()},
        ledger_entries=n("ledger"), changes=n("changes"), last_change_sequence=view.last_change_seq(),
        inbox=events["in_inbox"], dead_letters=events["in_dlq"], outbox_pending=sent["pending"],
        outbox_dead=sent["dead"], interactions=_interactions(view), audit_entries=n("audit"),
    )


def _interactions(view: Txn) -> int:
    """Interactions kept, in O(1). resolver.history stores each one twice (its entry, and its by-id entry pointing to
    it: `resolver check` verifies the pairs) plus one count key once anything was recorded unassociated."""
    db = view.store.db.get("interactions")
    if db is None:
        return 0
    entries = int(view.txn.stat(db)["entries"])
    has_count = view.txn.get(_UNASSOCIATED_COUNT, db=db) is not None
    return (entries - has_count) // 2


def figures(store: Store) -> LmdbFigures:
    """The LMDB figures of `store`'s environment (call inside a read transaction: it is counted as a reader)."""
    info = store.env.info()
    page_size = int(store.env.stat()["psize"])
    pages = int(info["last_pgno"]) + 1
    map_size = int(info["map_size"])
    readers = _readers(store.env.readers())
    snapshots = [txn for txn in readers if txn is not None]
    return LmdbFigures(
        map_size_bytes=map_size, page_size=page_size, pages_used=pages, bytes_used=pages * page_size,
        map_used_percent=round(100 * pages * page_size / map_size, 2), readers_in_use=len(readers),
        max_readers=int(info["max_readers"]), readers_with_snapshot=len(snapshots),
        oldest_snapshot_txn=min(snapshots) if snapshots else None, last_txn_id=int(info["last_txnid"]),
        file_bytes=os.stat(store.path / "data.mdb").st_size,
    )


def _readers(table: str) -> list[int | None]:
    """LMDB's reader table (`mdb_reader_list`: a header, then `pid thread txnid` per slot a live process holds,
    txnid "-" for a slot without a snapshot open) as each slot's snapshot txn id (None: none open)."""
    slots: list[int | None] = []
    for line in table.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3:
            slots.append(None if parts[2] == "-" else int(parts[2]))
    return slots


def render(stats: Stats) -> str:
    """The human-readable table of `stats`."""
    c, m = stats.counts, stats.lmdb
    rows: list[tuple[str, str]] = [
        ("customers", f"{c.customers:,}"),
        ("aliases (merged away)", f"{c.aliases:,}"),
        ("tombstones (deleted)", f"{c.tombstones:,}"),
        *((f"index entries: {label}", f"{entries:,}") for label, entries in c.index_entries.items()),
        ("ledger entries", f"{c.ledger_entries:,}"),
        ("change log: entries", f"{c.changes:,}"),
        ("change log: last sequence", f"{c.last_change_sequence:,}"),
        ("event inbox", f"{c.inbox:,}"),
        ("event dead letters", f"{c.dead_letters:,}"),
        ("outbox: pending", f"{c.outbox_pending:,}"),
        ("outbox: dead", f"{c.outbox_dead:,}"),
        ("interactions", f"{c.interactions:,}"),
        ("audit entries", f"{c.audit_entries:,}"),
        ("LMDB map size", _size(m.map_size_bytes)),
        ("LMDB used", f"{_size(m.bytes_used)} ({m.pages_used:,} pages of {m.page_size:,} bytes), "
                      f"{m.map_used_percent:.2f} % of the map"),
        ("LMDB data.mdb on disk", _size(m.file_bytes)),
        ("LMDB readers", f"{m.readers_in_use:,} of {m.max_readers:,} slots in use, {m.readers_with_snapshot:,} "
                         "with a snapshot open" + (f" (oldest: txn {m.oldest_snapshot_txn:,})"
                                                    if m.oldest_snapshot_txn is not None else "")),
        ("LMDB last txn id", f"{m.last_txn_id:,}"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"stats: {stats.data_dir}"] + [f"  {label:<{width}}  {value}" for label, value in rows])


def _size(n: int) -> str:
    """Bytes in a binary unit with one decimal ("1.5 GiB"); below 1 KiB as bytes."""
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
