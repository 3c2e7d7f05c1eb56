"""Identifier normalization: the pure-Python reference (contract §2) that any compiled twin must equal.

Every identifier is normalized before it is indexed or looked up, and the normalized form is what is
stored. Each normalizer returns that form or raises `IdentifierError` (reason INVALID_EXTERNAL_ID,
INVALID_EMAIL, INVALID_PHONE or INVALID_REGION) or its subclass `BlockedIdentifier` (reason
BLOCKED_VALUE: a withheld or placeholder value, never indexed and never matched). No other exception
escapes for any `str` input. Error messages say what is wrong and never repeat the value (it is PII).

Phones: `phonenumbers` is the oracle. After the pre-processing described in `normalize_phone`, the
answer is exactly phonenumbers parse -> is_valid_number (or is_possible_number) -> E.164, repeated on that
E.164 form until it stops changing: the stored form is a fixed point, so normalizing it again returns it.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat

from resolver.errors import BlockedIdentifier, IdentifierError

__all__ = [
    "DEFAULT_POLICY",
    "Kind",
    "Policy",
    "check_region",
    "mask",
    "mask_value",
    "normalize_email",
    "normalize_external_id",
    "normalize_phone",
]


class Kind(enum.IntEnum):
    """The kind of an identifier; the numbers equal the proto's MatchKind."""

    EXTERNAL_ID = 1
    EMAIL = 2
    PHONE = 3


@dataclass(frozen=True, slots=True)
class Policy:
    """The configurable part of normalization, built once from the blueprint.

    `blocked_values` are compared case-insensitively (they are stored lower-cased) to the trimmed raw
    input and to the normalized value; `blocked_patterns` must fullmatch the normalized value. Both
    apply to phones and emails, in addition to the built-in placeholders.
    """

    default_region: str | None = None  # ISO 3166 alpha-2, upper-case; used when a call gives no region
    phone_acceptance: str = "valid"  # "valid" (is_valid_number) or "possible" (is_possible_number)
    blocked_values: frozenset[str] = frozenset()
    blocked_patterns: tuple[re.Pattern[str], ...] = ()

    def __post_init__(self) -> None:
        # A typo here would silently change what is indexed, so fail when the policy is built.
        if self.phone_acceptance not in ("valid", "possible"):
            raise ValueError(f"phone_acceptance must be 'valid' or 'possible', not {self.phone_acceptance!r}")
        if self.default_region is not None and self.default_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"default_region {self.default_region!r} is not an upper-case supported region")
        object.__setattr__(self, "blocked_values", frozenset(v.lower() for v in self.blocked_values))
        # The blueprint holds pattern strings; compiling them here keeps a str from failing per call.
        patterns = tuple(re.compile(p) if isinstance(p, str) else p for p in self.blocked_patterns)
        object.__setattr__(self, "blocked_patterns", patterns)


DEFAULT_POLICY = Policy()


def _blocked_by_policy(normalized: str, policy: Policy) -> bool:
    if normalized in policy.blocked_values:
        return True
    return any(pattern.fullmatch(normalized) for pattern in policy.blocked_patterns)


# Characters never allowed in an identifier: controls, invisible format characters (zero-width
# joiners, BOM, bidi overrides), line/paragraph separators, and lone surrogates (Cs), which cannot be
# encoded as UTF-8 and so could never be hashed into an index key.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # the Cc characters of ASCII: all it has of the forbidden ones


def _has_forbidden_char(text: str) -> bool:
    if text.isascii():  # the common case, a regex scan instead of a category lookup per character
        return ASCII_CONTROL.search(text) is not None
    return any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in text)


# --- region -------------------------------------------------------------------------------------


def check_region(region: str | None) -> str | None:
    """The region as phonenumbers wants it: None for None or "" (no region), else the upper-cased code.

    Raises IdentifierError(INVALID_REGION) unless it is an ASCII code in phonenumbers.SUPPORTED_REGIONS.
    (ASCII only, because str.upper() maps some non-ASCII letters onto ASCII: "ıt".upper() == "IT".)
    """
    if not region:
        return None
    code = region.upper()
    if not region.isascii() or code not in phonenumbers.SUPPORTED_REGIONS:
        raise IdentifierError("region is not a supported ISO 3166 alpha-2 code", reason="INVALID_REGION")
    return code


# --- external_id --------------------------------------------------------------------------------

MAX_EXTERNAL_ID_LENGTH = 255


