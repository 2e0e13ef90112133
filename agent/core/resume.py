"""Run a VM that the launcher stopped with ``-S`` only to set things up.

``keyagent launch`` adds ``-S`` so that nothing runs before the agent is
attached.  Without SEV (whose flow resumes the VM itself after the secret)
and when the user did not ask for ``-S``, this flow sends ``cont`` once the
monitor answers::

    -> query-status ; <- prelaunch/paused -> cont ; Finish(0)
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.actions import Action, Log, SendQmp
from agent.core.events import Event, QmpDisconnected, QmpError, QmpReply, Start
from agent.core.flow import Flow


@dataclass(frozen=True)
class ResumeParams:
    vm: str


class ResumeFlow(Flow[ResumeParams]):
    kind = "resume"
    Params = ResumeParams

    def __init__(self, params: ResumeParams) -> None:
        super().__init__(params)
        self.pending: str | None = None
        self.step = "idle"

    def _send(self, command: str) -> list[Action]:
        self.step = command
        self.pending = self.next_tag(command)
        return [SendQmp(self.pending, command, {})]

    def handle(self, event: Event) -> list[Action]:
        if self.finished is not None:
            return []
        if isinstance(event, Start):
            return self._send("query-status")
        if isinstance(event, QmpDisconnected):
            return self.finish(1, "QMP connection lost before the VM was started")
        if not isinstance(event, (QmpReply, QmpError)) or event.tag != self.pending:
            return []
        if isinstance(event, QmpError):
            return [
                Log("error", f"{self.step} failed: {event.desc}"),
                *self.finish(1, f"{self.step} failed: {event.desc}"),
            ]
        if self.step == "query-status":
            status = event.result.get("status") if isinstance(event.result, dict) else None
            if status == "running":
                return self.finish(0, "already running")
            return self._send("cont")
        return [Log("info", "VM started"), *self.finish(0, "VM started")]
