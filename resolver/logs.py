"""Logging set-up of every resolver process (the CLI, each serving worker, the events and outbound processes).

One handler on stderr, in the blueprint's `[logging] format`: "json" (one object per line: ts, level, logger,
pid, msg, every `extra=` field of the record, exc), "text" (a human line, extras appended as key=value), or
"auto" (json unless stderr is a terminal).

The masking choke point is `RedactingFilter`, on that handler: every record passes through it once, before any
formatter (or any other handler installed after it on the root logger) sees it. It renders the message with its
arguments, every extra value and the traceback through resolver.redact (phones and emails masked by the one
masking rule, tokens and secrets replaced; `[logging] payload = "none"`: not even the masked forms) and leaves
nothing raw on the record: msg becomes the redacted text, args and exc_info are dropped, exc_text holds the
redacted traceback. It runs per emitted line (a record below the level is never made), not per call.
Call sites still log no payload: external ids and attribute values have no shape a pattern could find.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any, NamedTuple, TextIO

import orjson

from resolver.config import Settings
from resolver.redact import Payload, may_hold, redact, redact_exception

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# The attributes every LogRecord has; anything else on a record came from `extra=` (taskName: Python 3.12+).
# LogRecord.__init__ sets the standard ones first, so only the keys after them are looked at.
_BORN_WITH = len(logging.makeLogRecord({}).__dict__)
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_DONE = "_redacted"  # set on a record once the filter has passed it (a second pass would mask masked forms)
_FIELDS = "_extras"  # the extras the filter left on a record, kept for the formatter (not found again per line)


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given with `extra=` (none starts with "_")."""
    d = record.__dict__
    return {k: d[k] for k in list(d)[_BORN_WITH:] if k not in _STANDARD and k[0] != "_"}


def _extras_for_format(record: logging.LogRecord) -> dict[str, Any]:
    """`extras(record)`, as the filter left them if it passed the record."""
    fields = record.__dict__.get(_FIELDS)
    return extras(record) if fields is None else fields


class RedactingFilter(logging.Filter):
    """The choke point: rewrites each record in place so that no handler or formatter can see a raw value."""

    def __init__(self, payload: Payload = "masked") -> None:
        super().__init__()
        self.payload = payload

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get(_DONE):
            return True
        payload = self.payload
        try:
            text = record.getMessage()
        except Exception:  # a call site's bad arguments must not lose the line, nor show them
            text = f"{record.msg} [the log arguments did not format]"
        record.args = None
        fields = extras(record)
        record.msg, cleaned = self.cleaned(text, fields)
        if cleaned is not fields:
            record.__dict__.update(cleaned)
            fields = cleaned
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_exception(record.exc_info, payload)  # type: ignore[arg-type]
        elif record.exc_text:  # rendered by someone before us: the text is all there is
            record.exc_text = redact(record.exc_text, payload)
        record.exc_info = None
        record.__dict__[_DONE] = True
        record.__dict__[_FIELDS] = fields
        return True

    def cleaned(self, text: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A line's message and extras as this filter leaves them: `fields` itself when nothing needed masking."""
        payload = self.payload
        # One quick test over the message and every text extra together: the common line (an access line) holds
        # nothing to mask and pays for that test only, not for the pattern run over each text.
        texts = [text]
        plain = True
        for value in fields.values():
            if isinstance(value, str):
                texts.append(value)
            elif not (value is None or isinstance(value, bool | int | float)):
                plain = False
        if plain and not may_hold("\n".join(texts), payload):
            return text, fields
        return redact(text, payload), {key: self._clean(value) for key, value in fields.items()}

    def _clean(self, value: Any) -> Any:
        """An extra value as JSON can hold it, every string in it redacted."""
        if isinstance(value, str):
            return redact(value, self.payload)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {redact(str(k), self.payload): self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(v) for v in value]
        return redact(str(value), self.payload)


_second: tuple[int, str] = (-1, "")  # the last second formatted (replaced whole: safe between threads)


def msecs_of(created: float) -> float:
    """A record's `msecs` for the time `created`, as LogRecord.__init__ computes it."""
    return int((created - int(created)) * 1000) + 0.0


def _utc(created: float, msecs: float) -> str:
    global _second
    whole = int(created)
    known, text = _second
    if whole != known:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC, ms), level, logger, pid, msg, the extras, exc (a traceback),
    stack (stack_info). An extra never replaces one of the first five."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:  # only without the filter (it renders the traceback itself)
            record.exc_text = self.formatException(record.exc_info)
        return json_line(record.created, record.msecs, record.levelname, record.name, record.process,  # type: ignore[arg-type]
                         record.getMessage(), _extras_for_format(record), record.exc_text,
                         self.formatStack(record.stack_info) if record.stack_info else None)


