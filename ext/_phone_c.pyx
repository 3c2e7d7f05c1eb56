# cython: language_level=3
"""Compiled twin of resolver/_phone_py.py: the fast phone normalizer.

Read resolver/_phone_py.py for the specification (the input shape, which phonenumbers steps are modelled, why
the answers equal the reference's, and how the fixed point of re-reads is reached without re-reading almost
every number); this file must not add behaviour of its own. What is compiled: the scan of the input into a C
digit buffer, country-code lookup in a C table, possible-length tests as bit masks, and the parse steps on
typed strings. The metadata's regular expressions run in `re`, on the same patterns phonenumbers uses
(generated at build time into resolver/_phonemeta.py), so exactness never depends on a re-implementation of a
pattern. The metadata tables and the validation over them are ext/_phone_meta.pxi, included here so that they
compile into this module.
"""

import phonenumbers

from cpython.unicode cimport Py_UNICODE_ISSPACE, PyUnicode_DecodeASCII

from resolver import _phone_consts as _consts
from resolver import normalize as _ref
from resolver._phone_consts import INVALID_CC_MSG, NOT_A_NUMBER_MSG, TOO_LONG_MSG, TOO_SHORT_MSG
from resolver.errors import BlockedIdentifier, IdentifierError
from resolver.normalize import DEFAULT_POLICY

__all__ = ["normalize_phone", "phone_stats", "reset_phone_stats"]

# resolver/_phone_consts.py's numbers, as C ints.
cdef int IS_POSSIBLE = _consts.IS_POSSIBLE, TOO_SHORT = _consts.TOO_SHORT, TOO_LONG = _consts.TOO_LONG
cdef int IS_POSSIBLE_LOCAL_ONLY = _consts.IS_POSSIBLE_LOCAL_ONLY, INVALID_LENGTH = _consts.INVALID_LENGTH
cdef int OK = _consts.OK, ERROR = _consts.ERROR, FALLBACK = _consts.FALLBACK, UNSETTLED = _consts.UNSETTLED
cdef Py_ssize_t MAX_INPUT = _consts.MAX_INPUT, MIN_NSN = _consts.MIN_NSN, MAX_NSN = _consts.MAX_NSN

cdef enum:  # C buffer sizes, not rules: the scan leaves a longer value to the reference
    SCAN_CAPACITY = 256  # digits of one value (normalize.MAX_PHONE_INPUT_LENGTH bounds it today)
    E164_CAPACITY = 24  # "+", a country code of up to 3 digits, a national number of up to MAX_NSN
if 4 + MAX_NSN > E164_CAPACITY:
    raise ImportError("resolver._phone_c: E164_CAPACITY is smaller than an E.164 number of MAX_NSN digits")

# The characters of the fast path's shape (resolver/_phone_consts.py), as ASCII classes.
cdef enum:
    C_SEPARATOR = 1
    C_FAST_START = 2
    C_URI_START = 4
cdef unsigned char CHAR_CLASS[128]
for _chars, _flag in ((_consts.SEPARATORS, C_SEPARATOR), (_consts.FAST_START, C_FAST_START),
                      (_consts.URI_START, C_URI_START)):
    for _ch in _chars.encode("ascii"):
        CHAR_CLASS[_ch] |= _flag


cdef inline bint _in_class(Py_UCS4 ch, unsigned char flags) noexcept:
    return ch < 128 and CHAR_CLASS[ch] & flags


cdef frozenset SUPPORTED = frozenset(phonenumbers.SUPPORTED_REGIONS)
cdef object _preprocess = _ref._preprocess_phone
cdef object _check_region = _ref.check_region
cdef object _unsettled_phone = _ref._unsettled_phone
cdef Py_ssize_t _MAX_PHONE_INPUT = _ref.MAX_PHONE_INPUT_LENGTH
cdef Py_ssize_t _REREAD_LIMIT = _ref.PHONE_REREAD_LIMIT

include "_phone_meta.pxi"


# The fields of the last Policy seen, by identity (a Policy is frozen; the reference keeps it alive). _fast
# copies them into locals right after _load_policy, with no Python code in between, so another thread that
# switches the cache while this call runs Python code (a regex, the reference's URI helper) cannot affect it.
cdef object _policy = None
cdef frozenset _blocked_values = frozenset()
cdef object _default_region = None
cdef tuple _blocked_patterns = ()
cdef bint _valid_policy = True


