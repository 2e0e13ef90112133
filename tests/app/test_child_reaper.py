"""keyagent launch as PID 1: the orphan reaper leaves other waiters' children alone.

Found by tests/contrib/test_container_image.py: in the image, the reaper took
swtpm_setup's status before asyncio's watcher did, and the launch failed with
"swtpm_setup failed (exit 255)".  The reaper does not need to be PID 1 to
reap, so these run in the test process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

from agent.app.launcher import ChildReaper


def zombie(status: int) -> subprocess.Popen:
    child = subprocess.Popen(["sh", "-c", f"exit {status}"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return child
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


async def test_a_fresh_zombie_is_left_to_whoever_waits_for_it():
    child = zombie(7)
    reaper = ChildReaper(own=set)
    reaper.reap()
    reaper.reap()  # a second SIGCHLD at once changes nothing
    assert child.wait(timeout=5) == 7  # reaped by the reaper, wait() would say 0


async def test_a_zombie_nobody_waits_for_is_reaped_on_a_later_look(monkeypatch):
    child = zombie(7)
    reaper = ChildReaper(own=set)
    monkeypatch.setattr(ChildReaper, "AGE_S", 0.05)
    reaper.reap()
    assert os.path.exists(f"/proc/{child.pid}")
    await asyncio.sleep(0.3)  # the reaper looks again by itself
    assert not os.path.exists(f"/proc/{child.pid}")
    assert child.wait(timeout=5) == 0  # the status was taken: ECHILD


async def test_own_children_are_never_reaped(monkeypatch):
    child = zombie(7)
    reaper = ChildReaper(own=lambda: {child.pid})
    monkeypatch.setattr(ChildReaper, "AGE_S", 0.0)
    reaper.reap()
    await asyncio.sleep(0.05)
    assert child.wait(timeout=5) == 7


async def test_an_asyncio_child_keeps_its_status_under_a_storm_of_sigchld():
    reaper = ChildReaper(own=set)
    for _ in range(20):
        proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 3")
        while proc.returncode is None:
            reaper.reap()
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.001)
            except TimeoutError:
                pass
        assert proc.returncode == 3
