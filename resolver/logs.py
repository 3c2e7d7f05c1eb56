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
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

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
            record.msg = text
        else:
            record.msg = redact(text, payload)
            fields = {key: self._clean(value) for key, value in fields.items()}
            record.__dict__.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_exception(record.exc_info, payload)  # type: ignore[arg-type]
        elif record.exc_text:  # rendered by someone before us: the text is all there is
            record.exc_text = redact(record.exc_text, payload)
        record.exc_info = None
        record.__dict__[_DONE] = True
        record.__dict__[_FIELDS] = fields
        return True

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
        out: dict[str, Any] = {"ts": _utc(record.created, record.msecs), "level": record.levelname,
                               "logger": record.name, "pid": record.process, "msg": record.getMessage()}
        for key, value in _extras_for_format(record).items():
            out.setdefault(key, value)
        if record.exc_info and not record.exc_text:  # only without the filter (it renders the traceback itself)
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
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
