"""The outbound process: the deliverer of `resolver serve`, in a child process of its own (`resolver-outbox`).

Why not a thread of the serving processes: delivery is CPU work (JSON, HMAC, HTTP) on a GIL the Resolve handlers
would share, and there must be one deliverer per data directory. Why not inside the events process: that process
exists only when CRM sources are declared, and its applier is CPU-bound too; on a small machine the two then wait
for one GIL where two processes use two cores, and a crash of one would take the other down. Like the events
process it runs at a lowered CPU priority (`[events] process_nice` and `process_sched_idle`: one setting for the
server's background work), so Resolve is preferred; it is supervised the same way (resolver.events.process:
restarted if it dies, stopped in steps), and it paces itself by the serving processes' CPU as the applier does
(resolver.events.pace). Everything it does is durable in the outbox, so a restart loses nothing.
It takes the SIGHUP the server forwards (resolver.reload) without stopping: it keeps no file that SIGHUP reloads
(its signing secrets are read at start-up).
"""

from __future__ import annotations

import logging
import os
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

from resolver.bootstrap import open_store
from resolver.config import Settings
from resolver.events import pace
from resolver.events.process import EventsProcess, child_startup, send_quietly

log = logging.getLogger("resolver.outbound.process")
PROCESS_NAME = pace.OUTBOUND_PROCESS  # its /proc/PID/comm (15 characters at most)


def _origin(url: str) -> str:
    """scheme://host[:port] of a destination: its path or query may be a credential (a hook URL's secret part)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def child_main(settings: Settings, conn: Connection) -> None:
    """The outbound process: lower its priority, open the store, deliver until told to stop."""
    from resolver.outbound.deliverer import Deliverer

    parent, stop, reloads = child_startup(settings, PROCESS_NAME)
    try:
        store = open_store(settings)
        deliverer = Deliverer(store, settings)
        deliverer.watch(pace.serving_processes(parent, os.getpid()))  # the gRPC side's CPU sets the pace
        deliverer.start()
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    ev = settings.events
    log.info("outbound process %d: delivering to %s; paced %g-%g/s (the ceiling while the serving processes use at "
             "most %g%% of the CPU, the floor from %g%%)", os.getpid(),
             ", ".join(f"{d.name} ({_origin(d.url)})" for d in settings.outbound.values()), pace.floor(ev), ev.rate_per_s,
             100 * ev.idle_cpu, 100 * ev.busy_cpu)
    conn.send(("ready", 0))
    failed = False
    while not stop.is_set():
        if not deliverer.alive:  # it logged why; exit, and the server starts a new process
            failed = True
            break
        if reloads.taken():
            log.info("outbound process: SIGHUP: nothing to reload here (signing secrets are read at start-up)")
        try:
            if not conn.poll(0.2):
                continue
            command = conn.recv()
        except (EOFError, OSError):
            log.warning("outbound process: the serving process is gone; stopping")
            break
        if command == "stop_intake":  # nothing comes in here
            send_quietly(conn, ("intake_stopped", 0))
        elif command == "stop":
            break
    deliverer.stop()  # attempts in flight get a few seconds; what is not acknowledged is sent again later
    store.close()
    send_quietly(conn, ("stopped", 0))
    if failed:
        raise SystemExit(1)


class OutboundProcess(EventsProcess):
    """The supervised outbound process of one `resolver serve` (the events process's supervision)."""

    target = staticmethod(child_main)
    process_name = PROCESS_NAME
    what = "the outbound process"
    while_down = ("nothing is delivered to the CRM until the server restarts; messages wait in the outbox",
                  "messages wait in the outbox")
