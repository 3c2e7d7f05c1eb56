"""How far the stream goes, as this node last saw it, and when: what a read compares its own position with.

The applier reports a sighting each time it meets the stream (a fetched batch says how many commands follow it; an
idle applier or one reopening its reader asks the stream for its bounds), and the writer each time the stream takes
one of its commands. Nothing asks the stream on behalf of a read: resolver.cluster.reads only reads `latest`.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sighting:
    """The stream held at least `last` commands at `at` (time.monotonic(); -inf: never seen)."""

    last: int
    at: float


class Horizon:
    """The latest sighting (thread-safe: reporters take a lock, readers take one attribute)."""

    def __init__(self) -> None:
        self.latest = Sighting(0, -math.inf)
        self._lock = threading.Lock()

    def saw(self, last: int) -> None:
        """The stream held at least `last` commands just now. Sightings race (the applier and writers report from
        their own threads), so a lower `last` never moves the sequence back; it still says the stream was reached."""
        with self._lock:
            self.latest = Sighting(max(last, self.latest.last), time.monotonic())
