"""A fake libvirt and a fake SEV domain, backed by the simulator's QEMU + PSP model.

They behave like libvirt 9.0 where it matters (start-paused domains report
"paused (user)", QEMU errors come wrapped as "unable to execute QEMU
command", typed-parameter names); used by ``tests/io/test_libvirt_monitor.py``
and ``tests/e2e/test_libvirt.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

from agent.common.errors import SimQmpError
from agent.io import libvirt_monitor as lm
from agent.tools.sim.machine import Machine, SimConfig

# -- fakes ---------------------------------------------------------------------------

VIR_ERR_INTERNAL_ERROR, VIR_ERR_OPERATION_INVALID = 1, 55
VIR_DOMAIN_RUNNING_UNPAUSED = 5


class FakeLibvirtError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    def get_error_code(self) -> int:
        return self.code


class FakeLibvirt:
    """libvirt's module functions and one connection, recording registrations."""

    def __init__(self) -> None:
        self.monitor_cbs: dict[int, object] = {}
        self.lifecycle_cbs: dict[int, object] = {}
        self.close_cb = None
        self.closed = False
        self.sent: list[str] = []  # qemuMonitorCommand texts
        self.monitor_events_supported = True
        self._ids = 0

    def api(self) -> lm.LibvirtApi:
        return lm.LibvirtApi(
            FakeLibvirtError,
            lambda uri: self,
            self.qemu_monitor_command,
            self.monitor_register,
            self.monitor_deregister,
        )

    # module-level calls
    def qemu_monitor_command(self, dom, text: str, flags: int) -> str:
        self.sent.append(text)
        return dom.monitor(json.loads(text))

    def monitor_register(self, conn, dom, event, cb, flags) -> int:
        if not self.monitor_events_supported:
            raise FakeLibvirtError(
                3, "this function is not supported by the connection driver: virConnectDomainQemuMonitorEventRegister"
            )
        self._ids += 1
        self.monitor_cbs[self._ids] = cb
        return self._ids

    def monitor_deregister(self, conn, cb_id: int) -> int:
        del self.monitor_cbs[cb_id]
        return 0

    # the virConnect
    def getVersion(self) -> int:  # noqa: N802 - libvirt's names
        return 7_002_022

    def domainEventRegisterAny(self, dom, event_id, cb, opaque) -> int:  # noqa: N802
        assert event_id == lm.VIR_DOMAIN_EVENT_ID_LIFECYCLE
        self._ids += 1
        self.lifecycle_cbs[self._ids] = cb
        return self._ids

    def domainEventDeregisterAny(self, cb_id: int) -> int:  # noqa: N802
        del self.lifecycle_cbs[cb_id]
        return 0

    def registerCloseCallback(self, cb, opaque) -> int:  # noqa: N802
        self.close_cb = cb
        return 0

    def unregisterCloseCallback(self) -> int:  # noqa: N802
        self.close_cb = None
        return 0

    def isAlive(self) -> int:  # noqa: N802
        return 0 if self.closed else 1

    def close(self) -> int:
        self.closed = True
        return 0

    # what libvirtd would send, dispatched later on the loop as libvirtaio does
    def emit_monitor(self, dom, name: str, data: dict | None) -> None:
        details = json.dumps(data) if data is not None else None
        for cb in list(self.monitor_cbs.values()):
            asyncio.get_running_loop().call_soon(cb, self, dom, name, 1, 2, details, None)

    def emit_lifecycle(self, dom, event: int, detail: int) -> None:
        for cb in list(self.lifecycle_cbs.values()):
            asyncio.get_running_loop().call_soon(cb, self, dom, event, detail, None)