def normalize_external_id(raw: str) -> str:
    """The trimmed id: 1-255 characters, no control/format/separator characters; case is kept."""
    value = raw.strip()
    if not value:
        raise IdentifierError("external_id is empty", reason="INVALID_EXTERNAL_ID")
    if len(value) > MAX_EXTERNAL_ID_LENGTH:
        raise IdentifierError(f"external_id is longer than {MAX_EXTERNAL_ID_LENGTH} characters", reason="INVALID_EXTERNAL_ID")
    if _has_forbidden_char(value):
        raise IdentifierError("external_id contains a control character", reason="INVALID_EXTERNAL_ID")
    return value


# --- email --------------------------------------------------------------------------------------

_PLACEHOLDER_EMAIL_LOCALS = frozenset({"noemail", "no-email", "no_email", "nomail"})
_PLACEHOLDER_EMAILS = frozenset({"none@none.com", "na@na.com", "test@test.com", "email@email.com", "noone@nowhere.com"})
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # 1-63 chars, no '-' at either end


def _invalid_email(message: str) -> IdentifierError:
    return IdentifierError(message, reason="INVALID_EMAIL")


def normalize_email(raw: str, policy: Policy = DEFAULT_POLICY) -> str:
    """The trimmed, lower-cased address with its domain IDNA-encoded (stdlib "idna" codec, IDNA 2003).

    Syntax: exactly one '@'; local part 1-64 characters without whitespace or control characters and
    without leading, trailing or consecutive dots; domain labels 1-63 of [a-z0-9-] not starting or
    ending with '-', at least two labels, TLD not all digits; whole address at most 254 characters.
    No provider rewriting: dots and +tags are kept. Placeholders (noemail@..., none@none.com, ...
    and the policy's) raise BlockedIdentifier.
    """
    value = raw.strip()
    if value.lower() in policy.blocked_values:
        raise BlockedIdentifier("email is a configured placeholder value")
    value = value.lower()
    if "@" not in value:
        raise _invalid_email("email has no '@'")
    local, _, domain = value.partition("@")
    if "@" in domain:
        raise _invalid_email("email has more than one '@'")

    if not local:
        raise _invalid_email("email has an empty local part")
    if len(local) > 64:
        raise _invalid_email("email local part is longer than 64 characters")
    if any(ch.isspace() for ch in local) or _has_forbidden_char(local):
        raise _invalid_email("email local part contains whitespace or a control character")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise _invalid_email("email local part has a leading, trailing or doubled dot")

    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise _invalid_email("email domain cannot be IDNA-encoded") from None
    labels = domain.split(".")
    if len(labels) < 2:
        raise _invalid_email("email domain has no dot")
    if not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise _invalid_email("email domain has an empty or malformed label")
    if labels[-1].isdigit():
        raise _invalid_email("email top-level domain is all digits")

    address = f"{local}@{domain}"
    if len(address) > 254:
        raise _invalid_email("email is longer than 254 characters")
    if local in _PLACEHOLDER_EMAIL_LOCALS or address in _PLACEHOLDER_EMAILS:
        raise BlockedIdentifier("email is a placeholder address")
    if _blocked_by_policy(address, policy):
        raise BlockedIdentifier("email is a configured placeholder value")
    return address


# --- phone --------------------------------------------------------------------------------------

MAX_PHONE_INPUT_LENGTH = 256
_PLACEHOLDER_PHONE_WORDS = frozenset(
    {
        "anonymous",
        "restricted",
        "unknown",
        "unavailable",
        "private",
        "withheld",
        "no caller id",
        "blocked",
        "unknown caller",
    }
)
# re.ASCII: with IGNORECASE alone, "ſ" (long s) would match "s".
_URI_SCHEME = re.compile(r"(tel|sips?):", re.IGNORECASE | re.ASCII)
_DIAL_SEPARATORS = re.compile(r"[ \-.()/]")
_E164 = PhoneNumberFormat.E164


def _invalid_phone(message: str) -> IdentifierError:
    return IdentifierError(message, reason="INVALID_PHONE")


def _check_placeholder_word(text: str, policy: Policy) -> None:
    word = text.strip().lower()
    if word in _PLACEHOLDER_PHONE_WORDS or word in policy.blocked_values:
        raise BlockedIdentifier("phone number is a withheld or placeholder value")


