"""The runtime's timers: ``ArmTimer``/``CancelTimer`` in, ``TimerFired`` out."""

from __future__ import annotations

import asyncio
from typing import assert_never

from agent.app.runtime_base import Feed
from agent.core.actions import ArmTimer, CancelTimer
from agent.core.events import TimerFired

TimerAction = ArmTimer | CancelTimer


class TimerExecutor:
    """One loop timer per (flow, name); re-arming replaces the old one."""

    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def run(self, flow_id: str, action: TimerAction) -> None:
        match action:
            case ArmTimer(name=name, seconds=seconds):
                self.cancel(flow_id, name)
                loop = asyncio.get_running_loop()
                self._timers[(flow_id, name)] = loop.call_later(seconds, self._fire, flow_id, name)
            case CancelTimer(name=name):
                self.cancel(flow_id, name)
            case _:
                assert_never(action)

    def armed(self, flow_id: str) -> list[str]:
        return sorted(name for fid, name in self._timers if fid == flow_id)

    def cancel(self, flow_id: str, name: str) -> None:
        handle = self._timers.pop((flow_id, name), None)
        if handle is not None:
            handle.cancel()

    def _fire(self, flow_id: str, name: str) -> None:
        self._timers.pop((flow_id, name), None)
        self._feed(flow_id, TimerFired(name))

    def forget(self, flow_id: str) -> None:
        for fid, name in [k for k in self._timers if k[0] == flow_id]:
            self.cancel(fid, name)

    def close(self) -> None:
        for key in list(self._timers):
            self.cancel(*key)
