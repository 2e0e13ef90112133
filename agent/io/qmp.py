"""QMP through qemu.qmp, with redaction before anything can be logged.

qemu.qmp logs every message it sends and receives at DEBUG (``--> {...}``),
and its ``ExecuteError`` keeps the sent message.  We override its two
message hooks so that what reaches the logger is already redacted: values
under known secret-bearing keys are replaced, and the forms of every live
:class:`Secret` are scrubbed.  qemu.qmp's default ``events`` listener keeps
every event until drained and can't be removed, so it is given a names
filter that matches nothing; our own listener is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.error import ProtocolError, QMPError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse
from qemu.qmp.protocol import ConnectError, Runstate, StateError
from qemu.qmp.qmp_client import BadReplyError

from agent.common.errors import MonitorGone, QmpCommandError
from agent.common.logs import scrub
from agent.common.secret import Secret

# Argument names whose values are secret material or ciphertext of it.
SENSITIVE_KEYS = frozenset(
    {"secret", "data", "iv", "password", "passphrase", "key", "packet-header", "psk", "key-secret"}
)

REDACTED = "<redacted>"

#: What qemu.qmp raises from ``execute`` when the connection is lost: the
#: reply never comes (ExecInterruptedError), we are no longer connected
#: (StateError), QEMU broke the protocol (ProtocolError: qemu.qmp then drops
#: the connection), or the stream itself failed.  An ``ExecuteError`` is an
#: answer, not a loss; anything else (a TypeError from arguments that are not
#: JSON) is our bug and surfaces as such.
MONITOR_LOST = (ExecInterruptedError, StateError, ProtocolError, EOFError, OSError)


def redact(value: Any) -> Any:
    """A copy of a QMP message with secret-bearing values replaced."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if k in SENSITIVE_KEYS and not isinstance(v, Mapping) else redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, Secret):
        return REDACTED
    return value


def wire_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments as QEMU wants them: a Secret becomes its base64 text."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, Secret):
            out[key] = value.b64()
        elif isinstance(value, Mapping):
            out[key] = wire_args(value)
        else:
            out[key] = value
    return out


def describe(msg: Mapping[str, Any]) -> str:
    try:
        return scrub(json.dumps(redact(dict(msg)), separators=(",", ":")))
    except Exception:  # pragma: no cover - a message that is not JSON-able
        return "<unprintable message>"


#: qemu.qmp's ``_execute(msg, assign_id=True)`` (there since QEMU's aqmp, so
#: in every qemu.qmp release): the one private method the lean ``execute``
#: below needs; a release without it gets the library's own ``execute``
_LEAN_EXECUTE = callable(getattr(QMPClient, "_execute", None))


class RedactingQMPClient(QMPClient):
    """QMPClient whose DEBUG message log is redacted at the source."""

    # Redacting and serialising a message costs more than sending it: only
    # when DEBUG is on (``keyagent bench`` saw it on every launch's QMP path).
    def _cb_outbound(self, msg: Message) -> Message:  # type: ignore[override]
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", describe(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:  # type: ignore[override]
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", describe(msg))
        return msg

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None, oob: bool = False) -> object:
        """``QMPClient.execute``, with the command serialised once, not three
        times: ``make_execute_msg`` and ``execute_msg`` each copy the message
        and serialise the copy eagerly, and the id assigned after that makes
        the writer serialise it again (7 commands per launch, three JSON
        encodings and two dict copies each, under ``keyagent host``:
        docs/hostbench.md).  The same bytes reach QEMU (keys in the same
        order: execute, arguments, id) and the same exceptions come back: a
        client not running, or out-of-band, takes the library's own path."""
        if oob or self.runstate is not Runstate.RUNNING or not _LEAN_EXECUTE:
            return await super().execute(cmd, arguments, oob=oob)
        body: dict[str, object] = {"execute": cmd}
        if arguments is not None:
            body["arguments"] = arguments
        msg = Message(body, eager=False)
        reply = await self._execute(msg)  # assigns the id; the writer serialises it once
        # what execute_msg makes of a reply, as it does
        if "error" in reply:
            try:
                error_response = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error_response, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply, msg)
        return reply["return"]


