"""The probe loop: identifiers → index keys → LMDB → confirmed customers → the precedence decision.

Pure-Python twin of ext/_probe_c.pyx, and its readable specification: the compiled module must answer
exactly as this one does (tests/unit/test_probe.py compares them).

A `Prober` works inside one LMDB transaction (read or write). Index entries are hashes, so every uuid found
under a key is confirmed against the identifiers stored in its record: a hash collision can never return a
wrong customer.

`decide` is contract §3's precedence rule, apart from everything that needs decoded records (attributes,
candidate order): external_id, then email, then phone; the first kind with hits decides; one customer is a
match, several are AMBIGUOUS (a shared identifier never picks); an identifier held by more than `limit`
customers is skipped (FAN_OUT); hits of lower kinds that point only at other customers are conflicts.
"""

from __future__ import annotations

from typing import Any

import orjson

from resolver._probe_types import (
    AMBIGUOUS,
    EMAIL,
    EXTERNAL_ID,
    FAN_OUT,
    HIT,
    MATCHED,
    MISS,
    NOT_FOUND,
    NOT_PROBED,
    PHONE,
    SHARED,
    Decision,
    Fanned,
    Probed,
    ProbeRow,
)


def holds(raw: bytes, kind: int, value: str) -> bool:
    """Whether a stored record (its JSON, resolver.records) holds the normalized identifier `value`."""
    rec = orjson.loads(raw)
    if kind == PHONE:
        return value in rec["phones"]
    if kind == EMAIL:
        return value in rec["emails"]
    return rec["external_id"] == value or value in rec.get("merged_external_ids", ())


def record_fields(raw: bytes, names: tuple[str, ...]) -> list[Any]:
    """The values of the top-level fields `names` of a stored record (None for an absent field)."""
    rec = orjson.loads(raw)
    return [rec.get(name) for name in names]


class Prober:
    """Index probes inside one transaction `txn` (py-lmdb); never outlives it.

    `indexes` are the index databases by kind (external_id, email, phone); `records` the records database;
    `key(kind, value)` the index key function (resolver._hotpath.KeyHasher.key).
    """

    __slots__ = ("txn", "indexes", "records", "key", "_confirmed")

    def __init__(self, txn: Any, indexes: tuple[Any, Any, Any], records: Any, key: Any) -> None:
        self.txn = txn
        self.indexes = indexes
        self.records = records
        self.key = key
        self._confirmed: dict[bytes, bytes] = {}  # records confirmed by the last decide(_many), for `fields`

    def fields(self, uid: bytes, names: tuple[str, ...]) -> list[Any] | None:
        """`record_fields` of the record under `uid` (None: no such record). A record the last `decide` or
        `decide_many` confirmed is not read again. Read transactions only: a write since then is not seen."""
        raw = self._confirmed.get(uid)
        if raw is None:
            raw = self.txn.get(uid, db=self.records)
        return None if raw is None else record_fields(raw, names)

    def probe(self, kind: int, value: str, limit: int) -> Probed:
        """Customers holding `value`: the entries under its key and the confirmed uuids, in key order.

        When more than `limit` entries share the key, no record is read and no uuid is returned.
        """
        with self.txn.cursor(db=self.indexes[kind - 1]) as cur:
            if not cur.set_key(self.key(kind, value)):
                return Probed(0, [])
            n = cur.count()
            if n > limit:
                return Probed(n, [])
            uids = list(cur.iternext_dup())
        confirmed = []
        for uid in uids:
            raw = self.txn.get(uid, db=self.records)
            if raw is not None and holds(raw, kind, value):
                confirmed.append(uid)
                self._confirmed[uid] = raw
        return Probed(n, confirmed)

    def decide(self, external_id: str | None, emails: list[str], phones: list[str], limit: int,
               explain: bool) -> Decision:
        """Contract §3's decision for one normalized identifier set (see the module docstring)."""
        self._confirmed.clear()
        return self._decide(external_id, emails, phones, limit, explain)

    def decide_many(self, sets: list[tuple[str | None, list[str], list[str], bool]], limit: int) -> list[Decision]:
        """`decide` for each normalized (external_id, emails, phones, explain) set, in order: the batch loop.
        Every record it confirms stays at hand for `fields` until the next decide(_many)."""
        self._confirmed.clear()
        return [self._decide(external_id, emails, phones, limit, explain) for external_id, emails, phones, explain in sets]

    def _decide(self, external_id: str | None, emails: list[str], phones: list[str], limit: int,
                explain: bool) -> Decision:
        by_kind = ((EXTERNAL_ID, [external_id] if external_id is not None else []), (EMAIL, emails), (PHONE, phones))
        outcome, decided = NOT_FOUND, 0
        winners: list[bytes] = []
        conflicts: list[bytes] = []
        fanned: list[Fanned] = []
        probes: list[ProbeRow] = []
        for kind, values in by_kind:
            kind_hits: list[bytes] = []
            for value in values:
                n, hits = self.probe(kind, value, limit)
                if n > limit:
                    fanned.append(Fanned(kind, value, n))
                    if explain:
                        probes.append(ProbeRow(kind, value, FAN_OUT, n))
                    continue
                if explain:
                    probes.append(ProbeRow(kind, value, HIT if len(hits) == 1 else SHARED if hits else MISS, len(hits)))
                if outcome == MATCHED:
                    # A lower kind pointing only at someone else: a possible duplicate or a ported number.
                    # A shared line that includes the matched customer is no conflict.
                    if hits and winners[0] not in hits:
                        conflicts += [h for h in hits if h not in conflicts]
                    continue
                kind_hits += [h for h in hits if h not in kind_hits]
            if outcome == MATCHED or not kind_hits:
                continue
            decided, winners = kind, kind_hits
            if len(kind_hits) == 1:
                outcome = MATCHED
                continue
            outcome = AMBIGUOUS
            if explain:
                probes += [ProbeRow(k, v, NOT_PROBED, 0) for k, vs in by_kind if k > kind for v in vs]
            break
        return Decision(outcome, decided, tuple(winners), tuple(conflicts), tuple(fanned), tuple(probes))
