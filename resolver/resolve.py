"""Resolve (contract §3): who is calling? external_id -> email -> phone; the first kind that hits decides.

One read transaction per call, so a Resolve sees every write acknowledged before it started. A shared
identifier never picks a customer: several hits on the deciding kind answer AMBIGUOUS with the candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from resolver._probe_py import MATCHED, NOT_FOUND, Decision
from resolver.attributes import AttributeSchema
from resolver.config import DEFAULT_VIEW, Settings
from resolver.errors import DeadlineExceeded, FieldViolation, IdentifierError, InvalidInput, NotFound, ResolverError
from resolver.identifiers import Identifiers, RawIdentifiers, Skipped, normalize_identifiers
from resolver.normalize import Kind, Policy, check_region, mask
from resolver.records import Record
from resolver.store import Store, View, uuid_bytes, uuid_text

# The record fields a Resolve answer shows (decoded lazily: the rest of the record is never parsed).
_SHOWN = ("uuid", "version", "attributes")
_SORTED = ("updated_us", "uuid", "version", "attributes")  # candidates: most recently updated first
_KIND = {int(k): k for k in Kind}  # by number, without Enum's slow __call__


@dataclass(slots=True)
class ResolveInput:
    identifiers: RawIdentifiers
    default_region: str = ""
    fields: tuple[str, ...] = ()
    view: str = ""
    explain: bool = False


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


@dataclass(slots=True)
class ResolveResult:
    outcome: str  # MATCHED | AMBIGUOUS | NOT_FOUND
    customer_uuid: str = ""
    matched_on: Kind | None = None
    version: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    candidates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class Resolver:
    """The Resolve use case over one store; safe to call from many threads."""

    def __init__(self, store: Store, settings: Settings, schema: AttributeSchema, policy: Policy) -> None:
        self.store = store
        self.settings = settings
        self.schema = schema
        self.policy = policy
        self.default_fields = settings.views.get(DEFAULT_VIEW)

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

    def prepare(self, req: ResolveInput) -> Prepared:
        """Validate and normalize a request (no storage touched); InvalidInput for a malformed one."""
        if not req.identifiers:
            raise InvalidInput([FieldViolation("identifiers", "give at least one identifier", "REQUIRED")])
        try:
            region = check_region(req.default_region)
        except IdentifierError as exc:
            raise InvalidInput([FieldViolation("default_region", exc.message, exc.reason)]) from None
        fields = self.projection(req.fields, req.view)
        ids, failures = normalize_identifiers(req.identifiers, region, self.policy, "identifiers")
        return Prepared(ids, fields, req.explain, [f.skipped() for f in failures])

    def resolve(self, req: ResolveInput, deadline: float | None = None) -> ResolveResult:
        """Answer one Resolve. `deadline` is a time.monotonic() instant; no work starts past it."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the lookup started")
        prepared = self.prepare(req)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the deadline passed before the lookup started")
        with self.store.read() as view:
            return self.lookup(view, prepared)

    def resolve_many(self, reqs: list[ResolveInput]) -> list[ResolveResult | ResolverError]:
        """The batch loop: normalize every request, then probe all of them inside ONE read transaction.

        Answers come in request order; a request that fails validation gets its error in its place, so
        one bad row never fails a bulk lookup. The snapshot is taken after every request was read, so each
        answer sees every write acknowledged before its request arrived.
        """
        prepared: list[Prepared | ResolverError] = []
        for req in reqs:
            try:
                prepared.append(self.prepare(req))
            except ResolverError as exc:
                prepared.append(exc)
        ok = [p for p in prepared if isinstance(p, Prepared)]
        with self.store.read() as view:
            decisions = iter(view.prober.decide_many(
                [(p.ids.external_id, p.ids.emails, p.ids.phones, p.explain) for p in ok], self.settings.max_fanout))
            return [p if isinstance(p, ResolverError) else self._answer(view, p, next(decisions)) for p in prepared]

    def lookup(self, view: View, p: Prepared) -> ResolveResult:
        """Probe the indexes for a prepared request inside the caller's read transaction (contract §3).

        The decision (which customer, or which candidates) is the probe loop's (resolver._probe_py.decide);
        this adds what needs decoded records: attributes, the candidates' order, the masked explanations.
        """
        ids = p.ids
        return self._answer(view, p, view.prober.decide(ids.external_id, ids.emails, ids.phones, self.settings.max_fanout,
                                                        p.explain))

    def _answer(self, view: View, p: Prepared, decision: Decision) -> ResolveResult:
        """The answer to a prepared request from its probe decision (records read in the same transaction)."""
        outcome, kind, uids, conflicts, fanned, probes = decision
        skipped = p.skipped
        if fanned:
            limit = self.settings.max_fanout
            detail = f"held by more than {limit} customers; never decides a match"
            skipped = skipped + [Skipped(_KIND[k], mask(_KIND[k], v), "FAN_OUT_LIMIT", detail) for k, v, _ in fanned]
        shown = [Probe(_KIND[k], mask(_KIND[k], v), state, n) for k, v, state, n in probes] if probes else []
        # every ResolveResult is built with all its fields, positionally: no default factories on this path
        if outcome == NOT_FOUND:
            return ResolveResult("NOT_FOUND", "", None, 0, {}, [], [], shown, list(skipped))
        fields = p.fields
        project = self.schema.project
        if outcome == MATCHED:
            found = view.prober.fields(uids[0], _SHOWN)
            assert found is not None  # confirmed inside this transaction
            customer_uuid, version, attributes = found
            return ResolveResult("MATCHED", customer_uuid, _KIND[kind], version, project(attributes, fields), [],
                                 [uuid_text(u) for u in conflicts] if conflicts else [], shown, list(skipped))
        ranked = sorted((f for u in uids if (f := view.prober.fields(u, _SORTED)) is not None),
                        key=lambda f: (-f[0], f[1]))
        candidates = [(f[1], project(f[3], fields)) for f in ranked[: self.settings.max_candidates]]
        return ResolveResult("AMBIGUOUS", "", _KIND[kind], 0, {}, candidates, [], shown, list(skipped))

    def get_customer(self, customer_uuid: str) -> Record:
        """The full record (a merged-away uuid answers with its survivor)."""
        try:
            uid = uuid_bytes(customer_uuid)
        except ValueError:
            raise InvalidInput([FieldViolation("customer_uuid", "not a UUID", "INVALID")]) from None
        with self.store.read() as view:
            rec = view.record(view.survivor(uid))
        if rec is None:
            raise NotFound(f"no customer {customer_uuid}")
        return rec
