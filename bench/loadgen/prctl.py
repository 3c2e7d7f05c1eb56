"""What a load client process asks of Linux through prctl(2): precise sleeps, and to end with its parent."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29


def _prctl(option: int, value: int) -> bool:
    """prctl(option, value); False where the C library or the call is not available."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def fine_timer_slack() -> None:
    """Ask Linux for 1 µs timer slack on this thread (default 50 µs), so sleeps end when asked."""
    _prctl(PR_SET_TIMERSLACK, 1000)


def die_with_parent(parent: int) -> None:
    """SIGKILL this client when the process that started it ends. A bench killed mid-run (Ctrl-C on `make`, a
    timeout) would otherwise leave its clients sending under SCHED_FIFO, taking a core from whatever runs next."""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL) and os.getppid() != parent:
        os._exit(1)  # it ended before the request took effect
