"""The runtime's dispatcher: one event at a time, each action to its executor."""

from __future__ import annotations

import asyncio

import pytest

from agent.app.eventlog import EventLog
from agent.app.runtime import Runtime
from agent.core.actions import ACTION_TYPES, ArmTimer, ControlReply, Finish, Log, SendQmp
from agent.core.events import ControlRequest, QmpReply, Start
from tests.app.runtime_fakes import FakeMonitor, QuietLog, ScriptedFlow


class RecordingLog(EventLog):
    def __init__(self) -> None:
        super().__init__(None)
        self.records: list[tuple[str, str, object]] = []

    def event(self, flow_id, event) -> None:
        self.records.append(("event", flow_id, event))

    def action(self, flow_id, action) -> None:
        self.records.append(("action", flow_id, action))


def _runtime(tmp_path, **kw) -> Runtime:
    return Runtime(
        qmp=kw.pop("qmp", None),
        event_log=kw.pop("event_log", EventLog(None)),
        run_dir=str(tmp_path),
        log=kw.pop("log", QuietLog()),
        **kw,
    )


async def test_every_action_type_has_a_handler(tmp_path):
    rt = _runtime(tmp_path)
    assert set(rt.handlers) == set(ACTION_TYPES.values())


async def test_an_unknown_action_is_refused_loudly(tmp_path):
    rt = _runtime(tmp_path)
    with pytest.raises(TypeError, match="unknown action object"):
        rt._do("f", object())  # type: ignore[arg-type]


async def test_each_event_and_its_actions_are_recorded_in_order_and_carried_out(tmp_path):
    mon = FakeMonitor({"query-status": {"status": "prelaunch"}})
    log = RecordingLog()
    rt = _runtime(tmp_path, qmp=mon, event_log=log)
    flow = ScriptedFlow([SendQmp("t1", "query-status"), Log("info", "asked", {"n": 1})], [Finish(0, "done")])
    finished = []
    rt.on_finish = lambda fid, fin: finished.append((fid, fin))
    dispatch = asyncio.ensure_future(rt.dispatch())
    rt.start_flow("f", flow)
    await asyncio.wait_for(rt.finished("f"), 1.0)
    dispatch.cancel()
    assert flow.seen == [Start(), QmpReply("t1", {"status": "prelaunch"})]
    assert [r[0] for r in log.records] == ["event", "action", "action", "event", "action"]
    assert rt.results == {"f": Finish(0, "done")} and finished == [("f", Finish(0, "done"))]
    assert ("info", "asked", {"flow": "f", "n": 1}) in rt.log.lines


async def test_a_finished_flow_leaves_nothing_behind_in_any_executor(tmp_path):
    rt = _runtime(tmp_path)
    flow = ScriptedFlow([ArmTimer("deadline", 60.0)], [Finish(1, "refused")])
    forgotten = []
    for ex in rt.executors:
        ex.forget = (lambda orig: lambda fid: (forgotten.append(fid), orig(fid)))(ex.forget)
    rt.start_flow("f", flow)
    rt.step(*rt._queue.get_nowait())
    assert rt.timers.armed("f") == ["deadline"]
    rt.step("f", Start())
    assert rt.timers.armed("f") == [] and forgotten == ["f"] * len(rt.executors)
    assert ("error", "flow finished", {"flow": "f", "code": 1, "reason": "refused"}) in rt.log.lines


async def test_a_control_request_to_an_ended_flow_is_answered_409(tmp_path):
    rt = _runtime(tmp_path)
    req, future = rt.new_request()
    rt.step("no-such-flow", ControlRequest(req, "cancel"))
    assert future.result() == (409, {"error": "that flow has already ended"})


async def test_a_flow_answers_a_control_request_through_the_runtime(tmp_path):
    rt = _runtime(tmp_path)
    req, future = rt.new_request()
    rt.start_flow("f", ScriptedFlow([], [ControlReply(req, 200, {"state": "ok"})]))
    rt.step(*rt._queue.get_nowait())
    rt.step("f", ControlRequest(req, "status"))
    assert future.result() == (200, {"state": "ok"}) and rt.replies == {}


async def test_closing_the_runtime_answers_waiting_requests_and_stops_timers(tmp_path):
    rt = _runtime(tmp_path)
    _, future = rt.new_request()
    rt.start_flow("f", ScriptedFlow([ArmTimer("deadline", 0.01)]))
    rt.step(*rt._queue.get_nowait())
    rt.close()
    await asyncio.sleep(0.03)
    assert future.result() == (503, {"error": "the agent is stopping"})
    assert rt._queue.empty()


async def test_the_monitors_loss_is_what_the_sidecar_sees(tmp_path):
    mon = FakeMonitor()
    rt = _runtime(tmp_path, qmp=mon)
    assert rt.qmp is mon and rt.qmp_gone is None
    rt.start_flow("f", ScriptedFlow())
    rt.step(*rt._queue.get_nowait())
    watcher = asyncio.ensure_future(rt.watch_qmp())
    mon.disconnect("EOF")
    assert await watcher == "EOF" and rt.qmp_gone == "EOF"


async def test_the_dispatchers_inbox_is_fifo_and_wakes_its_consumer_once_per_wait():
    from agent.app.runtime import _Inbox

    inbox = _Inbox()
    assert inbox.empty()
    with pytest.raises(asyncio.QueueEmpty):
        inbox.get_nowait()
    got = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not got.done()
    inbox.put_nowait(("a", Start()))
    inbox.put_nowait(("b", Start()))
    assert await asyncio.wait_for(got, 1) == ("a", Start())
    assert inbox.get_nowait() == ("b", Start()) and inbox.empty()
    # a consumer cancelled while waiting: the next put wakes nobody, a new consumer gets it
    waiting = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    inbox.put_nowait(("c", Start()))
    assert await asyncio.wait_for(inbox.get(), 1) == ("c", Start())
