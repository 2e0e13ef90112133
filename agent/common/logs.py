"""Structured JSON logs on stderr, with redaction as the last step.

All logging (ours through structlog, third-party libraries through the
standard library, qemu.qmp above all) ends in one handler whose filter
scrubs the raw, hex and base64 forms of every live :class:`Secret` before
a line is written.  Our own code never passes secret bytes to a logger in
the first place; the scrubber is the second wall, for text we do not
control (library DEBUG output, exception messages).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
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
    if isinstance(value, Secret):
        return value.to_log()
    if isinstance(value, str):
        return scrub(value)
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


_configured = False


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on ``stream`` (stderr), at ``level``, for us and for libraries."""
    global _configured
    stream = stream or sys.stderr
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning, error)")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str = "keyagent", **bound: Any) -> Any:
    if not _configured:
        setup_logging("info")
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)
