"""What a read on a cluster node may answer (contract §10): data at least as new as the caller asks, and never data
this node knows, or cannot rule out, to be stale.

Checked before every Resolve, ResolveStream batch and GetCustomer of a cluster node (resolver.api.servicer), in
this order, each refusal a NodeBehind (UNAVAILABLE, reason NODE_BEHIND, with the node's position), so that a client
or a balancer retries on another node:

1. the applier stopped for good (`behind`: the stream dropped what this node needs, or holds a command this version
   cannot read; health says NOT_SERVING for the same reason);
2. the applier has not heard from the stream for `[cluster] max_silence_s`: how far behind this node is cannot be
   told (NATS out of reach, or the applier held up, say by a long write transaction of the same store);
3. this node is more than `max_lag` commands behind the stream's last sequence as it last saw it;
4. `min_sequence` (a write's `log_sequence`, from any node): waited for on the applier's condition, no polling, at
   most `read_wait_s` and within the call's deadline, leaving part of what remains of it for the answer to arrive.

Nothing is asked of the network per call: the stream's last sequence comes from resolver.cluster.horizon.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from resolver.cluster.horizon import Horizon
from resolver.cluster.outcomes import Outcomes
from resolver.config.tables import ClusterSettings
from resolver.errors import NodeBehind

if TYPE_CHECKING:
    from resolver.cluster.applier import Applier

# Of what remains of the call's deadline, the share a read may wait for `min_sequence`: the rest is for the
# refusal to reach the caller before its own deadline does (a refusal says where this node is; a deadline does not).
WAIT_SHARE = 0.8


class ReadGate:
    """The checks above, over this node's applier, its applied position and its view of the stream."""

    def __init__(self, spec: ClusterSettings, applier: Applier, outcomes: Outcomes, horizon: Horizon) -> None:
        self._applier = applier
        self._outcomes = outcomes
        self._horizon = horizon
        self._max_lag = spec.max_lag
        self._max_silence_s = spec.max_silence_s
        self._wait_s = spec.read_wait_s

    def admit(self, min_sequence: int, deadline: float | None) -> None:
        """Return once this node may answer a read that must see `min_sequence` (0: any position); NodeBehind if it
        may not. `deadline`: the call's (a time.monotonic() instant; None: only `read_wait_s` bounds the wait)."""
        applied = self._outcomes.applied
        if self._applier.behind is not None:
            raise NodeBehind(f"this node stopped applying the replicated log at sequence {applied}; read another node",
                             position=applied, min_sequence=min_sequence)
        seen = self._horizon.latest
        now = time.monotonic()
        if self._max_silence_s and now - seen.at > self._max_silence_s:
            raise NodeBehind(f"this node has not heard from the replicated log for over {self._max_silence_s:g}s, so "
                             f"it cannot tell how far behind it is (applied: {applied}); read another node",
                             position=applied, min_sequence=min_sequence, stream_sequence=seen.last)
        if seen.last - applied > self._max_lag:
            raise NodeBehind(f"this node has applied the replicated log to {applied}, more than {self._max_lag} "
                             f"behind its last sequence {seen.last}; read another node",
                             position=applied, min_sequence=min_sequence, stream_sequence=seen.last)
        if min_sequence <= applied:
            return
        wait = self._wait_s if deadline is None else min(self._wait_s, (deadline - now) * WAIT_SHARE)
        if wait <= 0 or not self._outcomes.wait_applied(min_sequence, wait):
            position = self._outcomes.applied
            raise NodeBehind(f"this node has applied the replicated log to {position}, not yet to {min_sequence}; "
                             "read another node or retry", position=position, min_sequence=min_sequence,
                             stream_sequence=self._horizon.latest.last)