class BoundedListener(EventListener):
    """An event listener that keeps no history and never grows without bound.

    qemu.qmp's own listener appends every event to a history list forever.
    This one keeps only the named events, in a bounded queue; past the bound
    it drops and counts, so a flood can neither exhaust memory nor block
    qemu.qmp's reader (and with it the replies our flows wait for).
    """

    def __init__(self, names: set[str] | None = None, maxsize: int = 4096) -> None:
        super().__init__(names)
        self._queue = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    async def put(self, event: Message) -> None:  # type: ignore[override]
        if not self.accept(event):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1


class QmpConnection:
    """One monitor connection: commands, a bounded event stream, and EOF."""

    def __init__(self, name: str = "keyagent", events: set[str] | None = None, max_events: int = 4096) -> None:
        self.client = RedactingQMPClient(name)
        # The default listener keeps every event forever and cannot be
        # removed: make it accept none (its names filter), and use our own.
        self.client.events.names = {"x-keyagent-no-such-event"}
        self.events = BoundedListener(events, max_events)
        self.client.register_listener(self.events)
        self._closing: asyncio.Task | None = None

    @property
    def qemu_version(self) -> str:
        greeting: Any = self.client.greeting
        try:
            # greeting.QMP.version is the greeting's own mapping (qemu.qmp checked
            # it is one); _asdict() would deep-copy the whole greeting for three ints
            v = greeting.QMP.version["qemu"]
            return f"{v['major']}.{v['minor']}.{v['micro']}"
        except (AttributeError, TypeError, KeyError):
            return ""

    async def connect(self, path: str, timeout: float) -> None:
        """Connect and negotiate, retrying while the socket is not there yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # qemu.qmp logs every refused attempt at ERROR; while we wait for QEMU
        # to create its socket that is expected, so its logger is muted.
        self.client.logger.disabled = True
        try:
            await self._connect_retrying(path, deadline)
        finally:
            self.client.logger.disabled = False

    async def _connect_retrying(self, path: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        last: Exception | None = None
        while True:
            try:
                # a deadline on this task, not wait_for's task per attempt (one per VM under keyagent host)
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await self.client.connect(path)
                return
            except (TimeoutError, ConnectError, StateError) as exc:
                # ConnectError wraps what the attempt met (no socket yet,
                # refused, EOF or a bad greeting); anything else is a bug.
                last = exc
                try:
                    await self.client.disconnect()
                except (QMPError, OSError, EOFError):
                    pass  # the failed attempt's own error, already in `last`
            # qemu.qmp turns a cancellation inside connect() into a ConnectError:
            # a signal that stops the agent must not become one more retry.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError()
            if loop.time() >= deadline:
                cause = getattr(last, "exc", None) or last
                raise MonitorGone(f"cannot connect to QMP socket {path}: {_one_line(cause)}") from None
            await asyncio.sleep(0.05)

    async def execute(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        try:
            return await self.client.execute(command, wire_args(args or {}))
        except ExecuteError as exc:
            raise QmpCommandError(exc.error_class, exc.error.error.desc) from None
        except MONITOR_LOST as exc:
            raise MonitorGone(_one_line(exc)) from None

    def _disconnect_once(self) -> asyncio.Task[str]:
        """One disconnect for everybody: qemu.qmp's ``disconnect()`` makes a
        gather per caller, and a caller cancelled halfway leaves its gather's
        exception unretrieved (asyncio then logs an error).  So there is one
        task, created once and awaited (shielded) by whoever needs it."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._disconnect())
        return self._closing

    async def _disconnect(self) -> str:
        try:
            await self.client.disconnect()
        except EOFError:
            return "QEMU closed the monitor"
        except Exception as exc:  # noqa: BLE001
            # disconnect() re-raises whatever ended the connection (a reader's
            # ProtocolError, an OSError...): here it is the reason to report,
            # and the exit path (wiping keys, the exit record) must go on.
            return _one_line(exc)
        return "connection closed"

    async def wait_disconnected(self) -> str:
        """Return (with a reason) once the connection is gone."""
        while self.client.runstate is Runstate.RUNNING:
            await self.client.runstate_changed()
        return await asyncio.shield(self._disconnect_once())

    async def close(self) -> None:
        await asyncio.shield(self._disconnect_once())


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = scrub(str(exc)).strip().splitlines()
    return text[0] if text and text[0] else type(exc).__name__
