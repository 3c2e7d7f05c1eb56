"""A plain in-memory model of resolver's contract, for the model-based test (tests/reliability/test_model.py).

It answers every operation the state machine sends as the contract says the server must (contract.md §3 Resolve,
§4 Upsert, §5 DELETE, §7 Merge / Unmerge / Forget / interactions; where the contract is silent, the README's
"Resolve outcomes", "Upsert rules", the Unmerge row of the API table and "Erasure"). It holds no LMDB, index,
hash or byte encoding: customers are Python objects, an identifier's holders are found by scanning them, and the
clock is a counter (`tick`) that stands for the server's microseconds (only their order matters: which value was
set last, who held an identifier before a merge, who was active most recently).

An answer is a plain dict (the test turns the server's protobuf answers into the same shape) or a `Refused`: the
gRPC status code and the ErrorInfo reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

EXT, EMAIL, PHONE = "EXTERNAL_ID", "EMAIL", "PHONE"
LAST = "last_interaction_date"  # the blueprint's date-time attribute that interactions move forward
OWNED = {"status": "CRM"}  # attribute -> the source system that owns it (the blueprint's `owner`)
MAX_DUPLICATES = 10  # potential_duplicates reported by an Upsert, at most
NO_IDS: tuple[str, tuple[str, ...], tuple[str, ...]] = ("", (), ())  # a redacted answer's identifiers
Ids = tuple[str, tuple[str, ...], tuple[str, ...]]  # (external_id or "", emails, phones) as an answer shows them


@dataclass(frozen=True)
class Refused:
    """An error answer: the gRPC status code's name and the ErrorInfo reason."""

    code: str
    reason: str


@dataclass(frozen=True)
class UpsertReq:
    key: str
    customer_uuid: str = ""
    external_id: str | None = None
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str | None], ...] = ()  # sorted by name; None clears
    source: str = ""
    expected_version: int = 0
    remove_external_id: str | None = None
    remove_emails: tuple[str, ...] = ()
    remove_phones: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergeReq:
    key: str
    survivor: str
    merged: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True)
class UnmergeReq:
    key: str
    survivor: str
    merged: str


@dataclass(frozen=True)
class ForgetReq:
    key: str
    customer_uuid: str
    reason: str


@dataclass(frozen=True)
class InteractionReq:
    interaction_id: str
    occurred_us: int
    channel: str = "voice"
    customer_uuid: str = ""
    external_id: str | None = None
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResolveReq:
    external_id: str | None = None
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()


@dataclass
class Customer:
    """One live customer, as the contract describes it (identifiers in the order they came)."""

    uuid: str
    external_id: str | None = None
    merged_external_ids: list[str] = field(default_factory=list)  # of customers merged into this one
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    # provenance: (kind, value) -> holder ("upsert:SOURCE") -> since (tick); what lets an unmerge tell what a
    # merge brought from what the survivor held before or took since
    held: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    field_at: dict[str, int] = field(default_factory=dict)  # when each attribute was last set or cleared
    version: int = 0
    updated: int = 0

    def values(self, kind: str) -> list[str]:
        return self.emails if kind == EMAIL else self.phones

    def identifiers(self) -> list[tuple[str, str]]:
        out = [(EXT, x) for x in ([self.external_id] if self.external_id is not None else [])]
        return out + [(EXT, x) for x in self.merged_external_ids] + [(EMAIL, e) for e in self.emails] + \
            [(PHONE, p) for p in self.phones]

    def holds(self, kind: str, value: str) -> bool:
        if kind == EXT:
            return value == self.external_id or value in self.merged_external_ids
        return value in self.values(kind)

    def shown(self) -> Ids:
        return self.external_id or "", tuple(self.emails), tuple(self.phones)

    def add(self, kind: str, value: str, holder: str, at: int) -> None:
        self.held.setdefault((kind, value), {}).setdefault(holder, at)
        if value not in self.values(kind):
            self.values(kind).append(value)

    def release(self, kind: str, value: str, holder: str) -> None:
        holders = self.held.get((kind, value))
        if holders is None:
            return
        holders.pop(holder, None)
        if not holders:
            del self.held[(kind, value)]
            if value in self.values(kind):
                self.values(kind).remove(value)

    def drop(self, kind: str, value: str) -> None:
        self.held.pop((kind, value), None)
        if value in self.values(kind):
            self.values(kind).remove(value)

    def copy(self) -> Customer:
        return replace(self, merged_external_ids=list(self.merged_external_ids), emails=list(self.emails),
                       phones=list(self.phones), held={k: dict(v) for k, v in self.held.items()},
                       attributes=dict(self.attributes), field_at=dict(self.field_at))


