"""The fast phone normalizer, compiled and pure, against the reference (resolver.normalize, i.e. phonenumbers).

Every comparison is three-way: the compiled module (importable in both test modes), the pure twin and the
reference must give the same E.164 string, or the same exception class, reason and message.
"""

from __future__ import annotations

import random
import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from resolver import _hotpath, _phone_c, _phone_consts, _phone_py
from resolver import normalize as reference
from resolver.errors import IdentifierError
from resolver.normalize import DEFAULT_POLICY, Policy
from tests.unit.test_normalize import example_numbers  # one corpus definition for both suites

# compiled module against twin (and the reference library), both loaded here: the same test in either pass, run once
# (tests/unit/test_selection.py checks which one the switch picks)
pytestmark = pytest.mark.differential

POSSIBLE = Policy(phone_acceptance="possible")
GB_DEFAULT = Policy(default_region="GB")
CONFIGURED = Policy(blocked_values=frozenset({"+16502530099", "555"}), blocked_patterns=(re.compile(r"\+1900\d+"),))
POLICIES = [DEFAULT_POLICY, POSSIBLE, GB_DEFAULT, CONFIGURED]
POLICY_IDS = ["valid", "possible", "default-GB", "configured"]
REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
SAMPLE_REGIONS = [None, "", "US", "GB", "DE", "FR", "IT", "AR", "MX", "BR", "IN", "CN", "JP", "RU", "KZ", "AU", "CA",
                  "GG", "JE", "IM", "AG", "PR", "CI", "SM", "VA", "gb", "XX", "us"]
FAST = settings(max_examples=1500, deadline=None, database=None)
PHONEISH = "+0123456789 -().:/;@abcdefxtelsip"


def outcome(fn, raw: str, region: str | None, policy: Policy) -> tuple[str, ...]:  # noqa: ANN001
    try:
        return ("ok", fn(raw, region, policy))
    except IdentifierError as error:
        return (type(error).__name__, error.reason, error.message)


def assert_same(raw: str, region: str | None, policy: Policy = DEFAULT_POLICY) -> tuple[str, ...]:
    expected = outcome(reference.normalize_phone, raw, region, policy)
    assert outcome(_phone_py.normalize_phone, raw, region, policy) == expected, (raw, region)
    assert outcome(_phone_c.normalize_phone, raw, region, policy) == expected, (raw, region)
    return expected


# --- the selector ------------------------------------------------------------------------------------------


def test_limits_are_phonenumbers_own() -> None:
    """resolver/_phone_consts.py names phonenumbers' private limits; both implementations read them there."""
    from phonenumbers import phonenumberutil

    assert _phone_consts.MAX_INPUT == phonenumberutil._MAX_INPUT_STRING_LENGTH
    assert _phone_consts.MIN_NSN == phonenumberutil._MIN_LENGTH_FOR_NSN
    assert _phone_consts.MAX_NSN == phonenumberutil._MAX_LENGTH_FOR_NSN


def test_identifiers_use_the_selected_normalizer() -> None:
    from resolver import identifiers

    assert identifiers.normalize_phone is _hotpath.normalize_phone


# --- examples ----------------------------------------------------------------------------------------------

CASES = [
    ("+1 (650) 253-0000", None),
    ("001 650 253 0000", None),
    ("011 44 20 7946 0958", "US"),
    ("00 44 20 7946 0958", "US"),
    ("tel:+1-650-253-0000", None),
    ("tel:+1-650-253-0000;ext=12;isub=3", None),
    ("sip:+16502530000@carrier.example;user=phone", None),
    ("SIP:+16502530000:pw@carrier.example", None),
    ("sips:0207 946 0958@x", "GB"),
    ("sip:anonymous@anonymous.invalid", None),
    ("sip:nohost", None),
    ("tel:7946-0958;phone-context=+44-20", None),
    ("(650) 253-0000", "US"),
    ("020 7946 0958", "GB"),
    ("+44 (0) 20 7946 0958", None),
    ("07400 123456", "GB"),
    ("07624 123456", "GB"),
    ("01481 123456", "GG"),
    ("011 54 9 11 2345 6789", "US"),
    ("+54 9 11 2345-6789", None),
    ("011 15 2345-6789", "AR"),
    ("15 2345-6789", "AR"),
    ("+7 701 123 4567", None),
    ("8 (701) 123-45-67", "KZ"),
    ("+39 06 1234 5678", None),
    ("+1 268 464 1234", None),
    ("+15550199888", None),
    ("+10000000000", None),
    ("0000000000", "US"),
    ("+16502530099", None),
    ("+19005550100", None),
    ("555", None),
    ("+800 1234 5678", None),
    ("+882 1234 5678", None),
    ("12", "US"),
    ("(12)", "US"),
    ("1-2", "US"),
    ("+12", None),
    ("+", None),
    ("+0 123 4567", "US"),
    ("+999 123 4567", "US"),
    ("+999 123 4567", None),
    ("0044", None),
    ("00", "GB"),
    ("1 650 253 0000", "US"),
    ("650 253 0000", "CA"),
    ("1 613 555 0123", "CA"),
    ("44 20 7946 0958", "GB"),
    ("  +44 20 7946 0958  ", "gb"),
    ("anonymous", None),
    ("Tel: +44 20 7946 0958", None),
    ("+44 20 7946 0958 ext. 12", None),
    ("+44 20 7946 0958", "XX"),
    ("", None),
    ("1" * 300, "US"),
    ("0" + " " * 240 + "0" * 5 + "1234567890", "US"),
    ("00 " * 84 + "44 20 7946 0958", "US"),
    # read again, their E.164 forms change: the fixed point is the answer (tests/unit/test_phone_idempotent.py)
    ("+840086920663", None),
    ("00513741", "BY"),
    ("0000000052445", "AT"),
    ("0003768863362608", "JP"),
    ("0003768104058375", "JP"),
    ("+820081000000", None),
    ("011 2345-6789", "AR"),
]


