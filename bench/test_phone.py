"""Phone normalization per identifier on a realistic mix: compiled vs pure twin vs phonenumbers (the baseline).

The mix: E.164 40%, national with a region 30%, formatted international 20%, tel:/sip: URIs 10%, over 30
regions, built from phonenumbers' example numbers with their last digits varied, valid numbers only. All three
run in one group so pytest-benchmark prints the ratios; the fast path's fallback rate is printed beside them.
Run: `.venv/bin/python -m pytest bench/test_phone.py -o testpaths=bench --benchmark-only --benchmark-group-by=group`
"""

from __future__ import annotations

import importlib
import itertools
import random

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from resolver import _phone_py

MIX_REGIONS = ["US", "CA", "GB", "DE", "FR", "IT", "ES", "NL", "BE", "CH", "AT", "SE", "NO", "DK", "PL", "PT", "IE",
               "AU", "NZ", "JP", "IN", "BR", "MX", "AR", "ZA", "SG", "HK", "AE", "IL", "TR"]
MIX_SIZE = 2000


def _valid_variants(rng: random.Random, region: str, count: int) -> list[phonenumbers.PhoneNumber]:
    """Valid numbers of the region: its fixed-line and mobile examples with the last 4 digits varied."""
    found: list[phonenumbers.PhoneNumber] = []
    examples = [phonenumbers.example_number_for_type(region, t) for t in (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE)]
    examples = [e for e in examples if e is not None]
    for _ in range(count * 20):
        if len(found) == count:
            break
        base = rng.choice(examples)
        nsn = phonenumbers.national_significant_number(base)
        varied = nsn[:-4] + f"{rng.randrange(10_000):04d}"
        number = phonenumbers.parse("+" + str(base.country_code) + varied, None)
        if phonenumbers.is_valid_number(number):
            found.append(number)
    return found


def build_mix(n: int = MIX_SIZE, seed: int = 7) -> list[tuple[str, str | None]]:
    """(raw input, region) pairs in the issue's proportions, shuffled."""
    rng = random.Random(seed)
    per_region = n // len(MIX_REGIONS) + 1
    numbers = [(region, num) for region in MIX_REGIONS for num in _valid_variants(rng, region, per_region)]
    rng.shuffle(numbers)
    mix: list[tuple[str, str | None]] = []
    for i, (region, number) in enumerate(numbers[:n]):
        e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
        slot = i % 10
        if slot < 4:
            mix.append((e164, None))
        elif slot < 7:
            mix.append((phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL), region))
        elif slot < 9:
            mix.append((phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL), None))
        elif i % 20 == 9:
            mix.append((phonenumbers.format_number(number, PhoneNumberFormat.RFC3966), None))
        else:
            mix.append((f"sip:{e164}@carrier.example;user=phone", None))
    return mix


def _baseline(raw: str, region: str | None) -> str:
    """phonenumbers parse + is_valid_number + E.164, URIs unwrapped as cheaply as possible (in its favour)."""
    if raw.startswith("sip:"):
        raw = raw[4:].partition("@")[0]
    number = phonenumbers.parse(raw, region)
    assert phonenumbers.is_valid_number(number)
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


@pytest.fixture(scope="module")
def mix() -> list[tuple[str, str | None]]:
    return build_mix()


def _per_identifier(benchmark, fn, mix: list[tuple[str, str | None]]) -> None:  # noqa: ANN001
    """One benchmark round = the whole mix; the figures are divided down to one identifier."""
    items = mix

    def run() -> None:
        for raw, region in items:
            fn(raw, region)

    benchmark.extra_info["identifiers_per_round"] = len(items)
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    benchmark.extra_info["median_us_per_identifier"] = round(stats.median / len(items) * 1e6, 3)


@pytest.mark.benchmark(group="phone-mix")
def test_phone_mix_baseline_phonenumbers(benchmark, mix) -> None:  # noqa: ANN001
    _per_identifier(benchmark, _baseline, mix)
    print(f"\nphonenumbers: {benchmark.extra_info['median_us_per_identifier']} us/identifier")


@pytest.mark.benchmark(group="phone-mix")
def test_phone_mix_pure(benchmark, mix) -> None:  # noqa: ANN001
    _phone_py.reset_phone_stats()
    _per_identifier(benchmark, _phone_py.normalize_phone, mix)
    stats = _phone_py.phone_stats()
    print(f"\npure twin: {benchmark.extra_info['median_us_per_identifier']} us/identifier, "
          f"fallback {stats['fallbacks']}/{stats['calls']} = {stats['fallbacks'] / stats['calls']:.3%}")


@pytest.mark.benchmark(group="phone-mix")
def test_phone_mix_compiled(benchmark, mix) -> None:  # noqa: ANN001
    phone_c = importlib.import_module("resolver._phone_c")
    phone_c.reset_phone_stats()
    _per_identifier(benchmark, phone_c.normalize_phone, mix)
    stats = phone_c.phone_stats()
    benchmark.extra_info["fallback_rate"] = stats["fallbacks"] / stats["calls"]
    print(f"\ncompiled: {benchmark.extra_info['median_us_per_identifier']} us/identifier, "
          f"fallback {stats['fallbacks']}/{stats['calls']} = {stats['fallbacks'] / stats['calls']:.3%}")


@pytest.mark.benchmark(group="phone-mix")
def test_phone_mix_reference(benchmark, mix) -> None:  # noqa: ANN001
    from resolver.normalize import normalize_phone

    _per_identifier(benchmark, normalize_phone, mix)


@pytest.mark.benchmark(group="phone-one")
@pytest.mark.parametrize("raw,region", [("+442079460958", None), ("(650) 253-0000", "US")], ids=["e164", "national"])
@pytest.mark.parametrize("impl", ["compiled", "pure", "phonenumbers"])
def test_phone_one(benchmark, impl: str, raw: str, region: str | None) -> None:  # noqa: ANN001
    fn = {"compiled": lambda: importlib.import_module("resolver._phone_c").normalize_phone,
          "pure": lambda: _phone_py.normalize_phone, "phonenumbers": lambda: _baseline}[impl]()
    benchmark(fn, raw, region)


def test_mix_is_valid_and_in_proportion() -> None:
    mix = build_mix(500)
    assert len(mix) == 500
    assert sum(1 for raw, region in mix if region is None and raw.startswith("+") and raw[1:].isdigit()) == 200
    assert len({r for _, r in mix if r}) >= 20
    assert all(_phone_py.normalize_phone(raw, region) for raw, region in itertools.islice(mix, 100))


EMAILS = [f"  {name}.{i}+tag@{domain}  " for i, (name, domain) in
          enumerate((n, d) for n in ("John", "mary.ann", "x_y") for d in ("Example.COM", "mail.example.co.uk", "corp.io"))]


@pytest.mark.benchmark(group="email")
@pytest.mark.parametrize("impl", ["compiled", "pure", "reference"])
def test_email(benchmark, impl: str) -> None:  # noqa: ANN001
    """Email normalization per address (ASCII mix), compiled vs pure twin vs the reference."""
    from resolver import _email_py
    from resolver.normalize import normalize_email

    fn = {"compiled": lambda: importlib.import_module("resolver._email_c").normalize_email,
          "pure": lambda: _email_py.normalize_email, "reference": lambda: normalize_email}[impl]()

    def run() -> None:
        for raw in EMAILS:
            fn(raw)

    benchmark(run)
