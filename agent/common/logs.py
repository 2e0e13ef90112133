"""Structured JSON logs on stderr, with redaction as the last step.

All logging (ours through :func:`get_logger`, third-party libraries through
the standard library, qemu.qmp above all) ends in one handler whose filter
scrubs the raw, hex and base64 forms of every live :class:`Secret` before
a line is written.  Our own code never passes secret bytes to a logger in
the first place; the scrubber is the second wall, for text we do not
control (library DEBUG output, exception messages).

The lines are the ones structlog's JSON renderer wrote (bound values, then
the call's, then ``event``, ``level``, ``timestamp``; ``logger`` for a
library's record), but made here on the standard library alone: every
sidecar imports this module, and ``import structlog`` loads all of
structlog (and ``rich`` and its friends when they happen to be installed),
about a third of the sidecar's start-up and 5 MB of its RSS.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from agent.common.secret import Secret, live_secret_forms

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
    """Replace every form of every live secret in ``text``."""
    for form in live_secret_forms():
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, Secret):
        return value.to_log()
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v) for v in value]
    return value


def _json_fallback(obj: Any) -> Any:
    """What JSON cannot carry: its ``__structlog__()`` if it has one, else its repr."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


_UTC = datetime.UTC


class JsonFormatter(logging.Formatter):
    """One JSON object per record, every value scrubbed.

    Our records carry their event dict as ``record.msg`` (see
    :class:`BoundLogger`); a library's record becomes ``{"event": message,
    "level", "timestamp", "logger"}``.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, _UTC).isoformat().replace("+00:00", "Z")
        level = record.levelname.lower()
        msg = record.msg
        if isinstance(msg, dict):
            event = dict(msg)
            event["level"] = level
            event["timestamp"] = stamp
        else:
            event = {"event": record.getMessage(), "level": level, "timestamp": stamp, "logger": record.name}
        return json.dumps({k: _scrub_value(v) for k, v in event.items()}, default=_json_fallback)


class BoundLogger:
    """The part of structlog's bound logger the agent uses: ``bind`` and one
    method per level, each taking an event name and its fields.  A record is
    built only when the standard library's logger would emit it."""

    __slots__ = ("_logger", "_context")

    def __init__(self, logger: logging.Logger, context: dict[str, Any]) -> None:
        self._logger = logger
        self._context = context

    def bind(self, **fields: Any) -> BoundLogger:
        return BoundLogger(self._logger, {**self._context, **fields})

    def new(self, **fields: Any) -> BoundLogger:
        return BoundLogger(self._logger, dict(fields))

    def unbind(self, *keys: str) -> BoundLogger:
        return BoundLogger(self._logger, {k: v for k, v in self._context.items() if k not in keys})

    def _emit(self, level: int, event: str | None, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger._log(level, {**self._context, **fields, "event": event}, ())

    def debug(self, event: str | None = None, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str | None = None, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    msg = info

    def warning(self, event: str | None = None, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    warn = warning

    def error(self, event: str | None = None, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str | None = None, **fields: Any) -> None:
        self._emit(logging.ERROR, event, {"exc_info": True, **fields})

    def critical(self, event: str | None = None, **fields: Any) -> None:
        self._emit(logging.CRITICAL, event, fields)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (the standard library's name)
        return self._logger.isEnabledFor(level)


class RedactingFilter(logging.Filter):
    """Scrubs a stdlib record's final message (args are merged first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):  # our event dict (BoundLogger): scrubbed by the formatter
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


_configured = False


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on ``stream`` (stderr), at ``level``, for us and for libraries."""
    global _configured
    stream = stream or sys.stderr
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning, error)")

    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(numeric)
    # asyncio's debug chatter is not ours to show.
    logging.getLogger("asyncio").setLevel(max(numeric, logging.INFO))
    _configured = True


def get_logger(name: str = "keyagent", **bound: Any) -> Any:
    if not _configured:
        setup_logging("info")
    return BoundLogger(logging.getLogger(name), bound)
