"""Secret references: ``file:PATH``, ``keyring:DESCRIPTION``, ``libvirt:UUID``.

Resolving a reference reads the secret into a :class:`Secret`; the reference
itself (a path, a description, a UUID) may be logged, the bytes never.  A
key file holds the raw key bytes, used as they are (no newline trimming).

Two kinds of reference, two rules:

* From the configuration (``[vtpm] key``) or from a control peer with the
  agent's own uid or root (:data:`UNRESTRICTED`): any file the agent can
  read, the keyring, libvirt.
* From any other control peer (one let in by ``[control] gid``): the agent
  runs as root and would otherwise read ``/etc/shadow`` or
  ``/proc/self/environ`` for it.  Such a peer may only name a ``file:``
  under one of ``[control] ref_dirs`` (none by default), reached without
  following any symlink (each component opened with O_NOFOLLOW below the
  ref_dir), a regular file with one link, which either the operator put
  there (owned by the agent's uid or root) or the peer could read itself.
  Everything else is refused with the one same :data:`NOT_ALLOWED` message,
  before the file system is touched where possible, so that the answer
  never tells whether a file outside exists.

Nothing here may block the event loop on something a peer controls: files
are opened O_NONBLOCK (a FIFO opens at once and is refused as not a regular
file) and :func:`resolve_async` reads in a worker thread under a deadline
(a FUSE file that never answers, a libvirtd that does not reply).
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import threading
from dataclasses import dataclass

from agent.common.errors import UsageError
from agent.common.secret import Secret

MAX_SECRET_FILE = 64 * 1024
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
RESOLVE_TIMEOUT_S = 10.0
NOT_ALLOWED = "reference not allowed for this peer"

_OPEN_FILE = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_OPEN_DIR = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY


@dataclass(frozen=True)
class RefAccess:
    """Who a reference is resolved for, and where it may point.

    ``unrestricted``: the configuration, our own uid, root.  Otherwise the
    peer's uid and groups (primary and supplementary) and the ref_dirs
    (real paths, as ``[control] ref_dirs`` resolved them).
    """

    unrestricted: bool
    uid: int | None = None
    groups: frozenset[int] = frozenset()
    ref_dirs: tuple[str, ...] = ()


UNRESTRICTED = RefAccess(unrestricted=True)
NOBODY = RefAccess(unrestricted=False)  # no peer known: nothing is allowed


class RefNotAllowed(UsageError):
    """The one answer for every reference a restricted peer may not use."""

    def __init__(self) -> None:
        super().__init__(NOT_ALLOWED)


def _shown(path: str) -> str:
    """A path as it may appear in a one-line error."""
    return path if path.isprintable() else repr(path)


def _read_fd(fd: int, label: str) -> Secret:
    """Read a regular file's whole content (1 byte to MAX_SECRET_FILE)."""
    buf = bytearray()
    while True:
        chunk = os.read(fd, MAX_SECRET_FILE + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_SECRET_FILE:
            buf[:] = bytes(len(buf))
            raise UsageError(f"{label} is larger than {MAX_SECRET_FILE} bytes")
    if not buf:
        raise UsageError(f"{label} is empty")
    secret = Secret(buf)
    buf[:] = bytes(len(buf))
    return secret


def _check_regular(st: os.stat_result, label: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{label} is not a regular file")
    if st.st_size > MAX_SECRET_FILE:
        raise UsageError(f"{label} is larger than {MAX_SECRET_FILE} bytes")


def read_secret_file(path: str, what: str = "secret file") -> Secret:
    """Read a key file; never blocks on a FIFO or device, never follows a
    final symlink."""
    label = f"{what} {_shown(path)}"
    try:
        fd = os.open(path, _OPEN_FILE)
    except OSError as exc:
        raise UsageError(f"cannot read {label}: {exc.strerror}") from None
    except ValueError:  # an embedded NUL
        raise UsageError(f"cannot read {label}: not a valid path") from None
    try:
        _check_regular(os.fstat(fd), label)
        return _read_fd(fd, label)
    finally:
        os.close(fd)


def _under(path: str, ref_dirs: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """(ref_dir, components below it) if ``path`` is lexically inside one."""
    if not os.path.isabs(path) or "\0" in path:
        return None
    norm = os.path.normpath(path)
    for base in ref_dirs:
        rel = os.path.relpath(norm, base)
        if rel != os.curdir and rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return base, rel.split(os.sep)
    return None


def _peer_may_read(st: os.stat_result, access: RefAccess) -> bool:
    if st.st_uid in (0, os.geteuid()):
        return True  # put there by the operator, for the group to use unread
    if st.st_uid == access.uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in access.groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def read_peer_file(path: str, what: str, access: RefAccess) -> Secret:
    """A ``file:`` reference of a restricted peer: only below a ref_dir.

    Each directory below the ref_dir is opened with O_NOFOLLOW relative to
    the one before (no symlink anywhere, no race with a rename), the file
    likewise.  Failures that could describe something outside a ref_dir
    are the generic refusal; inside, the usual one-line reasons.
    """
    inside = _under(path, access.ref_dirs)
    if inside is None:
        raise RefNotAllowed()
    base, parts = inside
    label = f"{what} {_shown(path)}"
    try:
        dir_fd = os.open(base, _OPEN_DIR)
    except OSError:
        raise RefNotAllowed() from None
    fd = -1
    try:
        for name in parts[:-1]:
            try:
                next_fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
            except FileNotFoundError:
                raise UsageError(f"cannot read {label}: No such file or directory") from None
            except OSError:  # a symlink (ELOOP), not a directory (ENOTDIR), ...
                raise RefNotAllowed() from None
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            fd = os.open(parts[-1], _OPEN_FILE, dir_fd=dir_fd)
        except FileNotFoundError:
            raise UsageError(f"cannot read {label}: No such file or directory") from None
        except OSError:
            raise RefNotAllowed() from None
        st = os.fstat(fd)
        # One link: a hard link made into a ref_dir is another file's
        # name (fs.protected_hardlinks does not stop root-owned targets
        # linked by their owner's group).
        if stat.S_ISREG(st.st_mode) and (st.st_nlink != 1 or not _peer_may_read(st, access)):
            raise RefNotAllowed()
        _check_regular(st, label)
        return _read_fd(fd, label)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(dir_fd)


def _keyring(description: str) -> Secret:
    from agent.io import keyring

    try:
        serial = keyring.search(description)
    except OSError as exc:
        raise UsageError(f"keyring:{_shown(description)}: {exc.strerror}") from None
    try:
        data = keyring.read(serial)
    except OSError as exc:
        raise UsageError(f"keyring:{_shown(description)}: cannot read: {exc.strerror}") from None
    if not data:
        raise UsageError(f"keyring:{_shown(description)} is empty")
    secret = Secret(data)
    data[:] = bytes(len(data))
    return secret


def _libvirt(uuid: str) -> Secret:
    if not UUID_RE.fullmatch(uuid):
        raise UsageError(f"libvirt:{uuid!r} is not a UUID")
    try:
        import libvirt  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError("libvirt: references need libvirt-python installed") from None
    uri = os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")
    try:
        conn = libvirt.open(uri)
        try:
            value = conn.secretLookupByUUIDString(uuid).value()
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        raise UsageError(f"libvirt:{uuid}: {exc.get_error_message()}") from None
    if not value:
        raise UsageError(f"libvirt:{uuid} has an empty value")
    return Secret(value)


def resolve(ref: str, what: str = "secret", access: RefAccess = UNRESTRICTED) -> Secret:
    """Read the secret a reference names; UsageError (one line) otherwise."""
    scheme, sep, rest = ref.partition(":")
    if not sep or not rest:
        raise UsageError(f"{what} reference must be file:PATH, keyring:DESCRIPTION or libvirt:UUID")
    if not access.unrestricted:
        if scheme != "file":
            raise RefNotAllowed()
        return read_peer_file(rest, what, access)
    if scheme == "file":
        return read_secret_file(rest, what)
    if scheme == "keyring":
        return _keyring(rest)
    if scheme == "libvirt":
        return _libvirt(rest)
    raise UsageError(f"unknown {what} reference scheme {scheme!r} (use file:, keyring: or libvirt:)")


async def resolve_async(ref: str, what: str, access: RefAccess, timeout: float = RESOLVE_TIMEOUT_S) -> Secret:
    """:func:`resolve` in a daemon thread, under a deadline.

    The event loop keeps serving (``/healthz``, QMP events) whatever the
    reference does.  A thread that never returns (a FUSE file that never
    answers) cannot be stopped, but it is a daemon: it does not hold up the
    agent's exit (a pool's worker would: ``asyncio.run`` joins them), holds
    nothing once its secret is wiped, and at most MAX_PENDING_READS of them
    exist at a time.
    """
    global _pending
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    with _pending_lock:
        if _pending >= MAX_PENDING_READS:
            raise UsageError(f"{what} reference: too many references still being read")
        _pending += 1

    def work() -> None:
        global _pending
        try:
            try:
                outcome: tuple = (resolve(ref, what, access), None)
            except BaseException as exc:  # handed to the loop, raised there
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop is closed: nobody wants it any more
                if outcome[0] is not None:
                    outcome[0].wipe()
        finally:
            with _pending_lock:
                _pending -= 1

    threading.Thread(target=work, name="keyagent-ref", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise UsageError(f"{what} reference: no answer within {timeout:g} s") from None


MAX_PENDING_READS = 8
_pending = 0
_pending_lock = threading.Lock()


def _settle(future: asyncio.Future, secret: Secret | None, exc: BaseException | None) -> None:
    """On the loop: hand the outcome over, or wipe a secret nobody waits for."""
    if future.done():  # given up (deadline) or cancelled
        if secret is not None:
            secret.wipe()
    elif exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(secret)
