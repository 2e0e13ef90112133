"""Reading a small input file that a user named: only a regular file, only so much.

Why: ``open(path).read()`` on ``/dev/zero`` reads until memory runs out, and
on a FIFO ``open()`` itself blocks until someone writes to it (for ever, and
SIGTERM is not handled while the main thread sits in ``open()``).  Every
configuration file and key file the agent or the owner reads at start goes
through :func:`read_regular_file`: the file is opened with ``O_NONBLOCK``
(so a FIFO opens at once), checked with ``fstat`` on the open descriptor
(no window between the check and the read), and read to at most ``limit``
bytes.  A file that is there but unfit is a one-line :class:`UsageError`
(exit 2); an ``OSError`` of ``open()`` or ``read()`` (missing file, no
permission) is left to the caller, who words it for its own file.
"""

from __future__ import annotations

import os
import stat

from agent.common.errors import UsageError

__all__ = ["read_regular_file", "check_regular_file"]


def _open_regular(path: str | os.PathLike, what: str, limit: int) -> int:
    """An fd on ``path`` if it is a regular file of at most ``limit`` bytes."""
    shown = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{what} {shown} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {shown} is not a regular file")
        if st.st_size > limit:
            raise UsageError(f"{what} {shown} is larger than {limit} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular_file(path: str | os.PathLike, what: str, limit: int) -> None:
    """Refuse, before anything is created, a file :func:`read_regular_file` would refuse."""
    os.close(_open_regular(path, what, limit))


def read_regular_file(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; UsageError otherwise.

    The size is checked again while reading: a file that grows after the
    ``fstat`` is still cut off at ``limit + 1`` bytes and refused.
    """
    fd = _open_regular(path, what, limit)
    try:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UsageError(f"{what} {os.fspath(path)} is larger than {limit} bytes")
    finally:
        os.close(fd)
    return b"".join(chunks)
