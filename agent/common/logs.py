"""Structured JSON logs on stderr, with redaction as the last step.

All logging (ours through structlog, third-party libraries through the
standard library, qemu.qmp above all) ends in one handler's stream, and the
raw, hex and base64 forms of every live :class:`Secret` are scrubbed before
a line is written.  Our own code never passes secret bytes to a logger in
the first place; the scrubber is the second wall, for text we do not
control (library DEBUG output, exception messages).

Two paths, one output.  A library's record goes through the standard
library: the handler's :class:`RedactingFilter`, then structlog's
``ProcessorFormatter`` (level, UTC timestamp, logger name, the scrub,
JSON).  Our own lines (``get_logger``) take structlog's own path: a bound
logger that drops a line below the level before doing anything, the same
processors (level, timestamp, the scrub, JSON), and the rendered line is
written to the same handler's stream under the handler's lock.  Under
``keyagent host`` a hundred VMs log about twelve lines each as they launch,
and the standard library's part of a line (a ``LogRecord``, the caller's
frame looked up, the record copied by the formatter) was most of its cost.
The lines are the same, key for key: bound fields, call fields, ``event``,
``level``, ``timestamp``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

from agent.common.secret import Secret, live_secret_scrubber

__all__ = ["setup_logging", "get_logger", "scrub", "RedactingFilter"]

REDACTED = "<redacted>"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def scrub(text: str) -> str:
    """Replace every form of every live secret in ``text`` (a cost that does
    not grow with the number of live secrets: :class:`SecretForms`)."""
    return live_secret_scrubber().scrub(text, REDACTED)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Secret):
        return value.to_log()
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v) for v in value]
    return value


def _redact_processor(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    return {k: _scrub_value(v) for k, v in event_dict.items()}


class RedactingFilter(logging.Filter):
    """Scrubs a stdlib record's final message (args are merged first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):  # structlog's rendered event dict
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the bare template
            message = str(record.msg)
        record.msg = scrub(message)
        record.args = None
        if record.exc_info:
            # Tracebacks may carry sent messages; keep the type and a scrubbed text.
            exc = record.exc_info[1]
            record.msg = f"{record.msg}: {type(exc).__name__}: {scrub(str(exc))}"
            record.exc_info = None
            record.exc_text = None
        return True


# -- our own lines ---------------------------------------------------------------
# What setup_logging set, read at every line rather than kept by a logger:
# loggers are cached at their first use (module-level ones, a sidecar's), and
# a later setup_logging (another level or stream) must reach them, as it
# reaches the standard library's loggers.
_LEVEL = logging.INFO
_HANDLER: logging.StreamHandler[TextIO] | None = None


def _json_fallback(value: Any) -> Any:
    """What structlog's JSONRenderer makes of a value JSON has no form for
    (its ``__structlog__()``, else its ``repr``), scrubbed: the scrub ran on
    the values before JSON, and a repr made here had escaped it."""
    try:
        return _scrub_value(value.__structlog__())
    except AttributeError:
        return scrub(repr(value))


#: ``json.dumps(..., default=...)`` as structlog's JSONRenderer calls it,
#: without making an encoder per line (the same defaults: the same output)
_ENCODE = json.JSONEncoder(default=_json_fallback).encode


def _render(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    """The scrub and the JSON of one of our lines, as the handler's formatter
    makes a library's.  A line that cannot be rendered is reported on stderr
    and dropped, as the standard library's handler does with a record."""
    try:
        scrubber = live_secret_scrubber()  # once a line, not once a value
        out: dict[str, Any] = {}
        for key, value in event_dict.items():
            kind = type(value)
            if kind is str:
                out[key] = scrubber.scrub(value, REDACTED)
            elif value is None or kind is int or kind is bool:
                out[key] = value
            else:
                out[key] = _scrub_value(value)
        return _ENCODE(out)
    except Exception as exc:
        _report(exc)
        raise structlog.DropEvent from None


def _report(exc: Exception) -> None:
    """A line that could not be rendered or written: a note on stderr (the
    type, and the message scrubbed), never the line itself."""
    if logging.raiseExceptions and sys.stderr:
        try:
            sys.stderr.write(f"--- Logging error ---\n{type(exc).__name__}: {scrub(str(exc))}\n")
        except Exception:  # noqa: S110 - stderr itself is gone: nothing left to tell
            pass


#: (a second since the epoch, its date and time of day): formatted once a second
_SECOND: tuple[int, str] = (-1, "")


def iso_utc(ns: int) -> str:
    """``ns`` (nanoseconds since the epoch) as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes it, i.e.
    ``datetime.now(timezone.utc).isoformat()`` with ``Z`` for ``+00:00``:
    microseconds (floored, as ``datetime.now`` takes them), and no fraction
    at all when they are 0.  The date and time of day are formatted once a
    second, not once a line."""
    global _SECOND
    second, micro = divmod(ns // 1000, 1_000_000)
    cached = _SECOND
    if cached[0] != second:
        cached = _SECOND = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micro:06d}Z" if micro else f"{cached[1]}Z"


def _timestamp(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["timestamp"] = iso_utc(time.time_ns())
    return event_dict


class _Lines:
    """The logger structlog hands our rendered lines to: the stream of the
    handler setup_logging installed, under that handler's lock (so a line
    never interleaves with a library's), flushed as the handler flushes."""

    __slots__ = ()

    def msg(self, line: str) -> None:
        handler = _HANDLER
        if handler is None:
            return
        try:
            with handler.lock:  # type: ignore[union-attr]  # createLock() made it
                handler.stream.write(line + handler.terminator)
                handler.flush()
        except RecursionError:
            raise
        except Exception as exc:
            _report(exc)

    debug = info = warning = warn = error = exception = critical = fatal = msg


_LINES = _Lines()


def _lines_factory(*_args: Any) -> _Lines:
    return _LINES


def _method(level: int, name: str) -> Callable[..., Any]:
    """One level's method: below the level, a comparison and nothing else."""

    def method(self: structlog.BoundLoggerBase, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if level < _LEVEL:
            return None
        if name == "exception":
            kw.setdefault("exc_info", True)
        if args:
            kw["positional_args"] = args
        return self._proxy_to_logger(name, event, **kw)

    return method


class _BoundLogger(structlog.BoundLoggerBase):
    """The methods of ``structlog.stdlib.BoundLogger`` that the agent calls,
    with the level checked first (the standard library's path timestamped a
    debug line before dropping it); positional arguments are kept in the
    event dict as ``positional_args``, as there."""

    debug = _method(logging.DEBUG, "debug")
    info = _method(logging.INFO, "info")
    warning = warn = _method(logging.WARNING, "warning")
    error = _method(logging.ERROR, "error")
    exception = _method(logging.ERROR, "exception")
    critical = fatal = _method(logging.CRITICAL, "critical")


_configured = False


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on ``stream`` (stderr), at ``level``, for us and for libraries."""
    global _configured, _LEVEL, _HANDLER
    stream = stream or sys.stderr
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning, error)")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redact_processor,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(numeric)
    # asyncio's debug chatter is not ours to show.
    logging.getLogger("asyncio").setLevel(max(numeric, logging.INFO))
    _HANDLER, _LEVEL = handler, numeric

    structlog.configure(
        processors=[*shared, _render],
        logger_factory=_lines_factory,
        wrapper_class=_BoundLogger,
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str = "keyagent", **bound: Any) -> Any:
    if not _configured:
        setup_logging("info")
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)
