"""Resolve (contract §3): who is calling? external_id -> email -> phone; the first kind that hits decides.

One read transaction per call, so a Resolve sees every write acknowledged before it started. A shared
identifier never picks a customer: several hits on the deciding kind answer AMBIGUOUS with the candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from resolver.attributes import AttributeSchema
from resolver.config import DEFAULT_VIEW, Settings
from resolver.errors import DeadlineExceeded, FieldViolation, IdentifierError, InvalidInput, NotFound, ResolverError
from resolver.identifiers import Identifiers, RawIdentifiers, Skipped, normalize_identifiers
from resolver.normalize import Kind, Policy, check_region, mask
from resolver.records import Record
from resolver.store import Store, View, uuid_bytes

# Probe results, numbered as the proto's ProbeResult.
HIT, MISS, SHARED, FAN_OUT, NOT_PROBED = 1, 2, 3, 4, 5


@dataclass(slots=True)
class ResolveInput:
    identifiers: RawIdentifiers
    default_region: str = ""
    fields: tuple[str, ...] = ()
    view: str = ""
    explain: bool = False


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated, normalized Resolve, ready to probe."""

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
        with self.store.read() as view:
            return [p if isinstance(p, ResolverError) else self.lookup(view, p) for p in prepared]

    def lookup(self, view: View, p: Prepared) -> ResolveResult:
        """Probe the indexes for a prepared request inside the caller's read transaction (contract §3)."""
        result = ResolveResult(outcome="NOT_FOUND", skipped=list(p.skipped))
        limit = self.settings.max_fanout
        fields = p.fields
        winner: Record | None = None
        for kind, values in p.ids.by_kind():
            kind_hits: list[bytes] = []
            for value in values:
                n, hits = view.probe(kind, value, limit)
                if n > limit:
                    state = FAN_OUT
                    detail = f"held by more than {limit} customers; never decides a match"
                    result.skipped.append(Skipped(kind, mask(kind, value), "FAN_OUT_LIMIT", detail))
                else:
                    state = HIT if len(hits) == 1 else SHARED if hits else MISS
                if p.explain:
                    result.probes.append(Probe(kind, mask(kind, value), state, n if state == FAN_OUT else len(hits)))
                if state == FAN_OUT:
                    continue
                if winner is not None:
                    # A lower kind pointing only at someone else: a possible duplicate or a ported number.
                    # A shared line that includes the matched customer is no conflict.
                    if hits and uuid_bytes(winner.uuid) not in hits:
                        result.conflicts += [r.uuid for h in hits if (r := view.record(h)) and r.uuid not in result.conflicts]
                    continue
                kind_hits += [h for h in hits if h not in kind_hits]
            if winner is not None or not kind_hits:
                continue
            records = [r for h in kind_hits if (r := view.record(h)) is not None]
            if len(records) == 1:
                winner = records[0]
                result.outcome = "MATCHED"
                result.customer_uuid = winner.uuid
                result.matched_on = kind
                result.version = winner.version
                result.attributes = self.schema.project(winner.attributes, fields)
            else:
                records.sort(key=lambda r: (-r.updated_us, r.uuid))
                result.outcome = "AMBIGUOUS"
                result.matched_on = kind
                shown = records[: self.settings.max_candidates]
                result.candidates = [(r.uuid, self.schema.project(r.attributes, fields)) for r in shown]
                if p.explain:
                    result.probes += [Probe(k, mask(k, v), NOT_PROBED, 0) for k, vs in p.ids.by_kind() if k > kind for v in vs]
                break
        return result

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
