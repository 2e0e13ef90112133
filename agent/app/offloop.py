"""Blocking calls off the event loop, batched: what ``keyagent host`` uses so
that one VM's file-system calls do not hold up every other VM's steps.

``loop.run_in_executor`` per call costs 20-90 µs of CPU in hand-offs (a
thread woken, then the loop woken through its self-pipe), about as much as
the call it moves when that is a ``bind`` of a control socket.  Calls asked
in the same turn of the loop go to the worker thread as one job instead,
run there one after the other, and their results come back to the loop in
one wake-up: 100 VMs that start together cost a few hand-offs, not 100.

A batch is at most ``max_batch`` calls; more make more jobs, which the
executor's threads (6 here) run side by side: the launch notes' ``fsync``
waits overlap across jobs as they did with one job per note (100 notes on
6 threads ran 17 after each other per thread either way).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class OffLoop:
    """``await off_loop(fn, *args)``: ``fn(*args)`` on a worker thread, batched."""

    def __init__(self, max_batch: int = 8) -> None:
        self.max_batch = max_batch
        self._queued: list[_Call] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._submit, loop)
        self._queued.append((fn, args, future))
        return future

    def _submit(self, loop: asyncio.AbstractEventLoop) -> None:
        queued, self._queued = self._queued, []
        for i in range(0, len(queued), self.max_batch):
            batch = queued[i : i + self.max_batch]
            job = loop.run_in_executor(None, _run, loop, batch)
            job.add_done_callback(functools.partial(_failed, batch=batch))


def _run(loop: asyncio.AbstractEventLoop, batch: list[_Call]) -> None:
    results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
    for fn, args, future in batch:
        try:
            results.append((future, fn(*args), None))
        except Exception as exc:  # the caller's to handle, as if it had called fn itself
            results.append((future, None, exc))
    loop.call_soon_threadsafe(_deliver, results)


def _deliver(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        if future.done():  # cancelled meanwhile: its caller no longer waits (and cleans up; see callers)
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)


def _failed(job: asyncio.Future[None], batch: list[_Call]) -> None:
    """The job itself failed (not a call of it): nobody is left waiting."""
    exc = None if job.cancelled() else job.exception()
    if exc is None and not job.cancelled():
        return
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc or asyncio.CancelledError())
