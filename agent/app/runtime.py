"""The shell around the sans-IO flows: feeds events, carries out actions.

One dispatcher task takes ``(flow_id, event)`` pairs from a queue, records
the event, asks the flow for its actions, records each action and hands it
to the executor that owns its type (``handlers``: action type -> handler;
an executor with several action types dispatches them with ``match`` and
``assert_never``, so a new action is a type error until it is handled).
Everything that takes time (a QMP command, an owner request, a timer) runs
on its own and comes back as another event through the same queue, so a
flow sees one event at a time, in the order the log records them, and
``keyagent replay --check`` can reproduce its actions exactly.

The executors, each in its own module and tested alone against fakes:

=================  ===========================================  ==================
executor           actions                                      module
=================  ===========================================  ==================
``qmp``            ``SendQmp`` (+ monitor events, disconnect)   ``runtime_qmp``
``owner``          ``PostOwner``                                ``runtime_owner``
``timers``         ``ArmTimer``, ``CancelTimer``                ``runtime_timers``
``keys``           ``WriteKeyDir``, ``RemoveKeyDir``,           ``runtime_keys``
                   ``KeyringAdd``, ``KeyringDrop``
``control``        ``ControlReply``                             ``runtime_control``
the runtime        ``Log``, ``Finish``, ``NoteLaunched``        here
=================  ===========================================  ==================
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from agent.app.eventlog import EventLog
from agent.app.runtime_base import Executor
from agent.app.runtime_control import Answer, ControlReplies
from agent.app.runtime_keys import KeyStore
from agent.app.runtime_owner import OwnerExecutor, ask_owner
from agent.app.runtime_qmp import QmpExecutor
from agent.app.runtime_timers import TimerExecutor
from agent.common.logs import get_logger
from agent.core.actions import (
    Action,
    ArmTimer,
    CancelTimer,
    ControlReply,
    Finish,
    KeyringAdd,
    KeyringDrop,
    Log,
    NoteLaunched,
    PostOwner,
    RemoveKeyDir,
    SendQmp,
    WriteKeyDir,
)
from agent.core.events import ControlRequest, Event, Start
from agent.core.flow import Flow
from agent.io.monitor import Monitor

__all__ = ["Runtime", "ask_owner", "FinishCallback"]

FinishCallback = Callable[[str, Finish], None]
Handler = Callable[[str, Any], None]


class _Inbox:
    """The dispatcher's queue of ``(flow_id, event)``: what it uses of
    ``asyncio.Queue`` (``put_nowait``, ``get``, ``get_nowait``, ``empty``)
    for its one consumer, without the rest (no bound, no ``join``
    bookkeeping, one waiter instead of a deque of them): every event of
    every VM passes here, 12 per launch under ``keyagent host``.  FIFO, as
    the event log and ``replay --check`` need."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[tuple[str, Event]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: tuple[str, Event]) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # cancelled with its consumer: nobody to wake
                waiter.set_result(None)

    def get_nowait(self) -> tuple[str, Event]:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> tuple[str, Event]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


