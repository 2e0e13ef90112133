"""Blocking calls batched onto a worker thread (agent.app.offloop), as keyagent host uses them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.app.offloop import OffLoop


def counting_jobs(loop: asyncio.AbstractEventLoop) -> list[int]:
    jobs: list[int] = []
    real = loop.run_in_executor

    def run_in_executor(executor, fn, *args):
        jobs.append(len(args[1]) if len(args) > 1 else 0)  # the batch's size
        return real(executor, fn, *args)

    loop.run_in_executor = run_in_executor  # type: ignore[method-assign]
    return jobs


async def test_calls_asked_in_one_turn_run_as_one_job_in_order_off_the_loop():
    jobs = counting_jobs(asyncio.get_running_loop())
    off_loop, seen = OffLoop(), []

    def call(n):
        seen.append((n, threading.current_thread() is threading.main_thread()))
        return n * 10

    results = await asyncio.gather(*(off_loop(call, n) for n in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert seen == [(n, False) for n in range(5)]
    assert jobs == [5]
    assert await off_loop(call, 7) == 70  # a later turn: a job of its own
    assert jobs == [5, 1]


async def test_a_call_that_raises_fails_only_its_own_caller():
    off_loop = OffLoop()

    def boom():
        raise OSError(2, "No such file or directory")

    ok, bad = off_loop(lambda: "fine"), off_loop(boom)
    assert await ok == "fine"
    with pytest.raises(OSError, match="No such file"):
        await bad


async def test_a_caller_that_stopped_waiting_does_not_stop_the_others():
    off_loop, release = OffLoop(), threading.Event()
    first = off_loop(release.wait, 5)
    second = off_loop(lambda: "second")
    first.cancel()
    release.set()
    assert await second == "second"


async def test_a_turn_with_more_calls_than_a_batch_makes_several_jobs():
    jobs = counting_jobs(asyncio.get_running_loop())
    off_loop = OffLoop(max_batch=8)
    assert await asyncio.gather(*(off_loop(abs, -n) for n in range(20))) == list(range(20))
    assert jobs == [8, 8, 4]
