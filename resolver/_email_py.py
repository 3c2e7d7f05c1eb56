"""Fast email normalization: the pure-Python twin of ext/_email_c.pyx, and the readable specification of it.

`normalize_email` answers exactly what `resolver.normalize.normalize_email` answers (the same address, or the
same exception class, reason and message) for every input. The fast path takes addresses that are ASCII once
trimmed: there lower() is ASCII lower-casing, whitespace and control characters are the code points up to
U+0020 and U+007F, and the stdlib "idna" codec's ASCII branch only checks label lengths (empty or longer than
63 characters before the last label, 64 or more in the last), so the reference's steps reduce to character
tests. Anything non-ASCII (IDNA domains, Unicode local parts) falls back to the reference and is counted.
"""

from __future__ import annotations

from resolver import _email_consts as _consts
from resolver import normalize as _ref
from resolver._email_consts import (
    DIGIT_TLD_MSG,
    EMPTY_LOCAL_MSG,
    IDNA_MSG,
    KNOWN_PLACEHOLDER_MSG,
    LABEL_MSG,
    LOCAL_CHAR_MSG,
    LOCAL_DOT_MSG,
    LONG_ADDRESS_MSG,
    LONG_LOCAL_MSG,
    MAX_ADDRESS,
    MAX_LABEL,
    MAX_LOCAL,
    NO_AT_MSG,
    NO_DOT_MSG,
    PLACEHOLDER_MSG,
    TWO_ATS_MSG,
)
from resolver.errors import BlockedIdentifier, IdentifierError
from resolver.normalize import DEFAULT_POLICY, Policy

__all__ = ["email_stats", "normalize_email", "reset_email_stats"]

LABEL_CHARS = frozenset(_consts.LABEL_CHARS)
_stats = [0, 0]  # calls, fallbacks


def email_stats() -> dict[str, int]:
    """Calls of `normalize_email` in this process and how many of them fell back to the reference."""
    return {"calls": _stats[0], "fallbacks": _stats[1]}


def reset_email_stats() -> None:
    """Zero the counters of `email_stats`."""
    _stats[0] = _stats[1] = 0


def _invalid(message: str) -> IdentifierError:
    return IdentifierError(message, reason="INVALID_EMAIL")


def _label_ok(label: str) -> bool:
    """normalize._DOMAIN_LABEL.fullmatch on an ASCII label: 1-63 of [a-z0-9-], no '-' at either end."""
    return 0 < len(label) <= MAX_LABEL and label[0] != "-" and label[-1] != "-" and all(ch in LABEL_CHARS for ch in label)


def _fast(value: str, policy: Policy) -> str:
    """The reference's steps on a trimmed ASCII value."""
    if policy.blocked_values and value.lower() in policy.blocked_values:
        raise BlockedIdentifier(PLACEHOLDER_MSG)
    value = value.lower()
    local, at, domain = value.partition("@")
    if not at:
        raise _invalid(NO_AT_MSG)
    if "@" in domain:
        raise _invalid(TWO_ATS_MSG)
    if not local:
        raise _invalid(EMPTY_LOCAL_MSG)
    if len(local) > MAX_LOCAL:
        raise _invalid(LONG_LOCAL_MSG)
    if any(ch <= " " or ch == "\x7f" for ch in local):
        raise _invalid(LOCAL_CHAR_MSG)
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise _invalid(LOCAL_DOT_MSG)
    labels = domain.split(".")
    if domain and (any(not 0 < len(label) <= MAX_LABEL for label in labels[:-1]) or len(labels[-1]) > MAX_LABEL):
        raise _invalid(IDNA_MSG)
    if len(labels) < 2:
        raise _invalid(NO_DOT_MSG)
    if not all(_label_ok(label) for label in labels):
        raise _invalid(LABEL_MSG)
    if labels[-1].isdigit():
        raise _invalid(DIGIT_TLD_MSG)
    address = f"{local}@{domain}"
    if len(address) > MAX_ADDRESS:
        raise _invalid(LONG_ADDRESS_MSG)
    if local in _ref._PLACEHOLDER_EMAIL_LOCALS or address in _ref._PLACEHOLDER_EMAILS:
        raise BlockedIdentifier(KNOWN_PLACEHOLDER_MSG)
    if _ref._blocked_by_policy(address, policy):
        raise BlockedIdentifier(PLACEHOLDER_MSG)
    return address


def normalize_email(raw: str, policy: Policy = DEFAULT_POLICY) -> str:
    """`resolver.normalize.normalize_email`, on an ASCII fast path, else by it."""
    _stats[0] += 1
    value = raw.strip()
    if not value.isascii():
        _stats[1] += 1
        return _ref.normalize_email(raw, policy)
    return _fast(value, policy)
