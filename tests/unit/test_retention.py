"""The retention cutoff (resolver.retention.cutoff): a pure function of the blueprint's limits, a clock reading and
the newest sequence, so that a cluster can fix it once in a command (resolver.cluster.retention)."""

from __future__ import annotations

from resolver.config.tables import ChangeSettings
from resolver.retention import DAY_US, Cutoff, configured, cutoff

NOW = 100 * DAY_US


def test_no_limit_set_is_no_cutoff() -> None:
    assert not configured(ChangeSettings())
    assert cutoff(ChangeSettings(), NOW, 50) is None


def test_the_count_limit_keeps_the_newest_entries() -> None:
    assert cutoff(ChangeSettings(retention_count=10), NOW, 50) == Cutoff(through_seq=40, before_us=0)
    assert cutoff(ChangeSettings(retention_count=10), NOW, 7) == Cutoff(through_seq=0, before_us=0)  # fewer kept


def test_the_age_limit_is_measured_from_the_clock_reading() -> None:
    assert cutoff(ChangeSettings(retention_days=1.5), NOW, 50) == Cutoff(through_seq=0, before_us=NOW - 3 * DAY_US // 2)
    assert cutoff(ChangeSettings(retention_days=200), NOW, 50) == Cutoff(through_seq=0, before_us=0)  # before time


def test_both_limits_are_carried_and_the_same_inputs_give_the_same_cutoff() -> None:
    both = ChangeSettings(retention_days=2, retention_count=3)
    assert cutoff(both, NOW, 9) == cutoff(both, NOW, 9) == Cutoff(through_seq=6, before_us=NOW - 2 * DAY_US)
