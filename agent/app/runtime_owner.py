"""The runtime's owner executor: ``PostOwner`` in, an owner event out.

The shell (:mod:`agent.io.owner_client`) only moves bytes and returns
``(status, body)``; the core (:mod:`agent.core.owner_answer`) decides what
that answer means.  This executor joins the two, off the dispatcher: the
request runs as a task of the flow that asked, cancelled when it finishes.
"""

from __future__ import annotations

from typing import Any

from agent.app.runtime_base import Feed, FlowTasks
from agent.core.actions import PostOwner
from agent.core.events import OwnerAnswered, OwnerFailed, OwnerRefused, OwnerReleased

OwnerEvent = OwnerReleased | OwnerRefused | OwnerFailed | OwnerAnswered


async def ask_owner(owner_url: str, path: str, body: dict[str, Any], timeout: float) -> OwnerEvent:
    """POST to the guest owner; its answer as the core event it means.

    No answer at all (refused connection, timeout, not HTTP) is ``OwnerFailed``
    with a one-line reason; every wait is bounded by ``timeout``."""
    from agent.core.owner_answer import one_line, parse_other_answer, parse_owner_answer
    from agent.io.http import HttpError
    from agent.io.owner_client import post_owner
    from agent.protocol.owner import SECRET_PATH

    try:
        status, answer = await post_owner(owner_url, path, body, timeout)
    except HttpError as exc:
        return OwnerFailed(reason=f"owner unreachable: {one_line(str(exc))}")
    if path != SECRET_PATH:  # /v1/mh/*: the flow that asked parses the body
        return parse_other_answer(path, status, answer)
    return parse_owner_answer(status, answer)


class OwnerExecutor:
    def __init__(self, feed: Feed, owner_url: str | None, timeout: float) -> None:
        self._feed = feed
        self.owner_url = owner_url
        self.timeout = timeout
        self.tasks = FlowTasks()

    def run(self, flow_id: str, action: PostOwner) -> None:
        self.tasks.spawn(flow_id, self._post(flow_id, action))

    async def _post(self, flow_id: str, action: PostOwner) -> None:
        if not self.owner_url:
            self._feed(flow_id, OwnerFailed("no owner_url configured"))
            return
        event = await ask_owner(self.owner_url, action.path, action.body, self.timeout)
        self._feed(flow_id, event)

    def forget(self, flow_id: str) -> None:
        self.tasks.cancel(flow_id)

    def close(self) -> None:
        self.tasks.cancel()
