# cython: language_level=3
"""Compiled twin of resolver/_email_py.py: the ASCII fast path of email normalization.

Read resolver/_email_py.py for the specification; this file must not add behaviour of its own. The checks run
as C loops over the lower-cased value; the messages and their order are the reference's.
"""

from cpython.unicode cimport Py_UNICODE_ISSPACE

from resolver import _email_consts as _consts
from resolver import normalize as _ref
from resolver._email_consts import (DIGIT_TLD_MSG, EMPTY_LOCAL_MSG, IDNA_MSG, KNOWN_PLACEHOLDER_MSG, LABEL_MSG,
                                    LOCAL_CHAR_MSG, LOCAL_DOT_MSG, LONG_ADDRESS_MSG, LONG_LOCAL_MSG, NO_AT_MSG,
                                    NO_DOT_MSG, PLACEHOLDER_MSG, TWO_ATS_MSG)
from resolver.errors import BlockedIdentifier, IdentifierError
from resolver.normalize import DEFAULT_POLICY

__all__ = ["email_stats", "normalize_email", "reset_email_stats"]

# resolver/_email_consts.py's limits, as C ints, and its label characters as an ASCII table.
cdef Py_ssize_t MAX_LOCAL = _consts.MAX_LOCAL, MAX_LABEL = _consts.MAX_LABEL, MAX_ADDRESS = _consts.MAX_ADDRESS
cdef bint LABEL_CHAR[128]
for _ch in _consts.LABEL_CHARS.encode("ascii"):
    LABEL_CHAR[_ch] = True

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
    return ch < 128 and LABEL_CHAR[ch]


cdef str _fast(str value, policy):
    """The reference's steps on a trimmed ASCII value."""
    cdef Py_ssize_t n, at = -1, i, j, start, count, labels = 1, last_start
    cdef Py_UCS4 ch
    cdef bint all_digits
    blocked_values = policy.blocked_values
    value = value.lower()
    if blocked_values and value in blocked_values:
        raise BlockedIdentifier(PLACEHOLDER_MSG)
    n = len(value)
    for i in range(n):
        if value[i] == u"@":
            at = i
            break
    if at < 0:
        raise _invalid(NO_AT_MSG)
    for i in range(at + 1, n):
        if value[i] == u"@":
            raise _invalid(TWO_ATS_MSG)
    if at == 0:
        raise _invalid(EMPTY_LOCAL_MSG)
    if at > MAX_LOCAL:
        raise _invalid(LONG_LOCAL_MSG)
    for i in range(at):
        ch = value[i]
        if ch <= u" " or ch == u"\x7f":
            raise _invalid(LOCAL_CHAR_MSG)
    for i in range(at):
        if value[i] == u"." and (i == 0 or i == at - 1 or value[i + 1] == u"."):
            raise _invalid(LOCAL_DOT_MSG)
    # the idna codec's ASCII branch: labels before the last 1-63 long, the last shorter than 64
    start = at + 1
    if start < n:
        for i in range(start, n + 1):
            if i == n or value[i] == u".":
                count = i - start
                if (i < n and not 0 < count <= MAX_LABEL) or (i == n and count > MAX_LABEL):
                    raise _invalid(IDNA_MSG)
                start = i + 1
    for i in range(at + 1, n):
        if value[i] == u".":
            labels += 1
    if labels < 2:
        raise _invalid(NO_DOT_MSG)
    start = at + 1
    last_start = start
    for i in range(at + 1, n + 1):
        if i == n or value[i] == u".":
            count = i - start
            if not (0 < count <= MAX_LABEL) or value[start] == u"-" or value[i - 1] == u"-":
                raise _invalid(LABEL_MSG)
            for j in range(start, i):
                if not _label_char(value[j]):
                    raise _invalid(LABEL_MSG)
            last_start = start
            start = i + 1
    all_digits = True
    for i in range(last_start, n):
        ch = value[i]
        if not (u"0" <= ch <= u"9"):
            all_digits = False
            break
    if all_digits:
        raise _invalid(DIGIT_TLD_MSG)
    if n > MAX_ADDRESS:
        raise _invalid(LONG_ADDRESS_MSG)
    if value[:at] in _PLACEHOLDER_LOCALS or value in _PLACEHOLDER_EMAILS:
        raise BlockedIdentifier(KNOWN_PLACEHOLDER_MSG)
    if blocked_values and value in blocked_values:
        raise BlockedIdentifier(PLACEHOLDER_MSG)
    patterns = policy.blocked_patterns
    if patterns:
        for pattern in patterns:
            if pattern.fullmatch(value):
                raise BlockedIdentifier(PLACEHOLDER_MSG)
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
