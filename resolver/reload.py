"""SIGHUP: re-read the files a running server keeps in memory, without a restart and without dropping a call.

A part that can be reloaded (the gRPC TLS certificate, the webhook endpoint's certificate, the webhook secrets of
`[sources.*]`, the tokens file) is a `Reloadable`: `reload()` reads and checks its files, then swaps what it
serves in one step, or raises with the reason and keeps what it had. `reload_all` reloads a process's parts, one
failure never stopping the others.

`resolver serve` (resolver.server) takes SIGHUP in the supervisor, reloads its own parts and forwards the signal
to every child process, each of which reloads its own. A child is spawned with SIGHUP blocked (`sighup_blocked`,
around the spawn; a blocked signal stays pending across exec) and unblocks it once its handler is installed
(`accept_sighup`): a SIGHUP that arrives while it starts is answered when it serves, never by the default
action, which would end the process.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from resolver.errors import ConfigError

log = logging.getLogger("resolver.reload")


class Reloadable(Protocol):
    """A part of a running server that re-reads its files on SIGHUP."""

    what: str  # for the log: "the gRPC TLS certificate"

    def reload(self) -> None:
        """Read and check the files, then serve what they hold from the next call or connection on; on a bad
        file raise (ConfigError naming the file, or any exception) and keep serving what was there."""


def reason(exc: BaseException) -> str:
    """One line saying why a reload failed."""
    if isinstance(exc, ConfigError):
        return "; ".join(exc.problems)
    return f"{type(exc).__name__}: {exc}"


def reload_all(parts: Iterable[Reloadable]) -> list[str]:
    """Reload every part, logging each outcome; a part that fails keeps its previous state and the others still
    reload. The failures, as "WHAT: REASON" (empty: all reloaded)."""
    failures = []
    for part in parts:
        try:
            part.reload()
        except Exception as exc:
            failures.append(f"{part.what}: {reason(exc)}")
            log.error("reload of %s failed, keeping the previous one: %s", part.what, reason(exc))
        else:
            log.info("reloaded %s", part.what)
    return failures


class ReloadRequests:
    """SIGHUP noted by a signal handler, for a loop that polls (`taken()` once per turn).

    The handler only counts (no lock is taken in a signal handler); a SIGHUP that arrives while a reload runs
    makes the next `taken()` true again, so the newest files are always read.
    """

    def __init__(self) -> None:
        self._received = 0
        self._seen = 0

    def install(self) -> None:
        """Handle SIGHUP in this process from now on, and unblock it (`accept_sighup`)."""
        signal.signal(signal.SIGHUP, self._note)
        accept_sighup()

    def _note(self, *_: object) -> None:
        self._received += 1

    def taken(self) -> bool:
        """Whether a SIGHUP arrived since the last call."""
        if self._received == self._seen:
            return False
        self._seen = self._received
        return True


@contextmanager
def sighup_blocked() -> Iterator[None]:
    """Block SIGHUP in this thread while child processes are started here: they inherit the mask, and keep a
    SIGHUP pending until their handler is installed (`accept_sighup`)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def accept_sighup() -> None:
    """Unblock SIGHUP in this thread (a child calls it once its handler is installed)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
