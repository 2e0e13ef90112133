"""Fakes for the runtime's executors: what they feed, the monitor, the log, a flow."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from agent.common.errors import MonitorGone, QmpCommandError
from agent.core.actions import Action
from agent.core.flow import Flow


class Fed(list):
    """The feed an executor reports to: ``(flow_id, event)`` pairs, in order."""

    def __call__(self, flow_id: str, event: Any) -> None:
        self.append((flow_id, event))

    def events(self) -> list[Any]:
        return [e for _, e in self]


class QuietLog:
    """A structlog-shaped logger that keeps what it is told."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str):
        if level not in ("debug", "info", "warning", "error"):
            raise AttributeError(level)
        return lambda message, **fields: self.lines.append((level, message, fields))


class EventQueue:
    """An async iterator of monitor events that ends when told to."""

    def __init__(self) -> None:
        self._q: asyncio.Queue = asyncio.Queue()

    def put(self, msg: Any) -> None:
        self._q.put_nowait(msg)

    def end(self) -> None:
        self._q.put_nowait(StopAsyncIteration)

    def __aiter__(self):
        return self

    async def __anext__(self):
        msg = await self._q.get()
        if msg is StopAsyncIteration:
            raise StopAsyncIteration
        return msg


class FakeMonitor:
    """Answers from a table: command -> result, or an exception to raise."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.answers = answers or {}
        self.sent: list[tuple[str, Any]] = []
        self.events = EventQueue()
        self.gone = asyncio.get_running_loop().create_future()
        self.hold: asyncio.Event | None = None  # set: commands wait for it

    async def execute(self, command: str, args: Any = None) -> Any:
        self.sent.append((command, args))
        if self.hold is not None:
            await self.hold.wait()
        answer = self.answers.get(command, {})
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def wait_disconnected(self) -> str:
        return await self.gone

    def disconnect(self, reason: str) -> None:
        self.gone.set_result(reason)


COMMAND_FAILED = QmpCommandError("GenericError", "no such thing")
LOST = MonitorGone("QMP connection lost")


@dataclass(frozen=True)
class NoParams:
    pass


class ScriptedFlow(Flow):
    """A flow that answers each event with the actions queued for it."""

    kind = "scripted"
    wanted_events = frozenset({"RESUME"})

    def __init__(self, *scripts: list[Action]) -> None:
        super().__init__(NoParams())
        self.scripts = list(scripts)
        self.seen: list[Any] = []

    def handle(self, event: Any) -> list[Action]:
        self.seen.append(event)
        actions = self.scripts.pop(0) if self.scripts else []
        for a in actions:
            if type(a).__name__ == "Finish":
                self.finished = a
        return actions
