"""A request's identifier set, normalized: what failed and why is kept beside what succeeded."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from resolver._hotpath import normalize_email, normalize_phone
from resolver.config import Settings
from resolver.errors import DeadlineExceeded, IdentifierError
from resolver.normalize import Kind, Policy, mask, normalize_external_id


@dataclass(frozen=True, slots=True)
class RawIdentifiers:
    """Identifiers as a caller sent them (empty external_id: none)."""

    external_id: str = ""
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.external_id or self.emails or self.phones)


@dataclass(slots=True)
class Identifiers:
    """Normalized, de-duplicated identifiers, in the order first given."""

    external_id: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)

    def by_kind(self) -> list[tuple[Kind, list[str]]]:
        """In precedence order: external_id, emails, phones."""
        return [
            (Kind.EXTERNAL_ID, [self.external_id] if self.external_id is not None else []),
            (Kind.EMAIL, self.emails),
            (Kind.PHONE, self.phones),
        ]

    def as_dict(self) -> dict[str, object]:
        return {"external_id": self.external_id, "emails": self.emails, "phones": self.phones}


@dataclass(frozen=True, slots=True)
class Skipped:
    """An identifier that took no part: `masked` is the input as sent, masked."""

    kind: Kind
    masked: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Failure:
    """An identifier that could not be normalized; `field` is its request path."""

    field: str
    kind: Kind
    raw: str
    error: IdentifierError

    def skipped(self) -> Skipped:
        return Skipped(self.kind, mask(self.kind, self.raw), self.error.reason, self.error.message)


def policy_from(settings: Settings) -> Policy:
    return Policy(
        default_region=settings.matching.default_region,
        phone_acceptance=settings.matching.phone_acceptance,
        blocked_values=frozenset(v.strip().lower() for v in settings.matching.blocked_values),
        blocked_patterns=tuple(re.compile(p) for p in settings.matching.blocked_patterns),
    )


def normalize_identifiers(raw: RawIdentifiers, region: str | None, policy: Policy, prefix: str,
                          deadline: float | None = None) -> tuple[Identifiers, list[Failure]]:
    """Normalize every identifier; each one that fails is returned as a Failure, never raised.

    Linear in the number of identifiers. `deadline` (a time.monotonic() instant): DeadlineExceeded once it
    has passed, checked every few identifiers, so a large request stops when its caller has given up.
    """
    external_id: str | None = None
    emails: list[str] = []
    phones: list[str] = []
    failures: list[Failure] = []
    if raw.external_id:
        try:
            external_id = normalize_external_id(raw.external_id)
        except IdentifierError as exc:
            failures.append(Failure(f"{prefix}.external_id", Kind.EXTERNAL_ID, raw.external_id, exc))
    for i, value in enumerate(raw.emails):
        if deadline is not None and not i & _CHECK_EVERY and time.monotonic() >= deadline:
            raise DeadlineExceeded(_TOO_LATE)
        try:
            emails.append(normalize_email(value, policy))
        except IdentifierError as exc:
            failures.append(Failure(f"{prefix}.emails[{i}]", Kind.EMAIL, value, exc))
    for i, value in enumerate(raw.phones):
        if deadline is not None and not i & _CHECK_EVERY and time.monotonic() >= deadline:
            raise DeadlineExceeded(_TOO_LATE)
        try:
            phones.append(normalize_phone(value, region, policy))
        except IdentifierError as exc:
            failures.append(Failure(f"{prefix}.phones[{i}]", Kind.PHONE, value, exc))
    # de-duplicated keeping the first of each (dict keys keep insertion order: linear, not a list search)
    if len(emails) > 1:
        emails = list(dict.fromkeys(emails))
    if len(phones) > 1:
        phones = list(dict.fromkeys(phones))
    return Identifiers(external_id, emails, phones), failures  # positional: no default factories to run


_CHECK_EVERY = 7  # the deadline is read before identifiers 0, 8, 16, ... (a clock read per item costs more)
_TOO_LATE = "the deadline passed while the identifiers were being normalized; nothing was done"
