"""Control requests waiting for a flow's ``ControlReply``.

A verb asks for a request id and a future (``new_request``), feeds the flow
a ``ControlRequest`` with that id, and awaits the future; the flow's
``ControlReply`` resolves it.  When the runtime stops, every waiter gets 503
rather than hanging.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.core.actions import ControlReply

Answer = tuple[int, dict[str, Any]]


class ControlReplies:
    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[Answer]] = {}
        self._req = 0

    def new_request(self) -> tuple[str, asyncio.Future[Answer]]:
        self._req += 1
        req = f"ctl-{self._req}"
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting[req] = future
        return req, future

    def run(self, flow_id: str, action: ControlReply) -> None:
        future = self.waiting.pop(action.req, None)
        if future is not None and not future.done():
            future.set_result((action.status, action.body))

    def forget(self, flow_id: str) -> None:
        """Nothing per flow: a request outlives a flow that never answered it
        only until the verb's own deadline or ``close``."""

    def close(self) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_result((503, {"error": "the agent is stopping"}))