cdef inline int _load_policy(policy) except -1:
    global _policy, _blocked_values, _default_region, _blocked_patterns, _valid_policy
    if policy is not _policy:
        _blocked_values = policy.blocked_values
        _default_region = policy.default_region
        _blocked_patterns = policy.blocked_patterns
        _valid_policy = policy.phone_acceptance == "valid"
        _policy = policy
    return 0


cdef Py_ssize_t _calls = 0
cdef Py_ssize_t _fallbacks = 0


def phone_stats():
    """Calls of `normalize_phone` in this process and how many of them fell back to the reference."""
    return {"calls": _calls, "fallbacks": _fallbacks}


def reset_phone_stats():
    """Zero the counters of `phone_stats`."""
    global _calls, _fallbacks
    _calls = _fallbacks = 0


cdef str _strip_national_prefix(str number, _Meta md):
    """phonenumbers' _maybe_strip_national_prefix_carrier_code(number, metadata)[1]."""
    cdef str stripped
    cdef Py_ssize_t end
    if not number:
        return number
    if md.np_literal is not None:
        if not number.startswith(md.np_literal):
            return number
        stripped = number[len(md.np_literal):]
        if md.general_match(number) and not md.general_match(stripped):
            return number
        return stripped
    if md.npfp is None or not (md.np_first >> (<int>number[0] - 48)) & 1:
        return number
    m = md.npfp.match(number)
    if m is None:
        return number
    groups = m.groups()
    if md.transform is None or groups[len(groups) - 1] is None:
        end = m.end()
        if end == 0:  # an empty match (AR's rule has one) strips nothing: the checks below would keep number
            return number
        stripped = number[end:]
    else:
        stripped = md.npfp.sub(md.transform, number, count=1)
    if md.general_match(number) and not md.general_match(stripped):
        return number
    return stripped


cdef inline str _national_after_prefix(str national, _Meta md):
    """The national number once phonenumbers' parse has stripped a national prefix from it, where it would."""
    cdef str potential = _strip_national_prefix(national, md)
    cdef int r
    if potential is not national:
        r = md.test_length(len(potential))
        if r != TOO_SHORT and r != IS_POSSIBLE_LOCAL_ONLY and r != INVALID_LENGTH:
            return potential
    return national


cdef int _country_code(str full) except -1:
    """phonenumbers' _extract_country_code: the code (its length is len(str(code))), or 0."""
    cdef Py_ssize_t n = len(full), i
    cdef int cc = 0
    if n == 0 or full[0] == u"0":
        return 0
    for i in range(min(n, 3)):
        cc = cc * 10 + (<int>full[i] - 48)
        if CC_METAS[cc] is not None:
            return cc
    return 0


cdef str _parse(str digits, bint plus, bint viable, _Meta md, int* cc_out, int* status):
    """phonenumbers.parse of a value of the fast shape (see _phone_py._parse: OK or UNSETTLED)."""
    cdef bint international = plus, settled
    cdef str full = digits, national = u"", potential
    cdef Py_ssize_t end, n = len(digits)
    cdef int cc = 0
    if not viable:
        status[0] = ERROR
        return NOT_A_NUMBER_MSG
    if md is None and not plus:
        status[0] = ERROR
        return INVALID_CC_MSG
    if not plus and md is not None:
        end = -1
        if md.idd_literal is not None:
            if digits.startswith(md.idd_literal):
                end = len(md.idd_literal)
        elif md.idd is not None and (n == 0 or (md.idd_first >> (<int>digits[0] - 48)) & 1):
            m = md.idd(digits)
            if m is not None:
                end = m.end()
        if end >= 0 and (end == n or digits[end] != u"0"):
            international = True
            full = digits[end:]
    if international:
        if len(full) <= MIN_NSN:
            status[0] = ERROR
            return TOO_SHORT_MSG
        cc = _country_code(full)
        if cc == 0:
            if plus and md is not None:
                status[0] = FALLBACK
                return None
            status[0] = ERROR
            return INVALID_CC_MSG
        national = full[1 if cc < 10 else 2 if cc < 100 else 3:]
    else:
        if digits.startswith(md.cc_str):
            potential = _strip_national_prefix(digits[len(md.cc_str):], md)
            if (not md.general_match(digits) and md.general_match(potential)) or md.test_length(n) == TOO_LONG:
                cc = md.cc
                national = potential
    if cc != 0:
        md = <_Meta>(<tuple>CC_METAS[cc])[0]
    else:
        national = digits
        cc = md.cc
    if len(national) < MIN_NSN:
        status[0] = ERROR
        return TOO_SHORT_MSG
    potential = _national_after_prefix(national, md)
    # a re-read ends with this step too, on the main region's metadata: if it just changed nothing there, it won't
    settled = potential is national and md is <_Meta>(<tuple>CC_METAS[cc])[0]
    national = potential
    if len(national) > MAX_NSN:
        status[0] = ERROR
        return TOO_LONG_MSG
    cc_out[0] = cc
    status[0] = OK if settled else UNSETTLED
    return national


