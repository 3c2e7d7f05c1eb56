"""Fast email normalization: the pure-Python twin of ext/_email_c.pyx, and the readable specification of it.

`normalize_email` answers exactly what `resolver.normalize.normalize_email` answers (the same address, or the
same exception class, reason and message) for every input. The fast path takes addresses that are ASCII once
trimmed: there lower() is ASCII lower-casing, whitespace and control characters are the code points up to
U+0020 and U+007F, and the stdlib "idna" codec's ASCII branch only checks label lengths (empty or longer than
63 characters before the last label, 64 or more in the last), so the reference's steps reduce to character
tests. Anything non-ASCII (IDNA domains, Unicode local parts) falls back to the reference and is counted.
"""

from __future__ import annotations

from resolver import normalize as _ref
from resolver.errors import BlockedIdentifier, IdentifierError
from resolver.normalize import DEFAULT_POLICY, Policy

__all__ = ["email_stats", "normalize_email", "reset_email_stats"]

LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
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
    return 0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-" and all(ch in LABEL_CHARS for ch in label)


def _fast(value: str, policy: Policy) -> str:
    """The reference's steps on a trimmed ASCII value."""
    if policy.blocked_values and value.lower() in policy.blocked_values:
        raise BlockedIdentifier("email is a configured placeholder value")
    value = value.lower()
    local, at, domain = value.partition("@")
    if not at:
        raise _invalid("email has no '@'")
    if "@" in domain:
        raise _invalid("email has more than one '@'")
    if not local:
        raise _invalid("email has an empty local part")
    if len(local) > 64:
        raise _invalid("email local part is longer than 64 characters")
    if any(ch <= " " or ch == "\x7f" for ch in local):
        raise _invalid("email local part contains whitespace or a control character")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise _invalid("email local part has a leading, trailing or doubled dot")
    labels = domain.split(".")
    if domain and (any(not 0 < len(label) < 64 for label in labels[:-1]) or len(labels[-1]) >= 64):
        raise _invalid("email domain cannot be IDNA-encoded")
    if len(labels) < 2:
        raise _invalid("email domain has no dot")
    if not all(_label_ok(label) for label in labels):
        raise _invalid("email domain has an empty or malformed label")
    if labels[-1].isdigit():
        raise _invalid("email top-level domain is all digits")
    address = f"{local}@{domain}"
    if len(address) > 254:
        raise _invalid("email is longer than 254 characters")
    if local in _ref._PLACEHOLDER_EMAIL_LOCALS or address in _ref._PLACEHOLDER_EMAILS:
        raise BlockedIdentifier("email is a placeholder address")
    if _ref._blocked_by_policy(address, policy):
        raise BlockedIdentifier("email is a configured placeholder value")
    return address


def normalize_email(raw: str, policy: Policy = DEFAULT_POLICY) -> str:
    """`resolver.normalize.normalize_email`, on an ASCII fast path, else by it."""
    _stats[0] += 1
    value = raw.strip()
    if not value.isascii():
        _stats[1] += 1
        return _ref.normalize_email(raw, policy)
    return _fast(value, policy)
