"""The restart policy of supervised processes (resolver.restarts), on a clock the test moves: counting, the
backoff, the count starting again after a healthy stretch, and giving up."""

from __future__ import annotations

from resolver.restarts import BACKOFF_S, HEALTHY_AFTER_S, MAX_RESTARTS, Restarts


class Clock:
    """A monotonic clock that only moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def restart(policy: Restarts, clock: Clock) -> None:
    """Wait out the pending restart's backoff and make it, as a supervisor's tick does."""
    assert policy.pending
    clock.now = clock.now + BACKOFF_S[-1]
    assert policy.due()
    policy.started()


def test_each_death_in_a_row_is_counted_and_schedules_a_restart() -> None:
    clock = Clock()
    policy = Restarts(clock=clock)
    assert (policy.failures, policy.pending, policy.gave_up) == (0, False, False)
    for n in range(1, MAX_RESTARTS + 1):
        assert policy.died() is not None
        assert (policy.failures, policy.pending, policy.gave_up) == (n, True, False)
        restart(policy, clock)
        assert not policy.pending


def test_the_backoff_grows_per_death_and_its_last_step_repeats() -> None:
    clock = Clock()
    policy = Restarts(max_restarts=len(BACKOFF_S) + 2, clock=clock)
    delays = []
    for _ in range(len(BACKOFF_S) + 2):
        delays.append(policy.died())
        restart(policy, clock)
    assert delays == [*BACKOFF_S, BACKOFF_S[-1], BACKOFF_S[-1]]
    assert list(BACKOFF_S) == sorted(BACKOFF_S)


def test_a_restart_is_due_once_its_backoff_has_passed_and_only_once() -> None:
    clock = Clock()
    policy = Restarts(clock=clock)
    delay = policy.died()
    assert delay == BACKOFF_S[0]
    clock.now += delay / 2
    assert not policy.due() and policy.pending
    clock.now += delay / 2
    assert policy.due()
    assert not policy.pending and not policy.due()  # the caller restarts now; a later tick makes no second one


def test_the_count_starts_again_after_a_healthy_stretch_since_the_last_start() -> None:
    clock = Clock()
    policy = Restarts(clock=clock)
    policy.died()
    restart(policy, clock)
    policy.died()
    restart(policy, clock)
    clock.now += HEALTHY_AFTER_S / 2
    policy.running()
    assert policy.failures == 2  # not up long enough: still a crash loop
    clock.now += HEALTHY_AFTER_S / 2
    policy.running()
    assert policy.failures == 0
    assert policy.died() == BACKOFF_S[0]  # the next death starts the backoff from its first step


def test_the_healthy_stretch_is_measured_from_the_latest_start() -> None:
    clock = Clock()
    policy = Restarts(clock=clock)
    clock.now += HEALTHY_AFTER_S  # up long since construction, then it dies
    policy.died()
    restart(policy, clock)
    clock.now += HEALTHY_AFTER_S - BACKOFF_S[0]
    policy.running()
    assert policy.failures == 1  # the replacement has not been up that long
    clock.now += BACKOFF_S[0]
    policy.running()
    assert policy.failures == 0


def test_one_death_more_than_max_restarts_in_a_row_gives_up_for_good() -> None:
    clock = Clock()
    policy = Restarts(max_restarts=2, clock=clock)
    for _ in range(2):
        assert policy.died() is not None
        restart(policy, clock)
    assert policy.died() is None
    assert policy.gave_up and policy.failures == 3 and not policy.pending
    clock.now += HEALTHY_AFTER_S + BACKOFF_S[-1]
    assert not policy.due() and policy.gave_up


def test_no_restarts_allowed_gives_up_at_the_first_death() -> None:
    policy = Restarts(max_restarts=0, clock=Clock())
    assert policy.died() is None and policy.gave_up
