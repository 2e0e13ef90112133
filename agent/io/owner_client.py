"""The agent's side of the guest owner protocol (HTTP + JSON).

The answer is parsed by :func:`agent.core.owner_answer.parse_owner_answer`
(pure); this module only moves bytes and turns transport failures into
:class:`OwnerFailed` with a one-line reason.
"""

from __future__ import annotations

from typing import Any

from agent.core.events import OwnerFailed
from agent.core.owner_answer import one_line, parse_owner_answer
from agent.io.http import HttpError, request_json


async def post_owner(owner_url: str, path: str, body: dict[str, Any], timeout: float):
    url = owner_url.rstrip("/") + path
    try:
        status, answer = await request_json("POST", url, body, timeout=timeout)
    except HttpError as exc:
        return OwnerFailed(reason=f"owner unreachable: {one_line(str(exc))}")
    return parse_owner_answer(status, answer)
