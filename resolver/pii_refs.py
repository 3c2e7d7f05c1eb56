"""`pii_refs`: where a customer's PII is copied, so that a deletion (resolver.erase, resolver.forget) finds every
change-log entry and ledger response that copies a customer's identifiers or attributes without scanning the log.

| key                                    | value |
| -------------------------------------- | ----- |
| uuid (16) + b"C" + change sequence (8) | empty |
| uuid (16) + b"L" + ledger key          | empty |

The store writes them with what they point at, in one transaction (resolver.store: `Txn.append_change`,
`Txn.ledger_put`; `Txn.ledger_sweep` and resolver.retention drop them with it); the initial load writes the same
keys (resolver/_load_consts.py). `PiiRefs` is their reading side in every transaction: resolver.store.Txn
inherits it.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import lmdb

_U64 = struct.Struct(">Q")
_CHANGE_REF = b"C"
_LEDGER_REF = b"L"


def pii_owners(response: dict[str, Any]) -> list[str]:
    """The customers whose PII a stored response copies: its customer, and those a merge folded into it."""
    owner = response.get("customer_uuid")
    return ([owner] if owner else []) + list(response.get("merged_uuids", ()))


def pii_ledger_ref(uid: bytes, ledger_key: bytes) -> bytes:
    """The `pii_refs` key saying that the ledger entry `ledger_key` copies customer `uid`'s PII."""
    return uid + _LEDGER_REF + ledger_key


def pii_change_ref(uid: bytes, seq: int) -> bytes:
    """The `pii_refs` key saying that change-log entry `seq` copies customer `uid`'s PII."""
    return uid + _CHANGE_REF + _U64.pack(seq)


class _Storage(Protocol):
    """What the references' reading side uses of the store (resolver.store.Store, which imports this module)."""

    @property
    def db(self) -> dict[str, Any]: ...


class PiiRefs:
    """The `pii_refs` of one transaction (`store` and `txn` are the transaction's: resolver.store.Txn)."""

    __slots__ = ()
    store: _Storage
    txn: lmdb.Transaction[bytes]

    def pii_refs(self, uid: bytes) -> tuple[list[int], list[str]]:
        """The change-log sequences and ledger keys that copy the PII of customer `uid`."""
        seqs: list[int] = []
        keys: list[str] = []
        with self.txn.cursor(db=self.store.db["pii_refs"]) as cur:
            if cur.set_range(uid):
                for k in cur.iternext(keys=True, values=False):
                    if k[:16] != uid:
                        break
                    if k[16:17] == _CHANGE_REF:
                        seqs.append(_U64.unpack(k[17:])[0])
                    else:
                        keys.append(k[17:].decode("utf-8"))
        return seqs, keys

    def drop_pii_refs(self, uid: bytes) -> None:
        seqs, keys = self.pii_refs(uid)
        refs = self.store.db["pii_refs"]
        for seq in seqs:
            self.txn.delete(pii_change_ref(uid, seq), db=refs)
        for key in keys:
            self.txn.delete(pii_ledger_ref(uid, key.encode("utf-8")), db=refs)
