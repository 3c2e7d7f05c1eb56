"""Change-log retention (`[changes] retention_days`, `retention_count`): the sweeper deletes the oldest entries.

An entry goes when it is older than `retention_days` or beyond the newest `retention_count`, whichever removes
more; the oldest go first, so what is retained is always one gap-free run of sequences up to the newest (a watcher
asking for an older one is OUT_OF_RANGE, naming the oldest retained: resolver.feed). The newest entry is never
deleted: the next sequence is the last one + 1 (`Txn.append_change`), so an emptied log would reuse numbers.

With each entry go its `pii_refs` (uuid + b"C" + sequence), for every customer it can copy the PII of: its own, and
those it names (pii_of, merged_uuids, restored_uuid: a redacted entry kept the uuids but not pii_of).

Unmerge and retention: undoing a merge keeps each attribute written to the survivor after the merge, and learns
which from the change log (resolver.unmerge `_written_since`). Deleting those entries would make an Unmerge put
back the survivor's pre-merge values over later writes. So before an entry of customer S goes, the attributes it
wrote are added to the `written_since` of every merge journal entry of S older than it (S's merges that can still
be undone), and Unmerge reads both: the journal keeps exactly what the deleted entries said, and a merge that is
never undone pins nothing. (One B-tree lookup per deleted entry: most customers have no journal entry.)
"""

from __future__ import annotations

import struct
from typing import Any

from resolver.config.tables import ChangeSettings
from resolver.pii_refs import pii_change_ref
from resolver.records import decode_json
from resolver.store import Store, Txn, uuid_bytes

_U64 = struct.Struct(">Q")
DAY_US = 86_400 * 1_000_000


def sweep_changes(store: Store, settings: ChangeSettings, now_us: int, batch: int = 1000) -> int:
    """Delete the entries past retention in write transactions of up to `batch` entries; how many were deleted."""
    if settings.retention_days is None and settings.retention_count is None:
        return 0
    cutoff_us = now_us - int(settings.retention_days * DAY_US) if settings.retention_days is not None else None
    total = 0
    while True:
        with store.write() as view:
            n = _sweep(view, cutoff_us, settings.retention_count, batch)
        total += n
        if n < batch:
            return total


def _sweep(view: Txn, cutoff_us: int | None, keep: int | None, batch: int) -> int:
    excess = view.count("changes") - keep if keep is not None else 0
    last = view.last_change_seq()
    deleted = 0
    with view.txn.cursor(db=view.store.db["changes"]) as cur:
        if not cur.first():
            return 0
        while deleted < batch:
            key = cur.key()
            if not key:
                break
            seq = _U64.unpack(key)[0]
            if seq >= last:
                break
            entry = decode_json(cur.value())
            if deleted >= excess and (cutoff_us is None or entry.get("at_us", 0) >= cutoff_us):
                break
            _keep_for_unmerge(view, entry)
            _drop_refs(view, entry)
            deleted += 1
            if not cur.delete():  # moves to the next entry
                break
    return deleted


def _drop_refs(view: Txn, entry: dict[str, Any]) -> None:
    owners = {entry.get("customer_uuid"), entry.get("restored_uuid"), *entry.get("pii_of", ()),
              *entry.get("merged_uuids", ())}
    refs = view.store.db["pii_refs"]
    for owner in owners:
        if owner:
            view.txn.delete(pii_change_ref(uuid_bytes(owner), entry["seq"]), db=refs)


def _keep_for_unmerge(view: Txn, entry: dict[str, Any]) -> None:
    """Fold the attributes `entry` wrote into the `written_since` of its customer's older merge journal entries."""
    names = entry.get("attributes")
    customer = entry.get("customer_uuid")
    if not names or not customer:
        return
    sid = uuid_bytes(customer)
    found: list[tuple[int, dict[str, Any]]] = []
    with view.txn.cursor(db=view.store.db["merges"]) as cur:
        if not cur.set_range(sid):
            return
        for key, raw in cur:
            if key[:16] != sid or _U64.unpack(key[16:])[0] >= entry["seq"]:
                break
            found.append((_U64.unpack(key[16:])[0], decode_json(raw)))
    for merge_seq, journal in found:
        written = set(journal.get("written_since", ()))
        if not written.issuperset(names):
            view.journal_put(sid, merge_seq, {**journal, "written_since": sorted(written.union(names))})
