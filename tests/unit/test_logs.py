"""The logging choke point (resolver.logs, resolver.redact): JSON lines, extras, and no raw phone, email, token,
secret or quoted value in any line, whatever part of the record carries it (contract §8)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import resolver.logs
from resolver.api.status import to_rpc_status
from resolver.config import LoggingSettings, Settings
from resolver.errors import EventRejected, FieldViolation, InvalidInput
from resolver.events import dlq, signatures
from resolver.logs import RedactingFilter, make_handler, resolve_format, setup_logging
from resolver.normalize import Kind, mask, mask_value
from resolver.redact import MARKER, redact, redact_exception_text

PHONE = "+14155559888"
PHONE_NATIONAL = "(415) 555-9876"
EMAIL = "jane.canary@example.com"
EXTERNAL_ID = "CRM-CANARY-0042"
SENSITIVE = "Canary Sensitive Value"
TOKEN = "rsv_Zq8CanaryTokenValue_0123456789abcdef"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BEARER = "Bearer opaque.canary-token+value="
CANARIES = (PHONE, "4155559876", EMAIL, EXTERNAL_ID, SENSITIVE, TOKEN, SECRET, "opaque.canary-token")
PHONE_MASKED = mask(Kind.PHONE, PHONE)
EMAIL_MASKED = mask(Kind.EMAIL, EMAIL)


def _logger(name: str, fmt: str, payload: str = "masked") -> tuple[logging.Logger, io.StringIO]:
    """A logger of its own writing through the handler setup_logging installs, into a buffer."""
    buf = io.StringIO()
    log = logging.getLogger(f"test.logs.{name}.{fmt}.{payload}")
    log.handlers = [make_handler(fmt, payload, buf)]  # type: ignore[arg-type]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log, buf


def _log_everything(log: logging.Logger) -> None:
    """Each canary through each road into a line: the message, its arguments, extras, and exception texts."""
    log.info(f"upsert of {PHONE} and {EMAIL}, auth {BEARER}, token {TOKEN}, secret {SECRET}")
    log.warning("call %s at %s (national %s), token %s, secret %s", PHONE, EMAIL, PHONE_NATIONAL, TOKEN, SECRET)
    log.info("access", extra={"request_id": PHONE, "caller": EMAIL, "peer": f"ipv4:127.0.0.1:5000 {TOKEN}",
                              "fields": {"email": EMAIL, "nested": [PHONE, {"k": SECRET}]}, "count": 3,
                              "obj": ValueError(f"bad {EMAIL}")})
    try:
        try:
            {}[EXTERNAL_ID]
        except KeyError as exc:
            raise ValueError(f"no customer for {EMAIL} / {PHONE}: {SENSITIVE!r} {TOKEN}") from exc
    except ValueError:
        log.exception("Upsert failed with an internal error")
    try:
        raise RuntimeError({"phone": PHONE, "external_id": EXTERNAL_ID, "name": SENSITIVE, "secret": SECRET})
    except RuntimeError:
        log.error("internal error", exc_info=True)


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger as a fresh process has it: no handler (pytest's log capture is taken off for the test's
    body), all restored after the test (setup_logging changes the handlers, the level, the exception hooks)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield root
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks


def test_json_lines_parse_with_core_fields_and_extras() -> None:
    log, buf = _logger("fields", "json")
    log.info("Resolve %s in %.1f ms", "OK", 0.84, extra={"rpc": "/resolver.v1.IdentityResolver/Resolve", "code": "OK",
                                                         "duration_ms": 0.84, "peer": "ipv4:127.0.0.1:5000",
                                                         "request_id": "3f2b8c1e-5d6a-4b7c-8d9e-0f1a2b3c4d5e",
                                                         "caller": "ivr", "level": "not the level"})
    line = json.loads(buf.getvalue())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert (line["level"], line["logger"], line["pid"], line["msg"]) == ("INFO", log.name, os.getpid(),
                                                                         "Resolve OK in 0.8 ms")
    assert line["rpc"] == "/resolver.v1.IdentityResolver/Resolve" and line["code"] == "OK"
    assert line["duration_ms"] == 0.84 and line["caller"] == "ivr"
    # uuids, IP addresses and ports are not phone numbers: kept as they are
    assert line["request_id"] == "3f2b8c1e-5d6a-4b7c-8d9e-0f1a2b3c4d5e" and line["peer"] == "ipv4:127.0.0.1:5000"
    assert "exc" not in line


def test_every_line_is_one_json_object_even_with_a_traceback() -> None:
    log, buf = _logger("lines", "json")
    _log_everything(log)
    lines = [json.loads(text) for text in buf.getvalue().splitlines()]
    assert len(lines) == 5
    assert [x["level"] for x in lines] == ["INFO", "WARNING", "INFO", "ERROR", "ERROR"]
    exc = lines[3]["exc"]
    assert exc.startswith("Traceback (most recent call last):") and "direct cause" in exc
    assert "KeyError: 'CR***42'" in exc and "ValueError: no customer for" in exc
    assert lines[2]["count"] == 3 and lines[2]["fields"]["nested"][0] == PHONE_MASKED


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_canary_reaches_a_line_raw(fmt: str) -> None:
    log, buf = _logger("canaries", fmt)
    _log_everything(log)
    out = buf.getvalue()
    for canary in CANARIES:
        assert canary not in out, canary
    # masked the project's way (resolver.normalize.mask / mask_value), not dropped
    assert PHONE_MASKED in out and EMAIL_MASKED in out and mask(Kind.PHONE, "4155559876") in out
    assert mask_value(EXTERNAL_ID) in out and mask_value(SENSITIVE) in out
    assert "[token]" in out and "[secret]" in out and "Bearer [token]" in out


def test_text_lines_keep_todays_format_and_append_extras() -> None:
    log, buf = _logger("text", "text")
    log.info("hello %s", "world", extra={"rpc": "Resolve", "request_id": PHONE})
    line = buf.getvalue().rstrip("\n")
    assert re.fullmatch(rf"\S+ \S+ INFO {re.escape(log.name)}\[{os.getpid()}\]: hello world "
                        rf"rpc=Resolve request_id={re.escape(PHONE_MASKED)}", line)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_payload_none_drops_even_the_masked_forms(fmt: str) -> None:
    log, buf = _logger("none", fmt, "none")
    _log_everything(log)
    log.info("already masked by its call site: %s %s %s", PHONE_MASKED, EMAIL_MASKED, mask_value(EXTERNAL_ID))
    out = buf.getvalue()
    for text in (*CANARIES, PHONE_MASKED, EMAIL_MASKED, mask_value(EXTERNAL_ID), mask_value(SENSITIVE), "***"):
        assert text not in out, text
    assert MARKER in out and "[token]" in out


def test_a_line_whose_arguments_do_not_format_is_kept_and_masked() -> None:
    log, buf = _logger("badargs", "json")
    log.info(f"count for {EMAIL}: %d", "not a number")
    line = json.loads(buf.getvalue())
    assert "did not format" in line["msg"] and EMAIL not in line["msg"] and EMAIL_MASKED in line["msg"]


def test_auto_is_json_unless_stderr_is_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("text", io.StringIO()) == "text" and resolve_format("json", Tty()) == "json"


def test_setup_logging_installs_one_masking_handler(
        root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    root_logging.handlers[:] = []  # as in a fresh process
    err = io.StringIO()  # not a terminal: "auto" means json
    monkeypatch.setattr(sys, "stderr", err)
    settings = Settings(logging=LoggingSettings(level="DEBUG", format="auto", payload="masked"))
    setup_logging(settings)
    setup_logging(settings)  # replaces its handler, never doubles the lines
    assert len(root_logging.handlers) == 1 and root_logging.level == logging.DEBUG
    assert any(isinstance(f, RedactingFilter) for f in root_logging.handlers[0].filters)
    root_logging.addHandler(caplog.handler)  # a handler added later sees the records already redacted
    logging.getLogger("resolver.test").debug("phone %s", PHONE, extra={"request_id": EMAIL})
    line = json.loads(err.getvalue())
    assert line["msg"] == f"phone {PHONE_MASKED}" and line["request_id"] == EMAIL_MASKED
    record = caplog.records[-1]
    assert record.getMessage() == f"phone {PHONE_MASKED}" and record.request_id == EMAIL_MASKED


def test_a_traceback_is_masked_for_every_handler(root_logging: logging.Logger, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    root_logging.handlers[:] = []  # as in a fresh process
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    setup_logging(Settings(logging=LoggingSettings(level="INFO", format="text")))
    root_logging.addHandler(caplog.handler)
    try:
        raise KeyError(EXTERNAL_ID)
    except KeyError:
        logging.getLogger("resolver.api.servicer").exception("%s failed with an internal error", "Upsert")
    record = caplog.records[-1]
    assert record.exc_info is None and record.exc_text is not None  # the raw exception is not left on the record
    assert EXTERNAL_ID not in record.exc_text and "KeyError: 'CR***42'" in record.exc_text
    written = sys.stderr.getvalue()  # type: ignore[attr-defined]
    assert EXTERNAL_ID not in written and "KeyError: 'CR***42'" in written and "Traceback" in written


def test_redact_masks_shapes_and_leaves_other_numbers() -> None:
    for phone in (PHONE, "+1 (415) 555-9888", "+44 20 7946 0958", "tel:+442079460958", "415.555.9888", "4155559888"):
        assert phone not in redact(f"x {phone} y"), phone
    assert redact(f"<{PHONE}>") == f"<{PHONE_MASKED}>" and redact(f"mailto:{EMAIL}") == f"mailto:{EMAIL_MASKED}"
    assert redact("authorization: Bearer eyJhbGciOi.J9.abc") == "authorization: Bearer [token]"
    assert redact("BEARER 0123456789abcdef") == "BEARER [token]"
    prose = "this method needs a bearer token: send the metadata `authorization: Bearer TOKEN`"
    assert redact(prose) == prose
    kept = ("uuid 12345678-1234-1234-1234-123456789012", "at 1764489600.123", "ip 10.20.30.40:50051", "v1.2.3",
            "2026-11-30T08:00:00Z", "sequence 42, 4096 characters", "masked +141******88 j***@example.com")
    for text in kept:
        assert redact(text) == text
    long_word = "a" * 20000  # the email pattern starts only where a local part starts: linear, not quadratic
    assert redact(long_word) == long_word


def test_exception_text_masks_every_quoted_value() -> None:
    text = redact_exception_text(f"ValueError: {{'id': '{EXTERNAL_ID}', 'phone': '{PHONE}', 'mail': \"{EMAIL}\"}}")
    assert EXTERNAL_ID not in text and PHONE not in text and EMAIL not in text
    assert f"'{mask_value(EXTERNAL_ID)}'" in text and f"'{PHONE_MASKED}'" in text and f'"{EMAIL_MASKED}"' in text


def test_error_messages_to_clients_pass_the_same_choke_point() -> None:
    status = to_rpc_status(InvalidInput([FieldViolation(f"attributes.{EMAIL}", f"bad value {PHONE}", "INVALID")],
                                        f"invalid request for {EMAIL}"))
    text = status.SerializeToString()
    for canary in (PHONE.encode(), EMAIL.encode()):
        assert canary not in text
    assert EMAIL_MASKED in status.message


def test_dead_letter_views_mask_through_the_same_rules() -> None:
    exc = EventRejected(f"the event does not match the schema: data must not contain {{'{EMAIL}'}} properties",
                        reason="SCHEMA_INVALID", violations=[FieldViolation("source_system", f"says {PHONE!r}")])
    assert EMAIL not in dlq._detail(exc) and PHONE not in dlq._detail(exc)
    body = json.dumps({"event_type": PHONE, "source_system": EMAIL, "record_id": EXTERNAL_ID, EMAIL: 1,
                       "change_set": {PHONE: {"new_value": SENSITIVE}}}).encode()
    shown = dlq.masked_payload(body)
    for canary in (PHONE, EMAIL, EXTERNAL_ID, SENSITIVE):
        assert canary not in shown
    headers = signatures.redact({"webhook-signature": "v1,abc", "x-custom": TOKEN, "user-agent": EMAIL})
    assert headers == {"webhook-signature": "[redacted]", "x-custom": "[token]", "user-agent": EMAIL_MASKED}


def test_uncaught_exceptions_are_logged_through_the_filter(root_logging: logging.Logger,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root_logging.handlers[:] = []  # as in a fresh process
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    setup_logging(Settings(logging=LoggingSettings(format="json")))

    def crash() -> None:
        raise ValueError(f"cannot handle {PHONE} / {EXTERNAL_ID!r}")

    thread = threading.Thread(target=crash, name="canary-thread")
    thread.start()
    thread.join(timeout=10)
    try:
        raise LookupError(EMAIL)
    except LookupError:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    lines = [json.loads(text) for text in err.getvalue().splitlines()]
    assert [(x["logger"], x["level"]) for x in lines] == [("resolver.uncaught", "CRITICAL")] * 2
    assert lines[0]["msg"] == "uncaught exception in thread canary-thread"
    assert f"ValueError: cannot handle {PHONE_MASKED} / 'CR***42'" in lines[0]["exc"]
    assert f"LookupError: {EMAIL_MASKED}" in lines[1]["exc"]
    for canary in (PHONE, EXTERNAL_ID, EMAIL):
        assert canary not in err.getvalue()


def test_a_root_logger_configured_by_someone_else_is_left_alone(root_logging: logging.Logger) -> None:
    root_logging.handlers[:] = []  # as in a fresh process
    theirs = logging.NullHandler()
    root_logging.addHandler(theirs)
    root_logging.setLevel(logging.WARNING)
    setup_logging(Settings(logging=LoggingSettings(level="DEBUG", format="json")))
    assert root_logging.handlers == [theirs] and root_logging.level == logging.WARNING


def test_timestamps_are_the_records_own_across_seconds_and_threads() -> None:
    """The formatter keeps the last second it formatted: every line still carries its own record's time, in any
    order of times and from several threads at once."""
    times = [1_700_000_000.0 + s + ms / 1000 for s in (0, 0, 1, 86_400, 1, 0) for ms in (0, 1, 999)] * 200
    expected = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(_msecs(t)):03d}Z" for t in times]
    assert expected[9] == "2023-11-15T22:13:20.000Z"
    found: list[list[str]] = []

    def format_all() -> None:
        found.append([resolver.logs._utc(t, _msecs(t)) for t in times])

    threads = [threading.Thread(target=format_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [expected] * 4


def _msecs(t: float) -> float:
    return (t - int(t)) * 1000


LINES_WITH_AND_WITHOUT_PII = [
    ("Resolve", "OK", 0.512, "ipv4:127.0.0.1:45678", "3f2b8c1e-5d6a", "ivr"),
    ("Upsert", "INVALID_ARGUMENT", 12.25, "ipv6:[::1]:5000", f"call from {PHONE}", "crm"),
    ("Resolve", "OK", 1.0, "ipv4:10.0.0.1:1", EMAIL, f"caller {TOKEN}"),
    ("GetCustomer", "NOT_FOUND", 0.001, "unix:/tmp/s", "r-é-ü-😀", ""),
]


@pytest.mark.parametrize("payload", ["masked", "none"])
def test_access_lines_written_directly_are_the_bytes_logging_writes(payload: str) -> None:
    """resolver.api.access_lines writes through resolver.logs.DirectWriter where only the serving JSON handler would
    see its records: the same lines through logging (another handler present) must give the same bytes."""
    from resolver.api.access_lines import AccessLines, Line

    logger = logging.getLogger(f"test.direct.{payload}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    buf = io.StringIO()
    logger.addHandler(make_handler("json", payload, buf))  # type: ignore[arg-type]
    lines = AccessLines(logger, interval=3600)
    queued = [Line(1_700_000_000.0 + i * 0.3337, *fields) for i, fields in enumerate(LINES_WITH_AND_WITHOUT_PII * 5)]
    try:
        assert resolver.logs.direct_writer(logger) is not None
        for line in queued:
            lines.add(line)
        lines.flush()
        direct = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        other = logging.NullHandler()
        logger.addHandler(other)  # a second handler: the records go through logging
        assert resolver.logs.direct_writer(logger) is None
        for line in queued:
            lines.add(line)
        lines.flush()
        assert buf.getvalue() == direct
    finally:
        logger.handlers.clear()
    rows = [json.loads(text) for text in direct.splitlines()]
    assert len(rows) == len(queued) and rows[0]["msg"] == "Resolve OK 0.512 ms" and rows[0]["caller"] == "ivr"
    assert not any(canary in direct for canary in CANARIES)


def test_the_direct_writer_is_only_for_a_lone_json_handler() -> None:
    logger = logging.getLogger("test.direct.gate")
    logger.propagate = False
    try:
        logger.addHandler(make_handler("json", "masked", io.StringIO()))
        assert resolver.logs.direct_writer(logger) is not None
        logger.addFilter(logging.Filter("elsewhere"))  # a filter of the logger's: logging must apply it
        assert resolver.logs.direct_writer(logger) is None
        logger.filters.clear()
        logger.disabled = True
        assert resolver.logs.direct_writer(logger) is None
        logger.disabled = False
        logger.handlers.clear()
        logger.addHandler(make_handler("text", "masked", io.StringIO()))  # text lines: through logging
        assert resolver.logs.direct_writer(logger) is None
        logger.handlers.clear()
        quiet = make_handler("json", "masked", io.StringIO())
        quiet.setLevel(logging.WARNING)  # a handler above INFO sees no access line: none to write directly
        logger.addHandler(quiet)
        assert resolver.logs.direct_writer(logger) is None
        logger.propagate = True  # and the root's handlers, whatever they are, would see the records too
        logger.handlers.clear()
        logger.addHandler(make_handler("json", "masked", io.StringIO()))
        assert (resolver.logs.direct_writer(logger) is None) == bool(
            [h for h in logging.getLogger().handlers if logging.INFO >= h.level])
    finally:
        logger.handlers.clear()
        logger.disabled = False
        logger.propagate = True
