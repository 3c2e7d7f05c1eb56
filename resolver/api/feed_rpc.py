"""The servicer's methods for WatchChanges, the change feed (contract §7; resolver.feed): a mixin of
resolver.api.servicer.IdentityResolverServicer, which provides `service`, `_call` and the rest.

Threads: grpcio's sync server runs a response stream on one thread for as long as the call lasts. WatchChanges
calls run on a pool of their own (`[changes] max_watchers` + 2 threads: grpcio takes a handler's
`experimental_thread_pool`, resolver.api.handlers), so watchers never take the threads Resolve and Upsert are
served from; a call beyond `max_watchers` is refused at once (RESOURCE_EXHAUSTED TOO_MANY_WATCHERS).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from resolver import feed
from resolver.api.status import to_status
from resolver.errors import ResolverError
from resolver.feed import Change, Watch, WatchFilter
from resolver.v1 import resolver_pb2 as pb
from resolver.watchers import Watcher, Watchers

if TYPE_CHECKING:
    from resolver.service import Service

T = TypeVar("T")
IDLE_CHECK_S = 1.0  # a watcher at the end of the log looks at its call this often even if nothing wakes it


def change_event(c: Change) -> pb.ChangeEvent:
    """The proto of a feed change (already masked by resolver.feed). Repeated fields are set only when there is
    something in them: this runs once per event a watcher gets."""
    ev = pb.ChangeEvent(sequence=c.seq, customer_uuid=c.customer_uuid, action=c.action, version=c.version,
                        source_system=c.source_system)
    ev.committed_at.FromMicroseconds(c.at_us)
    if c.added:
        ev.added.extend([pb.IdentifierRef(kind=pb.MatchKind.ValueType(k.value), masked_value=v) for k, v in c.added])
    if c.removed:
        ev.removed.extend([pb.IdentifierRef(kind=pb.MatchKind.ValueType(k.value), masked_value=v) for k, v in c.removed])
    if c.merged_uuids:
        ev.merged_uuids.extend(c.merged_uuids)
    if c.restored_uuid:
        ev.restored_uuid = c.restored_uuid
    if c.interaction_id:
        ev.interaction_id = c.interaction_id
    for f in c.fields:
        fc = ev.fields.add(name=f.name, masked=f.masked)
        if f.old is not None:
            _set_value(fc.old_value, f.old)
        if f.new is not None:
            _set_value(fc.new_value, f.new)
    return ev


def _set_value(target: struct_pb2.Value, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int | float):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    else:  # a list or an object (not in today's attribute types): as Struct carries it
        holder = struct_pb2.Struct()
        holder.update({"v": value})
        target.CopyFrom(holder.fields["v"])


def _end_call(context: grpc.ServicerContext, error: ResolverError) -> None:
    """End a call with `error`'s code and message from another thread than the one running it (a stalled
    watcher: WATCHER_STALLED; the server stopping: UNAVAILABLE).

    The call's thread may be blocked inside grpcio, sending a response the client does not take, so abort() (which
    raises in its caller) cannot reach it, and a status sent the ordinary way would queue behind the blocked
    response. grpcio has no public call for this: ServicerContext.cancel ends the call with CANCELLED. The call
    object's own cancel with a status (grpc_call_cancel_with_status) sends the status at once, ahead of the
    flow-controlled data; the client reads the events it had buffered, then the status (code and message: no
    ErrorInfo travels this way). If a grpcio release moves that object, the call is still ended, as CANCELLED.
    """
    status = to_status(error)
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is not None and hasattr(call, "cancel"):
        call.cancel(status.code.value[0], status.details)
    else:
        context.cancel()


class FeedRpcs:
    """Mixed into IdentityResolverServicer."""

    if TYPE_CHECKING:
        service: Service

        def _call(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T: ...

    _feed_lock = threading.Lock()
    _feed_watchers: Watchers | None = None

    def watchers(self) -> Watchers:
        """This process's watchers (made on first use)."""
        with self._feed_lock:
            if self._feed_watchers is None:
                self._feed_watchers = Watchers(self.service.store, self.service.settings.changes)
            return self._feed_watchers

    def end_streams(self) -> None:
        """End every WatchChanges call now (UNAVAILABLE): the server is stopping (resolver.bootstrap.Running.stop)."""
        self.watchers().stop()  # made if need be: a call arriving during the drain is refused

    def stream_thread_pool(self, method: str) -> ThreadPoolExecutor | None:
        """The thread pool a server-streaming method runs on (resolver.api.handlers asks once per method at
        registration); None: the server's own."""
        if method != "WatchChanges":
            return None
        return ThreadPoolExecutor(max_workers=self.service.settings.changes.max_watchers + 2,
                                  thread_name_prefix="feed")

    def WatchChanges(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.ChangeEvent]:
        """Every committed change from `from_sequence` on, then live; filtered, masked (resolver.feed)."""
        service = self.service
        watchers = self.watchers()

        def admit() -> tuple[Watch, Watcher]:
            flt = WatchFilter.parse(request.customer_uuids, request.fields, service.schema)
            watcher = watchers.admit(functools.partial(_end_call, context))
            try:
                return Watch(service.store, service.schema, flt, feed.start(service.store, request.from_sequence)), watcher
            except BaseException:
                watcher.close()
                raise

        watch, watcher = self._call(context, "WatchChanges", admit)
        try:
            if not context.add_callback(watcher.end):
                return  # the call is over already
            while not watcher.ended:
                changes, read = self._call(context, "WatchChanges", watch.poll)
                for change in changes:
                    event = change_event(change)
                    watcher.sending()
                    yield event
                    watcher.sent()
                if not read:
                    watcher.wait_past(watch.next - 1, IDLE_CHECK_S)
                    if not context.is_active():
                        return
        finally:
            watcher.close()
