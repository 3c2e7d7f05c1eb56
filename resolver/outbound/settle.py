"""What the deliverer decided about one queued message, as a command (contract §10): on one machine applied by the
deliverer's own writer; in a cluster published to the replicated log (resolver.cluster.codec `outbound.settle.v1`)
and applied by every node, so that every node's outbox knows what was delivered and a node that takes delivery
over (resolver.cluster.lease) resumes where the previous one stopped.

Everything its apply needs is in it (the time a message died, the instant of its next attempt); applying it to a
message no longer queued changes nothing but the attempt counter (resolver.outbound.outbox), so a decision
published twice, or by two deliverers around a takeover, is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from resolver.config import Settings
from resolver.outbound import outbox
from resolver.store import Txn

Verdict = Literal["ack", "retry", "dead"]


@dataclass(frozen=True, slots=True)
class Settle:
    """Message `message_id` was `ack`nowledged (2xx), is retried at `next_us` (`throttled`: after a 429), or is
    `dead` (`reason`: REJECTED, EXPIRED, UNKNOWN_DESTINATION) at `now_us`; `attempts` made since the last decision."""

    message_id: int
    verdict: Verdict
    attempts: int
    error: str = ""
    reason: str = ""
    next_us: int = 0
    throttled: bool = False
    now_us: int = 0

    @property
    def key(self) -> str:
        """One decision's identity: a message is acknowledged or killed once, retried once per planned attempt."""
        return f"outbound/{self.message_id}/{self.verdict}/{self.next_us if self.verdict == 'retry' else 0}"

    @property
    def fingerprint(self) -> str:
        return f"{self.attempts}/{self.reason}/{self.now_us}"


def apply(view: Txn, cmd: Settle) -> bool:
    """Apply the decision in the caller's transaction; False if the message was no longer queued."""
    txn, store = view.txn, view.store
    if cmd.verdict == "ack":
        return outbox.acknowledge(txn, store, cmd.message_id, cmd.attempts)
    if cmd.verdict == "retry":
        return outbox.retry_later(txn, store, cmd.message_id, attempts=cmd.attempts, error=cmd.error,
                                  next_us=cmd.next_us, throttled=cmd.throttled)
    return outbox.kill(txn, store, cmd.message_id, attempts=cmd.attempts, error=cmd.error, reason=cmd.reason,
                       now_us=cmd.now_us)


def replicated_apply(view: Txn, cmd: Settle, _settings: Settings) -> bool:
    """`apply`, as the replicated log's entry (resolver.cluster.codec)."""
    return apply(view, cmd)
