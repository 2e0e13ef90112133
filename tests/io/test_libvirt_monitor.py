"""QMP through libvirt: the translation, events and redaction, on fakes and on test:///.

SEV needs hardware that is not here: a fake libvirt domain stands in,
backed by the simulator's QEMU + PSP model (``agent.tools.sim.machine``), and
behaving like libvirt 9.0 where it matters (start-paused domains report
"paused (user)", QEMU errors come wrapped as "unable to execute QEMU
command", typed-parameter names).  The real libvirt test driver
(``test:///default``, in-process, no daemon) covers lifecycle events through
libvirtaio; tests/e2e/test_libvirt.py covers a real libvirtd with QEMU.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os

import pytest

from agent.common.secret import Secret
from agent.io import libvirt_monitor as lm
from agent.common.errors import MonitorGone, QmpCommandError, SimQmpError
from agent.common.logs import setup_logging
from agent.tools.sim.machine import Machine, SimConfig

try:
    import libvirt  # noqa: F401
    HAVE_LIBVIRT = True
except ImportError:
    HAVE_LIBVIRT = False

needs_libvirt = pytest.mark.skipif(not HAVE_LIBVIRT, reason="libvirt-python is not installed")

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
        return lm.LibvirtApi(FakeLibvirtError, lambda uri: self, self.qemu_monitor_command,
                             self.monitor_register, self.monitor_deregister)

    # module-level calls
    def qemu_monitor_command(self, dom, text: str, flags: int) -> str:
        self.sent.append(text)
        return dom.monitor(json.loads(text))

    def monitor_register(self, conn, dom, event, cb, flags) -> int:
        if not self.monitor_events_supported:
            raise FakeLibvirtError(3, "this function is not supported by the connection "
                                      "driver: virConnectDomainQemuMonitorEventRegister")
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
            raise FakeLibvirtError(VIR_ERR_INTERNAL_ERROR, "internal error: unable to execute "
                                   f"QEMU command '{command}': {exc.desc}") from None

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
        return {"sev-measurement": measure["data"], "sev-api-major": info["api-major"],
                "sev-api-minor": info["api-minor"], "sev-build-id": info["build-id"],
                "sev-policy": info["policy"]}

    def setLaunchSecurityState(self, params: dict, flags: int) -> int:  # noqa: N802
        self._alive()
        self.calls.append(("setLaunchSecurityState", dict(params), flags))
        if self.machine.status == "running":
            raise FakeLibvirtError(VIR_ERR_OPERATION_INVALID,
                                   "Requested operation is not valid: domain is not paused")
        args = {"packet-header": params[lm.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_HEADER],
                "secret": params[lm.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET]}
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
                return json.dumps({"id": "libvirt-9", "error": {
                    "class": "GenericError",
                    "desc": f"attempt to add duplicate property '{args['id']}' to object "
                            "(type 'container')"}})
            self.objects.add(args["id"])
            return json.dumps({"return": {}, "id": "libvirt-9"})
        if command == "query-migrate":
            return json.dumps({"return": {"status": "completed"}, "id": "libvirt-10"})
        return json.dumps({"id": "libvirt-11", "error": {
            "class": "CommandNotFound", "desc": f"The command {command} has not been found"}})


def sev_machine(**overrides) -> Machine:
    cfg = SimConfig(tik=os.urandom(16), tek=os.urandom(16),
                    digest=hashlib.sha256(b"fw").digest(), **overrides)
    return Machine(cfg)


def attach(lib: FakeLibvirt, dom, events=None) -> lm.LibvirtConnection:
    return lm.LibvirtConnection.attached(lib, dom, api=lib.api(), name="t", events=events)


@pytest.fixture
def captured_logs():
    stream = io.StringIO()
    setup_logging("debug", stream)
    yield stream
    setup_logging("info")


# -- the translation -------------------------------------------------------------------

async def test_query_status_maps_libvirt_states_to_qmp_status_names():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom)
    assert (await conn.execute("query-status"))["status"] == "paused"
    dom.state = lambda: [lm.VIR_DOMAIN_PAUSED, lm.VIR_DOMAIN_PAUSED_STARTING_UP]
    assert (await conn.execute("query-status"))["status"] == "prelaunch"
    dom.state = lambda: [lm.VIR_DOMAIN_RUNNING, 1]
    assert await conn.execute("query-status") == {"status": "running", "singlestep": False,
                                                  "running": True}
    dom.state = lambda: [lm.VIR_DOMAIN_PAUSED, lm.VIR_DOMAIN_PAUSED_IOERROR]
    assert (await conn.execute("query-status"))["status"] == "io-error"


async def test_a_shut_off_domain_is_a_disconnect():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom)
    dom.state = lambda: [lm.VIR_DOMAIN_SHUTOFF, 1]
    with pytest.raises(MonitorGone):
        await conn.execute("query-status")
    assert await asyncio.wait_for(conn.wait_disconnected(), 1) == "the domain is shut off"


async def test_query_sev_and_measure_come_from_launch_security_info():
    machine = sev_machine(policy=5, api_major=1, api_minor=51, build_id=3)
    lib = FakeLibvirt()
    conn = attach(lib, FakeSevDomain(lib, machine))
    sev = await conn.execute("query-sev")
    assert sev == {"enabled": True, "api-major": 1, "api-minor": 51, "build-id": 3,
                   "policy": 5, "state": "launch-secret"}
    measure = await conn.execute("query-sev-launch-measure")
    assert base64.b64decode(measure["data"]) == machine.measurement
    assert lib.sent == []  # no monitor passthrough for the SEV flow


async def test_a_domain_without_sev_says_not_enabled():
    lib = FakeLibvirt()
    conn = attach(lib, FakeSevDomain(lib, sev_machine(), sev=False))
    assert await conn.execute("query-sev") == {"enabled": False}
    with pytest.raises(QmpCommandError) as err:
        await conn.execute("query-sev-launch-measure")
    assert err.value.error_class == "GenericError"


async def test_qemu_errors_wrapped_by_libvirt_keep_qemus_text_and_generic_class():
    # The launch flow retries query-sev-launch-measure on GenericError only.
    lib = FakeLibvirt()
    conn = attach(lib, FakeSevDomain(lib, sev_machine(measure_delay_s=60)))
    with pytest.raises(QmpCommandError) as err:
        await conn.execute("query-sev-launch-measure")
    assert (err.value.error_class, err.value.desc) == (
        "GenericError", "SEV launch measurement is not available")


async def test_inject_hands_libvirt_the_base64_packet_and_address():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    dom.setLaunchSecurityState = lambda params, flags: dom.calls.append((dict(params), flags))
    conn = attach(lib, dom)
    secret = Secret(b"\x01\x02 encrypted secret table")
    header = base64.b64encode(bytes(52)).decode()
    assert await conn.execute("sev-inject-launch-secret",
                              {"packet-header": header, "secret": secret, "gpa": 0x800000}) == {}
    params, flags = dom.calls[-1]
    assert params == {"sev-secret-header": header, "sev-secret": secret.b64(),
                      "sev-secret-set-address": 0x800000}
    assert flags == 0
    await conn.execute("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
    assert "sev-secret-set-address" not in dom.calls[-1][0]


async def test_cont_stop_quit_use_the_domain_api():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom)
    for command in ("cont", "stop", "quit"):
        assert await conn.execute(command) == {}
    assert [c[0] for c in dom.calls] == ["resume", "suspend", "destroy"]
    assert lib.sent == []


async def test_other_commands_pass_through_qemu_monitor_command_with_secrets_as_base64():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom)
    data = Secret(b"ciphertext under the master key")
    props = {"qom-type": "secret", "id": "s1", "data": data, "keyid": "keyagent-master",
             "iv": "AAAAAAAAAAAAAAAAAAAAAA==", "format": "base64"}
    assert await conn.execute("object-add", props) == {}
    sent = json.loads(lib.sent[-1])
    assert sent == {"execute": "object-add", "arguments": {**props, "data": data.b64()}}
    assert await conn.execute("query-migrate") == {"status": "completed"}
    assert json.loads(lib.sent[-1]) == {"execute": "query-migrate"}


async def test_a_qmp_error_reply_becomes_qmp_error_with_qemus_class():
    lib = FakeLibvirt()
    conn = attach(lib, FakeSevDomain(lib, sev_machine()))
    await conn.execute("object-add", {"qom-type": "secret", "id": "s1", "data": "x"})
    with pytest.raises(QmpCommandError) as err:
        await conn.execute("object-add", {"qom-type": "secret", "id": "s1", "data": "x"})
    assert err.value.error_class == "GenericError"
    assert "duplicate property 's1'" in err.value.desc
    with pytest.raises(QmpCommandError) as err:
        await conn.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound"


async def test_a_libvirt_error_is_a_one_line_qmp_error_of_class_libvirt():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())

    def unsupported(params, flags):
        raise FakeLibvirtError(84, "Operation not supported: setting a launch secret is only "
                                   "supported in SEV-enabled domains\nsecond line")

    dom.setLaunchSecurityState = unsupported
    conn = attach(lib, dom)
    with pytest.raises(QmpCommandError) as err:
        await conn.execute("sev-inject-launch-secret",
                           {"packet-header": "AAAA", "secret": Secret(b"s" * 32)})
    assert err.value.error_class == "libvirt"
    assert err.value.desc.startswith("Operation not supported") and "\n" not in err.value.desc


async def test_an_error_echoing_what_was_sent_never_carries_it():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    secret = Secret(b"0123456789abcdef secret payload")

    def echoing(params, flags):
        raise FakeLibvirtError(1, f"internal error: bad value {params['sev-secret']}")

    dom.setLaunchSecurityState = echoing
    conn = attach(lib, dom)
    with pytest.raises(QmpCommandError) as err:
        await conn.execute("sev-inject-launch-secret",
                           {"packet-header": "AAAA", "secret": secret})
    assert secret.b64() not in str(err.value) and secret.b64() not in err.value.desc


async def test_a_libvirt_error_after_the_domain_went_away_is_a_disconnect():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom)
    dom.destroyed = True
    with pytest.raises(MonitorGone):
        await conn.execute("cont")
    assert "Domain not found" in await asyncio.wait_for(conn.wait_disconnected(), 1)
    with pytest.raises(MonitorGone):
        await conn.execute("query-status")


async def test_nothing_secret_reaches_the_debug_log(captured_logs):
    lib = FakeLibvirt()
    conn = attach(lib, FakeSevDomain(lib, sev_machine()))
    data = Secret(b"ciphertext that must not be logged")
    await conn.execute("object-add", {"qom-type": "secret", "id": "s1", "data": data,
                                      "iv": "AAAAAAAAAAAAAAAAAAAAAA==", "format": "base64"})
    text = captured_logs.getvalue()
    assert "object-add" in text and "<redacted>" in text
    assert data.b64() not in text and "must not be logged" not in text
    assert "AAAAAAAAAAAAAAAAAAAAAA==" not in text  # the IV: redacted by key too


# -- events ---------------------------------------------------------------------------

async def test_monitor_events_arrive_as_qmp_shaped_dicts():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom, events={"MIGRATION", "RESUME"})
    lib.emit_monitor(dom, "MIGRATION_PASS", {"pass": 1})  # not asked for
    lib.emit_monitor(dom, "MIGRATION", {"status": "setup"})
    lib.emit_monitor(dom, "RESUME", None)
    it = aiter(conn.events)
    first = await asyncio.wait_for(anext(it), 1)
    assert first == {"event": "MIGRATION", "data": {"status": "setup"},
                     "timestamp": {"seconds": 1, "microseconds": 2}}
    resume = await asyncio.wait_for(anext(it), 1)
    assert (resume["event"], resume["data"]) == ("RESUME", {})
    assert conn.events.dropped == 0


async def test_events_past_the_bound_are_dropped_and_counted():
    stream = lm.EventStream(None, maxsize=2)
    for i in range(5):
        stream.put("MIGRATION", {"status": "active"})
    assert stream.dropped == 3


async def test_with_monitor_events_lifecycle_does_not_double_resume():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom)
    await conn.execute("cont")
    await asyncio.sleep(0.01)
    names = []
    while not conn.events._queue.empty():
        names.append(conn.events._queue.get_nowait()["event"])
    assert names == ["RESUME"]


async def test_without_monitor_events_lifecycle_stands_in():
    lib = FakeLibvirt()
    lib.monitor_events_supported = False
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom)
    assert conn.monitor_events is False
    await conn.execute("cont")
    await conn.execute("stop")
    it = aiter(conn.events)
    assert [(await asyncio.wait_for(anext(it), 1))["event"] for _ in range(2)] == ["RESUME", "STOP"]


async def test_stopped_lifecycle_event_ends_the_connection():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    conn = attach(lib, dom, events={"SHUTDOWN"})
    await conn.execute("quit")
    assert await asyncio.wait_for(conn.wait_disconnected(), 1) == "the domain was destroyed"
    assert (await asyncio.wait_for(anext(aiter(conn.events)), 1))["data"] == {
        "guest": False, "reason": "host-signal"}


async def test_the_connection_closing_under_us_is_a_disconnect():
    lib = FakeLibvirt()
    conn = attach(lib, FakeSevDomain(lib, sev_machine()))
    lib.close_cb(lib, 1, None)
    assert "end of file" in await asyncio.wait_for(conn.wait_disconnected(), 1)


async def test_close_deregisters_everything_and_drops_the_domain():
    lib = FakeLibvirt()
    conn = attach(lib, FakeSevDomain(lib, sev_machine()))
    assert lib.monitor_cbs and lib.lifecycle_cbs and lib.close_cb
    await conn.close()
    assert not lib.monitor_cbs and not lib.lifecycle_cbs and lib.close_cb is None
    assert lib.closed and conn.dom is None
    assert await conn.wait_disconnected() == "connection closed"
    with pytest.raises(MonitorGone):
        await conn.execute("query-status")


async def test_qemu_version_comes_from_the_hypervisor_version():
    lib = FakeLibvirt()
    assert attach(lib, FakeSevDomain(lib, sev_machine())).qemu_version == "7.2.22"


# -- the real libvirt library, with its test driver -------------------------------------

@needs_libvirt
def test_our_abi_numbers_are_libvirts():
    import libvirt

    for name in dir(lm):
        if name.startswith("VIR_") and hasattr(libvirt, name):
            assert getattr(lm, name) == getattr(libvirt, name), name


TEST_DOMAIN = ("<domain type='test'><name>{name}</name><memory>8192</memory>"
               "<os><type>hvm</type></os></domain>")


@needs_libvirt
async def test_lifecycle_through_libvirtaio_on_the_test_driver():
    """test:///default: no QEMU, no monitor events; lifecycle events stand in."""
    import libvirt

    name = f"keyagent-t-{os.getpid()}"
    maker = libvirt.open("test:///default")  # the test driver is shared per process
    maker.createXML(TEST_DOMAIN.format(name=name), 0)
    conn = await lm.open_connection("test:///default", name, "t",
                                    events={"RESUME", "STOP", "SHUTDOWN"}, timeout=2)
    try:
        assert conn.monitor_events is False
        assert (await conn.execute("query-status"))["status"] == "running"
        await conn.execute("stop")
        assert (await conn.execute("query-status"))["status"] == "paused"
        await conn.execute("cont")
        it = aiter(conn.events)
        got = [(await asyncio.wait_for(anext(it), 2))["event"] for _ in range(2)]
        assert got == ["STOP", "RESUME"]
        with pytest.raises(QmpCommandError) as err:  # the test driver has no launch security
            await conn.execute("query-sev")
        assert err.value.error_class == "libvirt"
        await conn.execute("quit")
        reason = await asyncio.wait_for(conn.wait_disconnected(), 2)
        assert reason == "the domain was destroyed"
    finally:
        await conn.close()
        maker.close()


