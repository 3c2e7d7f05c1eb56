"""Phone normalization is idempotent: a stored (normalized) value normalizes to itself, under both policies.

phonenumbers strips one national prefix per parse, so its E.164 answer can read back as another number
("+840086920663" -> "+84086920663" -> "+8486920663"). normalize_phone returns the fixed point of those re-reads
(resolver/normalize.py says why an input whose chain reaches a rejected number is rejected). Every check runs on
the reference, the pure twin and the compiled module, and they must also agree with one another.
"""

from __future__ import annotations

import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneMetadata

from resolver import _phone_c, _phone_py
from resolver import normalize as reference
from resolver.errors import IdentifierError
from resolver.normalize import DEFAULT_POLICY, Policy
from tests.unit.test_normalize import example_numbers, read_once, settle

# compiled module against twin (and the reference library), both loaded here: the same test in either pass, run once
# (tests/unit/test_selection.py checks which one the switch picks)
pytestmark = pytest.mark.differential

POSSIBLE = Policy(phone_acceptance="possible")
POLICIES = {"valid": DEFAULT_POLICY, "possible": POSSIBLE}
# blocks every number whose national number starts with 0 after a 2-digit calling code: intermediate forms
BLOCKING = Policy(phone_acceptance="possible", blocked_patterns=(re.compile(r"\+\d\d0\d*"),))
IMPLEMENTATIONS = {"reference": reference.normalize_phone, "pure": _phone_py.normalize_phone,
                   "compiled": _phone_c.normalize_phone}
REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
FAST = settings(max_examples=1500, deadline=None, database=None)
BLOCKED = "BLOCKED"


def _prefix_pieces(region: str) -> list[str]:
    """Digit runs a region's national prefix rule can match (and its national prefix): they make chains."""
    md = PhoneMetadata.metadata_for_region(region)
    pieces = set(re.findall(r"\d+", md.national_prefix_for_parsing or "")) | {"0", "00"}
    if md.national_prefix:
        pieces.add(md.national_prefix)
    return sorted(pieces)


PIECES = {region: _prefix_pieces(region) for region in REGIONS}
EXAMPLE_NSNS = {region: sorted({phonenumbers.national_significant_number(n) for n in example_numbers(region)})
                for region in REGIONS}


@st.composite
def inputs(draw: st.DrawFn) -> tuple[str, str | None]:
    """(raw, region): a calling code or a national form, led by national-prefix digits more often than chance;
    the rest random digits or an example number of the region with its last digits changed (mostly valid)."""
    region = draw(st.sampled_from(REGIONS))
    cc = phonenumbers.country_code_for_region(region)
    head = "".join(draw(st.lists(st.sampled_from(PIECES[region]), max_size=3)))
    if EXAMPLE_NSNS[region] and draw(st.booleans()):
        example = draw(st.sampled_from(EXAMPLE_NSNS[region]))
        tail = draw(st.text("0123456789", min_size=1, max_size=4))
        body = example[: max(len(example) - len(tail), 1)] + tail
    else:
        body = draw(st.text("0123456789", min_size=1, max_size=14))
    nsn = head + body
    return draw(st.sampled_from([
        (f"+{cc}{nsn}", None),
        (f"00{cc}{nsn}", None),
        (f"011 {cc} {nsn}", "US"),
        (f"+{cc} {nsn}", region),
        (nsn, region),
        ("0" + nsn, region),
        (f"{cc}{nsn}", region),
        ("00" + nsn, region),
    ]))


def outcome(fn, raw: str, region: str | None, policy: Policy) -> tuple[str, ...]:  # noqa: ANN001
    try:
        return ("ok", fn(raw, region, policy))
    except IdentifierError as error:
        return (type(error).__name__, error.reason, error.message)


def agreed(raw: str, region: str | None, policy: Policy) -> tuple[str, ...]:
    """The outcome all three implementations give (asserting that they do)."""
    results = {name: outcome(fn, raw, region, policy) for name, fn in IMPLEMENTATIONS.items()}
    assert results["pure"] == results["reference"], (raw, region, results)
    assert results["compiled"] == results["reference"], (raw, region, results)
    return results["reference"]


# --- the property ------------------------------------------------------------------------------------------


@FAST
@given(inputs(), st.sampled_from(list(POLICIES)))
def test_every_accepted_input_normalizes_to_a_fixed_point(raw_and_region: tuple[str, str | None], name: str) -> None:
    raw, region = raw_and_region
    policy = POLICIES[name]
    for fn in IMPLEMENTATIONS.values():
        first = outcome(fn, raw, region, policy)
        if first[0] != "ok":
            continue
        assert outcome(fn, first[1], None, policy) == first, (fn, raw, region)
        assert outcome(fn, first[1], region, policy) == first, (fn, raw, region)


@FAST
@given(inputs(), st.sampled_from([DEFAULT_POLICY, POSSIBLE, BLOCKING]))
def test_implementations_agree_on_inputs_and_on_their_normal_forms(raw_and_region: tuple[str, str | None],
                                                                  policy: Policy) -> None:
    first = agreed(*raw_and_region, policy)
    if first[0] == "ok":
        assert agreed(first[1], None, policy) == first


