"""The raw LMDB floors of bench/import_rate.py: py-lmdb alone writing what an import writes, row for row, with
every byte made before the clock starts.

Per row: a pre-encoded record of the store's average size, 3 index entries (random 16-byte keys, dupsort), a
ledger entry, its expiry key, a change-log entry and 2 `pii_refs` keys.
- `floor_per_batch`: random uuid4 record keys, a synced commit per batch (what an incremental import must pay);
- `floor_one_transaction`: time-ordered record keys, the record, change-log, expiry and `pii_refs` keys appended,
  the index and ledger entries put sorted per batch, one synced commit (what an initial load in place must pay);
  with `commit_rows`, an unsynced commit every so many rows and one sync at the end (an initial load built beside
  the store: resolver.importer.staged).

Each returns the rows, the value sizes, the batch, the wall time and the rows per second.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb


class _Entries:
    """A floor's pre-encoded entries, row by row."""

    def __init__(self, rows: int, sizes: dict[str, int], *, ordered: bool) -> None:
        self.value, self.entry, self.change = (b"x" * sizes[n] for n in ("records", "ledger", "changes"))
        t0 = time.time_ns() // 1_000_000
        # ordered: uuids that increase with the row (as an import's UUIDv7s do); else random (uuid4)
        self.uids = [((t0 << 80) | (i << 32) | random.getrandbits(32)).to_bytes(16, "big") if ordered
                     else os.urandom(16) for i in range(rows)]
        self.keys = [os.urandom(48) for _ in range(rows)]  # three hashed index keys
        self.lkeys = [b"bench-load-%d" % i for i in range(rows)]  # the dataset's idempotency keys


@dataclass(frozen=True)
class _FloorEnv:
    """An open floor environment and the store's databases in it (the three indexes dupsort, as the store's)."""

    env: lmdb.Environment
    records: Any
    ledger: Any
    ledger_exp: Any
    changes: Any
    refs: Any
    ix: list[Any]  # external_id, email, phone


@contextmanager
def _floor_env(where: Path, *, durable: bool = True) -> Iterator[_FloorEnv]:
    """An environment in `where` (commits synced, or not) with the store's databases open; closed on the way out."""
    env = lmdb.open(str(where), map_size=64 << 30, max_dbs=10, sync=durable, metasync=durable)
    try:
        records, ledger, ledger_exp, changes, refs = (env.open_db(n) for n in (b"records", b"ledger", b"ledger_exp",
                                                                             b"changes", b"pii_refs"))
        ix = [env.open_db(name, dupsort=True, dupfixed=True) for name in (b"ix_external", b"ix_email", b"ix_phone")]
        yield _FloorEnv(env, records, ledger, ledger_exp, changes, refs, ix)
    finally:
        env.close()


def _figures(rows: int, batch: int, sizes: dict[str, int], elapsed: float) -> dict[str, Any]:
    return {"rows": rows, "bytes": sizes, "batch": batch, "wall_s": round(elapsed, 2), "rows_per_s": round(rows / elapsed)}


def floor_per_batch(rows: int, batch: int, sizes: dict[str, int], where: Path) -> dict[str, Any]:
    """py-lmdb: every entry of a row put one by one, random uuid4 record keys, one synced commit per batch."""
    e = _Entries(rows, sizes, ordered=False)
    with _floor_env(where) as f:
        # locals, not attributes, in the loop: the floor times LMDB, not attribute look-ups
        records, ledger, ledger_exp, changes, refs, ix = f.records, f.ledger, f.ledger_exp, f.changes, f.refs, f.ix
        started = time.monotonic()
        for start in range(0, rows, batch):
            with f.env.begin(write=True) as txn:
                for i in range(start, min(start + batch, rows)):
                    uid, k, lkey = e.uids[i], e.keys[i], e.lkeys[i]
                    seq = i.to_bytes(8, "big")
                    txn.put(uid, e.value, db=records)
                    txn.put(k[:16], uid, db=ix[0])
                    txn.put(k[16:32], uid, db=ix[1])
                    txn.put(k[32:], uid, db=ix[2])
                    txn.put(lkey, e.entry, db=ledger)
                    txn.put(b"%016x" % i + lkey, b"", db=ledger_exp)
                    txn.put(seq, e.change, db=changes, append=True)
                    txn.put(uid + b"C" + seq, b"", db=refs)
                    txn.put(uid + b"L" + lkey, b"", db=refs)
        elapsed = time.monotonic() - started
    return _figures(rows, batch, sizes, elapsed)


def floor_one_transaction(rows: int, batch: int, sizes: dict[str, int], where: Path, *,
                          commit_rows: int = 0) -> dict[str, Any]:
    """py-lmdb: one transaction; per batch the record, change-log, expiry and pii_refs entries appended (their keys
    increase), index and ledger entries put sorted; one synced commit. `commit_rows` > 0: what an initial load
    built beside the store pays instead (resolver.importer.staged): an unsynced commit every `commit_rows` rows,
    then one sync of the whole file."""
    e = _Entries(rows, sizes, ordered=True)
    batches = []
    for start in range(0, rows, batch):
        part = range(start, min(start + batch, rows))
        batches.append((
            [(e.uids[i], e.value) for i in part],
            [sorted((e.keys[i][16 * j:16 * j + 16], e.uids[i]) for i in part) for j in range(3)],
            sorted((e.lkeys[i], e.entry) for i in part),
            [(b"%016x" % i + e.lkeys[i], b"") for i in part],
            [(i.to_bytes(8, "big"), e.change) for i in part],
            sorted(r for i in part for r in ((e.uids[i] + b"C" + i.to_bytes(8, "big"), b""),
                                             (e.uids[i] + b"L" + e.lkeys[i], b""))),
        ))
    per_txn = max(commit_rows // batch, 1) if commit_rows else len(batches)
    with _floor_env(where, durable=not commit_rows) as f:
        started = time.monotonic()
        for first in range(0, len(batches), per_txn):
            with f.env.begin(write=True) as txn:
                for recs, index, ledgers, expiries, log_entries, pii in batches[first:first + per_txn]:
                    txn.cursor(db=f.records).putmulti(recs, append=True)
                    for db, items in zip(f.ix, index, strict=True):
                        txn.cursor(db=db).putmulti(items)
                    txn.cursor(db=f.ledger).putmulti(ledgers)
                    txn.cursor(db=f.ledger_exp).putmulti(expiries, append=True)
                    txn.cursor(db=f.changes).putmulti(log_entries, append=True)
                    txn.cursor(db=f.refs).putmulti(pii, append=True)
        if commit_rows:
            f.env.sync(True)
        elapsed = time.monotonic() - started
    return _figures(rows, batch, sizes, elapsed)