@needs_libvirt
async def test_a_missing_domain_is_reported_after_the_timeout():
    with pytest.raises(MonitorGone) as err:
        await lm.open_connection("test:///default", "no-such-domain", timeout=0.3)
    assert "no-such-domain" in str(err.value)


@needs_libvirt
async def test_a_domain_that_is_not_running_is_waited_for_then_reported():
    import libvirt

    name = f"keyagent-off-{os.getpid()}"
    maker = libvirt.open("test:///default")
    dom = maker.defineXML(TEST_DOMAIN.format(name=name))  # defined, never started
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(MonitorGone, match=f"domain {name} is not running"):
            await lm.open_connection("test:///default", name, timeout=0.3)
        assert loop.time() - start < 1.5  # closing did not wait on leftover handles
    finally:
        dom.undefine()
        maker.close()


@needs_libvirt
async def test_a_second_event_loop_takes_libvirtaio_over_once_the_first_is_idle():
    # pytest-asyncio gives each test its own loop: the test above ran on another.
    await test_a_missing_domain_is_reported_after_the_timeout()


# -- the command line -----------------------------------------------------------------

@pytest.mark.parametrize("argv, text", [
    (["run", "--libvirt", "test:///default"], "--libvirt URI needs --domain NAME"),
    (["run", "--qmp", "unix:/tmp/x.sock", "--domain", "vm"], "--domain is only for --libvirt"),
    (["run", "--qmp", "unix:/tmp/x.sock", "--libvirt", "test:///default"], "not allowed with"),
    (["run"], "one of the arguments --qmp --libvirt is required"),
])
def test_run_needs_exactly_one_monitor(argv, text, capsys):
    from agent.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1