def _telephone_subscriber(text: str) -> str:
    """The number of a tel: URI body or of a sip: user part, keeping only a phone-context parameter.

    phonenumbers itself understands ";phone-context=": a context starting with '+' is prefixed to a
    local number ("tel:7946-0958;phone-context=+44-20" -> +442079460958); a domain context is ignored
    (the region is then needed); a global number with a context, or an empty or malformed context, is
    rejected. It finds the parameter case-sensitively, so we rebuild it in lower case. Every other
    parameter (;ext=, ;isub=, ;npdi, ;rn=, ...) is dropped: E.164 has no extension, and phonenumbers
    would fail on parameters it does not know.
    """
    number, *params = text.split(";")
    for param in params:
        name, _, context = param.partition("=")
        if name.strip().lower() == "phone-context":
            return f"{number};phone-context={context}"
    return number


def _preprocess_phone(value: str, policy: Policy) -> str:
    """Unwraps tel:, sip: and sips: URIs (scheme case-insensitive); other input is returned unchanged."""
    scheme = _URI_SCHEME.match(value)
    if scheme is None:
        return value
    body = value[scheme.end() :]
    if scheme.group(1).lower() != "tel":
        # sip:user[:password]@host;uri-params -> user. The host and URI parameters (;user=phone)
        # say nothing about the number. RFC 3261 lets a user part be a telephone-subscriber, so it
        # gets the same parameter handling as a tel: body.
        user, at, _host = body.partition("@")
        if not at:
            raise _invalid_phone("sip URI has no user part")
        body = user.partition(":")[0]
    # "sip:anonymous@anonymous.invalid" (RFC 3323) is the usual withheld caller: block, not reject.
    _check_placeholder_word(body.partition(";")[0], policy)
    return _telephone_subscriber(body)


def _international_retry(value: str) -> str | None:
    """The value as "+<rest>" if its digits start with 00 or 011 (dialled from anywhere), else None.

    phonenumbers strips only the IDD of the region it is given, so "001 555 019 9888" under region US
    (whose IDD is 011), or with no region at all, would otherwise be rejected.
    """
    digits = _DIAL_SEPARATORS.sub("", value)
    if digits.startswith("00"):
        return "+" + digits[2:]
    if digits.startswith("011"):
        return "+" + digits[3:]
    return None


def _parse_error_message(error: NumberParseException) -> str:
    if error.error_type == NumberParseException.INVALID_COUNTRY_CODE:
        return "phone number has no recognisable country code (write it as +<country code> or give a region)"
    if error.error_type in (NumberParseException.TOO_SHORT_NSN, NumberParseException.TOO_SHORT_AFTER_IDD):
        return "phone number is too short"
    if error.error_type == NumberParseException.TOO_LONG:
        return "phone number is too long"
    return "value does not look like a phone number"


def _parse(text: str, region: str | None, policy: Policy) -> tuple[phonenumbers.PhoneNumber | None, str]:
    """(the parsed number, "") if phonenumbers parses and accepts `text`, else (None, what is wrong)."""
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as error:
        return None, _parse_error_message(error)
    if number.national_number == 0:
        raise BlockedIdentifier("phone number is all zeros (a withheld or placeholder number)")
    if policy.phone_acceptance == "valid":
        if phonenumbers.is_valid_number(number):
            return number, ""
        return None, f"phone number is not valid for country code +{number.country_code}"
    if phonenumbers.is_possible_number(number):
        return number, ""
    return None, f"phone number has an impossible length for country code +{number.country_code}"


# How many times an accepted E.164 form is read again before it is rejected as never settling. A re-read can
# change nothing but the national number's national prefix (calling codes are prefix-free), so each change
# shortens a national number of at most 17 digits (phonenumbers' _MAX_LENGTH_FOR_NSN), bar one transform rule
# rewriting a whole short local number (SM, MG, NF), which no rule matches again: chains end far below this.
PHONE_REREAD_LIMIT = 17


def _unsettled_phone(message: str | None) -> IdentifierError:
    """The error for an input whose E.164 form, read again, is rejected (`message`: why), or keeps changing (None)."""
    if message is None:
        return _invalid_phone(f"phone number has no stable E.164 form: it still changes after {PHONE_REREAD_LIMIT} re-reads")
    return _invalid_phone(f"phone number has no stable E.164 form: read again, it drops a national prefix "
                          f"and is then rejected ({message})")


