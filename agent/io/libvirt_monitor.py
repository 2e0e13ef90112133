"""QEMU's monitor through libvirt, shaped like :class:`agent.io.qmp.QmpConnection`.

Where libvirt owns a VM, its QMP socket is libvirt's alone: the agent talks
to libvirtd instead, with libvirt-python on the running asyncio loop
(``libvirtaio``).  :class:`LibvirtConnection` has QmpConnection's interface
(``connect`` / ``execute`` / ``events`` / ``wait_disconnected`` / ``close`` /
``qemu_version``), so the runtime and the sans-IO flows do not know which
one they drive.

``execute`` translates what libvirt has an API for, so that libvirt's view
of the domain stays true (a ``cont`` behind its back would leave libvirt
believing the VM paused):

==========================  ==================================================
QMP command                 libvirt
==========================  ==================================================
query-status                ``dom.state()``, mapped to QMP status names
query-sev                   ``dom.launchSecurityInfo()`` -> QMP's SevInfo shape
query-sev-launch-measure    ``dom.launchSecurityInfo()["sev-measurement"]``
sev-inject-launch-secret    ``dom.setLaunchSecurityState(...)``
cont / stop / quit          ``dom.resume()`` / ``dom.suspend()`` / ``dom.destroy()``
system_powerdown            ``dom.shutdownFlags(ACPI_POWER_BTN)``
anything else               ``qemuMonitorCommand`` passthrough (libvirt marks
                            the domain tainted "custom-monitor")
==========================  ==================================================

Events: QEMU's own events (MIGRATION, RESUME, STOP, SHUTDOWN, ...) come
through ``qemuMonitorEventRegister`` with QEMU's ``data``.  Lifecycle
events end the connection (STOPPED: QEMU is gone); they stand in for
RESUME / STOP / SHUTDOWN only where the driver has no QEMU monitor events
(the ``test:///`` driver): with both, every RESUME would arrive twice.

Every libvirt call runs on the event loop's thread: libvirtaio is not
thread-safe (its handle updates touch the loop directly), and the remote
driver does its own I/O while a call waits, so a call blocks the loop only
for its round trip (``destroy`` can take a few seconds: it is the last one).

Redaction: what is sent is logged only through :func:`agent.io.qmp.describe`
(redacted, then scrubbed); libvirt's default error handler, which prints
every error to stderr, is replaced; error texts are scrubbed and never hold
the arguments sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.common.errors import MonitorGone, QmpCommandError
from agent.common.logs import get_logger, scrub
from agent.common.secret import Secret
from agent.io.qmp import SENSITIVE_KEYS, describe, wire_args

# -- libvirt's stable ABI numbers (libvirt-domain.h, virterror.h) -----------
# Written out so the translation does not need libvirt-python to be tested,
# and because a binding built against an older libvirt lacks newer names.
VIR_DOMAIN_NOSTATE, VIR_DOMAIN_RUNNING, VIR_DOMAIN_BLOCKED, VIR_DOMAIN_PAUSED = 0, 1, 2, 3
VIR_DOMAIN_SHUTDOWN, VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_CRASHED, VIR_DOMAIN_PMSUSPENDED = 4, 5, 6, 7

VIR_DOMAIN_PAUSED_UNKNOWN = 0
VIR_DOMAIN_PAUSED_USER = 1
VIR_DOMAIN_PAUSED_MIGRATION = 2
VIR_DOMAIN_PAUSED_SAVE = 3
VIR_DOMAIN_PAUSED_DUMP = 4
VIR_DOMAIN_PAUSED_IOERROR = 5
VIR_DOMAIN_PAUSED_WATCHDOG = 6
VIR_DOMAIN_PAUSED_FROM_SNAPSHOT = 7
VIR_DOMAIN_PAUSED_SHUTTING_DOWN = 8
VIR_DOMAIN_PAUSED_SNAPSHOT = 9
VIR_DOMAIN_PAUSED_CRASHED = 10
VIR_DOMAIN_PAUSED_STARTING_UP = 11
VIR_DOMAIN_PAUSED_POSTCOPY = 12
VIR_DOMAIN_PAUSED_POSTCOPY_FAILED = 13

VIR_DOMAIN_EVENT_ID_LIFECYCLE = 0
VIR_DOMAIN_EVENT_SUSPENDED, VIR_DOMAIN_EVENT_RESUMED, VIR_DOMAIN_EVENT_STOPPED = 3, 4, 5
VIR_DOMAIN_EVENT_SHUTDOWN, VIR_DOMAIN_EVENT_CRASHED = 6, 8
VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED, VIR_DOMAIN_EVENT_SHUTDOWN_GUEST = 0, 1
VIR_DOMAIN_EVENT_SHUTDOWN_HOST = 2
VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN = 1

VIR_ERR_NO_SUPPORT = 3
VIR_ERR_NO_DOMAIN = 42

VIR_DOMAIN_LAUNCH_SECURITY_SEV_MEASUREMENT = "sev-measurement"
VIR_DOMAIN_LAUNCH_SECURITY_SEV_API_MAJOR = "sev-api-major"
VIR_DOMAIN_LAUNCH_SECURITY_SEV_API_MINOR = "sev-api-minor"
VIR_DOMAIN_LAUNCH_SECURITY_SEV_BUILD_ID = "sev-build-id"
VIR_DOMAIN_LAUNCH_SECURITY_SEV_POLICY = "sev-policy"
VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_HEADER = "sev-secret-header"
VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET = "sev-secret"
VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_SET_ADDRESS = "sev-secret-set-address"

# dom.state() -> QMP's RunState names (qapi/run-state.json).  libvirt starts
# a domain "paused (user)" when asked to start it paused, where QEMU itself
# says "prelaunch"; the launch flow accepts both.
PAUSED_STATUS = {
    VIR_DOMAIN_PAUSED_STARTING_UP: "prelaunch",
    VIR_DOMAIN_PAUSED_USER: "paused",
    VIR_DOMAIN_PAUSED_UNKNOWN: "paused",
    VIR_DOMAIN_PAUSED_MIGRATION: "postmigrate",
    VIR_DOMAIN_PAUSED_SAVE: "save-vm",
    VIR_DOMAIN_PAUSED_DUMP: "paused",
    VIR_DOMAIN_PAUSED_IOERROR: "io-error",
    VIR_DOMAIN_PAUSED_WATCHDOG: "watchdog",
    VIR_DOMAIN_PAUSED_FROM_SNAPSHOT: "restore-vm",
    VIR_DOMAIN_PAUSED_SHUTTING_DOWN: "shutdown",
    VIR_DOMAIN_PAUSED_SNAPSHOT: "save-vm",
    VIR_DOMAIN_PAUSED_CRASHED: "guest-panicked",
    VIR_DOMAIN_PAUSED_POSTCOPY: "postmigrate",
    VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "postmigrate",
}
STATE_STATUS = {
    VIR_DOMAIN_NOSTATE: "debug",
    VIR_DOMAIN_RUNNING: "running",
    VIR_DOMAIN_BLOCKED: "running",
    VIR_DOMAIN_SHUTDOWN: "shutdown",
    VIR_DOMAIN_CRASHED: "guest-panicked",
    VIR_DOMAIN_PMSUSPENDED: "suspended",
}

# Lifecycle event -> the QMP event it stands for (only without monitor events).
LIFECYCLE_AS_QMP = {
    VIR_DOMAIN_EVENT_RESUMED: "RESUME",
    VIR_DOMAIN_EVENT_SUSPENDED: "STOP",
    VIR_DOMAIN_EVENT_SHUTDOWN: "SHUTDOWN",
}
STOPPED_REASONS = {
    0: "the domain shut down",
    1: "the domain was destroyed",
    2: "the domain crashed",
    3: "the domain migrated away",
    4: "the domain was saved",
    5: "the domain failed",
    6: "the domain was restored from a snapshot",
}
CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by us"}

# libvirt's wrapping of a QMP error: qemuMonitorJSONCheckError().
_QEMU_ERROR = re.compile(r"unable to execute QEMU command '[^']*': (.*)$", re.S)
_UUID = re.compile(r"[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")

INSTALL_HINT = (
    "libvirt-python is not installed: pip install 'keyagent[libvirt]' "
    "(it builds against libvirt-dev, with pkg-config and a C compiler)"
)


@dataclass
class LibvirtApi:
    """The module-level libvirt calls, in one place so tests can stand in."""

    libvirtError: type[Exception]  # noqa: N815 - libvirt's name
    open: Callable[[str], Any]
    qemuMonitorCommand: Callable[[Any, str, int], str]  # noqa: N815
    qemuMonitorEventRegister: Callable[..., int]  # noqa: N815
    qemuMonitorEventDeregister: Callable[[Any, int], int]  # noqa: N815


def load_api() -> LibvirtApi:
    """libvirt-python, imported only when ``--libvirt`` is used."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        from agent.common.errors import UsageError

        raise UsageError(INSTALL_HINT) from None
    return LibvirtApi(
        libvirt.libvirtError,
        libvirt.open,
        libvirt_qemu.qemuMonitorCommand,
        libvirt_qemu.qemuMonitorEventRegister,
        libvirt_qemu.qemuMonitorEventDeregister,
    )


