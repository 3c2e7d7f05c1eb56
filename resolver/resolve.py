"""Resolve (contract §3): who is calling? external_id -> email -> phone; the first kind that hits decides.

One read transaction per call, so a Resolve sees every write acknowledged before it started. A shared
identifier never picks a customer: several hits on the deciding kind answer AMBIGUOUS with the candidates.

Sensitive attributes (stored sealed: resolver.crypto) are decrypted for a caller whose token has the `sensitive`
scope (resolver.api.caller) and left out for others. Only a projection that can show one looks for them: a view
without sensitive attributes, or a blueprint without any, answers as if encryption did not exist.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from resolver import metrics
from resolver._probe_types import MATCHED, NOT_FOUND, Decision, Fanned
from resolver.api.caller import sees_sensitive
from resolver.attributes import AttributeSchema
from resolver.config import DEFAULT_VIEW, Settings
from resolver.crypto import Sealer
from resolver.erase import tombstone
from resolver.errors import DeadlineExceeded, FieldViolation, IdentifierError, InvalidInput, NotFound, ResolverError
from resolver.identifiers import Identifiers, RawIdentifiers, Skipped, normalize_identifiers
from resolver.normalize import Kind, Policy, check_region, mask
from resolver.records import Record
from resolver.store import Store, Txn, uuid_bytes, uuid_text

# The record fields a Resolve answer shows (decoded lazily: the rest of the record is never parsed).
_SHOWN = ("uuid", "version", "attributes")
_SORTED = ("updated_us", "uuid", "version", "attributes")  # candidates: most recently updated first
_KIND = {int(k): k for k in Kind}  # by number, without Enum's slow __call__
_PROBE_CHUNK = 64  # requests probed between two reads of the deadline in resolve_many
_BATCH_TOO_LATE = "the deadline passed during the batch; it was not answered"
_ADHOC: tuple[str, ...] = ("(a request's own fields)",)  # Resolver._sensitive_of's miss: a marker, compared by identity


@dataclass(slots=True)
class ResolveInput:
    identifiers: RawIdentifiers
    default_region: str = ""
    fields: tuple[str, ...] = ()
    view: str = ""
    explain: bool = False
    min_sequence: int = 0  # read at least this replicated-log position (a cluster node's gate, not the lookup's)


@dataclass(slots=True)
class Prepared:
    """A validated, normalized Resolve, ready to probe (not frozen: that costs a microsecond per call)."""

    ids: Identifiers
    fields: tuple[str, ...] | None
    explain: bool
    skipped: list[Skipped]


@dataclass(frozen=True, slots=True)
class Probe:
    kind: Kind
    masked: str
    result: int
    hits: int


class Candidate(NamedTuple):
    """One of the customers an AMBIGUOUS answer names."""

    customer_uuid: str
    attributes: dict[str, Any]


@dataclass(slots=True)
class ResolveResult:
    """The answer to one Resolve; built by `not_found`, `matched` or `ambiguous`, which name what each
    outcome carries and fill in the rest (no default factories: this is built on every Resolve)."""

    outcome: str  # MATCHED | AMBIGUOUS | NOT_FOUND
    customer_uuid: str
    matched_on: Kind | None
    version: int
    attributes: dict[str, Any]
    candidates: list[Candidate]  # most recently updated first
    conflicts: list[str]
    probes: list[Probe]
    skipped: list[Skipped]

    # The constructors below take keywords and pass the fields on in declaration order. Calling the class
    # with nine keywords costs about 0.5 µs (CPython 3.11 packs them into a dict for __init__); a method
    # takes keywords without one, so a named constructor costs one plain call (about 0.1 µs).
    @classmethod
    def not_found(cls, *, probes: list[Probe], skipped: list[Skipped]) -> ResolveResult:
        """No customer holds any of the identifiers."""
        return cls("NOT_FOUND", "", None, 0, {}, [], [], probes, skipped)

    @classmethod
    def matched(cls, *, customer_uuid: str, matched_on: Kind, version: int, attributes: dict[str, Any],
                conflicts: list[str], probes: list[Probe], skipped: list[Skipped]) -> ResolveResult:
        """One customer holds the deciding identifiers; `conflicts`: others that lower kinds point at."""
        return cls("MATCHED", customer_uuid, matched_on, version, attributes, [], conflicts, probes, skipped)

    @classmethod
    def ambiguous(cls, *, matched_on: Kind, candidates: list[Candidate], probes: list[Probe],
                  skipped: list[Skipped]) -> ResolveResult:
        """Several customers share the deciding identifiers: none is picked."""
        return cls("AMBIGUOUS", "", matched_on, 0, {}, candidates, [], probes, skipped)


def _probe_order(sets: list[tuple[str | None, list[str], list[str], bool]],
                 key: Callable[[int, str], bytes]) -> list[int]:
    """The positions of `sets` in the order of the index key each is probed by first (external_id, else its
    first email, else its first phone), grouped by index."""
    def first(i: int) -> tuple[int, bytes]:
        external_id, emails, phones, _ = sets[i]
        if external_id is not None:
            return 1, key(1, external_id)
        if emails:
            return 2, key(2, emails[0])
        return (3, key(3, phones[0])) if phones else (4, b"")
    return sorted(range(len(sets)), key=first)


def fanned_skipped(fanned: Sequence[Fanned], limit: int) -> list[Skipped]:
    """The identifiers a decision skipped for fan-out (held by more than `limit` customers), as reported."""
    detail = f"held by more than {limit} customers; never decides a match"
    return [Skipped(_KIND[k], mask(_KIND[k], v), "FAN_OUT_LIMIT", detail) for k, v, _ in fanned]


class Resolver:
    """The Resolve use case over one store; safe to call from many threads."""

    def __init__(self, store: Store, settings: Settings, schema: AttributeSchema, policy: Policy) -> None:
        self.store = store
        self.settings = settings
        self.schema = schema
        self.policy = policy
        self.default_fields = settings.views.get(DEFAULT_VIEW)
        self.sealer = store.sealer if store is not None else Sealer.from_settings(settings)  # None: prepare only
        # The sensitive attributes each projection may show, by the identity of its fields: None (all of them) and
        # the blueprint's view tuples, which `projection` hands out as they are. So a view costs one dict lookup per
        # answer, not a pass over its fields; a request's own `fields` are looked at when answered (`_sensitive`).
        self._sensitive_of = {id(f): tuple(n for n in f if self.sealer.sensitive(n))
                              for f in settings.views.values()} | {id(None): self.sealer.names}

    def projection(self, fields: tuple[str, ...], view: str) -> tuple[str, ...] | None:
        """The attribute names to return (None: all); InvalidInput for an unknown view or field."""
        if fields and view:
            raise InvalidInput([FieldViolation("view", "give fields or a view, not both", "INVALID")])
        if view:
            if view not in self.settings.views:
                known = ", ".join(sorted(self.settings.views)) or "none declared"
                raise InvalidInput([FieldViolation("view", f"unknown view (known: {known})", "UNKNOWN_VIEW")])
            return self.settings.views[view]
        if fields:
            if not self.schema.open:
                bad = [FieldViolation(f"fields[{i}]", "unknown attribute", "UNKNOWN_ATTRIBUTE")
                       for i, f in enumerate(fields) if f not in self.schema.specs]
                if bad:
                    raise InvalidInput(bad)
            return fields
        return self.default_fields

    def prepare(self, req: ResolveInput, deadline: float | None = None) -> Prepared:
        """Validate and normalize a request (no storage touched); InvalidInput for a malformed one,
        DeadlineExceeded if `deadline` passes while its identifiers are normalized."""
        if not req.identifiers:
            raise InvalidInput([FieldViolation("identifiers", "give at least one identifier", "REQUIRED")])
        try:
            region = check_region(req.default_region)
        except IdentifierError as exc:
            raise InvalidInput([FieldViolation("default_region", exc.message, exc.reason)]) from None
        fields = self.projection(req.fields, req.view)
        ids, failures = normalize_identifiers(req.identifiers, region, self.policy, "identifiers", deadline)
        return Prepared(ids, fields, req.explain, [f.skipped() for f in failures])

    def resolve(self, req: ResolveInput, deadline: float | None = None) -> ResolveResult:
        """Answer one Resolve. `deadline` is a time.monotonic() instant; no work starts past it."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the lookup started")
        prepared = self.prepare(req, deadline)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the lookup started")
        with self.store.read() as txn:
            return self.lookup(txn, prepared)

    def resolve_many(self, reqs: list[ResolveInput], deadline: float | None = None) -> list[ResolveResult | ResolverError]:
        """The batch loop: normalize every request, then probe all of them inside ONE read transaction.

        Answers come in request order; a request that fails validation gets its error in its place, so
        one bad row never fails a bulk lookup. The snapshot is taken after every request was read, so each
        answer sees every write acknowledged before its request arrived. `deadline` (time.monotonic()) is
        read between requests and between probe chunks: once it has passed, DeadlineExceeded for the batch.
        The requests are probed in the order of their first index key (`_probe_order`): neighbouring keys share
        B-tree pages, so a batch walks each index once, left to right, instead of jumping across it.
        """
        prepared: list[Prepared | ResolverError] = []
        for req in reqs:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(_BATCH_TOO_LATE)
            try:
                prepared.append(self.prepare(req, deadline))
            except DeadlineExceeded:
                raise
            except ResolverError as exc:
                prepared.append(exc)
        ok = [p for p in prepared if isinstance(p, Prepared)]
        fanout = self.settings.matching.max_fanout
        sets = [(p.ids.external_id, p.ids.emails, p.ids.phones, p.explain) for p in ok]
        order = _probe_order(sets, self.store.hasher.key) if len(sets) > 1 else range(len(sets))
        answered: dict[int, ResolveResult] = {}  # by position in `sets`
        counts: collections.Counter[tuple[int, int]] = collections.Counter()  # (outcome, kind) -> answers
        with self.store.read() as txn:
            for start in range(0, len(sets), _PROBE_CHUNK):
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded(_BATCH_TOO_LATE)
                chunk = order[start:start + _PROBE_CHUNK]
                decisions = txn.prober.decide_many([sets[i] for i in chunk], fanout)
                # answered at once: the records the chunk's probes confirmed are still at hand (Prober.fields)
                for i, decision in zip(chunk, decisions, strict=True):
                    answered[i] = self._answer(txn, ok[i], decision)
                    counts[decision.outcome, decision.kind] += 1
        for (outcome, kind), n in counts.items():  # counted once per kind of answer, not per answer
            metrics.resolved(outcome, kind, n)
        answers = (answered[i] for i in range(len(sets)))
        return [p if isinstance(p, ResolverError) else next(answers) for p in prepared]

    def lookup(self, txn: Txn, p: Prepared) -> ResolveResult:
        """Probe the indexes for a prepared request inside the caller's read transaction (contract §3).

        The decision (which customer, or which candidates) is the probe loop's (resolver._probe_py.decide);
        this adds what needs decoded records: attributes, the candidates' order, the masked explanations.
        """
        ids = p.ids
        decision = txn.prober.decide(ids.external_id, ids.emails, ids.phones, self.settings.matching.max_fanout,
                                     p.explain)
        metrics.resolved(decision.outcome, decision.kind)
        return self._answer(txn, p, decision)

    def _sensitive(self, fields: tuple[str, ...]) -> tuple[str, ...]:
        """The sensitive attributes among a request's own `fields`."""
        sensitive = self.sealer.sensitive
        return tuple(n for n in fields if sensitive(n))

    def _answer(self, txn: Txn, p: Prepared, decision: Decision) -> ResolveResult:
        """The answer to a prepared request from its probe decision (records read in the same transaction)."""
        outcome, kind, uids, conflicts = decision.outcome, decision.kind, decision.uuids, decision.conflicts
        fanned, probes = decision.fanned, decision.probes
        skipped = p.skipped
        if fanned:
            skipped = skipped + fanned_skipped(fanned, self.settings.matching.max_fanout)
        shown = [Probe(_KIND[k], mask(_KIND[k], v), state, n) for k, v, state, n in probes] if probes else []
        if outcome == NOT_FOUND:
            return ResolveResult.not_found(probes=shown, skipped=list(skipped))
        fields = p.fields
        project = self.schema.project
        # () for most answers: no sensitive attribute declared, or none in the projection; nothing more is done then
        sensitive = self._sensitive_of.get(id(fields), _ADHOC) if self.sealer.names else ()
        if sensitive is _ADHOC:
            sensitive = self._sensitive(fields or ())  # (never None: id(None) is in _sensitive_of)
        if outcome == MATCHED:
            found = txn.prober.fields(uids[0], _SHOWN)
            assert found is not None  # confirmed inside this transaction
            customer_uuid, version, attributes = found
            projected = project(attributes, fields)
            for name in sensitive:  # usually none; else the first one the record holds decides
                if name in projected:
                    self.sealer.reveal(customer_uuid, projected, sensitive, sees_sensitive())
                    break
            return ResolveResult.matched(customer_uuid=customer_uuid, matched_on=_KIND[kind], version=version,
                                         attributes=projected,
                                         conflicts=[uuid_text(u) for u in conflicts] if conflicts else [],
                                         probes=shown, skipped=list(skipped))
        ranked = sorted((f for u in uids if (f := txn.prober.fields(u, _SORTED)) is not None),
                        key=lambda f: (-f[0], f[1]))
        candidates = [Candidate(customer_uuid, project(attributes, fields))
                      for _, customer_uuid, _, attributes in ranked[: self.settings.matching.max_candidates]]
        if sensitive:
            visible = sees_sensitive()
            for c in candidates:
                self.sealer.reveal(c.customer_uuid, c.attributes, sensitive, visible)
        return ResolveResult.ambiguous(matched_on=_KIND[kind], candidates=candidates, probes=shown,
                                       skipped=list(skipped))

    def get_customer(self, customer_uuid: str) -> Record:
        """The full record (a merged-away uuid answers with its survivor), sensitive attributes decrypted for a
        caller with the `sensitive` scope and left out for others; NotFound, with reason CUSTOMER_DELETED when the
        customer (or the survivor it was merged into) was deleted."""
        try:
            uid = uuid_bytes(customer_uuid)
        except ValueError:
            raise InvalidInput([FieldViolation("customer_uuid", "not a UUID", "INVALID")]) from None
        with self.store.read() as txn:
            survivor = txn.survivor(uid)
            rec = txn.stored_record(survivor)
            deleted = rec is None and tombstone(txn, survivor) is not None
        if deleted:
            raise NotFound(f"customer {customer_uuid} was deleted", reason="CUSTOMER_DELETED")
        if rec is None:
            raise NotFound(f"no customer {customer_uuid}")
        if not sees_sensitive():
            for name in self.sealer.names:
                rec.attributes.pop(name, None)
        self.sealer.open_all(rec.uuid, rec.attributes)
        return rec
