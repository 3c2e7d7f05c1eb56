"""The fast email normalizer, compiled and pure, against the reference (resolver.normalize.normalize_email)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver import _email_c, _email_py
from resolver import normalize as reference
from resolver.errors import IdentifierError
from resolver.normalize import DEFAULT_POLICY, Policy

# compiled module against twin (and the reference library), both loaded here: the same test in either pass, run once
# (tests/unit/test_selection.py checks which one the switch picks)
pytestmark = pytest.mark.differential

CONFIGURED = Policy(blocked_values=frozenset({"Shared@Example.com", "x@y"}), blocked_patterns=(re.compile(r".*@test\.invalid"),))
POLICIES = [DEFAULT_POLICY, CONFIGURED]
FAST = settings(max_examples=1500, deadline=None, database=None)
EMAILISH = "abcXYZ019.-_+@ \t\x00\x7f\u00e9\u0130\u212a"


def outcome(fn, raw: str, policy: Policy) -> tuple[str, ...]:  # noqa: ANN001
    try:
        return ("ok", fn(raw, policy))
    except IdentifierError as error:
        return (type(error).__name__, error.reason, error.message)


def assert_same(raw: str, policy: Policy = DEFAULT_POLICY) -> None:
    expected = outcome(reference.normalize_email, raw, policy)
    assert outcome(_email_py.normalize_email, raw, policy) == expected, raw
    assert outcome(_email_c.normalize_email, raw, policy) == expected, raw


CASES = [
    " John.Doe+tag@Example.COM ", "a@b.c", "a@b", "@b.c", "a@", "a@@b.c", "a@b@c.d", ".a@b.c", "a.@b.c", "a..b@c.d",
    "a b@c.d", "a\x00@c.d", "a\x7f@c.d", "a@-b.c", "a@b-.c", "a@b_c.d", "a@b..c", "a@.b.c", "a@b.c.", "a@b.123",
    "a@1.2", "a@" + "b" * 63 + ".c", "a@" + "b" * 64 + ".c", "a@b." + "c" * 64, "a@b." + "c" * 63, "x" * 64 + "@b.c",
    "x" * 65 + "@b.c", "a@" + ".".join(["b" * 60] * 5), "noemail@x.com", "None@None.com", "shared@example.com",
    "x@y", "who@test.invalid", "jöhn@example.com", "john@exämple.com", "john@EXAMPLE.COM\u3000", "\u212a@k.com",
    "", "   ", "plain",
]


@pytest.mark.parametrize("policy", POLICIES, ids=["default", "configured"])
@pytest.mark.parametrize("raw", CASES)
def test_examples_agree(raw: str, policy: Policy) -> None:
    assert_same(raw, policy)


@FAST
@given(st.text(max_size=40), st.sampled_from(POLICIES))
def test_arbitrary_text_agrees(raw: str, policy: Policy) -> None:
    assert_same(raw, policy)


@FAST
@given(st.text(alphabet=EMAILISH, max_size=30), st.sampled_from(POLICIES))
def test_emailish_text_agrees(raw: str, policy: Policy) -> None:
    assert_same(raw, policy)


@FAST
@given(st.lists(st.text(alphabet="ab9-", min_size=0, max_size=70), min_size=1, max_size=5),
       st.text(alphabet="aZ.9+", min_size=0, max_size=70), st.sampled_from(POLICIES))
def test_label_lengths_agree(labels: list[str], local: str, policy: Policy) -> None:
    assert_same(local + "@" + ".".join(labels), policy)


def test_stats_count_calls_and_fallbacks() -> None:
    for impl in (_email_c, _email_py):
        impl.reset_email_stats()
        impl.normalize_email("a@b.co")
        impl.normalize_email("a@bü.co")
        assert impl.email_stats() == {"calls": 2, "fallbacks": 1}
