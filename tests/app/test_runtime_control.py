"""Control requests waiting for a flow's ControlReply."""

from __future__ import annotations

from agent.app.runtime_control import ControlReplies
from agent.core.actions import ControlReply


async def test_each_request_gets_a_fresh_id_and_its_reply_resolves_it():
    control = ControlReplies()
    (r1, f1), (r2, f2) = control.new_request(), control.new_request()
    assert r1 != r2
    control.run("f", ControlReply(r2, 200, {"ok": True}))
    assert f2.done() and f2.result() == (200, {"ok": True})
    assert not f1.done() and list(control.waiting) == [r1]


async def test_a_reply_to_an_unknown_or_answered_request_is_dropped():
    control = ControlReplies()
    req, future = control.new_request()
    control.run("f", ControlReply(req, 200, {}))
    control.run("f", ControlReply(req, 500, {"error": "again"}))
    control.run("f", ControlReply("ctl-99", 200, {}))
    assert future.result() == (200, {})


async def test_closing_answers_every_waiting_request_with_503():
    control = ControlReplies()
    _, future = control.new_request()
    control.forget("any-flow")  # a flow's end does not answer for it
    assert not future.done()
    control.close()
    assert future.result() == (503, {"error": "the agent is stopping"})
