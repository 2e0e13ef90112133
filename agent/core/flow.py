"""The shape every flow shares (the table of kinds is ``agent.core.registry``).

A flow is a state machine: ``handle(event) -> list[Action]``.  It is built
from JSON parameters (recorded in the event log), so ``keyagent replay
--check`` can make the same flow again and feed it the recorded events.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Generic, TypeVar

from agent.core.actions import Action, ArmTimer, CancelTimer, Finish
from agent.core.events import Event

#: a flow's parameters: a frozen dataclass of JSON values (``Flow.Params``)
P = TypeVar("P")


class Flow(Generic[P]):
    """``Flow[LaunchParams]``: ``self.params`` is typed by the subclass."""

    kind: ClassVar[str]
    #: QMP event names this flow wants; the runtime feeds (and records) only these.
    wanted_events: ClassVar[frozenset[str]] = frozenset()
    #: the dataclass of this flow's parameters
    Params: ClassVar[type[Any]]

    def __init__(self, params: P) -> None:
        self.params = params
        self.finished: Finish | None = None
        self._timers: set[str] = set()
        self._tags = 0

    # -- replay support ------------------------------------------------------
    def params_json(self) -> dict[str, Any]:
        params: Any = self.params  # a dataclass instance (Params)
        return dataclasses.asdict(params)

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> Flow[Any]:
        return cls(cls.Params(**data))

    # -- helpers for subclasses ---------------------------------------------
    def next_tag(self, command: str) -> str:
        self._tags += 1
        return f"{self.kind}:{self._tags}:{command}"

    def arm(self, name: str, seconds: float) -> ArmTimer:
        self._timers.add(name)
        return ArmTimer(name, seconds)

    def finish(self, code: int, reason: str) -> list[Action]:
        """Final actions: cancel every timer this flow may have armed, then Finish.

        The reason is one line whatever QEMU put in an error text it quotes."""
        self.finished = Finish(code, " ".join(reason.splitlines()))
        actions: list[Action] = [CancelTimer(name) for name in sorted(self._timers)]
        actions.append(self.finished)
        return actions

    def handle(self, event: Event) -> list[Action]:  # pragma: no cover - abstract
        raise NotImplementedError
