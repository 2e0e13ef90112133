"""Call something that reads a FIFO, with a deadline even if it blocks in open().

A reader that forgets ``O_NONBLOCK`` blocks in ``open()`` until a writer
comes: a regression would hang the whole test run.  The call runs in a
daemon thread; past the deadline the FIFO is opened for writing once, which
releases the stuck ``open()``, and the test fails instead of hanging.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


def call_with_fifo_deadline(
    fifo: str | os.PathLike, fn: Callable[[], Any], seconds: float = 5.0
) -> BaseException | None:
    """Run ``fn()``; return the exception it raised (None if it returned)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a reader waits: this succeeds
        os.close(fd)
        thread.join(5)
        raise AssertionError(f"still blocked on the FIFO {fifo} after {seconds:g}s")
    return outcome[0]
