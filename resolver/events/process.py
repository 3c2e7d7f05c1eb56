"""The events process: the webhook endpoint and the applier of `resolver serve`, in one child process.

Why a process of their own: as threads of a serving process, the aiohttp loop, the admissions and the applier
share the GIL and the CPU with the Resolve handlers (Resolve p99 8-11x higher during a 20,000-event drain).
In a child process at a lowered CPU priority (`[events] process_nice`, SCHED_IDLE with `process_sched_idle`),
the kernel prefers the serving workers. The workers keep gRPC `IngestEvents` and the DLQ admin RPCs: they
write to the same LMDB inbox, which this process's applier drains (one applier per data directory), at a pace
set by the CPU the serving processes (the parent and its other children) use, read from /proc
(resolver.events.pace): nothing is added to a Resolve.

`EventsProcess` is the parent's side: it spawns the child (spawn context, like the workers: the child opens
the LMDB store itself), waits for its readiness, restarts it (bounded, with a backoff: resolver.restarts) if it
dies (accepted events are durable in the inbox, so nothing is lost), and stops it in two steps: intake first
(before the gRPC workers drain), then the applier after its current batch. Commands travel on a pipe; the child
takes the end of the pipe (its parent is gone) as "stop". SIGHUP, forwarded by the parent (`reload()`), makes the
child re-read the webhook secrets and the endpoint's certificate between two requests (resolver.reload).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NamedTuple

from resolver import metrics
from resolver.bootstrap import build_events, build_service
from resolver.config import Settings
from resolver.events import pace
from resolver.logs import setup_logging
from resolver.reload import ReloadRequests, reload_all, sighup_blocked
from resolver.restarts import MAX_RESTARTS, Restarts

if TYPE_CHECKING:
    from resolver.events.runtime import Events

log = logging.getLogger("resolver.events.process")
PROCESS_NAME = pace.EVENTS_PROCESS  # its /proc/PID/comm (15 characters at most), for ps, top and the tests
START_TIMEOUT_S = 60.0


class EventsProcessError(RuntimeError):
    """The events process could not be started."""


# -- the child ------------------------------------------------------------------------------------------------

def lower_priority(nice: int, sched_idle: bool) -> None:
    """Lower the CPU priority of every thread of this process (on Linux both are per thread; threads started
    later inherit them): `nice` added as os.nice() does, and the SCHED_IDLE policy if asked."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        if nice:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        if sched_idle:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def set_process_name(name: str) -> None:
    """Name this process for ps/top (prctl PR_SET_NAME); nothing where that is not available."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError, TypeError):
        pass


class ChildStart(NamedTuple):
    """What a background child (events, outbound) has once started: its parent's pid (read before the parent
    could be gone), the event SIGTERM sets, and the SIGHUP requests it answers between two commands."""

    parent: int
    stop: threading.Event
    reloads: ReloadRequests


def child_startup(settings: Settings, name: str) -> ChildStart:
    """The start-up every background child shares: metrics inherited (before anything that counts is built), CPU
    priority lowered, the process named `name`, logging, Ctrl-C left to the parent (it turns it into an orderly
    stop), SIGTERM as the stop event, and SIGHUP taken (its default action would end the process; the child is
    spawned with SIGHUP blocked, so one sent while it starts is answered later)."""
    parent = os.getppid()  # read first: once the parent is gone this is someone else
    metrics.inherit(settings)
    lower_priority(settings.events.process_nice, settings.events.process_sched_idle)
    set_process_name(name)
    setup_logging(settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    reloads = ReloadRequests()
    reloads.install()
    return ChildStart(parent, stop, reloads)


def watch_serving(events: Events, parent: int) -> None:
    """Pace the applier by the serving processes' CPU (the parent, `resolver serve`, and its other children: the
    gRPC workers), and answer a full inbox with the delay of the applier's current pace."""
    applier = events.applier
    assert applier is not None
    applier.watch(pace.serving_processes(parent, os.getpid()))
    pacer = applier.pacer
    events.ingestor.drain_rate = lambda: pacer.current


def child_main(settings: Settings, conn: Connection) -> None:
    """The events process: lower its priority, open the store, serve webhooks and apply until told to stop."""
    parent, stop, reloads = child_startup(settings, PROCESS_NAME)
    try:
        service = build_service(settings)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    events = build_events(service)
    try:
        events.start(applier=True)
    except Exception as exc:
        events.stop()
        service.close()
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    watch_serving(events, parent)
    ev = settings.events
    log.info("events process %d: webhooks on %s, applier %g-%g/s (the ceiling while the serving processes use at "
             "most %g%% of the CPU, the floor from %g%%) in batches of %d, nice +%d%s", os.getpid(),
             ev.http_listen or "(none)", pace.floor(ev), ev.rate_per_s, 100 * ev.idle_cpu, 100 * ev.busy_cpu, ev.batch,
             ev.process_nice, ", SCHED_IDLE" if ev.process_sched_idle else "")
    conn.send(("ready", events.http_port))
    while not stop.is_set():
        if reloads.taken():
            reload_all(events.reloadables)
        try:
            if not conn.poll(0.2):
                continue
            command = conn.recv()
        except (EOFError, OSError):
            log.warning("events process: the serving process is gone; stopping")
            break
        if command == "stop_intake":
            events.stop_intake()
            send_quietly(conn, ("intake_stopped", 0))
        elif command == "stop":
            break
    events.stop()  # intake (if still open), queued admissions, then the applier after its current batch
    service.close()
    send_quietly(conn, ("stopped", 0))


