"""How the deliverer judges an attempt, and how long it waits before the next one. Pure functions.

| answer | outcome |
| --- | --- |
| 2xx | acknowledged: the message leaves the queue |
| 429 | retried after its Retry-After (delta-seconds or an HTTP date), else the back-off; the whole destination waits |
| 5xx, a connection refused or reset, a timeout | retried after the back-off |
| any other answer (4xx, a 3xx: redirects are not followed) | dead-lettered with the answer as its last error |

The back-off doubles from `backoff_initial_s` per failed attempt up to `backoff_max_s`, and each delay is a random
50-100% of that ("equal jitter"), so customers that failed together do not retry together. A message whose age
passes `max_age_s` is dead-lettered instead of being tried again (reason EXPIRED).
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable
from dataclasses import dataclass

ACK, RETRY, DEAD = "ack", "retry", "dead"
MAX_RETRY_AFTER_S = 24 * 3600.0  # a Retry-After further away than this is read as this


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an attempt's answer means: ACK, RETRY (after `retry_after_s` if the answer named it) or DEAD."""

    outcome: str
    error: str = ""
    retry_after_s: float | None = None
    throttled: bool = False  # a 429: the destination is paused as a whole


def judge(status: int, retry_after: str | None, now_s: float) -> Verdict:
    """The verdict on an HTTP answer `status` with its Retry-After header (None: absent), at wall time `now_s`."""
    if 200 <= status < 300:
        return Verdict(ACK)
    if status == 429:
        return Verdict(RETRY, f"HTTP 429{f' (Retry-After {retry_after})' if retry_after else ''}",
                       retry_after_seconds(retry_after, now_s), throttled=True)
    if status >= 500:
        return Verdict(RETRY, f"HTTP {status}")
    return Verdict(DEAD, f"HTTP {status}")


def failed(exc: BaseException) -> Verdict:
    """The verdict on an attempt that got no answer: a connection refused or reset, a timeout (retried)."""
    name = type(exc).__name__
    text = str(exc)[:200]
    return Verdict(RETRY, f"{name}: {text}" if text else name)


def retry_after_seconds(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds ("120") or an HTTP date; None if absent or unreadable.
    Never negative; at most MAX_RETRY_AFTER_S."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        return None
    return min(max(0.0, when.timestamp() - now_s), MAX_RETRY_AFTER_S)


def backoff_s(failures: int, initial_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """The delay before the next attempt after `failures` (1, 2, ...) failed attempts in a row: initial * 2^(n-1),
    capped at `max_s`, times a random factor in [0.5, 1)."""
    base = min(max_s, initial_s * 2.0 ** min(max(failures, 1) - 1, 60))
    return base * (0.5 + 0.5 * rand())
