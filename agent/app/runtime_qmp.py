"""The runtime's QMP executor: commands out, replies and events in.

``SendQmp`` runs as a task (QEMU answers in its own time); its reply or
error comes back to the flow as ``QmpReply``/``QmpError``.  A lost monitor
is not reported per command: ``watch`` tells every active flow once
(``QmpDisconnected``), and from then on commands are not sent at all.
Command tasks are not cancelled when their flow finishes: a flow's last
command (``quit``, ``stop``) must still reach QEMU; ``drain`` waits for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from agent.app.runtime_base import Feed
from agent.common.secret import Secret
from agent.core.actions import SendQmp
from agent.core.events import QmpDisconnected, QmpError, QmpEvent, QmpReply
from agent.io import qmp as qmpio
from agent.io.monitor import Monitor

#: commands whose Secret arguments QEMU consumes: once it has answered (or
#: the monitor is gone), no flow reads them again, so they are wiped here
#: rather than left for the collector (the launch flow sends the owner's
#: secret table once and never keeps it; a replay never runs this executor,
#: so its shared placeholder secrets are not touched)
CONSUMES_SECRETS = frozenset({"sev-inject-launch-secret"})


class FlowView(Protocol):
    """What the executor reads of a flow: is it running, which events it wants."""

    @property
    def finished(self) -> Any: ...

    @property
    def wanted_events(self) -> Iterable[str]: ...


class QmpExecutor:
    def __init__(self, monitor: Monitor | None, feed: Feed, log: Any) -> None:
        self.monitor: Monitor | None = monitor
        self._feed = feed
        self._log = log
        self.gone: str | None = None  # why the monitor went away, once it has
        self.tasks: set[asyncio.Task[None]] = set()
        self._hold: asyncio.Future[Any] | None = None  # hold_until

    def hold_until(self, done: asyncio.Future[Any]) -> None:
        """Commands sent from now on reach QEMU only once ``done`` is (the
        launch note's fsync: ``cont`` after it); those sent before do not wait.
        ``done`` must end by itself (it has its own deadline)."""
        self._hold = done
        done.add_done_callback(self._released)

    def _released(self, done: asyncio.Future[Any]) -> None:
        if self._hold is done:
            self._hold = None

    def run(self, flow_id: str, action: SendQmp) -> None:
        task = asyncio.ensure_future(self._send(flow_id, action, self._hold))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, flow_id: str, action: SendQmp, hold: asyncio.Future[Any] | None = None) -> None:
        self._log.debug("qmp command", flow=flow_id, command=action.command)
        try:
            if hold is not None:
                await asyncio.wait({hold})  # its outcome is its own (a warning); in order, FIFO
            await self._execute(flow_id, action)
        finally:
            if action.command in CONSUMES_SECRETS:
                for value in action.args.values():
                    if isinstance(value, Secret):
                        value.wipe()

    async def _execute(self, flow_id: str, action: SendQmp) -> None:
        if self.monitor is None or self.gone is not None:
            return  # the disconnect event reaches the flow on its own
        try:
            result = await self.monitor.execute(action.command, action.args)
        except qmpio.QmpCommandError as exc:
            self._feed(flow_id, QmpError(action.tag, exc.error_class, exc.desc))
        except qmpio.MonitorGone:
            pass  # the disconnect watcher tells every flow
        else:
            self._feed(flow_id, QmpReply(action.tag, result))

    async def command_outside_flows(self, command: str) -> None:
        """Best effort, no reply: refused by QEMU or lost, it is ignored."""
        if self.monitor is None:
            return
        try:
            await self.monitor.execute(command)
        except (qmpio.QmpCommandError, qmpio.MonitorGone):
            pass

    async def pump_events(self, flows: Callable[[], Mapping[str, FlowView]]) -> None:
        """Hand each monitor event to every running flow that wants it."""
        assert self.monitor is not None
        async for msg in self.monitor.events:
            try:
                name = msg.get("event")
                data = msg.get("data")
            except Exception:  # not even a mapping: nothing to tell a flow
                continue
            if not isinstance(name, str):  # no event name (an unhashable one would stop the pump)
                continue
            # QEMU's events carry an object or nothing; anything else is
            # treated as no data rather than allowed to stop the pump (and
            # with it the guard against a VM resumed behind our back).
            data = dict(data) if isinstance(data, dict) else {}
            for flow_id, flow in list(flows().items()):
                if flow.finished is None and name in flow.wanted_events:
                    self._feed(flow_id, QmpEvent(name, data))

    async def watch(self, active: Callable[[], list[str]]) -> str:
        """Wait for the monitor to go; tell every active flow; the reason."""
        assert self.monitor is not None
        reason = await self.monitor.wait_disconnected()
        self.gone = reason
        self._log.info("QMP disconnected", reason=reason)
        for flow_id in active():
            self._feed(flow_id, QmpDisconnected(reason))
        return reason

    async def drain(self, timeout: float) -> None:
        """Let commands already sent (a final ``quit`` or ``stop``) complete."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    def forget(self, flow_id: str) -> None:
        """Nothing: a finished flow's last commands still go to QEMU."""

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
