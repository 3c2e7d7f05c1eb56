"""What applying each recent stream sequence returned, and how far this node has applied: read-your-writes.

The applier records an outcome per sequence once the transaction that applied it has committed; a writer that
published sequence N waits here for N's outcome. The outcomes are held in memory for the last `keep` sequences
(enough for a writer to read its own, and for a retry within the stream's de-duplication window to read the
answer of the write it repeats); older ones, and those applied before this process started, are gone.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

KEEP = 50_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """A command's result (`ok`) or the error it raised (`value` is then the exception)."""

    ok: bool
    value: Any


class Outcomes:
    """Sequence -> Outcome for the recent sequences, and `applied`, the last sequence applied (thread-safe)."""

    def __init__(self, applied: int, keep: int = KEEP) -> None:
        self.applied = applied
        self._keep = keep
        self._held: OrderedDict[int, Outcome] = OrderedDict()
        self._changed = threading.Condition()

    def record(self, applied: int, outcomes: list[tuple[int, Outcome]]) -> None:
        """A batch committed: its outcomes, and the position reached (which may pass sequences with none)."""
        with self._changed:
            for seq, outcome in outcomes:
                self._held[seq] = outcome
            while len(self._held) > self._keep:
                self._held.popitem(last=False)
            self.applied = max(self.applied, applied)
            self._changed.notify_all()

    def wait(self, seq: int, timeout: float) -> Outcome | None:
        """Block until `seq` is applied here (TimeoutError after `timeout` s); its outcome, or None when it is no
        longer (or never was) held in this process."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.applied < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sequence {seq} not applied within {timeout:.1f}s (applied: {self.applied})")
                self._changed.wait(left)
            return self._held.get(seq)

    def wait_applied(self, seq: int, timeout: float) -> bool:
        """Whether this node reached `seq` within `timeout` s (a read that must see a write made elsewhere)."""
        try:
            self.wait(seq, timeout)
        except TimeoutError:
            return False
        return True
