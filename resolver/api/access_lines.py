"""The access log's lines, made in batches by a thread of their own instead of inside each call.

Why: an access line made inside the call (a LogRecord, the masking filter, the JSON formatter, a write to stderr)
cost a serving process up to ~100 µs of CPU per call, about a fifth of a Resolve's server CPU (bench/README.md,
"The access log"), though the same lines made one after another in a loop cost a fraction of that. So
the call only queues its fields (`add`: one deque append), and every `INTERVAL` seconds a daemon thread turns what
was queued into records of the logger "resolver.access", with the call's end as their time, and hands them to
logging exactly as a line logged in the call: the same handlers, the same masking filter (resolver.logs, the one
choke point), the same format. Where those records would reach only the JSON handler `resolver serve` installs,
the thread writes the same bytes through resolver.logs.DirectWriter instead (the same masking and line, without
logging's per-record machinery: a serving process's usual case). What changes is only when a line is written: up
to `INTERVAL` after its call, and at exit (atexit: a serving process that stops normally writes every line it
queued). A process killed with SIGKILL loses the lines of its last `INTERVAL`. The queue is bounded
(`MAX_QUEUED`): past it, a call writes its own line as before, so a stuck log slows the calls down rather than
growing memory or dropping lines.

The thread releases the GIL every `LINES_PER_SLICE` lines, so a call waiting for it waits for a few lines at most,
never for a whole batch. A forked child (the importer's workers) drops what its parent had queued: those lines
are the parent's to write.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from typing import Any, NamedTuple

from resolver.logs import DirectLine, direct_writer, msecs_of

INTERVAL = 0.05  # seconds between two batches
LINES_PER_SLICE = 32  # lines made between two releases of the GIL (the served switch interval bounds a hold too)
MAX_QUEUED = 100_000  # lines waiting at most (~20 MB); past it a call writes its own line (`AccessLines.add`)
MESSAGE = "%s %s %.3f ms"  # rpc, code, duration


class Line(NamedTuple):
    """One call's access line, as queued."""

    at: float  # time.time() at the call's end
    rpc: str
    code: str
    duration_ms: float
    peer: str
    request_id: str
    caller: str

    def message(self) -> str:
        return MESSAGE % (self.rpc, self.code, self.duration_ms)

    def extra(self) -> dict[str, Any]:
        """The record's `extra` fields (FIELDS)."""
        return dict(zip(FIELDS, self[1:], strict=True))


FIELDS = Line._fields[1:]  # the record's `extra` fields, in this order (the time is the record's own)


class AccessLines:
    """The queue of one process's access lines for `logger`, and the thread that writes them."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL, max_queued: int = MAX_QUEUED) -> None:
        self.logger = logger
        self.interval = interval
        self.max_queued = max_queued
        self._queue: deque[Line] = deque()
        self._started = False  # this process's writer thread runs (reset in a forked child: threads do not follow)
        self._start_lock = threading.Lock()
        self._template: dict[str, Any] | None = None  # the fields every line's record starts from (`_record`)
        os.register_at_fork(after_in_child=self._forked)

    def add(self, line: Line) -> None:
        """Queue one line (thread-safe); it is written within `interval` seconds. With `max_queued` lines already
        waiting (the log's stream is stuck or slower than the calls), the line is written here, in the call, as
        before the queue: the calls slow down with the log instead of memory growing or lines being dropped."""
        if len(self._queue) >= self.max_queued:
            self._write(line)
            return
        self._queue.append(line)
        if not self._started:
            self._start()

    def flush(self) -> None:
        """Write every line queued so far, in this thread (the writer thread, atexit, or a test)."""
        queue = self._queue
        direct = direct_writer(self.logger)
        while queue:
            lines: list[Line] = []
            try:
                while len(lines) < LINES_PER_SLICE:
                    lines.append(queue.popleft())
            except IndexError:  # the queue is empty (or another thread flushed the last ones meanwhile)
                pass
            if direct is not None:
                direct.write([DirectLine(line.at, line.message(), line.extra()) for line in lines])
            else:
                for line in lines:
                    self._write(line)
            if queue:
                time.sleep(0)  # let a waiting call thread have the GIL

    def _write(self, line: Line) -> None:
        self.logger.handle(self._record(line))

    def _record(self, line: Line) -> logging.LogRecord:
        """The line's record: a copy of a record the logger made in this process (level, logger, source, process
        and thread: this thread's, as for a record made here), with the call's time, the message rendered (no
        arguments) and the fields as `extra=` gives them. Copying a dict costs a fraction of LogRecord.__init__,
        which looks up the time, thread, process and their names again for every line."""
        template = self._template
        if template is None:
            logger = self.logger
            template = self._template = logger.makeRecord(logger.name, logging.INFO, __file__, 0, MESSAGE, (),
                                                          None).__dict__.copy()
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        at = line.at
        fields["created"] = at
        fields["msecs"] = msecs_of(at)
        # as LogRecord.__init__ has it: since logging was loaded, which the template's own two times give
        fields["relativeCreated"] = template["relativeCreated"] + (at - template["created"]) * 1000
        fields["msg"] = line.message()
        fields.update(line.extra())
        return record

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
            threading.Thread(target=self._run, name="access-log", daemon=True).start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # a broken handler must not end the thread: logging reports its own errors
                logging.getLogger(__name__).exception("access lines could not be written")

    def _forked(self) -> None:
        self._queue.clear()
        self._template = None  # its process id is the parent's
        self._started = False
        self._start_lock = threading.Lock()
