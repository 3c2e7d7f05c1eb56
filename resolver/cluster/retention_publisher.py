"""The lease holder's side of change-log retention in a cluster (the command: resolver.cluster.retention).

Every `storage.sweep_interval_s`, while this node holds the lease, the publisher fixes the cutoff from the
blueprint's `[changes]` limits, this node's clock and its change log (resolver.retention.cutoff), and publishes it
as a RetentionCommand if it would delete something here. This node's change log may lag the stream: its cutoff
then keeps more, never less, than the blueprint says (the next round deletes the rest).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from resolver.cluster.retention import RetentionCommand, apply
from resolver.config import Settings
from resolver.retention import cutoff, due
from resolver.service import now_us
from resolver.store import Store

if TYPE_CHECKING:
    from resolver.cluster.lease import Lease
    from resolver.cluster.writer import ReplicatedWriter

log = logging.getLogger("resolver.cluster")
LIMIT = 1000  # entries one command deletes at most: one apply transaction stays short; the rest go by the next


class RetentionPublisher:
    """In a daemon thread (`start`), while this node holds `lease`: publishes the retention cutoff through `writer`
    every `storage.sweep_interval_s` when it would delete something here. `stop` ends the thread and gives the
    lease up (Lease.close: a second close, by the deliverer that shares it, does nothing)."""

    def __init__(self, store: Store, settings: Settings, writer: ReplicatedWriter, lease: Lease) -> None:
        self.store = store
        self.settings = settings
        self.writer = writer
        self.lease = lease
        self._published_us = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # a publish in flight ends within the writer's apply_timeout_s
            self._thread.join(self.settings.cluster.apply_timeout_s + 5)
        self.lease.close()

    def publish(self) -> int:
        """Publish cutoffs fixed now until one deletes fewer than LIMIT (or none is due here); how many entries
        their applies deleted. Raises what the writer raises (Unavailable: the log did not take it; next round)."""
        total = 0
        while not self._stop.is_set():
            with self.store.read() as view:
                cut = cutoff(self.settings.changes, now_us(), view.last_change_seq())
                if cut is None or not due(view, cut):
                    return total
            self._published_us = max(now_us(), self._published_us + 1)  # a new command, never a stream duplicate
            cmd = RetentionCommand(cut.through_seq, cut.before_us, LIMIT, self._published_us)
            n: int = self.writer.submit(apply, cmd)
            total += n
            if n < LIMIT:
                return total
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.lease.held():
                try:
                    n = self.publish()
                    if n:
                        log.info("change-log retention: published cutoffs removed %d entries (on every node)", n)
                except Exception:  # the node must go on serving; the next round publishes again
                    log.exception("change-log retention was not published")
            self._stop.wait(self.settings.storage.sweep_interval_s)
