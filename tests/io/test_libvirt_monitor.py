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
import io
import json
import os

import pytest

from agent.common.errors import MonitorGone, QmpCommandError
from agent.common.logs import setup_logging
from agent.common.secret import Secret
from agent.io import libvirt_monitor as lm
from tests.io.fake_libvirt import FakeLibvirt, FakeLibvirtError, FakeSevDomain, attach, sev_machine

try:
    import libvirt  # noqa: F401

    HAVE_LIBVIRT = True
except ImportError:
    HAVE_LIBVIRT = False

needs_libvirt = pytest.mark.skipif(not HAVE_LIBVIRT, reason="libvirt-python is not installed")


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
    assert await conn.execute("query-status") == {"status": "running", "singlestep": False, "running": True}
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
    assert sev == {
        "enabled": True,
        "api-major": 1,
        "api-minor": 51,
        "build-id": 3,
        "policy": 5,
        "state": "launch-secret",
    }
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
    assert (err.value.error_class, err.value.desc) == ("GenericError", "SEV launch measurement is not available")


async def test_inject_hands_libvirt_the_base64_packet_and_address():
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, sev_machine())
    dom.setLaunchSecurityState = lambda params, flags: dom.calls.append((dict(params), flags))
    conn = attach(lib, dom)
    secret = Secret(b"\x01\x02 encrypted secret table")
    header = base64.b64encode(bytes(52)).decode()
    assert (
        await conn.execute("sev-inject-launch-secret", {"packet-header": header, "secret": secret, "gpa": 0x800000})
        == {}
    )
    params, flags = dom.calls[-1]
    assert params == {"sev-secret-header": header, "sev-secret": secret.b64(), "sev-secret-set-address": 0x800000}
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
    props = {
        "qom-type": "secret",
        "id": "s1",
        "data": data,
        "keyid": "keyagent-master",
        "iv": "AAAAAAAAAAAAAAAAAAAAAA==",
        "format": "base64",
    }
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
        raise FakeLibvirtError(
            84, "Operation not supported: setting a launch secret is only supported in SEV-enabled domains\nsecond line"
        )

    dom.setLaunchSecurityState = unsupported
    conn = attach(lib, dom)
    with pytest.raises(QmpCommandError) as err:
        await conn.execute("sev-inject-launch-secret", {"packet-header": "AAAA", "secret": Secret(b"s" * 32)})
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
        await conn.execute("sev-inject-launch-secret", {"packet-header": "AAAA", "secret": secret})
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
    await conn.execute(
        "object-add",
        {"qom-type": "secret", "id": "s1", "data": data, "iv": "AAAAAAAAAAAAAAAAAAAAAA==", "format": "base64"},
    )
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
    assert first == {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {"seconds": 1, "microseconds": 2}}
    resume = await asyncio.wait_for(anext(it), 1)
    assert (resume["event"], resume["data"]) == ("RESUME", {})
    assert conn.events.dropped == 0


async def test_events_past_the_bound_are_dropped_and_counted():
    stream = lm.EventStream(None, maxsize=2)
    for _ in range(5):
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
    assert (await asyncio.wait_for(anext(aiter(conn.events)), 1))["data"] == {"guest": False, "reason": "host-signal"}


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


TEST_DOMAIN = "<domain type='test'><name>{name}</name><memory>8192</memory><os><type>hvm</type></os></domain>"


@needs_libvirt
async def test_lifecycle_through_libvirtaio_on_the_test_driver():
    """test:///default: no QEMU, no monitor events; lifecycle events stand in."""
    import libvirt

    name = f"keyagent-t-{os.getpid()}"
    maker = libvirt.open("test:///default")  # the test driver is shared per process
    maker.createXML(TEST_DOMAIN.format(name=name), 0)
    conn = await lm.open_connection("test:///default", name, "t", events={"RESUME", "STOP", "SHUTDOWN"}, timeout=2)
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


@pytest.mark.parametrize(
    "argv, text",
    [
        (["run", "--libvirt", "test:///default"], "--libvirt URI needs --domain NAME"),
        (["run", "--qmp", "unix:/tmp/x.sock", "--domain", "vm"], "--domain is only for --libvirt"),
        (["run", "--qmp", "unix:/tmp/x.sock", "--libvirt", "test:///default"], "not allowed with"),
        (["run"], "one of the arguments --qmp --libvirt is required"),
    ],
)
def test_run_needs_exactly_one_monitor(argv, text, capsys):
    from agent.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1
