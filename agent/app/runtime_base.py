"""What every executor of the runtime shares: how it reports back.

An executor carries out one family of actions (QMP commands, owner requests,
timers, key material, control replies) and turns each outcome into an event
for the flow that asked, through ``feed``: the runtime's queue, so a flow
still sees one event at a time in the order the event log records them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from agent.core.events import Event

Feed = Callable[[str, Event], None]


class Executor(Protocol):
    """The lifetime hooks the runtime calls on every executor."""

    def forget(self, flow_id: str) -> None:
        """The flow finished: drop whatever this executor holds for it."""

    def close(self) -> None:
        """The runtime stops: drop everything, wake every waiter."""


class FlowTasks:
    """Background tasks grouped by flow, so a finished flow's can be cancelled."""

    def __init__(self) -> None:
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}

    def spawn(self, flow_id: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        tasks = self._tasks.setdefault(flow_id, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def cancel(self, flow_id: str | None = None) -> None:
        """Cancel the flow's tasks (every flow's when ``flow_id`` is None)."""
        for fid in [f for f in self._tasks if flow_id is None or f == flow_id]:
            for task in self._tasks.pop(fid):
                task.cancel()

    def all(self) -> set[asyncio.Task[None]]:
        return {t for tasks in self._tasks.values() for t in tasks}
