"""The hot path of `resolver import` (pure-Python twin of ext/_load_c.pyx, and the readable specification of it).

Two halves, one on each side of the process boundary, and the bytes that cross it:

- resolver/_load_worker_py.py (a worker process): `RowPlanner`, a JSON line -> its packed create, for the plain
  creates an initial load is made of, by the general path's own rules (`PlanRules`); None sends a line to the
  general path.
- resolver/_load_parent_py.py (the parent): `CreateQueue`, the plain creates of one write transaction, proved to be
  creates there and queued for resolver.bulk.BulkWriter; `KeyFilter`, the keys an initial load has claimed.
- resolver/_load_consts.py: the packed create itself (`pack`, `unpack`, `Entry`).

This module is the twin's one name, as resolver._load_c is the compiled module's: resolver._hotpath picks one of
the two, and the import pipeline reads the packed create's helpers from here. Nothing here imports the store or the
use cases (resolver._hotpath selects this module, and they import it).
"""

from __future__ import annotations

from resolver._load_consts import Entry, entry_derived, entry_head, pack, unpack
from resolver._load_parent_py import CreateQueue, Drained, KeyFilter
from resolver._load_worker_py import MEMO_SIZE as MEMO_SIZE
from resolver._load_worker_py import PlanRules, Request, RowPlanner

__all__ = ["CreateQueue", "Drained", "Entry", "KeyFilter", "PlanRules", "Request", "RowPlanner", "entry_derived", "entry_head",
           "pack", "unpack"]