cdef str _e164(int cc, str nsn):
    """"+" + cc + nsn, built in one C buffer (cc < 1000, nsn at most MAX_NSN ASCII digits)."""
    cdef char out[E164_CAPACITY]
    cdef Py_ssize_t n = 1, i, size = len(nsn)
    out[0] = b"+"
    if cc >= 100:
        out[n] = <char>(48 + cc // 100)
        n += 1
    if cc >= 10:
        out[n] = <char>(48 + cc // 10 % 10)
        n += 1
    out[n] = <char>(48 + cc % 10)
    n += 1
    for i in range(size):
        out[n + i] = <char>nsn[i]
    return PyUnicode_DecodeASCII(out, n + size, NULL)


cdef str _attempt(str digits, bint plus, bint viable, _Meta md, bint valid_policy, int* status):
    """One parse + acceptance (see _phone_py._attempt: OK or UNSETTLED, which is then exact); raises
    BlockedIdentifier on an all-zero number."""
    cdef int cc = 0, r
    cdef str nsn
    cdef Py_ssize_t i
    cdef _Meta main
    nsn = _parse(digits, plus, viable, md, &cc, status)
    if status[0] != OK and status[0] != UNSETTLED:
        return nsn
    for i in range(len(nsn)):
        if nsn[i] != u"0":
            break
    else:
        raise BlockedIdentifier("phone number is all zeros (a withheld or placeholder number)")
    main = <_Meta>(<tuple>CC_METAS[cc])[0]
    if valid_policy:
        if not _is_valid(cc, nsn):
            status[0] = ERROR
            return f"phone number is not valid for country code +{cc}"
    else:
        r = main.test_length(len(nsn))
        if r != IS_POSSIBLE and r != IS_POSSIBLE_LOCAL_ONLY:
            status[0] = ERROR
            return f"phone number has an impossible length for country code +{cc}"
    if status[0] == UNSETTLED and _national_after_prefix(nsn, main) == nsn:
        status[0] = OK
    return _e164(cc, nsn)


cdef bint _blocked(str e164, frozenset blocked_values, tuple blocked_patterns) except -1:
    """normalize._blocked_by_policy, on the policy's fields."""
    if blocked_values and e164 in blocked_values:
        return True
    for pattern in blocked_patterns:
        if pattern.fullmatch(e164):
            return True
    return False


cdef str _settle(str e164, bint valid_policy, frozenset blocked_values, tuple blocked_patterns):
    """The reference's re-reads of an UNSETTLED, accepted, unblocked e164 (see _phone_py._settle)."""
    cdef int status = UNSETTLED
    cdef str text
    cdef Py_ssize_t i
    for i in range(_REREAD_LIMIT):
        if status == OK:
            return e164
        text = _attempt(e164[1:], True, True, None, valid_policy, &status)
        if status != OK and status != UNSETTLED:
            raise _unsettled_phone(text)
        if _blocked(text, blocked_values, blocked_patterns):
            raise BlockedIdentifier("phone number is a configured placeholder value")
        e164 = text
    raise _unsettled_phone(None)


cdef inline Py_UCS4 _lower_ascii(Py_UCS4 ch):
    return <Py_UCS4>(<unsigned int>ch + 32) if u"A" <= ch <= u"Z" else ch


cdef Py_ssize_t _scheme_length(str value):
    """The length of a leading "tel:", "sip:" or "sips:" (ASCII, any case), else 0: normalize._URI_SCHEME."""
    cdef Py_ssize_t n = len(value)
    if n < 4:
        return 0
    cdef Py_UCS4 a = _lower_ascii(value[0]), b = _lower_ascii(value[1]), c = _lower_ascii(value[2])
    if (a == u"t" and b == u"e" and c == u"l") or (a == u"s" and b == u"i" and c == u"p"):
        if value[3] == u":":
            return 4
        if a == u"s" and n >= 5 and _lower_ascii(value[3]) == u"s" and value[4] == u":":
            return 5
    return 0


cdef str _unwrap_uri(str value, policy, frozenset blocked_values):
    """normalize._preprocess_phone, common case only (see _phone_py._unwrap_uri)."""
    cdef Py_ssize_t start = _scheme_length(value), at, colon
    cdef str body
    if start == 0:
        return value
    body = value[start:]
    if start == 5 or value[0] == u"s" or value[0] == u"S":
        at = body.find(u"@")
        if at < 0:
            return _preprocess(value, policy)
        body = body[:at]
        colon = body.find(u":")
        if colon >= 0:
            body = body[:colon]
    if u";" in body:
        return _preprocess(value, policy)
    if blocked_values and body.strip().lower() in blocked_values:
        raise BlockedIdentifier("phone number is a withheld or placeholder value")
    return body


cdef str _fast(object raw, region, policy):
    """The reference's answer, or None when the fast path cannot decide it."""
    if type(raw) is not str:
        return None
    cdef str value = <str>raw, digits, text = None, rest
    cdef Py_ssize_t n = len(value), i, ndigits = 0, first = -1, last = -1, idd
    if n and (Py_UNICODE_ISSPACE(value[0]) or Py_UNICODE_ISSPACE(value[n - 1])):
        value = value.strip()  # str.strip() removes exactly the Py_UNICODE_ISSPACE characters
        n = len(value)
    cdef Py_UCS4 ch, c0
    cdef bint plus, viable
    cdef char buf[SCAN_CAPACITY]
    cdef int status
    if n == 0 or n > _MAX_PHONE_INPUT:
        return None
    c0 = value[0]
    if not _in_class(c0, C_FAST_START | C_URI_START):
        return None
    # the reference's steps, in its order: placeholder (no word starts with those), region, URI
    _load_policy(policy)
    cdef frozenset blocked_values = _blocked_values
    cdef tuple blocked_patterns = _blocked_patterns
    cdef bint valid_policy = _valid_policy
    default_region = _default_region
    if blocked_values and value.lower() in blocked_values:
        raise BlockedIdentifier("phone number is a withheld or placeholder value")
    if not region:
        region = default_region
    elif region not in SUPPORTED:
        region = _check_region(region) or default_region
    if _in_class(c0, C_URI_START):
        value = _unwrap_uri(value, policy, blocked_values)
        n = len(value)
    if n > SCAN_CAPACITY:
        return None
    # the scan: ['+'] (digit | separator)*, digits into buf
    plus = n > 0 and value[0] == u"+"
    for i in range(1 if plus else 0, n):
        ch = value[i]
        if u"0" <= ch <= u"9":
            buf[ndigits] = <char>ch
            ndigits += 1
            if first < 0:
                first = i
            last = i
        elif not _in_class(ch, C_SEPARATOR):
            return None
    digits = PyUnicode_DecodeASCII(buf, ndigits, NULL)
    viable = ndigits >= 3 or (not plus and ndigits == 2 and last - first == 1)
    md = METADATA[region] if region is not None else None
    if n > MAX_INPUT:
        status = ERROR
        text = TOO_LONG_MSG
    else:
        text = _attempt(digits, plus, viable, md, valid_policy, &status)
    if status == FALLBACK:
        return None
    if status == ERROR and not plus:
        # the reference's retry: digits starting 00 or 011, read as "+<rest>" with no region
        idd = 2 if digits.startswith(u"00") else 3 if digits.startswith(u"011") else 0
        if idd:
            rest = digits[idd:]
            text = _attempt(rest, True, len(rest) >= 3, None, valid_policy, &status)
    if status != OK and status != UNSETTLED:
        raise IdentifierError(text, reason="INVALID_PHONE")
    if _blocked(text, blocked_values, blocked_patterns):
        raise BlockedIdentifier("phone number is a configured placeholder value")
    return text if status == OK else _settle(text, valid_policy, blocked_values, blocked_patterns)


def normalize_phone(raw, region=None, policy=DEFAULT_POLICY):
    """`resolver.normalize.normalize_phone`, on a fast path where it can be decided exactly, else by it."""
    global _calls, _fallbacks
    _calls += 1
    result = _fast(raw, region, policy)
    if result is None:
        _fallbacks += 1
        return _ref.normalize_phone(raw, region, policy)
    return result