@FAST
@given(inputs(), st.sampled_from(list(POLICIES)))
def test_the_answer_is_phonenumbers_read_to_a_fixed_point(raw_and_region: tuple[str, str | None], name: str) -> None:
    """The contract's oracle, written with phonenumbers alone (tests/unit/test_normalize.py)."""
    raw, region = raw_and_region
    first = read_once(raw, region, name)
    expected = first if first in (None, BLOCKED) else settle(first, name)
    got = agreed(raw, region, POLICIES[name])
    assert (got[1] if got[0] == "ok" else BLOCKED if got[0] == "BlockedIdentifier" else None) == expected


# --- regressions: what the measurement script found ---------------------------------------------------------

UNSTABLE_PREFIX = "phone number has no stable E.164 form: read again, it drops a national prefix and is then rejected"
SETTLED = [
    # (raw, region, policy, stored form): each once read back as another number
    ("+840086920663", None, "possible", "+8486920663"),  # 2 re-reads
    ("+84086920663", None, "possible", "+8486920663"),
    ("00513741", "BY", "possible", "+375513741"),
    ("+3750513741", None, "possible", "+375513741"),
    ("00335510", "AU", "possible", "+61335510"),
    ("0005561092", "MM", "possible", "+955561092"),
    ("0084994", "AU", "possible", "+6184994"),
    ("0000000052445", "AT", "possible", "+4352445"),  # the longest chain found: 7 changes
    ("0003768863362608", "JP", "valid", "+81863362608"),  # under the default policy too
    ("8100003768256933663", "JP", "valid", "+81256933663"),
]


@pytest.mark.parametrize("raw,region,name,stored", SETTLED)
def test_regressions_store_the_fixed_point(raw: str, region: str | None, name: str, stored: str) -> None:
    policy = POLICIES[name]
    assert agreed(raw, region, policy) == ("ok", stored)
    assert agreed(stored, None, policy) == ("ok", stored)
    assert agreed(stored, region, policy) == ("ok", stored)


REJECTED = [
    # (raw, region, policy, exception, message): the chain reaches a number that is not accepted
    ("0003768104058375", "JP", "valid", "IdentifierError",
     UNSTABLE_PREFIX + " (phone number is not valid for country code +81)"),
    ("000376800080719514", "JP", "valid", "IdentifierError",
     UNSTABLE_PREFIX + " (phone number is not valid for country code +81)"),
    ("+820081000000", None, "possible", "BlockedIdentifier", "phone number is all zeros (a withheld or placeholder number)"),
    ("01831000000", "AU", "possible", "BlockedIdentifier", "phone number is all zeros (a withheld or placeholder number)"),
    ("080000000000", "BY", "possible", "BlockedIdentifier", "phone number is all zeros (a withheld or placeholder number)"),
]


@pytest.mark.parametrize("raw,region,name,exception,message", REJECTED)
def test_regressions_whose_chain_is_rejected(raw: str, region: str | None, name: str, exception: str,
                                              message: str) -> None:
    policy = POLICIES[name]
    reason = "INVALID_PHONE" if exception == "IdentifierError" else "BLOCKED_VALUE"
    assert agreed(raw, region, policy) == (exception, reason, message)
    # the first reading alone was accepted: it is the re-read that refuses it
    assert read_once(raw, region, name) not in (None, BLOCKED)


def test_a_blocked_intermediate_form_blocks_the_input() -> None:
    """A configured value blocks an input whose chain passes through it, as it blocks that value itself."""
    for policy in (Policy(phone_acceptance="possible", blocked_values=frozenset({"+84086920663"})),
                   Policy(phone_acceptance="possible", blocked_patterns=(re.compile(r"\+8486\d+"),))):
        assert agreed("+840086920663", None, policy) == (
            "BlockedIdentifier", "BLOCKED_VALUE", "phone number is a configured placeholder value")


# --- why the fast paths may skip the re-read ---------------------------------------------------------------


def test_calling_codes_are_prefix_free() -> None:
    """A re-read of "+<cc><nsn>" finds the same calling code: the fast paths' check relies on it."""
    codes = [str(cc) for cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE]
    assert not [(a, b) for a in codes for b in codes if a != b and b.startswith(a)]


def test_valid_numbers_never_take_the_slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the benchmark's realistic mix (valid numbers), the pure twin never re-reads a number."""
    from bench.test_phone import build_mix

    settled: list[str] = []
    real = _phone_py._settle
    monkeypatch.setattr(_phone_py, "_settle", lambda e164, policy: settled.append(e164) or real(e164, policy))
    for raw, region in build_mix(2000, seed=5):
        for policy in POLICIES.values():
            _phone_py.normalize_phone(raw, region, policy)
    assert settled == []
    assert _phone_py.normalize_phone("+840086920663", None, POSSIBLE) == "+8486920663"
    assert settled == ["+84086920663"]
