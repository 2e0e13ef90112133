"""A live swtpm found by a restarted agent: recognised through /proc and a pidfd, never by connecting."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile

import pytest

from agent.common.secret import Secret
from agent.io import swtpm

needs_swtpm = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
    reason="needs swtpm and swtpm_setup (apt: swtpm swtpm-tools)",
)


@pytest.fixture
def dirs():
    """(run_dir, state_dir) under a short base path: socket paths must fit 107 bytes."""
    base = tempfile.mkdtemp(prefix="swtpm-adopt-", dir="/tmp")
    run = os.path.join(base, "run")
    os.mkdir(run, 0o700)
    yield run, os.path.join(base, "state")
    shutil.rmtree(base, ignore_errors=True)


async def live_swtpm(run: str, state: str) -> swtpm.SwtpmProcess:
    key = os.urandom(32)
    await swtpm.setup_state(state, "2.0", Secret(key), "raw")
    return await swtpm.start_swtpm(state, "2.0", Secret(key), "raw", run)


@needs_swtpm
async def test_the_swtpm_of_this_vm_is_adopted_and_its_death_is_seen_through_the_pidfd(dirs):
    run, state = dirs
    sw = await live_swtpm(run, state)
    try:
        adopted = swtpm.find_live(run, state)
        assert adopted is not None and adopted.pid == sw.pid
        os.kill(sw.pid, 9)
        await asyncio.wait_for(adopted.wait(), 5)
        assert adopted.returncode is None  # not our child: no status to read
        assert not os.path.exists(adopted.pid_file)
    finally:
        await sw.stop()


@needs_swtpm
async def test_an_adopted_swtpm_is_stopped_through_its_pidfd(dirs):
    run, state = dirs
    sw = await live_swtpm(run, state)
    adopted = swtpm.find_live(run, state)
    assert adopted is not None
    await asyncio.wait_for(adopted.stop(), 10)
    assert await asyncio.wait_for(sw.wait(), 5) == 0  # SIGTERM: swtpm's clean exit


@needs_swtpm
async def test_a_swtpm_of_another_state_or_run_dir_is_not_adopted(dirs):
    run, state = dirs
    sw = await live_swtpm(run, state)
    try:
        assert swtpm.find_live(run, state + "-other") is None
        other_run = run + "-other"
        os.mkdir(other_run, 0o700)
        shutil.copy(os.path.join(run, swtpm.PID_FILE_NAME), other_run)
        assert swtpm.find_live(other_run, state) is None
    finally:
        await sw.stop()


def test_a_pid_file_of_a_dead_or_foreign_process_or_of_garbage_adopts_nothing(dirs):
    run, state = dirs
    pid_file = os.path.join(run, swtpm.PID_FILE_NAME)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for text in (f"{dead.pid}\n", f"{os.getpid()}\n", "1\n", "x\n", "9" * 40):
        with open(pid_file, "w") as f:
            f.write(text)
        assert swtpm.find_live(run, state) is None
    os.unlink(pid_file)
    os.symlink("/proc/self/stat", pid_file)
    assert swtpm.find_live(run, state) is None


def test_listening_inodes_are_read_from_proc_net_unix_lines():
    table = [
        "Num       RefCount Protocol Flags    Type St Inode Path",
        "0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/vm/swtpm-ctrl.sock",
        "0000000000000000: 00000003 00000000 00000000 0001 03 4343 /run/vm/swtpm-ctrl.sock",
        "0000000000000000: 00000002 00000000 00010000 0001 01 4444 /run/other.sock",
        "0000000000000000: 00000002 00000000 00010000 0001 01 4545",
    ]
    assert swtpm._listening_inodes("/run/vm/swtpm-ctrl.sock", table) == {"4242"}