def bind_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Make libvirt dispatch its callbacks on ``loop`` (libvirtaio).

    libvirt accepts one event implementation per process.  A later asyncio
    loop (tests run one per test) takes it over when nothing from the old
    loop is still registered, which :meth:`LibvirtConnection.close` ensures
    by deregistering every callback and draining libvirtaio.
    """
    import libvirt
    import libvirtaio

    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    # libvirtaio logs every handle and timer change at DEBUG: not useful here.
    logging.getLogger("virEventAsyncIOImpl").setLevel(logging.INFO)
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    elif impl.loop is not loop:
        if not impl.is_idle():
            raise MonitorGone("libvirt's event loop is still in use by another asyncio loop in this process")
        impl.loop = loop


def _ignore_libvirt_error(_ctx: Any, _err: Any) -> None:
    """libvirt's default handler prints every error on stderr; we report our own."""


class EventStream:
    """Bounded QMP-shaped events (``{"event", "data", "timestamp"}``).

    Like :class:`agent.io.qmp.BoundedListener`: only the names asked for,
    and past the bound they are dropped and counted, never queued forever.
    """

    def __init__(self, names: set[str] | None = None, maxsize: int = 4096) -> None:
        self.names = set(names) if names is not None else None
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    def accept(self, name: str) -> bool:
        return self.names is None or name in self.names

    def put(self, name: str, data: Mapping[str, Any] | None, seconds: int = 0, micros: int = 0) -> None:
        if not self.accept(name):
            return
        msg = {"event": name, "data": dict(data or {}), "timestamp": {"seconds": seconds, "microseconds": micros}}
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict:
        return await self._queue.get()


