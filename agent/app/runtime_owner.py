"""The runtime's owner executor: ``PostOwner`` in, an owner event out.

The shell (:mod:`agent.io.owner_client`) only moves bytes and returns
``(status, body)``; the core (:mod:`agent.core.owner_answer`) decides what
that answer means.  This executor joins the two, off the dispatcher: the
request runs as a task of the flow that asked, cancelled when it finishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.app.runtime_base import Feed, FlowTasks
from agent.core.actions import PostOwner
from agent.core.events import OwnerAnswered, OwnerFailed, OwnerRefused, OwnerReleased

OwnerEvent = OwnerReleased | OwnerRefused | OwnerFailed | OwnerAnswered


async def ask_owner(
    owner_url: str | Sequence[str], path: str, body: dict[str, Any], timeout: float, log: Any = None
) -> OwnerEvent:
    """POST to the guest owner(s); the final answer as the core event it means.

    Connection errors, 5xx and 429 are tried again, across every URL, until
    ``timeout`` runs out (:func:`agent.io.owner_client.post_owner_retrying`);
    the flow sees only the last answer, so a replay of the event log is
    exact.  Each retry is a log line (URL, attempt, status or reason), never
    an event.  No answer at all is ``OwnerFailed`` with a one-line reason."""
    from agent.core.owner_answer import one_line, parse_other_answer, parse_owner_answer
    from agent.io.http import HttpError
    from agent.io.owner_client import post_owner_retrying
    from agent.protocol.owner import SECRET_PATH

    def on_retry(url: str, attempt: int, what: str, pause: float) -> None:
        if log is not None:
            log.warning(
                "guest owner gave no answer, trying again",
                url=url,
                attempt=attempt,
                error=what,
                pause_s=round(pause, 3),
            )

    try:
        answer = await post_owner_retrying(owner_url, path, body, timeout, on_retry=on_retry)
    except HttpError as exc:
        return OwnerFailed(reason=f"owner unreachable: {one_line(str(exc))}")
    if answer.attempts > 1 and log is not None:
        log.info("guest owner answered", url=answer.url, status=answer.status, attempts=answer.attempts)
    if path != SECRET_PATH:  # /v1/mh/*: the flow that asked parses the body
        return parse_other_answer(path, answer.status, answer.body)
    return parse_owner_answer(answer.status, answer.body)


class OwnerExecutor:
    def __init__(self, feed: Feed, owner_url: str | Sequence[str] | None, timeout: float, log: Any = None) -> None:
        self._feed = feed
        self.owner_url = owner_url
        self.timeout = timeout
        self.log = log
        self.tasks = FlowTasks()

    def run(self, flow_id: str, action: PostOwner) -> None:
        self.tasks.spawn(flow_id, self._post(flow_id, action))

    async def _post(self, flow_id: str, action: PostOwner) -> None:
        if not self.owner_url:
            self._feed(flow_id, OwnerFailed("no owner_url configured"))
            return
        event = await ask_owner(self.owner_url, action.path, action.body, self.timeout, self.log)
        self._feed(flow_id, event)

    def forget(self, flow_id: str) -> None:
        self.tasks.cancel(flow_id)

    def close(self) -> None:
        self.tasks.cancel()
