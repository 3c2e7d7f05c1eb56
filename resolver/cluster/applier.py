"""The applier: this node's one consumer of the stream, applying every command to its own store, in order.

Each batch of commands is applied in one LMDB write transaction (each command nested, so a command that fails
rolls back alone, exactly as resolver.writer does on one machine), together with the last stream sequence
reached, stored in the `meta` database. So the store and its position never disagree: after a crash, the node
resumes from the sequence after the one stored, and a command is applied exactly once per data directory. The
position is read inside that same transaction, so even a second applier on the same directory (another process
opened with the same blueprint) skips what was applied and cannot apply anything twice.

A store that applied one stream refuses another (its name is stored beside the position). If the stream no
longer holds the sequence this node needs (retention removed it while the node was away), the applier stops and
says so (`behind`): the node must start again from a `resolver backup` taken from a node that is current. It also
stops before a command this version cannot read (written by a newer one): skipping it would part the replicas.

A command's apply seals sensitive values with nonces derived from its stream sequence (resolver.nonces), not drawn
at random: every node stores the same bytes, and replicas can be compared byte for byte (resolver.cluster.digest).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Literal

import lmdb

from resolver.cluster.codec import Op, decode
from resolver.cluster.horizon import Horizon
from resolver.cluster.log import CommandLog, Reader
from resolver.cluster.outcomes import Outcome, Outcomes
from resolver.config import Settings
from resolver.errors import ClusterError, ResolverError, StorageFull
from resolver.nonces import command_identity
from resolver.store import Store, Txn
from resolver.writer import apply_nested

log = logging.getLogger("resolver.cluster")
_U64 = struct.Struct(">Q")
POSITION_KEY = b"cluster.sequence"
STREAM_KEY = b"cluster.stream"
BATCH = 256
FETCH_WAIT_S = 1.0
RETRY_S = 0.5
Step = Literal["ok", "gap", "stop"]  # how a batch ended: applied, a sequence missing, a command this version cannot read


def stored_position(store: Store, stream: str) -> int:
    """The last sequence of `stream` applied to `store` (0: none); ClusterError if it applied another stream."""
    with store.read() as txn:
        return _position(txn, stream)


def _position(txn: Txn, stream: str) -> int:
    meta = txn.store.db["meta"]
    name = txn.txn.get(STREAM_KEY, db=meta)
    if name is not None and name.decode() != stream:
        raise ClusterError(f"{txn.store.path}: this store applied stream {name.decode()!r}, not {stream!r}")
    raw = txn.txn.get(POSITION_KEY, db=meta)
    return _U64.unpack(raw)[0] if raw is not None else 0


class Applier:
    """Consumes `log` from the stored position on, in a daemon thread, records outcomes in `outcomes`, and reports
    in `horizon` how far the stream goes each time it meets it."""

    def __init__(self, store: Store, settings: Settings, log: CommandLog, outcomes: Outcomes,
                 horizon: Horizon) -> None:
        self.store = store
        self.settings = settings
        self.log = log
        self.outcomes = outcomes
        self.horizon = horizon
        self.stream = settings.cluster.stream
        self.behind: str | None = None  # why this node cannot catch up (None: it can)
        self._behind_listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-applier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def on_behind(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` once this node falls behind the stream for good (at once if it has)."""
        with self._lock:
            if self.behind is None:
                self._behind_listeners.append(listener)
                return
        listener(self.behind)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(FETCH_WAIT_S + 10)

    def _run(self) -> None:
        reader: Reader | None = None
        idle = 0  # empty fetches in a row while the stream holds more than was applied
        while not self._stop.is_set():
            try:
                if reader is None:
                    reader = self._open()
                    if reader is None:
                        return
                    idle = 0
                fetched = reader.fetch(BATCH, FETCH_WAIT_S)
                if fetched.commands:
                    self.horizon.saw(fetched.stream_last)
                    step = self._apply(fetched.commands)
                    if step == "stop":
                        return
                    idle, lost = 0, step == "gap"  # a gap: a fetch was lost on a reconnect
                else:  # a consumer on a server that died delivers nothing, ever; twice empty, it is not a mere race
                    last = self.log.bounds().last
                    self.horizon.saw(last)
                    idle = idle + 1 if last > self.outcomes.applied else 0
                    lost = idle >= 2
                if lost:  # read again from the stored position
                    reader.close()
                    reader = None
            except Exception as exc:  # NATS away, the consumer lost, or the disk full: again from the stored position
                if isinstance(exc, ClusterError):
                    log.warning("cluster applier: %s; retrying", exc)
                else:
                    log.exception("cluster applier: a batch was not applied; retrying")
                if reader is not None:
                    reader.close()
                    reader = None
                self._stop.wait(RETRY_S)
        if reader is not None:
            reader.close()

    def _open(self) -> Reader | None:
        """A reader from the position after the stored one; None (and `behind` set) if the stream lost it."""
        position = stored_position(self.store, self.stream)
        first, last = self.log.bounds()
        self.horizon.saw(last)
        if first > position + 1:
            self._give_up(f"this store is at sequence {position}, the stream {self.stream!r} starts at {first}: "
                          "start this node from a backup of a current node")
            return None
        return self.log.reader(position + 1)

    def _give_up(self, reason: str) -> None:
        """This node cannot go on applying the log: say why (log, `behind`, the listeners: health)."""
        log.error("cluster applier stopped: %s", reason)
        with self._lock:
            self.behind = reason
            listeners, self._behind_listeners = self._behind_listeners, []
        for listener in listeners:
            listener(reason)

    def _apply(self, batch: list[tuple[int, bytes]]) -> Step:
        """Apply a fetched batch in one transaction, as far as it follows the stored position ("gap" if it stops
        following it) and holds commands this version can read ("stop" at the first that it cannot)."""
        outcomes: list[tuple[int, Outcome]] = []
        step: Step = "ok"
        unreadable = ""
        with self.store.write() as txn:
            position = _position(txn, self.stream)
            for seq, data in batch:
                if seq <= position:
                    continue  # applied already (a re-read after a reconnect, or another applier)
                if seq != position + 1:
                    step = "gap"
                    break
                try:
                    op, command = decode(data)
                except ClusterError as exc:  # skipping it would part this store from the others: stop before it
                    step, unreadable = "stop", f"stream sequence {seq}: {exc}; upgrade this node"
                    break
                outcomes.append((seq, self._apply_one(txn, seq, op, command)))
                position = seq
            meta = self.store.db["meta"]
            txn.txn.put(POSITION_KEY, _U64.pack(position), db=meta)
            txn.txn.put(STREAM_KEY, self.stream.encode(), db=meta)
        # committed and synced: only now may the writers of these commands answer
        self.outcomes.record(position, outcomes)
        if step == "stop":
            self._give_up(unreadable)
        return step

    def _apply_one(self, txn: Txn, seq: int, op: Op, command: object) -> Outcome:
        """Apply the command at `seq`, nested: its result, or the error it failed with (the same on every node).
        What fails because of this node (its disk, its memory) is raised instead: the batch is retried, never
        skipped. What it seals, it seals with nonces derived from `seq` (resolver.nonces): the same bytes on
        every node."""
        settings = self.settings
        sealer = self.store.sealer.for_command(command_identity(self.stream, seq))

        def run(t: Txn, c: object) -> object:
            t.sealer = sealer
            return op.apply(t, c, settings)

        try:
            return Outcome(True, apply_nested(self.store, txn, run, command))
        except (StorageFull, lmdb.Error, OSError, MemoryError):
            raise
        except ResolverError as exc:
            return Outcome(False, exc)
        except Exception as exc:  # a bug fails alone, as on one machine, and identically on every node
            log.exception("a replicated command failed with an internal error")
            return Outcome(False, exc)
