"""Turn the guest owner's HTTP answer into a typed event.

Pure: the shell hands over the status and the decoded JSON; this decides
whether it is a release, a refusal, or malformed.  Malformed answers are
never "probably fine": anything off is :class:`OwnerFailed`, and the flow
then refuses to resume the VM.  The answer's format is
:class:`agent.protocol.owner.SecretAnswer`, the one the owner builds.
"""

from __future__ import annotations

from typing import Any

from agent.core.events import OwnerAnswered, OwnerFailed, OwnerRefused, OwnerReleased
from agent.protocol.base import MAX_ERROR_LEN, one_line
from agent.protocol.owner import MAX_SECRET_LEN, ProtocolError, SecretAnswer, refusal_reason

__all__ = ["parse_owner_answer", "parse_other_answer", "one_line", "MAX_SECRET_LEN", "MAX_ERROR_LEN"]


def parse_owner_answer(status: int, body: Any) -> OwnerReleased | OwnerRefused | OwnerFailed:
    if status != 200:
        if 400 <= status <= 599:
            return OwnerRefused(status=status, error=refusal_reason(status, body))
        return OwnerFailed(reason=f"malformed owner answer: unexpected HTTP status {status}")
    try:
        answer = SecretAnswer.parse(body)
    except ProtocolError as exc:
        return OwnerFailed(reason=f"malformed owner answer: {exc.reason}")
    return OwnerReleased(packet_header=answer.packet_header_b64(), secret=answer.secret, gpa=answer.gpa)


def parse_other_answer(path: str, status: int, body: Any) -> OwnerAnswered | OwnerRefused | OwnerFailed:
    """An answer on another path (``/v1/mh/*``): a 200 with a JSON object, a refusal, or malformed."""
    if status != 200:
        if 400 <= status <= 599:
            return OwnerRefused(status=status, error=refusal_reason(status, body))
        return OwnerFailed(reason=f"malformed owner answer: unexpected HTTP status {status}")
    if not isinstance(body, dict):
        return OwnerFailed(reason="malformed owner answer: body is not a JSON object")
    return OwnerAnswered(path=path, body=body)
