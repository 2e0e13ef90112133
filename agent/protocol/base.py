"""What every protocol module shares: the parse error and strict base64."""

from __future__ import annotations

import base64
import binascii
from typing import Any

MAX_ERROR_LEN = 200


class ProtocolError(ValueError):
    """A message that does not follow its protocol (one line, no secret).

    ``partial`` holds the fields parsed before the fault, so that a
    refusal can still say which VM or policy a bad request named.
    """

    def __init__(self, reason: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial: dict[str, Any] = dict(partial or {})


def b64decode(text: object) -> bytes | None:
    """Strict base64 of a JSON string; None for anything else."""
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def one_line(text: object, limit: int = MAX_ERROR_LEN) -> str:
    """A peer's text made safe for one log line: whitespace folded, length capped."""
    folded = " ".join(str(text).split())
    return folded if len(folded) <= limit else folded[: limit - 3] + "..."


def is_uint(value: object) -> bool:
    """A JSON integer (not a boolean) that is not negative."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
