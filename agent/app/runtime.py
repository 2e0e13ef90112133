"""The shell around the sans-IO flows: feeds events, carries out actions.

One dispatcher task takes ``(flow_id, event)`` pairs from a queue, records
the event, asks the flow for its actions, records each action and starts
it.  Everything that takes time (a QMP command, an owner request, a timer)
runs on its own and comes back as another event through the same queue, so
a flow sees one event at a time, in the order the log records them, and
``keyagent replay --check`` can reproduce its actions exactly.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from agent.core.actions import (ArmTimer, CancelTimer, ControlReply, Finish, KeyringAdd,
                                KeyringDrop, Log, PostOwner, RemoveKeyDir, SendQmp, WriteKeyDir)
from agent.core.events import (ControlRequest, KeyDirFailed, KeyDirReady, KeyringFailed, KeyringReady,
                               QmpDisconnected, QmpError, QmpEvent, QmpReply)
from agent.common.secret import Secret
from agent.core.flow import Flow
from agent.app.eventlog import EventLog
from agent.io import qmp as qmpio
from agent.io.monitor import Monitor
from agent.common.logs import get_logger

FinishCallback = Callable[[str, Finish], None]


class Runtime:
    def __init__(self, *, qmp: Monitor | None, event_log: EventLog,
                 owner_url: str | None = None, owner_timeout: float = 30.0,
                 on_finish: FinishCallback | None = None, log: Any = None,
                 run_dir: str | None = None, metrics=None) -> None:
        self.qmp = qmp
        self.event_log = event_log
        self.owner_url = owner_url
        self.owner_timeout = owner_timeout
        self.on_finish = on_finish
        self.log = log or get_logger("keyagent")
        self.flows: dict[str, Flow] = {}
        self.results: dict[str, Finish] = {}
        self.qmp_gone: str | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: dict[str, set[asyncio.Task]] = {}
        self._qmp_tasks: set[asyncio.Task] = set()
        self.run_dir = run_dir
        self.metrics = metrics
        self._started_at: dict[str, float] = {}
        # Key directories by (flow, name): removed on RemoveKeyDir and, whatever
        # happened, when the flow finishes or the runtime closes.
        self.key_dirs: dict[tuple[str, str], str] = {}
        # Control requests waiting for a flow's ControlReply.
        self.replies: dict[str, asyncio.Future] = {}
        self._req = 0
        # Keyring keys by (flow, name): dropped on KeyringDrop, on finish, on close.
        self.keyring_keys: dict[tuple[str, str], int] = {}
        self._finished: dict[str, asyncio.Event] = {}

    # -- flows ----------------------------------------------------------------
    def start_flow(self, flow_id: str, flow: Flow) -> None:
        from agent.core.events import Start

        self.flows[flow_id] = flow
        self.event_log.flow(flow_id, flow)
        self._started_at[flow_id] = asyncio.get_running_loop().time()
        if self.metrics is not None:
            self.metrics.flow_started(flow.kind)
        self.feed(flow_id, Start())

    async def finished(self, flow_id: str) -> None:
        """Return once the flow has finished."""
        if self.flows[flow_id].finished is not None:
            return
        await self._finished.setdefault(flow_id, asyncio.Event()).wait()

    def feed(self, flow_id: str, event: Any) -> None:
        self._queue.put_nowait((flow_id, event))

    def active(self) -> list[str]:
        return [fid for fid, f in self.flows.items() if f.finished is None]

    async def dispatch(self) -> None:
        """Run forever (until cancelled), one event at a time."""
        while True:
            flow_id, event = await self._queue.get()
            self.step(flow_id, event)

    def step(self, flow_id: str, event: Any) -> None:
        flow = self.flows.get(flow_id)
        if flow is None or flow.finished is not None:
            if isinstance(event, ControlRequest):
                # Raced the flow's end: answer rather than leave the caller hanging.
                self._do(flow_id, ControlReply(event.req, 409,
                                               {"error": "that flow has already ended"}))
            return
        self.event_log.event(flow_id, event)
        for action in flow.handle(event):
            self.event_log.action(flow_id, action)
            self._do(flow_id, action)

    # -- actions --------------------------------------------------------------
    def _do(self, flow_id: str, action: Any) -> None:
        if isinstance(action, SendQmp):
            task = asyncio.ensure_future(self._send_qmp(flow_id, action))
            self._qmp_tasks.add(task)
            task.add_done_callback(self._qmp_tasks.discard)
        elif isinstance(action, PostOwner):
            self._spawn(flow_id, self._post_owner(flow_id, action))
        elif isinstance(action, ArmTimer):
            self._cancel_timer(flow_id, action.name)
            loop = asyncio.get_running_loop()
            self._timers[(flow_id, action.name)] = loop.call_later(
                action.seconds, self._fire, flow_id, action.name)
        elif isinstance(action, CancelTimer):
            self._cancel_timer(flow_id, action.name)
        elif isinstance(action, Log):
            getattr(self.log, action.level, self.log.info)(action.message, flow=flow_id,
                                                             **action.fields)
        elif isinstance(action, Finish):
            self._finish(flow_id, action)
        elif isinstance(action, ControlReply):
            future = self.replies.pop(action.req, None)
            if future is not None and not future.done():
                future.set_result((action.status, action.body))
        elif isinstance(action, WriteKeyDir):
            self._write_key_dir(flow_id, action)
        elif isinstance(action, RemoveKeyDir):
            self._remove_key_dir(flow_id, action.name)
        elif isinstance(action, KeyringAdd):
            self._keyring_add(flow_id, action)
        elif isinstance(action, KeyringDrop):
            self._keyring_drop(flow_id, action.name)
        else:  # pragma: no cover - a flow returned something we do not know
            raise TypeError(f"unknown action {type(action).__name__}")

    async def _send_qmp(self, flow_id: str, action: SendQmp) -> None:
        self.log.debug("qmp command", flow=flow_id, command=action.command)
        if self.qmp is None or self.qmp_gone is not None:
            return  # the disconnect event reaches the flow on its own
        try:
            result = await self.qmp.execute(action.command, action.args)
        except qmpio.QmpCommandError as exc:
            self.feed(flow_id, QmpError(action.tag, exc.error_class, exc.desc))
        except qmpio.MonitorGone:
            pass  # the disconnect watcher tells every flow
        else:
            self.feed(flow_id, QmpReply(action.tag, result))

    async def _post_owner(self, flow_id: str, action: PostOwner) -> None:
        from agent.core.events import OwnerFailed

        if not self.owner_url:
            self.feed(flow_id, OwnerFailed("no owner_url configured"))
            return
        event = await ask_owner(self.owner_url, action.path, action.body, self.owner_timeout)
        self.feed(flow_id, event)

    def _spawn(self, flow_id: str, coro) -> None:
        task = asyncio.ensure_future(coro)
        tasks = self._tasks.setdefault(flow_id, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _fire(self, flow_id: str, name: str) -> None:
        from agent.core.events import TimerFired

        self._timers.pop((flow_id, name), None)
        self.feed(flow_id, TimerFired(name))

    def _cancel_timer(self, flow_id: str, name: str) -> None:
        handle = self._timers.pop((flow_id, name), None)
        if handle is not None:
            handle.cancel()

    # -- key directories --------------------------------------------------------
    def _write_key_dir(self, flow_id: str, action: WriteKeyDir) -> None:
        from agent.io.rundir import make_key_dir, remove_key_dir, write_key_file

        if not self.run_dir:
            self.feed(flow_id, KeyDirFailed(action.name, "no run_dir configured for key files"))
            return
        path = None
        try:
            path = make_key_dir(self.run_dir, action.name)
            self.key_dirs[(flow_id, action.name)] = path
            for fname, value in action.files.items():
                if isinstance(value, Secret):
                    with value.view() as data:
                        write_key_file(path, fname, data)
                else:
                    write_key_file(path, fname, str(value).encode())
        except OSError as exc:
            if path is not None:
                remove_key_dir(path)
                self.key_dirs.pop((flow_id, action.name), None)
            self.feed(flow_id, KeyDirFailed(action.name, f"cannot write key files: {exc.strerror}"))
            return
        self.log.debug("key directory written", flow=flow_id, dir=path,
                       files=sorted(action.files))
        self.feed(flow_id, KeyDirReady(action.name, path))

    def _remove_key_dir(self, flow_id: str, name: str) -> None:
        from agent.io.rundir import remove_key_dir

        path = self.key_dirs.pop((flow_id, name), None)
        if path is not None:
            remove_key_dir(path)
            self.log.debug("key directory removed", flow=flow_id, dir=path)

    def _remove_all_key_dirs(self, flow_id: str | None = None) -> None:
        for fid, name in [k for k in self.key_dirs if flow_id is None or k[0] == flow_id]:
            self._remove_key_dir(fid, name)

    # -- keyring --------------------------------------------------------------------
    def _keyring_add(self, flow_id: str, action: KeyringAdd) -> None:
        from agent.io import keyring

        serial = None
        try:
            with action.key.view() as payload:
                serial = keyring.add_key(action.description, payload)
            # Possessor: all; user (QEMU runs as this uid): view, read, search.
            keyring.setperm(serial, keyring.KEY_POS_ALL | keyring.KEY_USR_VIEW
                            | keyring.KEY_USR_READ | keyring.KEY_USR_SEARCH)
        except OSError as exc:
            if serial is not None:  # added but not usable: it must not stay
                for step in (keyring.revoke, keyring.unlink):
                    try:
                        step(serial)
                    except OSError:
                        pass
            self.feed(flow_id, KeyringFailed(action.name, f"cannot add a keyring key: "
                                                          f"{exc.strerror}"))
            return
        self.keyring_keys[(flow_id, action.name)] = serial
        self.log.debug("keyring key added", flow=flow_id, description=action.description,
                       serial=serial)
        self.feed(flow_id, KeyringReady(action.name, serial))

    def _keyring_drop(self, flow_id: str, name: str) -> None:
        from agent.io import keyring

        serial = self.keyring_keys.pop((flow_id, name), None)
        if serial is None:
            return
        for step in (keyring.revoke, keyring.unlink):
            try:
                step(serial)
            except OSError:
                pass
        self.log.debug("keyring key dropped", flow=flow_id, serial=serial)

    def _drop_all_keyring_keys(self, flow_id: str | None = None) -> None:
        for fid, name in [k for k in self.keyring_keys if flow_id is None or k[0] == flow_id]:
            self._keyring_drop(fid, name)

    # -- control requests ---------------------------------------------------------
    def new_request(self) -> tuple[str, asyncio.Future]:
        self._req += 1
        req = f"ctl-{self._req}"
        future = asyncio.get_running_loop().create_future()
        self.replies[req] = future
        return req, future

    def _finish(self, flow_id: str, action: Finish) -> None:
        self.results[flow_id] = action
        # Whatever path the flow took, none of its key material outlives it.
        self._remove_all_key_dirs(flow_id)
        self._drop_all_keyring_keys(flow_id)
        for (fid, name) in [k for k in self._timers if k[0] == flow_id]:
            self._cancel_timer(fid, name)
        for task in self._tasks.pop(flow_id, set()):
            task.cancel()
        level = "info" if action.code == 0 else "error"
        getattr(self.log, level)("flow finished", flow=flow_id, code=action.code,
                                 reason=action.reason)
        self._finished.setdefault(flow_id, asyncio.Event()).set()
        if self.metrics is not None:
            flow = self.flows[flow_id]
            elapsed = asyncio.get_running_loop().time() - self._started_at.get(flow_id, 0.0)
            self.metrics.flow_finished(flow.kind, action.code, elapsed, flow)
        if self.on_finish is not None:
            self.on_finish(flow_id, action)

    # -- QMP events and EOF ----------------------------------------------------
    async def pump_qmp_events(self) -> None:
        assert self.qmp is not None
        async for msg in self.qmp.events:
            try:
                name = msg.get("event")
                data = msg.get("data")
            except Exception:  # not even a mapping: nothing to tell a flow
                continue
            # QEMU's events carry an object or nothing; anything else is
            # treated as no data rather than allowed to stop the pump (and
            # with it the guard against a VM resumed behind our back).
            data = dict(data) if isinstance(data, dict) else {}
            for flow_id, flow in self.flows.items():
                if flow.finished is None and name in flow.wanted_events:
                    self.feed(flow_id, QmpEvent(name, data))

    async def watch_qmp(self) -> str:
        assert self.qmp is not None
        reason = await self.qmp.wait_disconnected()
        self.qmp_gone = reason
        self.log.info("QMP disconnected", reason=reason)
        for flow_id in self.active():
            self.feed(flow_id, QmpDisconnected(reason))
        return reason

    async def drain_qmp(self, timeout: float = 5.0) -> None:
        """Let commands already sent (a final ``quit`` or ``stop``) complete."""
        if self._qmp_tasks:
            await asyncio.wait(set(self._qmp_tasks), timeout=timeout)

    def close(self) -> None:
        self._remove_all_key_dirs()
        self._drop_all_keyring_keys()
        for future in self.replies.values():
            if not future.done():
                future.set_result((503, {"error": "the agent is stopping"}))
        for key in list(self._timers):
            self._cancel_timer(*key)
        for tasks in self._tasks.values():
            for task in tasks:
                task.cancel()
        for task in self._qmp_tasks:
            task.cancel()


async def ask_owner(owner_url: str, path: str, body: dict, timeout: float):
    """POST to the guest owner; its answer as the core event it means.

    The shell (``agent.io.owner_client``) returns ``(status, body)``; the
    core (``agent.core.owner_answer``) decides what that is: released,
    refused, or a malformed answer.  No answer at all is ``OwnerFailed``."""
    from agent.core.events import OwnerFailed
    from agent.core.owner_answer import one_line, parse_owner_answer
    from agent.io.http import HttpError
    from agent.io.owner_client import post_owner

    try:
        status, answer = await post_owner(owner_url, path, body, timeout)
    except HttpError as exc:
        return OwnerFailed(reason=f"owner unreachable: {one_line(str(exc))}")
    return parse_owner_answer(status, answer)
