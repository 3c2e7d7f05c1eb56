"""Reliability tests (issue 18): crash loops, overload, deadlines, shutdown, limits, a model and fuzzing against
the real server. Each test calls `reliability_report(tried=..., held=..., figures=...)` once its assertions hold;
the session writes tests/reliability/out/report.md (tests/conftest.py: the one conftest pytest-xdist's controller
loads)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.reliability.report import REPORT


@pytest.fixture
def reliability_report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`reliability_report(tried, held, figures="")`: this test's row in the report."""

    def add(tried: str, held: str, figures: str = "") -> None:
        REPORT.add(request.node.nodeid, tried, held, figures)

    return add


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        REPORT.outcome(item.nodeid, rep.outcome)
