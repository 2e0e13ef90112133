"""The agent's side of the guest owner protocol (HTTP + JSON).

This module only moves bytes: it returns the owner's ``(status, body)`` and
raises :class:`agent.io.http.HttpError` when there is no answer.  Which core
event an answer becomes is the core's decision
(:func:`agent.core.owner_answer.parse_owner_answer`), made by the runtime
(:func:`agent.app.runtime.ask_owner`).
"""

from __future__ import annotations

from typing import Any

from agent.io.http import request_json


async def post_owner(owner_url: str, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    """POST ``body`` as JSON to the owner; its status and decoded JSON body."""
    url = owner_url.rstrip("/") + path
    return await request_json("POST", url, body, timeout=timeout)
