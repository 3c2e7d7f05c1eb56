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

What goes is fixed by a `Cutoff` (`cutoff`: the blueprint's limits, a clock reading and the newest sequence), and
`remove` deletes what a cutoff names. One machine's sweeper (`sweep_changes`) computes the cutoff in each of its
transactions; in a cluster the node holding the lease fixes it once, in a replicated command, and every node's
apply calls the same `remove` with it (resolver.cluster.retention): the same log, the same entries deleted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from resolver.config.tables import ChangeSettings
from resolver.pii_refs import pii_change_ref
from resolver.records import decode_json
from resolver.store import Store, Txn, uuid_bytes

_U64 = struct.Struct(">Q")
DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True, slots=True)
class Cutoff:
    """What retention deletes, oldest first: entries up to sequence `through_seq` (the count limit; 0: none by
    count) and entries written before `before_us` (the age limit; 0: none by age), whichever removes more, and
    never the newest entry. Nothing in it depends on when or where it is applied."""

    through_seq: int
    before_us: int


def configured(settings: ChangeSettings) -> bool:
    """Whether `[changes]` sets a retention limit (else the log is kept whole)."""
    return settings.retention_days is not None or settings.retention_count is not None


def cutoff(settings: ChangeSettings, now_us: int, last_seq: int) -> Cutoff | None:
    """The cutoff of `[changes]` retention at `now_us` for a log whose newest entry is `last_seq` (None: no limit
    is set). The log holds one gap-free run of sequences, so keeping the newest `retention_count` entries is
    deleting those up to `last_seq - retention_count`."""
    if not configured(settings):
        return None
    through = max(0, last_seq - settings.retention_count) if settings.retention_count is not None else 0
    before = max(0, now_us - int(settings.retention_days * DAY_US)) if settings.retention_days is not None else 0
    return Cutoff(through, before)


def sweep_changes(store: Store, settings: ChangeSettings, now_us: int, batch: int = 1000) -> int:
    """Delete the entries past retention in write transactions of up to `batch` entries; how many were deleted."""
    total = 0
    while True:
        with store.write() as view:
            cut = cutoff(settings, now_us, view.last_change_seq())
            n = remove(view, cut, batch) if cut is not None else 0
        total += n
        if n < batch:
            return total


def remove(view: Txn, cut: Cutoff, limit: int) -> int:
    """Delete, in `view`'s transaction, the oldest entries that `cut` names, at most `limit` of them (with their
    pii_refs, their attributes folded into the merge journal first); how many were deleted. Deterministic: the
    same log and the same arguments delete the same entries."""
    last = view.last_change_seq()
    deleted = 0
    with view.txn.cursor(db=view.store.db["changes"]) as cur:
        if not cur.first():
            return 0
        while deleted < limit:
            key = cur.key()
            if not key:
                break
            entry = decode_json(cur.value())
            if not _goes(cut, _U64.unpack(key)[0], last, entry):
                break
            _keep_for_unmerge(view, entry)
            _drop_refs(view, entry)
            deleted += 1
            if not cur.delete():  # moves to the next entry
                break
    return deleted


def due(view: Txn, cut: Cutoff) -> bool:
    """Whether `remove` would delete anything from the log as `view` sees it (its oldest entry goes)."""
    with view.txn.cursor(db=view.store.db["changes"]) as cur:
        if not cur.first():
            return False
        return _goes(cut, _U64.unpack(cur.key())[0], view.last_change_seq(), decode_json(cur.value()))


def _goes(cut: Cutoff, seq: int, last: int, entry: dict[str, Any]) -> bool:
    """Entry `seq` is past `cut` (by count or by age) and is not the newest, `last`."""
    return seq < last and (seq <= cut.through_seq or entry.get("at_us", 0) < cut.before_us)


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