class LibvirtConnection:
    """One libvirt domain, spoken to as if it were QEMU's QMP monitor."""

    def __init__(
        self,
        uri: str,
        name: str = "keyagent",
        events: set[str] | None = None,
        max_events: int = 4096,
        *,
        api: LibvirtApi | None = None,
    ) -> None:
        self.uri = uri
        self.name = name
        self.events = EventStream(events, max_events)
        self.log = get_logger("keyagent.libvirt", connection=name)
        self._api = api
        self.conn: Any = None
        self.dom: Any = None
        self._version = 0
        self._gone = asyncio.Event()
        self._reason = ""
        self._monitor_cb: int | None = None
        self._lifecycle_cb: int | None = None
        self._close_cb = False
        self.monitor_events = False  # QEMU's events through qemuMonitorEventRegister
        self._closed = False

    @classmethod
    def attached(
        cls,
        conn: Any,
        dom: Any,
        *,
        api: LibvirtApi,
        name: str = "keyagent",
        events: set[str] | None = None,
        max_events: int = 4096,
    ) -> LibvirtConnection:
        """A connection around objects already opened (an embedding, a test's fakes)."""
        self = cls("", name, events, max_events, api=api)
        self._attach(conn, dom)
        return self

    @property
    def _libvirt(self) -> LibvirtApi:
        """libvirt's calls: loaded by connect(), or given to attached()."""
        assert self._api is not None
        return self._api

    # -- QmpConnection's interface (agent.io.monitor.Monitor) ----------------------
    @property
    def qemu_version(self) -> str:
        v = self._version
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}" if v else ""

    async def connect(self, domain: str, timeout: float) -> None:
        """Open the URI and find the running domain, retrying until ``timeout``.

        Like a QMP socket that QEMU has not created yet, libvirtd may still
        be starting or the domain not yet started: both are waited for.
        """
        loop = asyncio.get_running_loop()
        if self._api is None:
            self._api = load_api()
        bind_event_loop(loop)
        deadline = loop.time() + timeout
        problem = "unknown error"
        dom = None
        while True:
            if self.conn is None:
                try:
                    self.conn = self._api.open(self.uri)
                except self._libvirt.libvirtError as exc:
                    problem = f"cannot open libvirt connection {self.uri}: {_one_line(exc)}"
            if self.conn is not None:
                try:
                    dom = _lookup(self.conn, domain)
                    if dom.isActive():
                        self._attach(self.conn, dom)
                        return
                    problem = f"domain {domain} is not running"
                    dom = None  # it holds the connection open
                except self._libvirt.libvirtError as exc:
                    self._deregister()
                    self.dom = None
                    problem = f"domain {domain}: {_one_line(exc)}"
                    if not _alive(self.conn):
                        self._close_conn()
            if loop.time() >= deadline:
                self._close_conn()
                raise MonitorGone(problem)
            await asyncio.sleep(0.1)

    async def execute(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        if self._gone.is_set():
            raise MonitorGone(self._reason)
        args = dict(args or {})
        debug = logging.getLogger("keyagent.libvirt").isEnabledFor(logging.DEBUG)
        if debug:  # redacting costs more than the call: only when it is shown
            self.log.debug("libvirt -->", message=describe({"execute": command, "arguments": args}))
        handler = _TRANSLATED.get(command)
        api = self._libvirt
        try:
            result = handler(self, args) if handler else self._passthrough(command, args)
        except api.libvirtError as exc:
            raise self._error(command, exc, args) from None
        if debug:
            self.log.debug("libvirt <--", message=describe({"return": result}))
        return result

    async def wait_disconnected(self) -> str:
        """Return (with a reason) once the domain or the connection is gone."""
        await self._gone.wait()
        return self._reason

    async def close(self) -> None:
        """Deregister everything, close, and let libvirtaio finish its frees."""
        if self._closed:
            return
        self._closed = True
        self._set_gone("connection closed")
        self._deregister()
        self._close_conn()
        try:
            import libvirtaio
        except ImportError:
            return
        impl = libvirtaio.getCurrentImpl()
        if impl is not None and impl.loop is asyncio.get_running_loop():
            try:
                await asyncio.wait_for(impl.drain(), 2.0)
            except TimeoutError:
                self.log.warning("libvirt event callbacks still pending after close")

    # -- set-up -------------------------------------------------------------------
    def _attach(self, conn: Any, dom: Any) -> None:
        self.conn, self.dom = conn, dom
        api = self._libvirt
        try:
            self._version = int(conn.getVersion())
        except (api.libvirtError, TypeError, ValueError):
            self._version = 0
        try:
            self._monitor_cb = api.qemuMonitorEventRegister(conn, dom, None, self._on_monitor_event, 0)
            self.monitor_events = True
        except api.libvirtError as exc:
            self.log.info("no QEMU monitor events from this driver: using lifecycle events", reason=_one_line(exc))
        self._lifecycle_cb = conn.domainEventRegisterAny(dom, VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        try:
            conn.registerCloseCallback(self._on_close, None)
            self._close_cb = True
        except api.libvirtError:
            pass  # drivers without a remote connection never close under us
        try:
            conn.setKeepAlive(5, 3)  # a hung libvirtd is noticed in ~20 s
        except (api.libvirtError, AttributeError):
            pass
        # The domain may have stopped between the lookup and the registration.
        try:
            active = dom.isActive()
        except api.libvirtError:
            active = False
        if not active:
            self._set_gone("the domain is not running")

    def _deregister(self) -> None:
        conn = self.conn
        if conn is None:
            return
        api = self._libvirt
        steps = []
        if self._monitor_cb is not None:
            steps.append(lambda cb=self._monitor_cb: api.qemuMonitorEventDeregister(conn, cb))
        if self._lifecycle_cb is not None:
            steps.append(lambda cb=self._lifecycle_cb: conn.domainEventDeregisterAny(cb))
        if self._close_cb:
            steps.append(conn.unregisterCloseCallback)
        for step in steps:
            try:
                step()
            except api.libvirtError:
                pass
        self._monitor_cb = self._lifecycle_cb = None
        self._close_cb = False

    def _close_conn(self) -> None:
        # A virDomain holds a reference on its connection: drop it first, or
        # virConnectClose leaves the socket (and its event handles) open.
        self.dom = None
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except self._libvirt.libvirtError:
                pass

    def _set_gone(self, reason: str) -> None:
        if not self._gone.is_set():
            self._reason = reason
            self._gone.set()

    # -- callbacks (libvirtaio runs them on the loop) ---------------------------
    def _on_monitor_event(
        self, _conn: Any, _dom: Any, event: str, seconds: int, micros: int, details: str | None, _opaque: Any
    ) -> None:
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        self.events.put(event, data if isinstance(data, dict) else {}, seconds, micros)

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if event == VIR_DOMAIN_EVENT_STOPPED:
            self._set_gone(STOPPED_REASONS.get(detail, "the domain stopped"))
            return
        if event == VIR_DOMAIN_EVENT_CRASHED:
            # on_crash=preserve keeps QEMU (paused); otherwise STOPPED follows.
            asyncio.get_running_loop().call_soon(self._check_alive)
            return
        name = LIFECYCLE_AS_QMP.get(event)
        if name is None or self.monitor_events:
            return  # QEMU's own event arrives through the monitor
        data: dict[str, Any] = {}
        if name == "SHUTDOWN":
            data = {
                "guest": detail == VIR_DOMAIN_EVENT_SHUTDOWN_GUEST,
                "reason": "guest-shutdown"
                if detail == VIR_DOMAIN_EVENT_SHUTDOWN_GUEST
                else "host-signal"
                if detail == VIR_DOMAIN_EVENT_SHUTDOWN_HOST
                else "none",
            }
        self.events.put(name, data)

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._set_gone(f"libvirt connection closed ({CLOSE_REASONS.get(reason, reason)})")

    def _check_alive(self) -> None:
        if not self._domain_alive():
            self._set_gone("the domain crashed")

    def _domain_alive(self) -> bool:
        try:
            return bool(self.dom is not None and _alive(self.conn) and self.dom.isActive())
        except self._libvirt.libvirtError:
            return False

    # -- translation ------------------------------------------------------------------
    def _error(self, command: str, exc: Exception, sent: Mapping[str, Any]) -> Exception:
        """A libvirtError as QmpCommandError, or MonitorGone once the domain is gone."""
        text = _one_line(exc)
        # Defence in depth: libvirt's texts do not echo arguments, but nothing
        # we sent that could be secret may come back inside an error.
        for value in _sensitive_strings(sent):
            if len(value) >= 8 and value in text:
                text = f"libvirt refused {command}"
                break
        if not self._domain_alive():
            self._set_gone(f"the domain is gone ({text})")
            return MonitorGone(self._reason)
        m = _QEMU_ERROR.search(text)
        if m:
            return QmpCommandError("GenericError", m.group(1).strip())
        return QmpCommandError("libvirt", text)

    def _passthrough(self, command: str, args: dict) -> Any:
        message: dict[str, Any] = {"execute": command}
        if args:
            message["arguments"] = wire_args(args)
        reply_text = self._libvirt.qemuMonitorCommand(self.dom, json.dumps(message), 0)
        try:
            reply = json.loads(reply_text)
        except ValueError:
            raise QmpCommandError("libvirt", f"unparsable monitor reply to {command}") from None
        if not isinstance(reply, dict):
            raise QmpCommandError("libvirt", f"unexpected monitor reply to {command}")
        error = reply.get("error")
        if isinstance(error, dict):
            desc = scrub(str(error.get("desc", ""))).strip().splitlines()
            raise QmpCommandError(str(error.get("class", "GenericError")), desc[0] if desc else "")
        return reply.get("return", {})

    def _query_status(self, _args: dict) -> dict:
        state, reason = self.dom.state()
        if state == VIR_DOMAIN_SHUTOFF:
            self._set_gone("the domain is shut off")
            raise MonitorGone(self._reason)
        if state == VIR_DOMAIN_PAUSED:
            status = PAUSED_STATUS.get(reason, "paused")
        else:
            status = STATE_STATUS.get(state, "debug")
        return {"status": status, "singlestep": False, "running": status == "running"}

    def _sev_info(self) -> dict:
        info = self.dom.launchSecurityInfo()
        return dict(info) if info else {}

    def _query_sev(self, _args: dict) -> dict:
        info = self._sev_info()
        if VIR_DOMAIN_LAUNCH_SECURITY_SEV_API_MAJOR not in info:
            return {"enabled": False}
        # libvirt does not report the SEV guest state; the domain's own
        # state stands in: paused before the first run is LAUNCH_SECRET,
        # and the PSP refuses a secret in any other state anyway.
        state, _ = self.dom.state()
        return {
            "enabled": True,
            "api-major": info[VIR_DOMAIN_LAUNCH_SECURITY_SEV_API_MAJOR],
            "api-minor": info.get(VIR_DOMAIN_LAUNCH_SECURITY_SEV_API_MINOR),
            "build-id": info.get(VIR_DOMAIN_LAUNCH_SECURITY_SEV_BUILD_ID),
            "policy": info.get(VIR_DOMAIN_LAUNCH_SECURITY_SEV_POLICY),
            "state": "running" if state in (VIR_DOMAIN_RUNNING, VIR_DOMAIN_BLOCKED) else "launch-secret",
        }

    def _query_sev_launch_measure(self, _args: dict) -> dict:
        measurement = self._sev_info().get(VIR_DOMAIN_LAUNCH_SECURITY_SEV_MEASUREMENT)
        if not measurement:
            raise QmpCommandError("GenericError", "SEV launch measurement is not available")
        return {"data": measurement}

    def _inject_launch_secret(self, args: dict) -> dict:
        wire = wire_args(args)
        header, secret = wire.get("packet-header"), wire.get("secret")
        if not isinstance(header, str) or not isinstance(secret, str):
            raise QmpCommandError("GenericError", "packet-header and secret must be base64 strings")
        params: dict[str, Any] = {
            VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_HEADER: header,
            VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET: secret,
        }
        if wire.get("gpa") is not None:
            params[VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_SET_ADDRESS] = int(wire["gpa"])
        try:
            self.dom.setLaunchSecurityState(params, 0)
        finally:
            params.clear()
            wire.clear()
        return {}

    def _cont(self, _args: dict) -> dict:
        self.dom.resume()
        return {}

    def _stop(self, _args: dict) -> dict:
        self.dom.suspend()
        return {}

    def _quit(self, _args: dict) -> dict:
        self.dom.destroy()
        return {}

    def _system_powerdown(self, _args: dict) -> dict:
        self.dom.shutdownFlags(VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        return {}


_TRANSLATED: dict[str, Callable[[LibvirtConnection, dict], Any]] = {
    "query-status": LibvirtConnection._query_status,
    "query-sev": LibvirtConnection._query_sev,
    "query-sev-launch-measure": LibvirtConnection._query_sev_launch_measure,
    "sev-inject-launch-secret": LibvirtConnection._inject_launch_secret,
    "cont": LibvirtConnection._cont,
    "stop": LibvirtConnection._stop,
    "quit": LibvirtConnection._quit,
    "system_powerdown": LibvirtConnection._system_powerdown,
}


async def open_connection(
    uri: str, domain: str, name: str = "keyagent", events: set[str] | None = None, timeout: float = 10.0
) -> LibvirtConnection:
    """Connect to ``domain`` at ``uri``; MonitorGone if it cannot be had."""
    conn = LibvirtConnection(uri, name, events)
    try:
        await conn.connect(domain, timeout)
    except BaseException:
        await conn.close()
        raise
    return conn


def _lookup(conn: Any, domain: str) -> Any:
    """A domain by name, UUID or numeric id, as virsh takes them."""
    if domain.isdigit():
        return conn.lookupByID(int(domain))
    if _UUID.fullmatch(domain):
        return conn.lookupByUUIDString(domain)
    return conn.lookupByName(domain)


def _alive(conn: Any) -> bool:
    if conn is None:
        return False
    try:
        return bool(conn.isAlive())
    except Exception:
        return False


def _sensitive_strings(value: Any, sensitive: bool = False) -> list[str]:
    """The wire text of every Secret and of every value under a secret-bearing key."""
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in _sensitive_strings(v, sensitive or k in SENSITIVE_KEYS)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _sensitive_strings(v, sensitive)]
    if isinstance(value, Secret):
        return [value.b64()]
    return [value] if sensitive and isinstance(value, str) else []


def _one_line(exc: BaseException) -> str:
    text = scrub(str(exc)).strip().splitlines()
    return text[0] if text and text[0] else type(exc).__name__