def json_line(created: float, msecs: float, level: str, logger: str, pid: int, msg: str, fields: dict[str, Any],
              exc: str | None = None, stack: str | None = None) -> str:
    """One JSON line (JsonFormatter's and the direct writer's): the core fields, then `fields` (none replaces one)."""
    out: dict[str, Any] = {"ts": _utc(created, msecs), "level": level, "logger": logger, "pid": pid, "msg": msg}
    for key, value in fields.items():
        out.setdefault(key, value)
    if exc:
        out["exc"] = exc
    if stack:
        out["stack"] = stack
    return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(logging.Formatter):
    """FORMAT, then the extras as ` key=value`, then the traceback."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _extras_for_format(record)
        return line + "".join(f" {k}={v}" for k, v in fields.items()) if fields else line


def resolve_format(fmt: str, stream: TextIO | None) -> str:
    """`[logging] format` for this process: "auto" is "text" on a terminal, else "json"."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


class DirectLine(NamedTuple):
    """A line for `DirectWriter`: what a record of it would carry (its time, rendered message and extras)."""

    created: float
    msg: str
    fields: dict[str, Any]


class DirectWriter:
    """Writes INFO lines of one logger straight to its one JSON handler (as `make_handler` makes them), as that
    handler writes their records, byte for byte: the same masking (RedactingFilter.cleaned), the same JSON line
    (`json_line`), the same stream, one write per batch. What it skips is logging's per-record machinery (a
    LogRecord, the walk to the handler, its lock, one write per line), which cost a serving process most of an
    access line (bench/README.md, "The access log"). `direct_writer` gives one only when records would reach that
    handler alone. tests/unit/test_logs.py holds both ways to the same bytes."""

    def __init__(self, logger: logging.Logger, handler: logging.StreamHandler[TextIO],
                 masking: RedactingFilter) -> None:
        self.name = logger.name
        self.handler = handler
        self.masking = masking

    def write(self, lines: list[DirectLine]) -> None:
        pid, name, cleaned = os.getpid(), self.name, self.masking.cleaned
        text = []
        for line in lines:
            msg, fields = cleaned(line.msg, line.fields)
            created = line.created
            text.append(json_line(created, msecs_of(created), "INFO", name, pid, msg, fields))
        handler = self.handler
        text.append("")
        handler.acquire()
        try:
            handler.stream.write(handler.terminator.join(text))
            handler.flush()
        finally:
            handler.release()


def direct_writer(logger: logging.Logger) -> DirectWriter | None:
    """A DirectWriter for `logger`'s INFO lines when a record of it would reach exactly one handler, a JSON one as
    `make_handler` makes them (the one `setup_logging` installs), with nothing else on the way (no filter of the
    logger's, no other handler up its hierarchy); otherwise None, and the records go through logging."""
    if logger.disabled or logger.filters:
        return None
    handlers: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        handlers.extend(h for h in node.handlers if logging.INFO >= h.level)
        node = node.parent if node.propagate else None
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if not (type(handler) is logging.StreamHandler and type(handler.formatter) is JsonFormatter
            and len(handler.filters) == 1 and type(handler.filters[0]) is RedactingFilter):
        return None
    return DirectWriter(logger, handler, handler.filters[0])


def make_handler(fmt: str, payload: Payload, stream: TextIO | None = None) -> logging.Handler:
    """The handler `setup_logging` installs: `stream` (default stderr), the choke point, the chosen formatter."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(payload))
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, stream) == "json" else TextFormatter())
    return handler


_INSTALLED = "_resolver_handler"
_UNCAUGHT = logging.getLogger("resolver.uncaught")


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """sys.excepthook: an exception nobody caught is logged (through the filter), not printed raw."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    _UNCAUGHT.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: the same for a thread's exception."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    _UNCAUGHT.critical("uncaught exception in thread %s", name,
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def setup_logging(settings: Settings) -> None:
    """Log to stderr at the blueprint's `[logging] level`, in its `format`, through the masking filter; uncaught
    exceptions (sys.excepthook, threading.excepthook) are logged through it too, not printed raw.

    A second call replaces the handler the first installed. A root logger that already has handlers of someone
    else's (a test run's log capture) is left alone, as logging.basicConfig leaves it: such a caller attaches
    `RedactingFilter` to its own handler. A handler added after ours receives records already redacted.
    """
    cfg = settings.logging
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _INSTALLED, False)]
    if len(ours) != len(root.handlers):
        return
    for old in ours:
        root.removeHandler(old)
        old.close()
    handler = make_handler(cfg.format, "none" if cfg.payload == "none" else "masked")
    setattr(handler, _INSTALLED, True)
    root.addHandler(handler)
    root.setLevel(getattr(logging, cfg.level))
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
