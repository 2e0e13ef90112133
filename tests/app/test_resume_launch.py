"""The run_dir's launch note: what a restarted agent learns about a running VM."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import stat
import threading

import pytest

from agent.app import resume_launch
from agent.app.eventlog import EventLog
from agent.app.offloop import OffLoop
from agent.app.resume_launch import LAUNCH_NOTE, drop_launch_note, read_launch_note, write_launch_note
from agent.app.runtime import Runtime
from agent.core.actions import NoteLaunched, SendQmp
from tests.app.runtime_fakes import FakeMonitor, QuietLog

MEASUREMENT = base64.b64encode(bytes(range(48))).decode()


def test_a_note_written_is_read_back(tmp_path):
    write_launch_note(str(tmp_path), MEASUREMENT)
    assert read_launch_note(str(tmp_path)) == MEASUREMENT
    mode = os.stat(tmp_path / LAUNCH_NOTE).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == [LAUNCH_NOTE]  # no temporary file left


def test_a_newer_note_replaces_the_old_one(tmp_path):
    other = base64.b64encode(bytes(48)).decode()
    write_launch_note(str(tmp_path), other)
    write_launch_note(str(tmp_path), MEASUREMENT)
    assert read_launch_note(str(tmp_path)) == MEASUREMENT


def test_without_a_note_there_is_nothing(tmp_path):
    assert read_launch_note(str(tmp_path)) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"measurement": 3}',
        b'{"measurement": "!!!"}',
        b'{"measurement": "' + base64.b64encode(bytes(16)) + b'"}',
        b'{"measurement": "' + MEASUREMENT.encode() + b'", "pad": "' + b"x" * 5000 + b'"}',
    ],
)
def test_a_malformed_note_is_no_note(tmp_path, content):
    (tmp_path / LAUNCH_NOTE).write_bytes(content)
    assert read_launch_note(str(tmp_path)) is None


def test_a_note_that_is_a_link_or_a_fifo_is_not_followed_or_waited_on(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(f'{{"measurement": "{MEASUREMENT}"}}')
    os.symlink(target, tmp_path / LAUNCH_NOTE)
    assert read_launch_note(str(tmp_path)) is None
    os.unlink(tmp_path / LAUNCH_NOTE)
    os.mkfifo(tmp_path / LAUNCH_NOTE)
    assert read_launch_note(str(tmp_path)) is None


async def test_the_runtime_writes_the_note_when_the_flow_asks(tmp_path):
    rt = Runtime(qmp=None, event_log=EventLog(None), run_dir=str(tmp_path), log=QuietLog())
    rt._do("launch", NoteLaunched(MEASUREMENT))
    assert read_launch_note(str(tmp_path)) == MEASUREMENT


async def test_a_note_that_cannot_be_written_is_only_a_warning(tmp_path):
    log = QuietLog()
    rt = Runtime(qmp=None, event_log=EventLog(None), run_dir=str(tmp_path / "gone"), log=log)
    rt._do("launch", NoteLaunched(MEASUREMENT))
    assert [msg for level, msg, _ in log.lines if level == "warning"] == ["cannot note the launch in the run_dir"]


async def test_without_a_run_dir_nothing_is_noted():
    rt = Runtime(qmp=None, event_log=EventLog(None), run_dir=None, log=QuietLog())
    rt._do("launch", NoteLaunched(MEASUREMENT))  # no error, nothing to write to


def test_a_dropped_note_is_gone_and_dropping_twice_is_fine(tmp_path):
    write_launch_note(str(tmp_path), MEASUREMENT)
    drop_launch_note(str(tmp_path))
    drop_launch_note(str(tmp_path))
    assert read_launch_note(str(tmp_path)) is None and os.listdir(tmp_path) == []


async def test_under_a_shared_loop_cont_waits_for_the_note_and_the_loop_does_not(tmp_path, monkeypatch):
    synced, release = [], threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        release.wait(5)  # on the worker thread: the loop goes on meanwhile
        real_fsync(fd)
        synced.append(fd)

    monkeypatch.setattr(resume_launch.os, "fsync", slow_fsync)
    mon = FakeMonitor()
    rt = Runtime(qmp=mon, event_log=EventLog(None), run_dir=str(tmp_path), log=QuietLog())
    rt.note_off_loop = OffLoop()  # keyagent host's sidecars
    rt._do("launch", NoteLaunched(MEASUREMENT))
    rt._do("launch", SendQmp("t1", "cont"))
    await asyncio.sleep(0.05)
    assert mon.sent == [] and synced == [] and read_launch_note(str(tmp_path)) is None
    release.set()
    await rt.drain_qmp(5.0)
    assert len(synced) == 1 and mon.sent == [("cont", {})]
    assert read_launch_note(str(tmp_path)) == MEASUREMENT
    assert sorted(os.listdir(tmp_path)) == [LAUNCH_NOTE]


async def test_under_a_shared_loop_a_note_that_cannot_be_made_durable_is_a_warning_and_cont_goes_on(
    tmp_path, monkeypatch
):
    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(resume_launch.os, "fsync", failing_fsync)
    log, mon = QuietLog(), FakeMonitor()
    rt = Runtime(qmp=mon, event_log=EventLog(None), run_dir=str(tmp_path), log=log)
    rt.note_off_loop = OffLoop()
    rt._do("launch", NoteLaunched(MEASUREMENT))
    rt._do("launch", SendQmp("t1", "cont"))
    await rt.drain_qmp(5.0)
    assert mon.sent == [("cont", {})]  # the VM still gets its cont: only the note is lost
    assert read_launch_note(str(tmp_path)) is None and os.listdir(tmp_path) == []
    assert [msg for level, msg, _ in log.lines if level == "warning"] == ["cannot note the launch in the run_dir"]


async def test_a_note_not_written_within_its_deadline_lets_cont_go_on_and_may_still_land(tmp_path, monkeypatch):
    release = threading.Event()
    real_fsync = os.fsync

    def stuck_fsync(fd):
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(resume_launch.os, "fsync", stuck_fsync)
    try:
        problem = await resume_launch.write_launch_note_off_loop(str(tmp_path), MEASUREMENT, OffLoop(), timeout=0.05)
        assert read_launch_note(str(tmp_path)) is None
    finally:
        release.set()
    assert problem == "not written within 0.05 s"
    for _ in range(100):  # the thread finishes it: a true note, only late
        if read_launch_note(str(tmp_path)) is not None:
            break
        await asyncio.sleep(0.01)
    assert read_launch_note(str(tmp_path)) == MEASUREMENT


async def test_a_sidecars_own_loop_writes_the_note_durably_before_going_on(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(resume_launch.os, "fsync", lambda fd: (real_fsync(fd), synced.append(fd)))
    rt = Runtime(qmp=FakeMonitor(), event_log=EventLog(None), run_dir=str(tmp_path), log=QuietLog())
    rt._do("launch", NoteLaunched(MEASUREMENT))
    assert len(synced) == 1 and read_launch_note(str(tmp_path)) == MEASUREMENT
    assert rt.qmp_executor._hold is None  # nothing held: cont goes at once
