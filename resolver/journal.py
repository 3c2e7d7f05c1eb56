"""The merge journal (`merges`): every merge, recorded under its survivor with the records as they were before it,
so that Unmerge (resolver.unmerge) can undo it exactly; erasure (resolver.erase, resolver.forget) drops or
redacts a customer's entries.

| key                                      | value                                                         |
| ---------------------------------------- | ------------------------------------------------------------- |
| survivor uuid (16) + change sequence (8) | the entry's JSON; the records' sensitive attribute values     |
| (the merge's, big-endian)                | sealed under their customers' uuids (Sealer.seal_journal)     |

`MergeJournal` is the journal's part of every transaction: resolver.store.Txn inherits it, so a use case reads and
writes the journal in the same transaction as the records it describes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Protocol

from resolver.records import decode_json, encode_json

if TYPE_CHECKING:
    import lmdb

    from resolver.crypto import Sealer

_U64 = struct.Struct(">Q")


class _Storage(Protocol):
    """What the journal uses of the store (resolver.store.Store, which imports this module)."""

    @property
    def db(self) -> dict[str, Any]: ...


class MergeJournal:
    """The merge journal of one transaction (`store` and `txn` are the transaction's: resolver.store.Txn)."""

    __slots__ = ()
    store: _Storage
    txn: lmdb.Transaction[bytes]
    sealer: Sealer  # what the transaction seals with (resolver.store.Txn)

    def journal_put(self, survivor: bytes, seq: int, entry: dict[str, Any]) -> None:
        """Record a merge (the records as they were before it) under its survivor and change sequence."""
        self.txn.put(survivor + _U64.pack(seq), encode_json(self.sealer.seal_journal(entry)),
                     db=self.store.db["merges"])

    def journal(self, survivor: bytes) -> list[dict[str, Any]]:
        """The merges recorded into `survivor`, oldest first, as stored (the records' sensitive values sealed:
        `store.sealer.open_record` opens a record built from one)."""
        out: list[dict[str, Any]] = []
        with self.txn.cursor(db=self.store.db["merges"]) as cur:
            if cur.set_range(survivor):
                for k, v in cur:
                    if k[:16] != survivor:
                        break
                    out.append(decode_json(v))
        return out

    def journal_delete(self, survivor: bytes, seq: int) -> None:
        self.txn.delete(survivor + _U64.pack(seq), db=self.store.db["merges"])
