"""The one masking choke point for free text: log lines, error messages, dead-letter details (contract §8).

`redact(text)` finds what can be recognised by its shape and never lets it through raw:

- phones (`+<digits>` with or without separators, `(415) 555-9888`, 9 to 15 bare digits) and emails are masked
  by resolver.normalize.mask, the project's one masking rule (`+141******88`, `j***@example.com`);
- bearer tokens, resolver tokens (`rsv_...`) and webhook secrets (`whsec_...`) are replaced whole.

External ids and attribute values have no shape: the call sites never put them in a message raw (they mask them
with resolver.normalize.mask_value). The exception that cannot promise that is an exception's own message (a
KeyError names its key, a ValueError quotes its input): `redact_exception` masks every quoted literal of it too.

`payload="none"` (`[logging] payload`): nothing of a value is shown, not even masked: each of the above, and any
masked form already in the text (anything holding "***"), becomes "[redacted]".

One precompiled pattern, one pass per text: the cost is paid per log line or per error, never per call.
"""

from __future__ import annotations

import re
import traceback
from types import TracebackType
from typing import Literal

from resolver.normalize import Kind, mask, mask_value

Payload = Literal["masked", "none"]

MARKER = "[redacted]"
TOKEN = "[token]"
SECRET = "[secret]"

# An email's local part, written out so that the match can only start where a local part starts (the look-behind):
# a long run of word characters without an "@" is scanned once, not once per start position. No "*" (a masked
# form is left as it is) and no quotes (a repr's quote is not part of the address).
_LOCAL = r"[\w.!#$%&+/=?^`{|}~-]"
_SHAPES = (
    # a credential, not prose ("a bearer token"): 12+ characters, a digit or a sign among them
    r"(?P<bearer>\b(?i:bearer)\s+)(?=[A-Za-z]*[\d_.~+/=-])[\w.~+/=-]{12,}"
    r"|(?P<token>rsv_[\w-]+)"  # no \b: "x_rsv_..." holds a token all the same
    r"|(?P<secret>whsec_[\w+/=-]+)"
    rf"|(?<!{_LOCAL})(?P<email>{_LOCAL}+@[\w-]+(?:\.[\w-]+)+)"
    # E.164, separators allowed: "+14155559888", "+1 (415) 555-9888", "tel:+44-20-7946-0958"
    r"|(?<![\w+*])(?P<phone>\+\d(?:[ .()/-]{0,2}\d){6,16})(?![\d*])"
    # national: "(415) 555-9888", "415.555.9888", or 9-15 bare digits; never a piece of a uuid, a decimal number,
    # an address or a masked form
    r"|(?<![\w+.*:/-])(?P<national>\(?\d{3}\)?[ .-]?\d{3}[ .-]\d{4}|\d{9,15})(?![\w*]|[.:/-]\d)"
)
_MASKED = re.compile(_SHAPES)
# payload "none": a masked form already in the text ("+141******88", "CR***BC", "j***@example.com") goes too
_NONE = re.compile(r"(?P<masked>[^\s'\"*]*\*\*\*[^\s'\",;)\]}]*)|" + _SHAPES)
# A quoted literal of an exception message (a repr: 'x', "x", with escapes), on one line.
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
_SECRET_INSIDE = re.compile(r"(?i:bearer)\s|rsv_|whsec_")


def _replacement(m: re.Match[str], none: bool) -> str:
    kind = m.lastgroup
    if kind == "bearer":
        return m.group("bearer") + TOKEN
    if kind == "token":
        return TOKEN
    if kind == "secret":
        return SECRET
    if none:
        return MARKER
    if kind == "email":
        return mask(Kind.EMAIL, m.group())
    digits = "".join(c for c in m.group() if c.isdigit())
    return mask(Kind.PHONE, "+" + digits if kind == "phone" else digits)


def _masked_sub(m: re.Match[str]) -> str:
    return _replacement(m, False)


def _none_sub(m: re.Match[str]) -> str:
    return _replacement(m, True)


# What every match above holds, checked first (most texts hold none of it, and the pattern is not run over
# them): an "@", a token's or secret's prefix, or 7 digits with at most 2 phone separators between neighbours
# (every phone shape above has them; an IP address or a uuid does not). Unrolled: it runs faster than {6}.
_SEP = r"[ ().+/-]{0,2}"
_SEVEN_DIGITS = re.compile(r"\d" + (_SEP + r"\d") * 6)


def may_hold(text: str, payload: Payload = "masked") -> bool:
    """False when `redact(text, payload)` is `text` for sure (a quick test: True may still find nothing)."""
    return ("@" in text or "rsv_" in text or "whsec_" in text or "earer" in text or "EARER" in text
            or (payload == "none" and "***" in text) or _SEVEN_DIGITS.search(text) is not None)


def redact(text: str, payload: Payload = "masked") -> str:
    """`text` with every phone, email, token and secret in it masked or replaced (see the module docstring)."""
    if not may_hold(text, payload):
        return text
    return _NONE.sub(_none_sub, text) if payload == "none" else _MASKED.sub(_masked_sub, text)


def _literal(inner: str, payload: Payload) -> str:
    """A quoted value of an exception message, masked whole: an email or a phone by its kind's rule, a token or
    secret replaced, anything else by mask_value (it may be an external id or an attribute value)."""
    if not inner:
        return inner
    whole = _MASKED.fullmatch(inner)
    if whole is not None:
        return _replacement(whole, payload == "none")
    if payload == "none" or _SECRET_INSIDE.search(inner):
        return MARKER
    return mask_value(inner)


def redact_exception_text(text: str, payload: Payload = "masked") -> str:
    """An exception's message (`format_exception_only` lines): `redact`, and every quoted literal masked whole."""
    parts: list[str] = []
    last = 0
    for m in _QUOTED.finditer(text):
        parts.append(redact(text[last:m.start()], payload))
        quote = m.group()[0]
        parts.append(quote + _literal(m.group()[1:-1], payload) + quote)
        last = m.end()
    parts.append(redact(text[last:], payload))
    return "".join(parts)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def redact_exception(exc_info: tuple[type[BaseException], BaseException, TracebackType | None],
                     payload: Payload = "masked") -> str:
    """A traceback as `traceback.format_exception` renders it (chained exceptions included), with each exception's
    message redacted by `redact_exception_text`. The frames are source lines, never values: kept as they are.
    (The members of an ExceptionGroup are not listed: the group's own message and frames are.)"""
    lines = _render(traceback.TracebackException(*exc_info, compact=True), payload)
    return "".join(lines).rstrip("\n")


def _render(te: traceback.TracebackException, payload: Payload) -> list[str]:
    out: list[str] = []
    if te.__cause__ is not None:
        out += _render(te.__cause__, payload)
        out.append(_CAUSE)
    elif te.__context__ is not None and not te.__suppress_context__:
        out += _render(te.__context__, payload)
        out.append(_CONTEXT)
    if te.stack:
        out.append("Traceback (most recent call last):\n")
        out.extend(te.stack.format())
    out.extend(redact_exception_text(line, payload) for line in te.format_exception_only())
    return out
