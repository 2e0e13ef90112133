"""What an SEV launch leaves in the run_dir for an agent started after it.

An agent is crash-only: killed at any step of a launch, the next ``keyagent
run`` over the same VM finishes from what QEMU and the run_dir say, never
from memory (docs/crash-only.md).  QEMU says almost everything: a VM still in
``prelaunch`` is attested again (the owner resends the same answer for the
same measurement; LAUNCH_SECRET may be repeated in the PSP's LSECRET state).
What QEMU cannot say is whether a *running* VM got its secret: QEMU 7.2
resumes an SEV guest with or without one.  So once a verified secret is
injected, before ``cont``, the launch flow asks for a note (the
``NoteLaunched`` action): ``launch.json`` in the run_dir with the measurement
QEMU reported for that launch.  The next agent that finds the VM running
compares the measurement QEMU still reports with the note (the MNONCE in it
is fresh for every launch, so a note from an earlier QEMU never matches) and
then has nothing to do; without a matching note a running VM is "too late to
attest", as before.  When QEMU is gone (the monitor closed under the agent,
or ``keyagent launch`` stopped it) the note is removed.

The note holds nothing secret (the measurement goes to the owner in clear).
It is written to a fresh 0600 file and renamed over the old one, so a kill
in the middle leaves the old note or the new one, never half of one.

Under ``keyagent host`` (one event loop for every VM) the runtime writes
the note on a worker thread (:func:`write_launch_note_off_loop`) and holds
every QMP command sent after it, ``cont`` first, until the note is durable.
Creating, ``fsync``-ing and renaming the file is mostly I/O wait, 0.3 ms
on a quiet disk and 1-3 ms under load: on the loop, 100 launches waited for
each other's notes; on threads, the notes' fsyncs also share journal
commits.  A note not written within ``SYNC_TIMEOUT_S`` (or not at all) is
a warning and ``cont`` goes on: without a note a restarted agent finds the
running VM too late to attest, the safe side.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Callable

from agent.sev.sizes import MEASUREMENT_LEN

LAUNCH_NOTE = "launch.json"
MAX_NOTE = 4096
#: how long ``cont`` waits for the note's fsync; past it the note is dropped
SYNC_TIMEOUT_S = 5.0


def write_launch_note(run_dir: str, measurement: str) -> None:
    """Keep ``measurement`` (base64, QEMU's text) as the VM's launched measurement, durably."""
    data = json.dumps({"measurement": measurement}).encode()
    # os.urandom, not secrets.token_hex: ``secrets`` imports hmac and hashlib, and
    # hashlib's import instantiates every OpenSSL digest (~0.7 MB of RSS in every sidecar).
    tmp = os.path.join(run_dir, f".{LAUNCH_NOTE}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(run_dir, LAUNCH_NOTE))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_launch_note_off_loop(
    run_dir: str,
    measurement: str,
    off_loop: Callable[..., asyncio.Future[None]],
    timeout: float = SYNC_TIMEOUT_S,
) -> asyncio.Future[str | None]:
    """:func:`write_launch_note` on a worker thread (``off_loop``:
    :class:`agent.app.offloop.OffLoop`): a future of None once the note is
    durable, otherwise of why not.  After ``timeout`` it says so and the
    caller goes on; the thread may still finish the note, which is then as
    true as it would have been in time (the secret was injected before it
    was asked for).  Callbacks, not a task: one of these per VM of a host."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str | None] = loop.create_future()

    def settle(problem: str | None) -> None:
        if not outcome.done():
            outcome.set_result(problem)

    timer = loop.call_later(timeout, settle, f"not written within {timeout:g} s")

    def written(done: asyncio.Future[None]) -> None:
        timer.cancel()
        exc = None if done.cancelled() else done.exception()  # retrieved, even after the timeout
        if done.cancelled():
            settle("cancelled")
        else:
            settle(None if exc is None else (getattr(exc, "strerror", None) or type(exc).__name__))

    off_loop(write_launch_note, run_dir, measurement).add_done_callback(written)
    return outcome


def drop_launch_note(run_dir: str) -> None:
    """QEMU is gone: the note speaks of no VM any more."""
    try:
        os.unlink(os.path.join(run_dir, LAUNCH_NOTE))
    except FileNotFoundError:
        pass
    except OSError:
        pass  # a stale note never matches a new launch's measurement (fresh MNONCE)


def read_launch_note(run_dir: str) -> str | None:
    """The measurement a previous agent noted, or None.

    None too for a note that is unreadable or malformed: then a running VM
    is too late to attest, the safe answer."""
    path = os.path.join(run_dir, LAUNCH_NOTE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = os.read(fd, MAX_NOTE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        note = json.loads(raw) if len(raw) <= MAX_NOTE else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(note, dict) or not isinstance(note.get("measurement"), str):
        return None
    measurement = note["measurement"]
    try:
        if len(base64.b64decode(measurement, validate=True)) != MEASUREMENT_LEN:
            return None
    except (binascii.Error, ValueError):
        return None
    return measurement
