# cython: language_level=3
"""Compiled twin of resolver/_email_py.py: the ASCII fast path of email normalization.

Read resolver/_email_py.py for the specification; this file must not add behaviour of its own. The checks run
as C loops over the lower-cased value; the messages and their order are the reference's.
"""

from cpython.unicode cimport Py_UNICODE_ISSPACE

from resolver import normalize as _ref
from resolver.errors import BlockedIdentifier, IdentifierError
from resolver.normalize import DEFAULT_POLICY

__all__ = ["email_stats", "normalize_email", "reset_email_stats"]

cdef frozenset _PLACEHOLDER_LOCALS = _ref._PLACEHOLDER_EMAIL_LOCALS
cdef frozenset _PLACEHOLDER_EMAILS = _ref._PLACEHOLDER_EMAILS
cdef object _reference = _ref.normalize_email

cdef Py_ssize_t _calls = 0
cdef Py_ssize_t _fallbacks = 0


def email_stats():
    """Calls of `normalize_email` in this process and how many of them fell back to the reference."""
    return {"calls": _calls, "fallbacks": _fallbacks}


def reset_email_stats():
    """Zero the counters of `email_stats`."""
    global _calls, _fallbacks
    _calls = _fallbacks = 0


cdef inline object _invalid(str message):
    return IdentifierError(message, reason="INVALID_EMAIL")


cdef inline bint _label_char(Py_UCS4 ch):
    return (u"a" <= ch <= u"z") or (u"0" <= ch <= u"9") or ch == u"-"


cdef str _fast(str value, policy):
    """The reference's steps on a trimmed ASCII value."""
    cdef Py_ssize_t n, at = -1, i, j, start, count, labels = 1, last_start
    cdef Py_UCS4 ch
    cdef bint all_digits
    blocked_values = policy.blocked_values
    value = value.lower()
    if blocked_values and value in blocked_values:
        raise BlockedIdentifier("email is a configured placeholder value")
    n = len(value)
    for i in range(n):
        if value[i] == u"@":
            at = i
            break
    if at < 0:
        raise _invalid("email has no '@'")
    for i in range(at + 1, n):
        if value[i] == u"@":
            raise _invalid("email has more than one '@'")
    if at == 0:
        raise _invalid("email has an empty local part")
    if at > 64:
        raise _invalid("email local part is longer than 64 characters")
    for i in range(at):
        ch = value[i]
        if ch <= u" " or ch == u"\x7f":
            raise _invalid("email local part contains whitespace or a control character")
    for i in range(at):
        if value[i] == u"." and (i == 0 or i == at - 1 or value[i + 1] == u"."):
            raise _invalid("email local part has a leading, trailing or doubled dot")
    # the idna codec's ASCII branch: labels before the last 1-63 long, the last shorter than 64
    start = at + 1
    if start < n:
        for i in range(start, n + 1):
            if i == n or value[i] == u".":
                count = i - start
                if (i < n and not 0 < count < 64) or (i == n and count >= 64):
                    raise _invalid("email domain cannot be IDNA-encoded")
                start = i + 1
    for i in range(at + 1, n):
        if value[i] == u".":
            labels += 1
    if labels < 2:
        raise _invalid("email domain has no dot")
    start = at + 1
    last_start = start
    for i in range(at + 1, n + 1):
        if i == n or value[i] == u".":
            count = i - start
            if not (0 < count <= 63) or value[start] == u"-" or value[i - 1] == u"-":
                raise _invalid("email domain has an empty or malformed label")
            for j in range(start, i):
                if not _label_char(value[j]):
                    raise _invalid("email domain has an empty or malformed label")
            last_start = start
            start = i + 1
    all_digits = True
    for i in range(last_start, n):
        ch = value[i]
        if not (u"0" <= ch <= u"9"):
            all_digits = False
            break
    if all_digits:
        raise _invalid("email top-level domain is all digits")
    if n > 254:
        raise _invalid("email is longer than 254 characters")
    if value[:at] in _PLACEHOLDER_LOCALS or value in _PLACEHOLDER_EMAILS:
        raise BlockedIdentifier("email is a placeholder address")
    if blocked_values and value in blocked_values:
        raise BlockedIdentifier("email is a configured placeholder value")
    patterns = policy.blocked_patterns
    if patterns:
        for pattern in patterns:
            if pattern.fullmatch(value):
                raise BlockedIdentifier("email is a configured placeholder value")
    return value


def normalize_email(raw, policy=DEFAULT_POLICY):
    """`resolver.normalize.normalize_email`, on an ASCII fast path, else by it."""
    global _calls, _fallbacks
    _calls += 1
    cdef str value
    cdef Py_ssize_t n
    if type(raw) is str:
        value = <str>raw
        n = len(value)
        if n and (Py_UNICODE_ISSPACE(value[0]) or Py_UNICODE_ISSPACE(value[n - 1])):
            value = value.strip()
        if value.isascii():
            return _fast(value, policy)
    _fallbacks += 1
    return _reference(raw, policy)
