"""The deliverer's lease: in a cluster, exactly one node sends the outbound messages that every node's outbox holds.
The same holder publishes change-log retention (resolver.cluster.retention): one election for a node's duties.

Every node applies the same commands, so every node's outbox queues the same messages under the same ids. The
node that delivers is the one holding key `outbound-deliverer` of the JetStream key-value bucket `<stream>-leases`
(replicated like the stream, its keys gone `lease_s` after their last write):

- take it: create the key only if it is absent (nobody holds it, or its holder stopped renewing and it expired);
- keep it: update it every `lease_s / RENEWALS`, only if its revision is still the one this node wrote last;
- lose it: an update refused (another node took it) or failing (NATS away). This node sends only until HOLD x
  `lease_s` after it *sent* its last successful renewal, and the key expires `lease_s` after the server *stored* it,
  which is later: so a node that cannot renew has stopped sending before anyone else can take the lease over;
- give it up: on stop the key is deleted (revision-checked), and another node takes over at its next try.

A node that takes the lease first applies the stream as far as it went when it took it: the previous holder's
decisions (resolver.outbound.settle) are then in its outbox, and it does not send again what was acknowledged.
Only what was in flight at the change (sent, its acknowledgement not yet in the log) is sent again, with the same
webhook-id: delivery stays at least once, and receivers de-duplicate on that id.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats.js.errors

from resolver.cluster.log import CommandLog
from resolver.config.tables import ClusterSettings
from resolver.errors import ClusterError

log = logging.getLogger("resolver.cluster")
KEY = "outbound-deliverer"
RENEWALS = 4  # tries to take or renew the lease per lease_s
HOLD = 0.5  # this node sends until this fraction of lease_s after it sent its last successful renewal


def bucket(spec: ClusterSettings) -> str:
    """The key-value bucket of the stream's leases."""
    return f"{spec.stream}-leases"


class Lease:
    """Takes and renews the lease in a daemon thread (started here); `held()` says whether this node may send now.
    `applied()` is how far this node has applied the stream (it catches up before its first send)."""

    def __init__(self, nats_log: CommandLog, spec: ClusterSettings, applied: Callable[[], int]) -> None:
        self.nats = nats_log
        self.spec = spec
        self.ttl = spec.lease_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this process, not a node's name
        self._applied = applied
        self._kv: Any = None
        self._revision = 0  # of this node's last write of the key (0: not held)
        self._until = 0.0  # monotonic: held until then, if renewed no more
        self._ready_at = 0  # the stream sequence to apply before the first send
        self._stop = threading.Event()
        self._complained = 0.0
        self._thread = threading.Thread(target=self._run, name="cluster-lease", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """This node holds the lease and has applied what the previous holder decided: it may send now."""
        return time.monotonic() < self._until and self._applied() >= self._ready_at

    def close(self) -> None:
        """Stop renewing; give the lease up if held (another node takes it at once, not after it expires)."""
        self._stop.set()
        self._thread.join(self.ttl + self.spec.connect_timeout_s + 5)
        revision, self._revision, self._until = self._revision, 0, 0.0
        if revision and self._kv is not None:
            try:
                self.nats.call(self._kv.delete(KEY, last=revision), self.spec.connect_timeout_s)
                log.info("outbound: this node gave up the delivery lease")
            except ClusterError:
                pass  # it expires by itself

    def _run(self) -> None:
        while not self._stop.is_set():
            self._try()
            self._stop.wait(self.ttl / RENEWALS)

    def _try(self) -> None:
        """Take or renew the lease once."""
        sent = time.monotonic()
        try:
            if self._kv is None:
                self._kv = self.nats.key_value(bucket(self.spec), self.ttl)
            revision = self.nats.call(self._claim(), min(self.spec.connect_timeout_s, self.ttl / RENEWALS))
        except ClusterError as exc:  # held until `_until` at most: then this node stops sending by itself
            if time.monotonic() - self._complained >= self.ttl:
                self._complained = time.monotonic()
                log.warning("outbound: the delivery lease cannot be renewed (%s)", exc)
            return
        if revision == 0:
            if self._revision:
                log.warning("outbound: another node took the delivery lease; this node stops sending")
            self._revision, self._until = 0, 0.0
            return
        if not self._revision:
            try:
                self._ready_at = self.nats.bounds().last
            except ClusterError:
                self._ready_at = self._applied()  # not known now: what is in flight may be sent again (at least once)
            log.info("outbound: this node holds the delivery lease; it sends once it applied sequence %d",
                     self._ready_at)
        self._revision = revision
        self._until = sent + HOLD * self.ttl

    async def _claim(self) -> int:
        """The key's new revision, written by this node (0: another node holds the lease)."""
        kv, holder = self._kv, self.holder.encode()
        try:
            if self._revision:
                return int(await kv.update(KEY, holder, last=self._revision))
            return int(await kv.create(KEY, holder))
        except nats.js.errors.KeyWrongLastSequenceError:
            try:
                entry = await kv.get(KEY)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return 0  # given up or expired just now: taken at the next try
            if entry.value != holder:
                return 0
            # this node's own write, whose answer was lost: renew it now (its time of writing is not known here)
            return int(await kv.update(KEY, holder, last=entry.revision))