class FakeSevDomain:
    """A libvirt 9.0 SEV domain, started paused, over the simulator's QEMU model."""

    def __init__(self, lib: FakeLibvirt, machine: Machine | None, sev: bool = True) -> None:
        self.lib, self.machine, self.sev = lib, machine, sev
        self.calls: list[tuple] = []
        self.destroyed = False
        self.objects: set[str] = set()

    def _alive(self) -> None:
        if self.destroyed:
            raise FakeLibvirtError(42, "Domain not found: no domain with matching uuid")

    def _qemu(self, command: str, args: dict | None = None):
        try:
            return self.machine.execute(command, args or {})
        except SimQmpError as exc:
            raise FakeLibvirtError(
                VIR_ERR_INTERNAL_ERROR, f"internal error: unable to execute QEMU command '{command}': {exc.desc}"
            ) from None

    def name(self) -> str:
        return "vm1"

    def isActive(self) -> int:  # noqa: N802
        return 0 if self.destroyed else 1

    def state(self) -> list[int]:
        self._alive()
        if self.machine.status == "running":
            return [lm.VIR_DOMAIN_RUNNING, VIR_DOMAIN_RUNNING_UNPAUSED]
        return [lm.VIR_DOMAIN_PAUSED, lm.VIR_DOMAIN_PAUSED_USER]

    def launchSecurityInfo(self) -> dict:  # noqa: N802
        self._alive()
        self.calls.append(("launchSecurityInfo",))
        if not self.sev:
            return {}
        info = self._qemu("query-sev")
        measure = self._qemu("query-sev-launch-measure")
        return {
            "sev-measurement": measure["data"],
            "sev-api-major": info["api-major"],
            "sev-api-minor": info["api-minor"],
            "sev-build-id": info["build-id"],
            "sev-policy": info["policy"],
        }

    def setLaunchSecurityState(self, params: dict, flags: int) -> int:  # noqa: N802
        self._alive()
        self.calls.append(("setLaunchSecurityState", dict(params), flags))
        if self.machine.status == "running":
            raise FakeLibvirtError(VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not paused")
        args = {
            "packet-header": params[lm.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_HEADER],
            "secret": params[lm.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET],
        }
        if lm.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_SET_ADDRESS in params:
            args["gpa"] = params[lm.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_SET_ADDRESS]
        self._qemu("sev-inject-launch-secret", args)
        return 0

    def resume(self) -> int:
        self._alive()
        self.calls.append(("resume",))
        self._qemu("cont")
        self.lib.emit_monitor(self, "RESUME", None)
        self.lib.emit_lifecycle(self, lm.VIR_DOMAIN_EVENT_RESUMED, 0)
        return 0

    def suspend(self) -> int:
        self._alive()
        self.calls.append(("suspend",))
        self._qemu("stop")
        self.lib.emit_monitor(self, "STOP", None)
        self.lib.emit_lifecycle(self, lm.VIR_DOMAIN_EVENT_SUSPENDED, 0)
        return 0

    def destroy(self) -> int:
        self._alive()
        self.calls.append(("destroy",))
        self.destroyed = True
        self.lib.emit_monitor(self, "SHUTDOWN", {"guest": False, "reason": "host-signal"})
        self.lib.emit_lifecycle(self, lm.VIR_DOMAIN_EVENT_SHUTDOWN, 2)
        self.lib.emit_lifecycle(self, lm.VIR_DOMAIN_EVENT_STOPPED, 1)
        return 0

    def monitor(self, msg: dict) -> str:
        """qemuMonitorCommand: a few commands of QEMU 7.2, replies as libvirt returns them."""
        self._alive()
        command, args = msg["execute"], msg.get("arguments", {})
        if command == "object-add":
            if args["id"] in self.objects:
                return json.dumps(
                    {
                        "id": "libvirt-9",
                        "error": {
                            "class": "GenericError",
                            "desc": f"attempt to add duplicate property '{args['id']}' to object (type 'container')",
                        },
                    }
                )
            self.objects.add(args["id"])
            return json.dumps({"return": {}, "id": "libvirt-9"})
        if command == "query-migrate":
            return json.dumps({"return": {"status": "completed"}, "id": "libvirt-10"})
        return json.dumps(
            {
                "id": "libvirt-11",
                "error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"},
            }
        )


def sev_machine(**overrides) -> Machine:
    cfg = SimConfig(tik=os.urandom(16), tek=os.urandom(16), digest=hashlib.sha256(b"fw").digest(), **overrides)
    return Machine(cfg)


def attach(lib: FakeLibvirt, dom, events=None) -> lm.LibvirtConnection:
    return lm.LibvirtConnection.attached(lib, dom, api=lib.api(), name="t", events=events)
