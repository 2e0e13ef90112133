"""Keep the agent's memory out of core dumps and away from same-uid debuggers.

The agent holds keys in memory (the master key, PSKs, launch secrets).  A
crash that writes a core file would put them on disk, where nothing removes
them; a process of the same uid could read them with ptrace or
``/proc/PID/mem``.  So every long-running command calls
:func:`harden_process` first:

* ``RLIMIT_CORE`` = (0, 0): no core file, and the hard limit keeps it so (it
  is inherited across ``exec``: QEMU and swtpm started by ``keyagent launch``
  write no core either, and they hold the same secrets and the guest's RAM);
* ``prctl(PR_SET_DUMPABLE, 0)`` (prctl(2)): no core even through a
  ``core_pattern`` pipe, no ``ptrace`` attach and no ``/proc/PID/mem``,
  ``environ``, ``maps`` or ``fd/`` for anyone without ``CAP_SYS_PTRACE``.
  ``/proc/PID/status`` and ``cmdline`` (mode 0444) stay readable, and
  ``SO_PEERCRED`` is unaffected.  The flag is reset by ``execve`` and is per
  process, so children the agent starts are not affected by it.

Only the standard library: ``resource`` and libc's ``prctl`` through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import resource

__all__ = ["harden_process", "is_dumpable", "release_free_memory", "PR_GET_DUMPABLE", "PR_SET_DUMPABLE"]

# <linux/prctl.h>
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg2: int = 0) -> int:
    """``prctl(option, arg2, 0, 0, 0)``; raises OSError on failure."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # the libc this Python is linked with
    ulong = ctypes.c_ulong
    result = _libc.prctl(ctypes.c_int(option), ulong(arg2), ulong(0), ulong(0), ulong(0))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def is_dumpable() -> bool:
    """Whether this process may dump core / be ptrace-attached by its uid."""
    return _prctl(PR_GET_DUMPABLE) != 0


def harden_process() -> list[str]:
    """Disable core dumps and make the process non-dumpable.

    Returns what could not be done (one short reason each), for the caller
    to log as a warning; an empty list when both measures are in place.  It
    never raises: a platform without ``prctl`` still runs the agent.
    """
    problems: list[str] = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        problems.append(f"cannot set RLIMIT_CORE to 0: {getattr(exc, 'strerror', None) or exc}")
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError) as exc:  # AttributeError: no prctl in this libc
        problems.append(f"cannot clear the dumpable flag: {getattr(exc, 'strerror', None) or exc}")
    return problems


def release_free_memory() -> None:
    """Give the heap the last burst of work freed back to the kernel.

    A sidecar spends its life idle after the launch, and there is one per
    VM: glibc keeps the pages freed by the launch's requests and replies
    (about 1 MB of RSS here), ``malloc_trim(0)`` returns them.  A no-op on a
    libc without it (musl).
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass
