"""The QMP wire protocol of the simulator, served on a unix socket.

What a client sees is what QEMU 7.2 sends (monitor/qmp.c,
monitor/qmp-cmds-control.c, qapi/qmp-dispatch.c):

* a greeting ``{"QMP": {"version": ..., "capabilities": ["oob"]}}``;
* until ``qmp_capabilities`` only that command exists: anything else is
  ``CommandNotFound`` "Expecting capabilities negotiation with
  'qmp_capabilities'";
* a request is checked member by member ("QMP input member 'x' is
  unexpected", "QMP input lacks member 'execute'"), its ``id`` is echoed;
* replies and events are JSON objects ending in ``\\r\\n`` (QEMU's monitor
  turns ``\\n`` into ``\\r\\n``); events carry ``timestamp`` and, when the
  event has any, ``data`` (RESUME and STOP have none);
* events only go to clients that finished negotiation.

Unlike QEMU's one-client chardev, several clients may connect at once; they
all drive the same :class:`~agent.tools.sim.machine.Machine`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import stat
import time
from collections.abc import Callable
from typing import Any, cast

from agent.common.logs import get_logger
from agent.tools.sim.json_stream import DEFAULT_MAX_MESSAGE, JsonStream, Parsed, ParseFailure
from agent.tools.sim.machine import QEMU_VERSION, InjectedEntry, Machine, SimConfig, SimQmpError
from agent.tools.sim.psp import Platform

__all__ = ["Simulator", "SimConfig", "Monitor", "encode_message"]

_QMP_CAPABILITIES = ("oob",)  # offered: QEMU offers oob on socket monitors


def encode_message(obj: dict) -> bytes:
    """One QMP message on the wire: compact-ish JSON, ASCII only, CRLF."""
    return (json.dumps(obj) + "\r\n").encode("ascii")


class Monitor:
    """One client's QMP session: negotiation, request checks, dispatch."""

    def __init__(self, machine: Machine, clients: Callable[[], list] | None = None) -> None:
        self.machine = machine
        self.negotiated = False
        self.oob = False
        self._clients = clients

    def greeting(self) -> dict:
        known = getattr(self.machine, "qemu_version", QEMU_VERSION)  # SNP: QEMU 9.1 (agent.tools.sim.snp)
        version = {"qemu": dict(known["qemu"]), "package": known["package"]}
        return {"QMP": {"version": version, "capabilities": list(_QMP_CAPABILITIES)}}

    def handle(self, item: Parsed | ParseFailure) -> tuple[dict, str | None]:
        """The reply to one parsed message, and the command name (for logs)."""
        if isinstance(item, ParseFailure):
            return _error(SimQmpError(item.desc)), None
        request = item.value
        if not isinstance(request, dict):
            return _error(SimQmpError("QMP input must be a JSON object")), None
        name: str | None = None
        try:
            name, oob = self._check_request(request)
            result = self._dispatch(name, oob, request.get("arguments", {}))
            reply: dict = {"return": result}
        except SimQmpError as exc:
            reply = self._error_reply(exc)
        except Exception as exc:  # a simulator bug must not kill the session
            get_logger("keyagent.sim").error("sim.internal_error", command=name, error=type(exc).__name__)
            reply = _error(SimQmpError(f"internal simulator error ({type(exc).__name__})"))
        if "id" in request:
            reply["id"] = request["id"]
        return reply, name

    def _error_reply(self, exc: SimQmpError) -> dict:
        # monitor_qmp_dispatch(): before negotiation a CommandNotFound gets a
        # more useful text.
        if not self.negotiated and exc.cls == "CommandNotFound":
            exc = SimQmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        return _error(exc)

    def _check_request(self, request: dict) -> tuple[str, bool]:
        # qmp_dispatch_check_obj()
        exec_key: str | None = None
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and self.oob):
                if not isinstance(value, str):
                    raise SimQmpError(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise SimQmpError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise SimQmpError("QMP input member 'arguments' must be an object")
            elif key == "id":
                continue
            else:
                raise SimQmpError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise SimQmpError("QMP input lacks member 'execute'")
        return request[exec_key], exec_key == "exec-oob"

    def _dispatch(self, name: str, oob: bool, args: dict) -> Any:
        known = name in ("qmp_capabilities", "query-commands", "x-sim-query-clients") or self.machine.has_command(name)
        if not known or (not self.negotiated and name != "qmp_capabilities"):
            raise SimQmpError(f"The command {name} has not been found", "CommandNotFound")
        if oob:
            raise SimQmpError(f"The command {name} does not support OOB")
        if name == "qmp_capabilities":
            return self._qmp_capabilities(args)
        if name == "query-commands":
            if args:
                raise SimQmpError(f"Parameter '{next(iter(args))}' is unexpected")
            names = ["qmp_capabilities", "query-commands", "x-sim-query-clients", *self.machine.command_names]
            return [{"name": n} for n in names]
        if name == "x-sim-query-clients":
            # Not QEMU: each connection's timestamps (see _Connection.times).
            return self._clients() if self._clients is not None else []
        return self.machine.execute(name, args)

    def _qmp_capabilities(self, args: dict) -> dict:
        # qmp_qmp_capabilities() + qmp_caps_accept()
        for key in args:
            if key != "enable":
                raise SimQmpError(f"Parameter '{key}' is unexpected")
        enable = args.get("enable", [])
        if not isinstance(enable, list):
            raise SimQmpError("Invalid parameter type for 'enable', expected: array")
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                raise SimQmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
            if cap != "oob":
                raise SimQmpError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
        if self.negotiated:
            raise SimQmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        unavailable = [c for c in enable if c not in _QMP_CAPABILITIES]
        if unavailable:
            raise SimQmpError(f"Capability {', '.join(unavailable)} not available")
        self.oob = "oob" in enable
        self.negotiated = True
        return {}


def _error(exc: SimQmpError) -> dict:
    return {"error": {"class": exc.cls, "desc": exc.desc}}


# Commands whose (last successful) time x-sim-query-clients shows, by name:
# between "measured" and "injected" the client was asking the guest owner.
_STAMPED = {
    "qmp_capabilities": "negotiated",
    "query-sev-launch-measure": "measured",
    "sev-inject-launch-secret": "injected",
    "cont": "cont",
}


class _Connection:
    def __init__(self, cid: int, monitor: Monitor, writer: asyncio.StreamWriter) -> None:
        self.cid = cid
        self.monitor = monitor
        self.writer = writer
        # When things happened on this connection, CLOCK_MONOTONIC seconds
        # (``time.monotonic()`` is the same clock in every process on Linux):
        # ``keyagent bench`` measures clients from the outside with these.
        self.times: dict = {
            "client": cid,
            "connected": time.monotonic(),
            **{stamp: None for stamp in _STAMPED.values()},
            "closed": None,
        }

    def send(self, obj: dict) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_message(obj))