def normalize_phone(raw: str, region: str | None = None, policy: Policy = DEFAULT_POLICY) -> str:
    """The E.164 form of a phone number, e.g. "+442079460958": the fixed point of `_normalize_phone_once`.

    phonenumbers strips one national prefix per parse, so a first answer can read back as another number:
    "+840086920663" -> "+84086920663" -> "+8486920663" (possible policy). The first answer is therefore read
    again (no region: it starts with '+') until a re-read returns it unchanged; that value is returned, so
    normalize_phone(normalize_phone(x)) == normalize_phone(x) for every accepted x, under both policies.
    Every re-read is a whole pass: one that is blocked (an all-zero number, a configured value) raises its
    BlockedIdentifier; one that is not accepted rejects the input (INVALID_PHONE, "no stable E.164 form").
    Why reject rather than keep the last accepted value: that value's own re-read is rejected, so storing it
    would store a form that normalizing again refuses; keeping the first answer breaks the property the same
    way. Rejecting is the only answer that keeps it, and what it rejects (a number that phonenumbers itself
    refuses once written in E.164) is rare: see bench/README.md. More than PHONE_REREAD_LIMIT re-reads that
    all change the number also reject it (never seen).
    """
    e164 = _normalize_phone_once(raw, region, policy)
    for _ in range(PHONE_REREAD_LIMIT):
        try:
            again = _normalize_phone_once(e164, None, policy)
        except BlockedIdentifier:
            raise
        except IdentifierError as error:
            raise _unsettled_phone(error.message) from None
        if again == e164:
            return e164
        e164 = again
    raise _unsettled_phone(None)


def _normalize_phone_once(raw: str, region: str | None, policy: Policy) -> str:
    """One pass of `normalize_phone`: the E.164 form of a phone number as phonenumbers reads it once.

    `region` (None or "" -> `policy.default_region`) interprets national forms. Steps:
    1. trim; empty or longer than 256 characters -> INVALID_PHONE;
    2. placeholder words (anonymous, restricted, unknown, ... and policy.blocked_values) -> blocked;
    3. tel: URI -> its number; sip:/sips: URI -> its user part (see `_telephone_subscriber` for the
       parameters: only phone-context is kept);
    4. phonenumbers.parse(value, region), accepted by is_valid_number ("valid" policy) or
       is_possible_number ("possible"); if that fails and the value's digits start with 00 or 011,
       the same with "+" + the rest and no region. The first accepted parse wins;
    5. not accepted -> INVALID_PHONE. Extensions are dropped, as E.164 drops them;
    6. an all-zero national number (+10000000000, 0000000000) -> blocked, checked before acceptance so
       a withheld ANI is reported as skipped rather than invalid; then the policy's values/patterns.
    Everything else (national prefixes, the region's IDD, vanity letters, "Tel:" labels, ...) is
    phonenumbers' behaviour, unchanged.
    """
    value = raw.strip()
    if not value:
        raise _invalid_phone("phone number is empty")
    if len(value) > MAX_PHONE_INPUT_LENGTH:
        raise _invalid_phone(f"phone number is longer than {MAX_PHONE_INPUT_LENGTH} characters")
    _check_placeholder_word(value, policy)
    region = check_region(region) or policy.default_region
    value = _preprocess_phone(value, policy)

    number, problem = _parse(value, region, policy)
    if number is None:
        retry = _international_retry(value)
        if retry is not None:
            number, problem = _parse(retry, None, policy)
    if number is None:
        raise _invalid_phone(problem)

    e164 = phonenumbers.format_number(number, _E164)
    if _blocked_by_policy(e164, policy):
        raise BlockedIdentifier("phone number is a configured placeholder value")
    return e164


# --- masking ------------------------------------------------------------------------------------


def mask(kind: Kind, value: str) -> str:
    """A log-safe form of any string: "+447*******56", "j***@example.com", "ab***yz"; never fails.

    Phones keep the '+', 3 leading and 2 trailing characters when at least 3 are hidden; emails keep
    the domain and the first character of a local part of 3 or more; anything else keeps 2+2 characters
    when longer than 6. Shorter values become "***".
    """
    if kind == Kind.PHONE:
        head = 4 if value.startswith("+") else 3
        hidden = len(value) - head - 2
        return value[:head] + "*" * hidden + value[-2:] if hidden >= 3 else "***"
    if kind == Kind.EMAIL:
        local, at, domain = value.rpartition("@")
        if not at:
            return "***"
        return (local[0] if len(local) >= 3 else "") + "***@" + domain
    return value[:2] + "***" + value[-2:] if len(value) > 6 else "***"


def mask_value(value: Any) -> str:
    """An attribute value (or any payload value) as it may be shown where the value itself must not be: text
    as `mask` shows a string that is no phone or email ("ab***yz"), anything else "***"."""
    return mask(Kind.EXTERNAL_ID, value) if isinstance(value, str) else "***"
