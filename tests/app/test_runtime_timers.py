"""The timer executor: ArmTimer/CancelTimer in, TimerFired out."""

from __future__ import annotations

import asyncio

from agent.app.runtime_timers import TimerExecutor
from agent.core.actions import ArmTimer, CancelTimer
from agent.core.events import TimerFired
from tests.app.runtime_fakes import Fed


async def test_an_armed_timer_fires_once_for_its_flow():
    fed = Fed()
    timers = TimerExecutor(fed)
    timers.run("f1", ArmTimer("deadline", 0.01))
    await asyncio.sleep(0.05)
    assert fed == [("f1", TimerFired("deadline"))]
    assert timers.armed("f1") == []


async def test_re_arming_replaces_the_earlier_timer():
    fed = Fed()
    timers = TimerExecutor(fed)
    timers.run("f1", ArmTimer("deadline", 0.01))
    timers.run("f1", ArmTimer("deadline", 0.05))
    await asyncio.sleep(0.03)
    assert fed == []
    await asyncio.sleep(0.05)
    assert fed == [("f1", TimerFired("deadline"))]


async def test_a_cancelled_timer_never_fires_and_unknown_names_are_ignored():
    fed = Fed()
    timers = TimerExecutor(fed)
    timers.run("f1", ArmTimer("deadline", 0.01))
    timers.run("f1", CancelTimer("deadline"))
    timers.run("f1", CancelTimer("never-armed"))
    await asyncio.sleep(0.03)
    assert fed == []


async def test_forget_cancels_only_that_flows_timers_and_close_cancels_the_rest():
    fed = Fed()
    timers = TimerExecutor(fed)
    timers.run("f1", ArmTimer("a", 0.01))
    timers.run("f1", ArmTimer("b", 0.01))
    timers.run("f2", ArmTimer("a", 0.01))
    timers.forget("f1")
    assert timers.armed("f1") == [] and timers.armed("f2") == ["a"]
    timers.run("f3", ArmTimer("a", 0.01))
    timers.close()
    await asyncio.sleep(0.03)
    assert fed == []