@pytest.mark.parametrize("policy", POLICIES, ids=POLICY_IDS)
@pytest.mark.parametrize("raw,region", CASES)
def test_examples_agree(raw: str, region: str | None, policy: Policy) -> None:
    assert_same(raw, region, policy)


# --- differential property tests ---------------------------------------------------------------------------


@FAST
@given(st.text(max_size=40), st.sampled_from(SAMPLE_REGIONS), st.sampled_from(POLICIES))
def test_arbitrary_text_agrees(raw: str, region: str | None, policy: Policy) -> None:
    assert_same(raw, region, policy)


@FAST
@given(st.text(alphabet=PHONEISH, max_size=30), st.sampled_from(SAMPLE_REGIONS), st.sampled_from(POLICIES))
def test_phoneish_text_agrees(raw: str, region: str | None, policy: Policy) -> None:
    assert_same(raw, region, policy)


@FAST
@given(
    st.sampled_from(["", "+", "00", "011", "0", "8", "1", "tel:+", "sip:+"]),
    st.text(alphabet="0123456789", min_size=1, max_size=18),
    st.lists(st.tuples(st.integers(0, 17), st.sampled_from(" -.()/")), max_size=4),
    st.sampled_from(SAMPLE_REGIONS),
    st.sampled_from(POLICIES),
)
def test_digit_strings_agree(prefix: str, digits: str, seps: list[tuple[int, str]], region: str | None,
                             policy: Policy) -> None:
    chars = list(digits)
    for pos, sep in sorted(seps, reverse=True):
        chars.insert(min(pos, len(chars)), sep)
    raw = prefix + "".join(chars)
    if prefix.startswith("sip"):
        raw += "@host.example;user=phone"
    assert_same(raw, region, policy)


EXAMPLE_NSNS = sorted(
    {(region, phonenumbers.national_significant_number(n)) for region in REGIONS for n in
     (phonenumbers.example_number_for_type(region, t) for t in PhoneNumberType.values()) if n is not None}
)


@FAST
@given(
    st.sampled_from(EXAMPLE_NSNS),
    st.integers(0, 6),
    st.text(alphabet="0123456789", min_size=6, max_size=6),
    st.sampled_from(["e164", "intl", "national", "00", "011", "tel", "sip", "cc-without-plus"]),
    st.sampled_from(POLICIES),
)
def test_varied_example_numbers_agree(example: tuple[str, str], keep: int, tail: str, form: str, policy: Policy) -> None:
    """Example numbers with their last digits replaced: mostly valid, in every form the fast path takes."""
    region, nsn = example
    nsn = nsn[: max(len(nsn) - 6 + keep, 1)] + tail[: len(nsn) - max(len(nsn) - 6 + keep, 1)]
    cc = phonenumbers.country_code_for_region(region)
    raw, reg = {
        "e164": (f"+{cc}{nsn}", None),
        "intl": (f"+{cc} {nsn[:3]} {nsn[3:]}", region),
        "national": ("0" + nsn, region),
        "00": (f"00 {cc} {nsn}", None),
        "011": (f"011 {cc} {nsn}", region),
        "tel": (f"tel:+{cc}-{nsn}", None),
        "sip": (f"sip:+{cc}{nsn}@h;user=phone", None),
        "cc-without-plus": (f"{cc}{nsn}", region),
    }[form]
    assert_same(raw, reg, policy)


# --- every region, every type, every form ------------------------------------------------------------------


def forms(number: phonenumbers.PhoneNumber, region: str) -> list[tuple[str, str | None]]:
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
    return [
        (e164, None),
        (e164, region),
        (phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL), None),
        (national, region),
        (phonenumbers.format_number(number, PhoneNumberFormat.RFC3966), None),
        ("00" + e164[1:], None),
        ("00" + e164[1:], region),
        ("011 " + e164[1:], "US"),
        (f"sip:{e164}@carrier.example;user=phone", None),
        (phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL).replace(" ", ""), region),
    ]