def send_quietly(conn: Connection, message: tuple[str, Any]) -> None:
    try:
        conn.send(message)
    except OSError:
        pass  # the parent is gone


# -- the parent's side ----------------------------------------------------------------------------------------

class EventsProcess:
    """The supervised events process of one `resolver serve`: `launch()`, `wait_ready()`, `check()` (from the
    parent's main loop: restarts a dead child), `stop_intake()`, then `stop()`.

    Another child speaking the same pipe protocol is supervised the same way by a subclass naming its `target`,
    `process_name`, `what` (for the log) and `while_down` (what waits while it is down): the outbound deliverer
    (resolver.outbound.process).
    """

    target: Callable[[Settings, Connection], None] = staticmethod(child_main)
    process_name = PROCESS_NAME
    what = "the events process"
    while_down = ("webhooks are refused and the inbox is not applied until the server restarts",
                  "accepted events wait in the inbox")

    def __init__(self, settings: Settings, ctx: Any, *, start_timeout: float = START_TIMEOUT_S,
                 max_restarts: int = MAX_RESTARTS) -> None:
        self.settings = settings
        self.ctx = ctx
        self.start_timeout = start_timeout
        self.restarts = 0  # over the server's life
        self._policy = Restarts(max_restarts)
        self._proc: Any = None
        self._conn: Connection | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def launch(self) -> None:
        """Spawn the child (returns at once; `wait_ready()` waits for it)."""
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=self.target, args=(self.settings, child_end), name=self.process_name)
        with sighup_blocked():  # the child takes SIGHUP once its handler is in place
            proc.start()
        child_end.close()  # only the child holds it now: its exit reads as EOF here
        self._proc, self._conn = proc, parent_end
        self._policy.started()

    def wait_ready(self) -> int:
        """Wait until the child serves; its webhook port (0: none). EventsProcessError if it failed to start."""
        assert self._proc is not None and self._conn is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise EventsProcessError(f"{self.what} did not start within {self.start_timeout:g}s")
            try:
                if not self._conn.poll(min(left, 0.5)):
                    continue
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                raise EventsProcessError(f"{self.what} exited (code {self._proc.exitcode}) before it was "
                                         "ready") from None
            if kind == "ready":
                log.info("%s started (pid %d)", self.what, self._proc.pid)
                return int(value)
            if kind == "failed":
                self._proc.join(5)
                raise EventsProcessError(str(value))

    def check(self) -> None:
        """Restart the child if it died (bounded: `max_restarts` in a row, with a growing backoff; resolver.restarts
        decides)."""
        policy = self._policy
        if self._stopping or policy.gave_up or self._proc is None:
            return
        if not policy.pending:
            if self._proc.is_alive():
                policy.running()
                return
            self._proc.join(1)
            self._close_conn()
            delay = policy.died()
            if delay is None:
                log.error("%s (pid %d) died (exit code %s) %d times in a row: not restarting it; %s", self.what,
                          self._proc.pid, self._proc.exitcode, policy.failures, self.while_down[0])
                return
            log.error("%s (pid %d) died unexpectedly (exit code %s); restarting it in %gs (restart %d of at most %d "
                      "in a row); %s", self.what, self._proc.pid, self._proc.exitcode, delay, policy.failures,
                      policy.max_restarts, self.while_down[1])
            return
        if not policy.due():
            return
        self.restarts += 1
        try:
            self.launch()
            self.wait_ready()
        except (EventsProcessError, OSError) as exc:
            log.error("restarting %s failed: %s", self.what, exc)  # counted as a death on the next check

    def reload(self) -> None:
        """Forward SIGHUP to the child: it re-reads what it keeps from files (a child being restarted reads them
        as it starts)."""
        if self._proc is not None and self._proc.is_alive() and self._proc.pid is not None:
            os.kill(self._proc.pid, signal.SIGHUP)

    def stop_intake(self, timeout: float = 10.0) -> None:
        """Ask the child to stop accepting webhooks, and wait until it has (bounded)."""
        self._stopping = True
        if not self._alive():
            return
        assert self._conn is not None
        try:
            self._conn.send("stop_intake")
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0 and self._conn.poll(left):
                if self._conn.recv()[0] == "intake_stopped":
                    return
        except (EOFError, OSError):
            return
        log.warning("%s did not confirm that intake stopped within %gs", self.what, timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """Stop the child: its applier finishes the current batch; its exit code (0: clean)."""
        self._stopping = True
        if self._proc is None:
            return 0
        if self._alive():
            assert self._conn is not None
            try:
                self._conn.send("stop")
            except OSError:
                pass
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.error("%s did not stop within %gs; terminating it", self.what, timeout)
                self._kill()
        else:
            self._proc.join(1)
        self._close_conn()
        code = self._proc.exitcode
        return int(code) if code is not None else 1

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self._conn is not None

    def _kill(self) -> None:
        assert self._proc is not None
        self._proc.terminate()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