class Runtime:
    def __init__(
        self,
        *,
        qmp: Monitor | None,
        event_log: EventLog,
        owner_url: str | Sequence[str] | None = None,
        owner_timeout: float = 30.0,
        on_finish: FinishCallback | None = None,
        log: Any = None,
        run_dir: str | None = None,
        metrics: Any = None,
    ) -> None:
        self.event_log = event_log
        self.on_finish = on_finish
        self.log = log or get_logger("keyagent")
        self.run_dir = run_dir
        self.metrics = metrics
        #: ``keyagent host`` (one loop for every VM): where the launch note is
        #: written off the loop (agent.app.offloop.OffLoop); None writes it inline
        self.note_off_loop: Callable[..., asyncio.Future[Any]] | None = None
        self.flows: dict[str, Flow] = {}
        self.results: dict[str, Finish] = {}
        self._queue = _Inbox()
        self._started_at: dict[str, float] = {}
        self._finished: dict[str, asyncio.Event] = {}

        self.qmp_executor = QmpExecutor(qmp, self.feed, self.log)
        self.owner = OwnerExecutor(self.feed, owner_url, owner_timeout, self.log)
        self.timers = TimerExecutor(self.feed)
        self.keys = KeyStore(self.feed, run_dir, self.log)
        self.control = ControlReplies()
        self.executors: tuple[Executor, ...] = (self.keys, self.timers, self.owner, self.control, self.qmp_executor)
        self.handlers: dict[type, Handler] = self._handler_table()

    def _handler_table(self) -> dict[type, Handler]:
        """Action type -> the handler that carries it out (every Action type)."""
        table: dict[type, Handler] = {
            SendQmp: self.qmp_executor.run,
            PostOwner: self.owner.run,
            ArmTimer: self.timers.run,
            CancelTimer: self.timers.run,
            Log: self._log_line,
            Finish: self._finish,
            ControlReply: self.control.run,
            WriteKeyDir: self.keys.run,
            RemoveKeyDir: self.keys.run,
            KeyringAdd: self.keys.run,
            KeyringDrop: self.keys.run,
            NoteLaunched: self._note_launched,
        }
        return table

    # -- what the sidecar, the launcher and the verbs read -----------------------
    @property
    def qmp(self) -> Monitor | None:
        return self.qmp_executor.monitor

    @property
    def qmp_gone(self) -> str | None:
        return self.qmp_executor.gone

    @property
    def owner_url(self) -> str | Sequence[str] | None:
        return self.owner.owner_url

    @property
    def owner_timeout(self) -> float:
        return self.owner.timeout

    @property
    def key_dirs(self) -> dict[tuple[str, str], str]:
        return self.keys.key_dirs

    @property
    def keyring_keys(self) -> dict[tuple[str, str], int]:
        return self.keys.keyring_keys

    @property
    def replies(self) -> dict[str, asyncio.Future[Answer]]:
        return self.control.waiting

    # -- flows ----------------------------------------------------------------
    def start_flow(self, flow_id: str, flow: Flow, first: Event | None = None) -> None:
        """Register and start a flow: ``Start``, or ``first`` (``Adopted`` for
        what a restarted agent takes over, ``agent.app.adopt``)."""
        self.flows[flow_id] = flow
        self.event_log.flow(flow_id, flow)
        self._started_at[flow_id] = asyncio.get_running_loop().time()
        if self.metrics is not None:
            self.metrics.flow_started(flow.kind)
        self.feed(flow_id, Start() if first is None else first)

    async def finished(self, flow_id: str) -> None:
        """Return once the flow has finished."""
        if self.flows[flow_id].finished is not None:
            return
        await self._finished.setdefault(flow_id, asyncio.Event()).wait()

    def feed(self, flow_id: str, event: Event) -> None:
        self._queue.put_nowait((flow_id, event))

    def active(self) -> list[str]:
        return [fid for fid, f in self.flows.items() if f.finished is None]

    def new_request(self) -> tuple[str, asyncio.Future[Answer]]:
        return self.control.new_request()

    async def dispatch(self) -> None:
        """Run forever (until cancelled), one event at a time."""
        while True:
            flow_id, event = await self._queue.get()
            self.step(flow_id, event)

    def step(self, flow_id: str, event: Event) -> None:
        flow = self.flows.get(flow_id)
        if flow is None or flow.finished is not None:
            if isinstance(event, ControlRequest):
                # Raced the flow's end: answer rather than leave the caller hanging.
                self._do(flow_id, ControlReply(event.req, 409, {"error": "that flow has already ended"}))
            return
        self.event_log.event(flow_id, event)
        for action in flow.handle(event):
            self.event_log.action(flow_id, action)
            self._do(flow_id, action)

    # -- actions --------------------------------------------------------------
    def _do(self, flow_id: str, action: Action) -> None:
        handler = self.handlers.get(type(action))
        if handler is None:  # a flow returned something no executor knows
            raise TypeError(f"unknown action {type(action).__name__}")
        handler(flow_id, action)

    def _log_line(self, flow_id: str, action: Log) -> None:
        getattr(self.log, action.level, self.log.info)(action.message, flow=flow_id, **action.fields)

    def _note_launched(self, flow_id: str, action: NoteLaunched) -> None:
        """The launch got its verified secret: a note in the run_dir for the next
        agent (:mod:`agent.app.resume_launch`), durable before ``cont`` is sent.
        Without a run_dir, or if it cannot be written, a restarted agent finds a
        running VM too late to attest: the safe side, so only a warning.

        Where the loop is shared (``note_off_loop``: ``keyagent host``) the
        note is written on a worker thread and every QMP command sent after
        this (``cont``) waits for it; the loop (every other VM) does not.  A
        sidecar's loop has one VM, whose ``cont`` waits for the note either
        way: it writes inline, without a thread pool to import and keep."""
        if self.run_dir is None:
            return
        from agent.app import resume_launch

        off_loop = self.note_off_loop
        if off_loop is None:
            try:
                resume_launch.write_launch_note(self.run_dir, action.measurement)
            except OSError as exc:
                self.log.warning("cannot note the launch in the run_dir", flow=flow_id, error=exc.strerror)
            return

        def told(outcome: asyncio.Future[str | None]) -> None:
            problem = outcome.result()
            if problem is not None:
                self.log.warning("cannot note the launch in the run_dir", flow=flow_id, error=problem)

        outcome = resume_launch.write_launch_note_off_loop(self.run_dir, action.measurement, off_loop)
        outcome.add_done_callback(told)
        self.qmp_executor.hold_until(outcome)

    def _finish(self, flow_id: str, action: Finish) -> None:
        self.results[flow_id] = action
        # Whatever path the flow took, none of its key material, timers or
        # requests outlive it (its last QMP commands still go to QEMU).
        for executor in self.executors:
            executor.forget(flow_id)
        level = "info" if action.code == 0 else "error"
        getattr(self.log, level)("flow finished", flow=flow_id, code=action.code, reason=action.reason)
        self._finished.setdefault(flow_id, asyncio.Event()).set()
        if self.metrics is not None:
            flow = self.flows[flow_id]
            elapsed = asyncio.get_running_loop().time() - self._started_at.get(flow_id, 0.0)
            self.metrics.flow_finished(flow.kind, action.code, elapsed, flow)
        if self.on_finish is not None:
            self.on_finish(flow_id, action)

    # -- QMP events and EOF ----------------------------------------------------
    async def pump_qmp_events(self) -> None:
        await self.qmp_executor.pump_events(lambda: self.flows)

    async def watch_qmp(self) -> str:
        return await self.qmp_executor.watch(self.active)

    async def drain_qmp(self, timeout: float = 5.0) -> None:
        """Let commands already sent (a final ``quit`` or ``stop``) complete."""
        await self.qmp_executor.drain(timeout)

    async def command_outside_flows(self, command: str) -> None:
        """A command no flow asked for (the sidecar's own ``quit``, the
        launcher's ``system_powerdown``): best effort, QEMU's refusal and a lost
        monitor ignored (the disconnect watcher reports the latter)."""
        await self.qmp_executor.command_outside_flows(command)

    def close(self) -> None:
        for executor in self.executors:
            executor.close()
