"""Change-log retention in a cluster: a replicated command, so that every node deletes the same entries.

On one machine the sweeper deletes by its own clock (resolver.retention). Nodes' clocks differ, and Unmerge reads
the change log, so in a cluster that would part the replicas. Instead the node holding the lease (the one that
delivers outbound messages: resolver.cluster.lease, not a second election) fixes the cutoff once, every
`storage.sweep_interval_s`, from the blueprint's `[changes]` limits, its own clock and its own change log, and
publishes it as a `RetentionCommand`; every node applies it in its apply transaction with the same
`resolver.retention.remove` as one machine. A node that was down applies it when it catches up, at the same place
in the log: the same entries go. This module is the command; resolver.cluster.retention_publisher publishes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from resolver.retention import Cutoff, remove
from resolver.store import Txn


@dataclass(frozen=True, slots=True)
class RetentionCommand:
    """Delete the change-log entries that the cutoff (`through_seq`, `before_us`: resolver.retention.Cutoff)
    names, at most `limit`; fixed by the lease holder at `published_us` (its clock: the command's identity)."""

    through_seq: int
    before_us: int
    limit: int
    published_us: int

    @property
    def key(self) -> str:
        return f"retention/{self.published_us}"

    @property
    def fingerprint(self) -> str:
        return f"{self.through_seq}/{self.before_us}/{self.limit}"


def apply(view: Txn, cmd: RetentionCommand) -> int:
    """Delete what the command names, in `view`'s transaction (every node, through resolver.cluster.codec); how
    many entries were deleted."""
    return remove(view, Cutoff(cmd.through_seq, cmd.before_us), cmd.limit)
