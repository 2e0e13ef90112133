"""The QMP executor: SendQmp out; replies, errors, events and the disconnect in."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from agent.app.runtime_qmp import QmpExecutor
from agent.core.actions import SendQmp
from agent.core.events import QmpDisconnected, QmpError, QmpEvent, QmpReply
from tests.app.runtime_fakes import COMMAND_FAILED, LOST, FakeMonitor, Fed, QuietLog


async def test_a_commands_reply_or_error_goes_back_to_the_flow_that_sent_it():
    mon = FakeMonitor({"query-status": {"status": "prelaunch"}, "cont": COMMAND_FAILED})
    fed = Fed()
    qmp = QmpExecutor(mon, fed, QuietLog())
    qmp.run("launch", SendQmp("t1", "query-status"))
    qmp.run("other", SendQmp("t2", "cont", {"x": 1}))
    await qmp.drain(1.0)
    assert ("launch", QmpReply("t1", {"status": "prelaunch"})) in fed
    assert ("other", QmpError("t2", "GenericError", "no such thing")) in fed
    assert mon.sent == [("query-status", {}), ("cont", {"x": 1})]


async def test_a_lost_monitor_is_not_reported_per_command():
    mon = FakeMonitor({"quit": LOST})
    fed = Fed()
    qmp = QmpExecutor(mon, fed, QuietLog())
    qmp.run("launch", SendQmp("t1", "quit"))
    await qmp.drain(1.0)
    assert fed == []


async def test_once_the_monitor_is_gone_nothing_more_is_sent_and_every_active_flow_is_told():
    mon = FakeMonitor()
    fed = Fed()
    qmp = QmpExecutor(mon, fed, QuietLog())
    watcher = asyncio.ensure_future(qmp.watch(lambda: ["launch", "migrate"]))
    mon.disconnect("EOF from QEMU")
    assert await watcher == "EOF from QEMU"
    assert qmp.gone == "EOF from QEMU"
    qmp.run("launch", SendQmp("t1", "cont"))
    await qmp.drain(1.0)
    assert mon.sent == []
    assert fed == [("launch", QmpDisconnected("EOF from QEMU")), ("migrate", QmpDisconnected("EOF from QEMU"))]


async def test_without_a_monitor_commands_are_dropped():
    fed = Fed()
    qmp = QmpExecutor(None, fed, QuietLog())
    qmp.run("launch", SendQmp("t1", "cont"))
    await qmp.drain(1.0)
    assert fed == []


async def test_monitor_events_reach_the_running_flows_that_want_them_whatever_their_data():
    mon = FakeMonitor()
    fed = Fed()
    qmp = QmpExecutor(mon, fed, QuietLog())
    flows = {
        "wants": SimpleNamespace(finished=None, wanted_events={"RESUME"}),
        "ended": SimpleNamespace(finished=object(), wanted_events={"RESUME"}),
        "deaf": SimpleNamespace(finished=None, wanted_events=set()),
    }
    for msg in (
        {"event": "RESUME", "data": {"a": 1}},
        "not a mapping",
        {"event": "RESUME", "data": [1]},
        {"event": "STOP"},
    ):
        mon.events.put(msg)
    mon.events.end()
    await asyncio.wait_for(qmp.pump_events(lambda: flows), 1.0)
    assert fed == [("wants", QmpEvent("RESUME", {"a": 1})), ("wants", QmpEvent("RESUME", {}))]


async def test_a_finished_flows_last_command_still_reaches_qemu_but_close_cancels_it():
    mon = FakeMonitor()
    mon.hold = asyncio.Event()
    fed = Fed()
    qmp = QmpExecutor(mon, fed, QuietLog())
    qmp.run("launch", SendQmp("t1", "quit"))
    qmp.forget("launch")
    mon.hold.set()
    await qmp.drain(1.0)
    assert fed == [("launch", QmpReply("t1", {}))]
    mon.hold.clear()
    qmp.run("launch", SendQmp("t2", "quit"))
    await asyncio.sleep(0)
    (task,) = qmp.tasks
    qmp.close()
    await asyncio.sleep(0)
    assert task.cancelled() and len(fed) == 1


async def test_the_log_names_the_command_never_its_arguments():
    log = QuietLog()
    qmp = QmpExecutor(FakeMonitor(), Fed(), log)
    qmp.run("secrets", SendQmp("t1", "object-add", {"data": "c2VjcmV0"}))
    await qmp.drain(1.0)
    assert log.lines == [("debug", "qmp command", {"flow": "secrets", "command": "object-add"})]


async def test_a_command_outside_the_flows_is_best_effort():
    mon = FakeMonitor({"system_powerdown": COMMAND_FAILED, "quit": LOST})
    fed = Fed()
    qmp = QmpExecutor(mon, fed, QuietLog())
    await qmp.command_outside_flows("system_powerdown")
    await qmp.command_outside_flows("quit")
    await QmpExecutor(None, fed, QuietLog()).command_outside_flows("quit")
    assert mon.sent == [("system_powerdown", None), ("quit", None)] and fed == []


async def test_the_launch_secret_is_wiped_once_qemu_answered_the_injection_whatever_the_answer():
    from agent.common.secret import Secret, live_secret_forms

    for answer in ({}, COMMAND_FAILED, LOST):
        mon = FakeMonitor({"sev-inject-launch-secret": answer})
        mon.hold = asyncio.Event()
        qmp = QmpExecutor(mon, Fed(), QuietLog())
        secret = Secret(b"launch-secret-table-0123456789")
        form = secret.hex()
        qmp.run("launch", SendQmp("t1", "sev-inject-launch-secret", {"packet-header": "AAAA", "secret": secret}))
        await asyncio.sleep(0)
        assert mon.sent and len(secret) == 30  # sent, not answered yet: still whole
        mon.hold.set()
        await qmp.drain(1.0)
        assert len(secret) == 0 and form not in live_secret_forms()


async def test_a_secret_sent_with_another_command_is_left_to_its_flow():
    from agent.common.secret import Secret

    mon = FakeMonitor()
    qmp = QmpExecutor(mon, Fed(), QuietLog())
    key = Secret(b"a master key kept by its flow")
    qmp.run("secrets", SendQmp("t1", "object-add", {"qom-type": "secret", "data": key}))
    await qmp.drain(1.0)
    assert len(key) == 29


async def test_commands_sent_after_a_hold_reach_qemu_only_once_it_ends_in_order():
    mon = FakeMonitor()
    qmp = QmpExecutor(mon, Fed(), QuietLog())
    qmp.run("other", SendQmp("t0", "query-status"))
    hold: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    qmp.hold_until(hold)
    qmp.run("launch", SendQmp("t1", "cont"))
    qmp.run("other", SendQmp("t2", "query-migrate"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert mon.sent == [("query-status", {})]  # sent before the hold: not held
    hold.set_exception(OSError("the hold's own failure is not the commands'"))
    await qmp.drain(1.0)
    assert [command for command, _ in mon.sent] == ["query-status", "cont", "query-migrate"]
    qmp.run("launch", SendQmp("t3", "quit"))  # the hold is over: no wait
    await qmp.drain(1.0)
    assert mon.sent[-1] == ("quit", {})
