"""Turn the guest owner's HTTP answer into a typed event.

Pure: the shell hands over the status and the decoded JSON; this decides
whether it is a release, a refusal, or malformed.  Malformed answers are
never "probably fine": anything off is :class:`OwnerFailed`, and the flow
then refuses to resume the VM.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from agent.core.events import OwnerFailed, OwnerRefused, OwnerReleased
from agent.common.secret import Secret
from agent.sev.sizes import PACKET_HEADER_LEN

MAX_SECRET_LEN = 64 * 1024  # far above OVMF's 4 KiB secret area; refuses absurd answers
MAX_ERROR_LEN = 200


def _b64(text: Any) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def one_line(text: str, limit: int = MAX_ERROR_LEN) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_owner_answer(status: int, body: Any) -> OwnerReleased | OwnerRefused | OwnerFailed:
    if status != 200:
        if 400 <= status <= 599:
            error = body.get("error") if isinstance(body, dict) else None
            if not isinstance(error, str) or not error.strip():
                error = f"HTTP {status}"
            return OwnerRefused(status=status, error=one_line(error))
        return OwnerFailed(reason=f"malformed owner answer: unexpected HTTP status {status}")
    if not isinstance(body, dict):
        return OwnerFailed(reason="malformed owner answer: body is not a JSON object")
    header = _b64(body.get("packet_header"))
    if header is None:
        return OwnerFailed(reason="malformed owner answer: packet_header is not base64")
    if len(header) != PACKET_HEADER_LEN:
        return OwnerFailed(reason=f"malformed owner answer: packet_header is {len(header)} bytes, "
                                  f"expected {PACKET_HEADER_LEN}")
    secret = _b64(body.get("secret"))
    if secret is None:
        return OwnerFailed(reason="malformed owner answer: secret is not base64")
    if not secret:
        return OwnerFailed(reason="malformed owner answer: secret is empty")
    if len(secret) > MAX_SECRET_LEN:
        return OwnerFailed(reason=f"malformed owner answer: secret is {len(secret)} bytes, "
                                  f"more than {MAX_SECRET_LEN}")
    gpa = body.get("gpa")
    if gpa is not None and (isinstance(gpa, bool) or not isinstance(gpa, int)
                            or not 0 <= gpa < 1 << 64):
        return OwnerFailed(reason="malformed owner answer: gpa is not an unsigned 64-bit integer")
    return OwnerReleased(packet_header=base64.b64encode(header).decode(),
                         secret=Secret(secret), gpa=gpa)