@dataclass
class MergeRecord:
    """The merge journal's entry: what Unmerge undoes (the survivor before, each merged customer as it was)."""

    seq: int
    at: int
    before: Customer
    merged: list[Customer]


@dataclass
class Stored:
    """An idempotency-ledger entry: the request (its key blanked) and the first answer; `owners`: the customers
    whose PII the answer copies (an erasure of one of them redacts its identifiers)."""

    request: Any
    answer: dict[str, Any]
    owners: frozenset[str]


def iso(us: int) -> str:
    """A whole-second instant as the server stores a date-time attribute."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def instant(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp()) * 1_000_000


class Model:
    """The whole store of one example, in memory."""

    def __init__(self, *, max_fanout: int, max_candidates: int) -> None:
        self.max_fanout = max_fanout
        self.max_candidates = max_candidates
        self.customers: dict[str, Customer] = {}
        self.aliases: dict[str, str] = {}  # merged-away uuid -> the customer it was merged into
        self.tombstones: set[str] = set()  # erased customers' uuids (the survivor of an erased family)
        self.erased: set[str] = set()  # every uuid an erasure took (the family: survivors and their aliases)
        self.deleted_records: set[str] = set()  # external_ids of deleted CRM records: their events are refused
        self.ledger: dict[str, Stored] = {}
        self.recorded: dict[str, Stored] = {}  # interactions by interaction_id (their own idempotency keys)
        self.history: dict[str, list[tuple[int, str]]] = {}  # uuid -> (occurred_us, interaction_id)
        self.journal: dict[str, list[MergeRecord]] = {}
        self.writes: list[tuple[int, str, frozenset[str]]] = []  # change log: (seq, customer, attributes written)
        self.known: list[str] = []  # every uuid the server issued in this example, in order
        self.clock = 0

    # -- reading -----------------------------------------------------------------------------------------------
    def survivor(self, uuid: str) -> str:
        while uuid in self.aliases:
            uuid = self.aliases[uuid]
        return uuid

    def live(self, uuid: str) -> Customer | None:
        return self.customers.get(self.survivor(uuid))

    def holders(self, kind: str, value: str) -> list[str]:
        """The live customers holding an identifier, in uuid order (the index's order)."""
        return sorted(u for u, c in self.customers.items() if c.holds(kind, value))

    def decide(self, q: ResolveReq) -> tuple[str, str | None, list[str], list[str]]:
        """Contract §3: (outcome, deciding kind, match or candidates, conflicts)."""
        outcome, decided, winners, conflicts = "NOT_FOUND", None, [], []
        for kind, values in ((EXT, [q.external_id] if q.external_id else []), (EMAIL, q.emails), (PHONE, q.phones)):
            kind_hits: list[str] = []
            for value in values:
                hits = self.holders(kind, value)
                if len(hits) > self.max_fanout:  # a switchboard: reported, never decides
                    continue
                if outcome == "MATCHED":
                    if hits and winners[0] not in hits:  # a lower kind pointing only at someone else
                        conflicts += [h for h in hits if h not in conflicts]
                    continue
                kind_hits += [h for h in hits if h not in kind_hits]
            if outcome == "MATCHED" or not kind_hits:
                continue
            decided, winners = kind, kind_hits
            if len(kind_hits) == 1:
                outcome = "MATCHED"
                continue
            outcome = "AMBIGUOUS"
            break
        return outcome, decided, winners, conflicts

    def resolve(self, q: ResolveReq) -> dict[str, Any]:
        outcome, kind, winners, conflicts = self.decide(q)
        answer: dict[str, Any] = {"outcome": outcome, "customer_uuid": "", "matched_on": kind, "version": 0,
                                  "attributes": {}, "candidates": [], "conflicts": []}
        if outcome == "MATCHED":
            c = self.customers[winners[0]]
            answer.update(customer_uuid=c.uuid, version=c.version, attributes=dict(c.attributes), conflicts=conflicts)
        elif outcome == "AMBIGUOUS":  # most recently active first, bounded
            ranked = sorted((self.customers[u] for u in winners), key=lambda c: (-c.updated, c.uuid))
            answer["candidates"] = [(c.uuid, dict(c.attributes)) for c in ranked[: self.max_candidates]]
        return answer

    def get(self, uuid: str) -> dict[str, Any] | Refused:
        target = self.survivor(uuid)
        c = self.customers.get(target)
        if c is None:
            return Refused("NOT_FOUND", "CUSTOMER_DELETED" if target in self.tombstones else "CUSTOMER_NOT_FOUND")
        return {"customer_uuid": c.uuid, "identifiers": c.shown(), "attributes": dict(c.attributes),
                "version": c.version}

    def interactions(self, uuid: str, limit: int = 50) -> list[str] | Refused:
        """ListInteractions: the survivor's and its merged customers' interactions, newest first."""
        target = self.survivor(uuid)
        if target not in self.customers:
            return Refused("NOT_FOUND", "CUSTOMER_DELETED" if target in self.tombstones else "CUSTOMER_NOT_FOUND")
        rows = [row for member in self.family(target) for row in self.history.get(member, [])]
        return [i for _, i in sorted(rows, key=lambda r: (-r[0], r[1]))[:limit]]

    def family(self, uuid: str) -> list[str]:
        """`uuid` and every customer merged into it, transitively (the merge journal)."""
        out = [uuid]
        for member in out:
            out += [m.uuid for entry in self.journal.get(member, []) for m in entry.merged if m.uuid not in out]
        return out

    def check(self) -> None:
        """The model's own invariants: it must never hold a state the contract forbids."""
        for kind, value in {i for c in self.customers.values() for i in c.identifiers() if i[0] == EXT}:
            assert len(self.holders(kind, value)) == 1, "an external_id is held by two customers"
        assert not self.erased & self.customers.keys(), "an erased customer is live"
        for alias in self.aliases:
            end = self.survivor(alias)
            assert end in self.customers or end in self.tombstones, "an alias leads nowhere"

    # -- writing -----------------------------------------------------------------------------------------------
    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def _log(self, uuid: str, written: set[str] | frozenset[str]) -> int:
        seq = len(self.writes) + 1
        self.writes.append((seq, uuid, frozenset(written)))
        return seq

    def _replay(self, ledger: dict[str, Stored], key: str, request: Any) -> dict[str, Any] | Refused | None:
        """Contract §4.2: the same key and request answers the first answer, replayed; another request under the
        key is IDEMPOTENCY_KEY_REUSED; None: the key is new (or its request failed, which is not stored)."""
        stored = ledger.get(key)
        if stored is None:
            return None
        if stored.request != request:
            return Refused("INVALID_ARGUMENT", "IDEMPOTENCY_KEY_REUSED")
        return {**stored.answer, "replayed": True}

    def upsert(self, req: UpsertReq, new_uuid: str) -> dict[str, Any] | Refused:
        """Contract §4. `new_uuid`: the uuid the server gave, used when the model creates a customer."""
        if not (req.customer_uuid or req.external_id or req.emails or req.phones):
            return Refused("INVALID_ARGUMENT", "INVALID_ARGUMENT")
        attributes = dict(req.attributes)
        if any(OWNED.get(name, req.source) != req.source for name in attributes):
            return Refused("PERMISSION_DENIED", "FIELD_OWNED_BY_OTHER_SOURCE")
        request = replace(req, key="")
        if (replayed := self._replay(self.ledger, req.key, ("upsert", request))) is not None:
            return replayed
        current = self._upsert_target(req)
        if isinstance(current, Refused):
            return current
        ext = req.external_id
        if ext is not None:
            if [h for h in self.holders(EXT, ext) if current is None or h != current.uuid]:
                return Refused("ALREADY_EXISTS", "EXTERNAL_ID_HELD")
            if current is not None and current.external_id not in (None, ext) and not current.holds(EXT, ext) \
                    and req.remove_external_id != current.external_id:
                return Refused("FAILED_PRECONDITION", "EXTERNAL_ID_CHANGE")
        if req.expected_version and (current is None or current.version != req.expected_version):
            return Refused("ABORTED", "VERSION_MISMATCH")

        now = self.tick()
        rec = Customer(new_uuid) if current is None else current.copy()
        if req.remove_external_id is not None and rec.external_id == req.remove_external_id:
            rec.external_id = None
        for email in req.remove_emails:  # removals first: "remove X, add Y" replaces in one request
            rec.drop(EMAIL, email)
        for phone in req.remove_phones:
            rec.drop(PHONE, phone)
        if req.remove_external_id in rec.merged_external_ids:
            rec.merged_external_ids.remove(req.remove_external_id)
        if ext is not None and not rec.holds(EXT, ext):
            rec.external_id = ext
        holder = "upsert:" + req.source
        holders_before = sorted((k, h) for k, hs in rec.held.items() for h in hs)
        for email in req.emails:
            rec.add(EMAIL, email, holder, now)
        for phone in req.phones:
            rec.add(PHONE, phone, holder, now)
        new_holder = holders_before != sorted((k, h) for k, hs in rec.held.items() for h in hs)
        written: set[str] = set()
        for name, value in attributes.items():
            if value is None and name not in rec.attributes:
                continue
            if value is not None and rec.attributes.get(name) == value:
                continue
            if value is None:
                del rec.attributes[name]
            else:
                rec.attributes[name] = value
            rec.field_at[name] = now
            written.add(name)
        before = set(current.identifiers()) if current is not None else set()
        action = "UNCHANGED"
        if current is None or before != set(rec.identifiers()) or written or new_holder:
            action = "CREATED" if current is None else "UPDATED"
            rec.version += 1
            rec.updated = now
            self.customers[rec.uuid] = rec
            self._log(rec.uuid, written)
            if current is None:
                self.known.append(rec.uuid)
        answer = {"customer_uuid": rec.uuid, "action": action, "version": rec.version, "replayed": False,
                  "potential_duplicates": self._duplicates(rec), "identifiers": rec.shown()}
        self.ledger[req.key] = Stored(("upsert", request), answer, frozenset({rec.uuid}))
        return answer

    def _upsert_target(self, req: UpsertReq) -> Customer | Refused | None:
        """Contract §4.3: the uuid given; else whom the external_id, else the email selects; a phone never does."""
        if req.customer_uuid:
            current = self.live(req.customer_uuid)
            return current if current is not None else Refused("NOT_FOUND", "CUSTOMER_NOT_FOUND")
        if req.external_id is not None and (hits := self.holders(EXT, req.external_id)):
            return self.customers[hits[0]]
        found: list[str] = []
        for email in req.emails:
            hits = self.holders(EMAIL, email)
            if len(hits) > self.max_fanout:
                continue
            # an email held by a customer with another external_id does not select it: that is someone else
            found += [h for h in hits if h not in found
                      and (req.external_id is None or self.customers[h].external_id in (None, req.external_id))]
        if len(found) > 1:
            return Refused("FAILED_PRECONDITION", "AMBIGUOUS_TARGET")
        return self.customers[found[0]] if found else None

    def _duplicates(self, rec: Customer) -> tuple[str, ...]:
        """Other customers sharing a phone or an email with `rec` (fanned-out identifiers not expanded)."""
        others: set[str] = set()
        for kind, value in rec.identifiers():
            hits = self.holders(kind, value) if kind != EXT else []
            if len(hits) <= self.max_fanout:
                others.update(h for h in hits if h != rec.uuid)
        return tuple(sorted(others)[:MAX_DUPLICATES])

    def merge(self, req: MergeReq) -> dict[str, Any] | Refused:
        """Contract §7: identifiers move, per field the most recently set value wins, the merged become aliases."""
        parties = [req.survivor, *req.merged]
        if not req.merged or len(set(parties)) != len(parties):
            return Refused("INVALID_ARGUMENT", "INVALID_ARGUMENT")
        request = replace(req, key="")
        if (replayed := self._replay(self.ledger, req.key, ("merge", request))) is not None:
            return replayed
        survivor = self.live(req.survivor)
        others: list[Customer] = []
        for uuid in req.merged:
            other = self.live(uuid)
            if other is None:
                return Refused("NOT_FOUND", "CUSTOMER_NOT_FOUND")
            if survivor is not None and other.uuid != survivor.uuid and other.uuid not in [o.uuid for o in others]:
                others.append(other)
        if survivor is None:
            return Refused("NOT_FOUND", "CUSTOMER_NOT_FOUND")
        now = self.tick()
        result = survivor.copy()
        taken: set[str] = set()
        for other in others:
            for kind, value in other.identifiers():
                if kind == EXT:
                    if result.external_id is None:
                        result.external_id = value
                    else:
                        result.merged_external_ids.append(value)
                elif value not in result.values(kind):
                    result.values(kind).append(value)
            for key, holders in other.held.items():
                mine = result.held.setdefault(key, {})
                for holder, since in holders.items():
                    mine.setdefault(holder, since)
            taken |= self._take(result, other, survivor.updated)
            del self.customers[other.uuid]
            self.aliases[other.uuid] = result.uuid
        if others:
            result.version += 1
            result.updated = now
            self.customers[result.uuid] = result
            seq = self._log(result.uuid, taken)
            self.journal.setdefault(result.uuid, []).append(MergeRecord(seq, now, survivor, others))
        merged = tuple(o.uuid for o in others)
        answer = {"customer_uuid": result.uuid, "version": result.version, "replayed": False, "merged_uuids": merged,
                  "identifiers": result.shown()}
        self.ledger[req.key] = Stored(("merge", request), answer, frozenset({result.uuid, *merged}))
        return answer

    @staticmethod
    def _take(result: Customer, other: Customer, survivor_updated: int) -> set[str]:
        """Merge's rule per attribute: the most recently set value wins (ties: the survivor's); what was taken."""
        taken = set()
        for name, value in other.attributes.items():
            theirs = other.field_at.get(name, other.updated)
            ours = result.field_at.get(name, survivor_updated if name in result.attributes else -1)
            if theirs > ours:
                result.attributes[name] = value
                result.field_at[name] = theirs
                taken.add(name)
        return taken

    def unmerge(self, req: UnmergeReq) -> dict[str, Any] | Refused:
        """README, Unmerge: the merged customer comes back as it was (version moved forward); what it brought leaves
        the survivor unless the survivor held it before, took it since, or a customer still merged into it holds it
        too (contract §3: that one's identifiers keep resolving to the survivor); an attribute written since stays,
        any other goes back to what the survivor would hold had the merge not brought this customer (the others
        merged with it keep theirs); blocked when a later merge, delete or identifier change depends on it."""
        if req.survivor == req.merged:
            return Refused("INVALID_ARGUMENT", "INVALID_ARGUMENT")
        request = replace(req, key="")
        if (replayed := self._replay(self.ledger, req.key, ("unmerge", request))) is not None:
            return replayed
        found = [(e, m) for e in reversed(self.journal.get(req.survivor, [])) for m in e.merged if m.uuid == req.merged]
        if not found:
            return Refused("FAILED_PRECONDITION", "NOT_MERGED")
        entry, snapshot = found[0]
        survivor = self.customers.get(req.survivor)
        if survivor is None:
            if req.survivor in self.tombstones or self.survivor(req.survivor) != req.survivor:
                return Refused("FAILED_PRECONDITION", "UNMERGE_BLOCKED")
            return Refused("NOT_FOUND", "CUSTOMER_NOT_FOUND")
        if any(not survivor.holds(kind, value) for kind, value in snapshot.identifiers()):
            return Refused("FAILED_PRECONDITION", "UNMERGE_BLOCKED")
        now = self.tick()
        after, before = survivor.copy(), entry.before
        still = {(key, holder) for e in self.journal[req.survivor] for m in e.merged if m is not snapshot
                 for key, holders in m.held.items() for holder in holders}
        for kind, value in snapshot.identifiers():
            if kind == EXT:
                if after.external_id == value:
                    after.external_id = None
                else:
                    after.merged_external_ids.remove(value)
                continue
            mine, had = after.held.get((kind, value), {}), before.held.get((kind, value), {})
            for holder in snapshot.held.get((kind, value), {}):
                # contract §3: an identifier of a customer still merged into the survivor keeps resolving to it
                if holder in mine and holder not in had and mine[holder] <= entry.at \
                        and ((kind, value), holder) not in still:
                    after.release(kind, value, holder)
        # per attribute: written since the merge, it stays; else what the survivor would hold had the merge not
        # brought the restored customer (the others merged with it still bring theirs)
        redo = before.copy()
        for other in entry.merged:
            if other is not snapshot:
                self._take(redo, other, before.updated)
        written = {n for seq, uuid, names in self.writes if uuid == survivor.uuid and seq > entry.seq for n in names}
        changed: set[str] = set()
        for name in {*after.attributes, *after.field_at, *redo.attributes} - written:
            was = after.attributes.get(name)
            if name in redo.attributes:
                after.attributes[name] = redo.attributes[name]
            else:
                after.attributes.pop(name, None)
            if after.attributes.get(name) != was:
                changed.add(name)
            if name in redo.field_at:
                after.field_at[name] = redo.field_at[name]
            else:
                after.field_at.pop(name, None)
        after.version += 1
        after.updated = now
        restored = snapshot.copy()
        restored.version += 1
        restored.updated = now
        self.customers[after.uuid] = after
        self.customers[restored.uuid] = restored
        del self.aliases[restored.uuid]
        entry.merged.remove(snapshot)
        if not entry.merged:
            self.journal[req.survivor].remove(entry)
        # later merges saw the survivor holding what the restored customer brought: not in its own right
        brought = {(key, holder) for key, holders in snapshot.held.items() for holder in holders
                   if holder not in before.held.get(key, {})}
        for later in self.journal[req.survivor]:
            if later.seq > entry.seq:
                was, later.before = later.before, later.before.copy()
                for (kind, value), holders in was.held.items():
                    for holder, since in holders.items():
                        if ((kind, value), holder) in brought and since <= entry.at:
                            later.before.release(kind, value, holder)
        self._log(after.uuid, changed)
        answer = {"survivor_uuid": after.uuid, "survivor_version": after.version, "merged_uuid": restored.uuid,
                  "merged_version": restored.version, "replayed": False}
        self.ledger[req.key] = Stored(("unmerge", request), answer, frozenset())
        return answer

    def _erase(self, rec: Customer) -> tuple[list[str], int]:
        """Contract §5 DELETE / §7 Forget: the customer and everyone merged into it stop resolving; a tombstone
        stays; answers in the ledger that copy their identifiers are redacted. (family, interactions removed)"""
        family = self.family(rec.uuid)
        del self.customers[rec.uuid]
        self.tombstones.add(rec.uuid)
        self.erased.update(family)
        self.deleted_records.update(x for kind, x in rec.identifiers() if kind == EXT)
        for stored in self.ledger.values():
            if stored.owners & set(family) and "identifiers" in stored.answer:
                stored.answer = {**stored.answer, "identifiers": NO_IDS}
        removed = 0
        for member in family:
            self.journal.pop(member, None)
            removed += len(self.history.pop(member, []))
        return family, removed

    def delete(self, external_id: str) -> str:
        """A CRM DELETE event for `external_id`, once applied: "APPLIED", or the dead letter's reason."""
        hits = self.holders(EXT, external_id)
        if not hits:
            return "RECORD_DELETED" if external_id in self.deleted_records else "UNKNOWN_RECORD"
        rec = self.customers[hits[0]]
        if rec.external_id == external_id:
            self._erase(rec)
            return "APPLIED"
        # a CRM record merged into this customer: only that record leaves it (README, CRM change events)
        detached = rec.copy()
        detached.merged_external_ids.remove(external_id)
        detached.version += 1
        detached.updated = self.tick()
        self.customers[rec.uuid] = detached
        self._log(rec.uuid, set())
        if any(m.external_id == external_id or external_id in m.merged_external_ids
               for entry in self.journal.get(rec.uuid, []) for m in entry.merged):
            self.deleted_records.add(external_id)
        return "APPLIED"

    def forget(self, req: ForgetReq) -> dict[str, Any] | Refused:
        """Contract §7/§8 Forget: erase the person the uuid resolves to (with everyone merged into it); a uuid
        already erased is erased again (nothing left to count)."""
        request = replace(req, key="")
        if (replayed := self._replay(self.ledger, req.key, ("forget", request))) is not None:
            return replayed
        target = self.survivor(req.customer_uuid)
        rec = self.customers.get(target)
        if rec is None and target not in self.tombstones:
            return Refused("NOT_FOUND", "CUSTOMER_NOT_FOUND")
        removed = {"customers": 0, "identifiers": 0, "attributes": 0, "interactions": 0}
        if rec is not None:
            family, interactions = self._erase(rec)
            removed = {"customers": len(family), "identifiers": len(rec.identifiers()),
                       "attributes": len(rec.attributes), "interactions": interactions}
        answer = {"customer_uuid": target, "replayed": False, "removed": removed}
        self.ledger[req.key] = Stored(("forget", request), answer, frozenset())
        return answer

    def interact(self, req: InteractionReq) -> dict[str, Any] | Refused:
        """RecordInteraction: once per interaction_id, against customer_uuid or whom the identifiers resolve to
        (AMBIGUOUS refused; nobody: recorded unassociated); the last-interaction date only moves forward."""
        request = replace(req, interaction_id="")
        if (replayed := self._replay(self.recorded, req.interaction_id, request)) is not None:
            return replayed
        if req.customer_uuid:
            target = self.survivor(req.customer_uuid)
            rec = self.customers.get(target)
            if rec is None:
                return Refused("NOT_FOUND", "CUSTOMER_DELETED" if target in self.tombstones else "CUSTOMER_NOT_FOUND")
        else:
            outcome, _, winners, _ = self.decide(ResolveReq(req.external_id, req.emails, req.phones))
            if outcome == "AMBIGUOUS":
                return Refused("FAILED_PRECONDITION", "AMBIGUOUS_TARGET")
            rec = self.customers[winners[0]] if outcome == "MATCHED" else None
        now = self.tick()
        last = None
        if rec is not None:
            old = rec.attributes.get(LAST)
            last = instant(old) if old is not None else None
            if last is None or req.occurred_us > last:
                rec = rec.copy()
                rec.attributes[LAST] = iso(req.occurred_us)
                rec.field_at[LAST] = now
                rec.version += 1
                rec.updated = now
                self.customers[rec.uuid] = rec
                self._log(rec.uuid, {LAST})
                last = req.occurred_us
            self.history.setdefault(rec.uuid, []).append((req.occurred_us, req.interaction_id))
        uuid = rec.uuid if rec is not None else ""
        answer = {"interaction_id": req.interaction_id, "customer_uuid": uuid, "replayed": False,
                  "last_interaction_us": last}
        self.recorded[req.interaction_id] = Stored(request, answer, frozenset({uuid} - {""}))
        return answer