class Simulator:
    """QEMU 7.2 with an SEV guest held at ``-S``, listening on ``path``.

    ``async with Simulator(config, path) as sim:`` serves until the block
    ends; ``await sim.wait_closed()`` returns once a client sent ``quit``.
    """

    def __init__(
        self,
        config: SimConfig,
        path: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_message: int = DEFAULT_MAX_MESSAGE,
        platform: Platform | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config
        self.path = os.fspath(path)
        self.name = name
        self._max_message = max_message
        # ``name`` and ``platform``: one VM of several in one process (agent.tools.sim.multi).
        self._log = get_logger("keyagent.sim") if name is None else get_logger("keyagent.sim", vm=name)
        # a Machine, or an SnpMachine that answers the same names (duck-typed)
        self.machine: Any
        if getattr(config, "snp", False) is True:  # agent.tools.sim.snp.SnpSimConfig: QEMU 9.1, sev-snp-guest
            from agent.tools.sim.snp import SnpMachine, SnpSimConfig

            self.machine = SnpMachine(cast(SnpSimConfig, config), clock=clock, emit=self._emit)
        else:
            self.machine = Machine(config, clock=clock, emit=self._emit, platform=platform, name=name)
            if self.machine.mh is not None:  # --mh: migrations run as tasks of this server
                self.machine.spawn = self._spawn
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[int, _Connection] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count(1)
        # The last connections' timestamps, shown by x-sim-query-clients.
        self._client_times: collections.deque = collections.deque(maxlen=256)
        self._quit = asyncio.Event()
        self._closed = False
        #: Test-only (``keyagent simulate --x-test-hold CMD``): the first request
        #: for each of these commands is neither executed nor answered, and its
        #: client is ignored until it disconnects: a test can kill the agent
        #: while it waits at exactly that step.  Nothing in QEMU does this.
        self.hold_once: set[str] = set()

    # -- state for tests ------------------------------------------------

    @property
    def status(self) -> str:
        return self.machine.status

    @property
    def sev_state(self) -> str:
        return self.machine.sev_state

    @property
    def injected_entries(self) -> list[InjectedEntry]:
        return list(self.machine.injected_entries)

    @property
    def injections(self) -> int:
        return self.machine.injections

    @property
    def cont_before_secret(self) -> bool:
        return self.machine.cont_before_secret

    @property
    def measurement(self) -> bytes | None:
        """The 48-byte blob the simulated PSP reports (None before it measured)."""
        return self.machine.measurement

    @property
    def quit_requested(self) -> bool:
        return self._quit.is_set()

    # -- lifecycle ------------------------------------------------------

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        _clear_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(self._serve_client, path=self.path)
        self._log.info(
            "sim.listening",
            qmp=f"unix:{self.path}",
            policy=self.machine.psp.policy,
            sev_es=bool(self.machine.psp.policy & 0x4),
            sev_state=self.machine.psp.state,
        )

    async def wait_closed(self) -> None:
        """Return once ``quit`` was received (and the clients were told)."""
        await self._quit.wait()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.writer.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        _remove_socket(self.path)
        self.machine.shutdown()
        self._log.info("sim.closed")

    # -- protocol -------------------------------------------------------

    def _clients(self) -> list[dict]:
        return [dict(t) for t in self._client_times]

    def _spawn(self, coro: Any) -> None:
        """Run a machine's coroutine (a migration stream) until it ends or the server closes."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, name: str, data: dict | None) -> None:
        now = time.time()
        seconds = int(now)
        event: dict = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
            "event": name,
        }
        if data is not None:
            event["data"] = data
        self._log.info("sim.event", qmp_event=name)
        for conn in list(self._conns.values()):
            if conn.monitor.negotiated:
                conn.send(event)

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        cid = next(self._ids)
        conn = _Connection(cid, Monitor(self.machine, self._clients), writer)
        self._conns[cid] = conn
        self._client_times.append(conn.times)
        log = self._log.bind(client=cid)
        log.info("sim.client_connected")
        stream = JsonStream(max_message=self._max_message)
        try:
            conn.send(conn.monitor.greeting())
            await writer.drain()
            while not self._quit.is_set():
                data = await reader.read(65536)
                if not data:
                    break
                for item in stream.feed(data):
                    held = self._held(item)
                    if held is not None:
                        log.warning("sim.test_hold", command=held)
                        while await reader.read(65536):  # until the client goes away
                            pass
                        return
                    reply, name = conn.monitor.handle(item)
                    if getattr(self.machine, "died", False):
                        # QEMU's exit(1) inside a command (SNP_LAUNCH_FINISH refused at cont):
                        # no reply, no SHUTDOWN event, every connection just closes
                        await self._die()
                        return
                    stamp = _STAMPED.get(name) if name is not None else None
                    if stamp is not None and "error" not in reply:
                        conn.times[stamp] = time.monotonic()
                    if name is not None:
                        outcome = "error" if "error" in reply else "ok"
                        log.info("sim.command", command=name[:64], outcome=outcome)
                    else:
                        # Not the text: a parse error quotes the client's input.
                        log.info("sim.bad_input")
                    conn.send(reply)
                    if self.machine.quit_requested:
                        break
                await writer.drain()
                if self.machine.quit_requested and not self._quit.is_set():
                    await self._shutdown_after_quit()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.pop(cid, None)
            conn.times["closed"] = time.monotonic()
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            log.info("sim.client_disconnected")

    def _held(self, item: Parsed | ParseFailure) -> str | None:
        """The test-only hold: the command's name if this is its first request."""
        if not self.hold_once or not isinstance(item, Parsed) or not isinstance(item.value, dict):
            return None
        name = item.value.get("execute")
        if not isinstance(name, str) or name not in self.hold_once:
            return None
        self.hold_once.discard(name)
        return name

    async def _die(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.writer.close()
        self._quit.set()

    async def _shutdown_after_quit(self) -> None:
        # qmp_quit(): reply first, then SHUTDOWN from the main loop, then exit.
        self._emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            with contextlib.suppress(Exception):
                await conn.writer.drain()
            conn.writer.close()
        self._quit.set()


def _clear_stale_socket(path: str) -> None:
    """Remove a socket left by an earlier run; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    os.unlink(path)


def _remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