def mutations(e164: str) -> list[str]:
    last = int(e164[-1])
    return [e164[:-1], e164 + "5", e164[:-1] + str((last + 1) % 10), e164[:-2] + "00"]


def test_every_region_every_type_every_form() -> None:
    checked = 0
    for region in REGIONS:
        for number in example_numbers(region):
            for raw, reg in forms(number, region):
                for policy in (DEFAULT_POLICY, POSSIBLE):
                    assert_same(raw, reg, policy)
                    checked += 1
            e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
            national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
            for mutated in mutations(e164) + mutations(national):
                assert_same(mutated, region)
                checked += 1
    for cc in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        number = phonenumbers.example_number_for_non_geo_entity(cc)
        if number is not None:
            e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
            for raw in [e164, "00" + e164[1:], *mutations(e164)]:
                assert_same(raw, None)
                checked += 1
    assert checked > 10_000


# --- the fallback rate on a realistic mix ------------------------------------------------------------------


def realistic_mix(n: int, seed: int = 3) -> list[tuple[str, str | None]]:
    """E.164 40%, national with region 30%, formatted international 20%, tel:/sip: 10%: valid numbers only."""
    from bench.test_phone import build_mix

    return build_mix(n, seed)


@pytest.mark.parametrize("impl", [_phone_c, _phone_py], ids=["compiled", "pure"])
def test_fallback_rate_on_a_realistic_mix_is_low(impl, capsys) -> None:  # noqa: ANN001
    mix = realistic_mix(3000)
    impl.reset_phone_stats()
    for raw, region in mix:
        assert impl.normalize_phone(raw, region) == reference.normalize_phone(raw, region)
    stats = impl.phone_stats()
    assert stats["calls"] == len(mix)
    with capsys.disabled():
        print(f"\n{impl.__name__}: fallback {stats['fallbacks']}/{stats['calls']}")
    assert stats["fallbacks"] <= len(mix) // 100


def test_stats_count_calls_and_fallbacks() -> None:
    for impl in (_phone_c, _phone_py):
        impl.reset_phone_stats()
        impl.normalize_phone("+16502530000")
        impl.normalize_phone("Tel: +16502530000")
        assert impl.phone_stats() == {"calls": 2, "fallbacks": 1}


def test_random_national_digits_agree() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        region = rng.choice(REGIONS)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 14)))
        policy = rng.choice(POLICIES)
        assert_same(digits, region, policy)
        assert_same("+" + digits, region, policy)


# --- the generated tables against the patterns they were compiled from ------------------------------------


def test_validation_dfas_equal_the_folded_regexes() -> None:
    """Every DFA, on every example NSN of its region with each digit changed to each other digit, and on random
    strings: DFA walk == re.fullmatch of (general and one type)."""
    rng = random.Random(5)
    checked = 0
    for key, md in _phone_py.METADATA.items():
        samples: list[str] = []
        if key.startswith("+"):
            example = phonenumbers.example_number_for_non_geo_entity(md.cc)
            examples = [example] if example is not None else []
        else:
            examples = example_numbers(key)
        for number in examples:
            nsn = phonenumbers.national_significant_number(number)
            samples += [nsn[:i] + d + nsn[i + 1 :] for i in range(len(nsn)) for d in "0123456789"]
        for length in md.dfa:
            samples += ["".join(rng.choice("0123456789") for _ in range(length)) for _ in range(50)]
        for nsn in samples:
            matcher = md.valid_matcher(len(nsn))
            assert _phone_py._valid_for(md, nsn) == (matcher is not None and matcher(nsn) is not None), (key, nsn)
            checked += 1
    assert checked > 100_000


def test_first_digit_filters_never_skip_a_match() -> None:
    rng = random.Random(6)
    for key, record in _phone_py._meta.METADATA.items():
        masks = _phone_py._meta.FIRST_DIGITS[key]
        for pattern, mask in zip((record[1], record[2], record[7]), masks, strict=True):
            if pattern is None:
                continue
            compiled = re.compile(pattern)
            for d in range(10):
                if mask >> d & 1:
                    continue
                for _ in range(30):
                    text = str(d) + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 16)))
                    assert compiled.match(text) is None, (key, pattern, text)


def test_threads_with_different_policies_do_not_mix() -> None:
    """The compiled module caches the last policy's fields; concurrent calls with two policies stay exact."""
    import threading

    failures: list[str] = []

    def hammer(policy: Policy, expected: tuple[str, ...]) -> None:
        for i in range(3000):
            raw = "tel:+1-555-019-9888" if i % 2 else "+15550199888"
            if outcome(_phone_c.normalize_phone, raw, None, policy)[0] != expected[0]:
                failures.append(policy.phone_acceptance)
                return

    threads = [threading.Thread(target=hammer, args=(DEFAULT_POLICY, ("IdentifierError",))),
               threading.Thread(target=hammer, args=(POSSIBLE, ("ok",)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
