"""The VM's run_dir: the only place the agent writes key material.

The run_dir belongs to the agent alone: it must be a real directory (not a
symlink), owned by us, mode 0700.  Key files live in fresh 0700
subdirectories named ``key-*``, each holding 0600 files created with
O_EXCL|O_NOFOLLOW, removed on every ending.  Anything of that shape found at
start is the wreck of a crashed predecessor and is swept.

Only one agent may own a run_dir at a time: :func:`lock_run_dir` takes an
exclusive ``flock`` on the directory itself, held for the agent's life and
taken before the sweep, so a second agent given the same run_dir stops
(exit 2) instead of sweeping the first's live key directories and taking
over its control socket.  The lock is on the directory (no lock file): it
leaves nothing behind, and the kernel drops it when the agent dies, however
it dies.

With ``[control] gid`` the control socket in the run_dir must be reachable
by that group, as libvirt's ``unix_sock_group`` is: :func:`set_run_dir_group`
makes the run_dir 0710 with that group (enter, but not list), while key
directories stay 0700 and key files 0600, the agent's alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Collection

from agent.common.errors import UsageError

KEY_DIR_PREFIX = "key-"
MIGRATION_KEY_DIR = "tls"  # agent.core.migration.KEY_DIR (io imports no flow)
STALE_FILE_NAMES = ("keys.psk",)
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL (unix(7))


def prepare_run_dir(path: str) -> str:
    """Create (0700) or check the run_dir; refuse one that is not ours."""
    path = os.path.abspath(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot create run_dir {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UsageError(f"cannot stat run_dir {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"run_dir {path} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"run_dir {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UsageError(f"run_dir {path} is owned by uid {st.st_uid}, not by us ({os.geteuid()})")
    # Only the permission bits count: a setgid bit (Kubernetes fsGroup sets it
    # on emptyDirs) gives nobody access to a 0700 directory.  0710 is what
    # set_run_dir_group leaves for the control socket's group (enter, no list).
    if st.st_mode & 0o777 not in (0o700, 0o710):
        raise UsageError(f"run_dir {path} has mode {stat.S_IMODE(st.st_mode):04o}, expected 0700")
    return path


class RunDirLock:
    """The exclusive lock on a run_dir, held while the agent lives."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def lock_run_dir(path: str) -> RunDirLock:
    """Lock the run_dir for this agent; a UsageError if another agent holds it.

    ``flock`` on the directory, non-blocking: a second agent fails at once
    with one line.  The descriptor is close-on-exec, so QEMU and swtpm do not
    keep the lock after the agent is gone.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open run_dir {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():  # replaced since prepare_run_dir looked
            raise UsageError(f"run_dir {path} is not ours")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(
                    f"run_dir {path} is in use by another agent (give each agent its own run_dir)"
                ) from None
            raise UsageError(f"cannot lock run_dir {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return RunDirLock(path, fd)


def set_run_dir_group(lock: RunDirLock, gid: int | None) -> None:
    """0700 (no group), or 0710 with ``gid`` so that group reaches the control socket.

    Done on the locked descriptor (no path lookup to race with).  A setgid
    bit already there is kept.  Group members can enter the run_dir but not
    list it; what they can open is decided by each entry's own mode: the
    control socket 0660, key directories 0700.
    """
    st = os.fstat(lock.fd)
    keep = stat.S_IMODE(st.st_mode) & stat.S_ISGID
    if gid is None:
        os.fchmod(lock.fd, keep | 0o700)
        return
    try:
        os.fchown(lock.fd, -1, gid)
    except OSError as exc:
        raise UsageError(f"cannot give run_dir {lock.path} to group {gid}: {exc.strerror}") from None
    os.fchmod(lock.fd, keep | 0o710)


def check_socket_length(path: str, what: str) -> None:
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise UsageError(f"{what} path {path} is {size} bytes, longer than a unix socket allows ({SUN_PATH_MAX})")


def check_socket_path(path: str, what: str, run_dir: str | None = None) -> None:
    """Refuse, before anything is created, a unix socket path that can never be bound.

    Too long for ``sun_path``, in a directory that does not exist (the
    run_dir itself is fine: the agent creates it), or taken by a file that
    is not a socket (only a stale socket is replaced).
    """
    check_socket_length(path, what)
    parent = os.path.dirname(os.path.abspath(path))
    if run_dir is not None and parent == os.path.abspath(run_dir) and not os.path.isdir(parent):
        return  # prepare_run_dir creates it, or says what is wrong with it
    if not os.path.isdir(parent):
        raise UsageError(f"{what} directory {parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot check {what} {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{what} {path} exists and is not a socket")


def sweep_stale_keys(run_dir: str, keep: Collection[str] = ()) -> list[str]:
    """Remove key directories and key files left by a crashed agent.

    ``key-*`` directories at the top, and a ``keys.psk`` anywhere below
    (the run_dir is the agent's alone, so any is stale), except the
    top-level entries named in ``keep``: the key directory of a migration
    QEMU is still running (``agent.app.adopt`` names it from what QEMU
    says).  Links are not followed.
    """
    kept = set(keep)
    removed = []
    for entry in os.scandir(run_dir):
        if entry.name in kept:
            continue
        if entry.name.startswith(KEY_DIR_PREFIX) and entry.is_dir(follow_symlinks=False):
            import shutil  # here: the idle sidecar's start-up does not pay for it (bz2, lzma)

            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        if root == run_dir:
            dirs[:] = [d for d in dirs if d not in kept]
        for name in files:
            if name in STALE_FILE_NAMES:
                path = os.path.join(root, name)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(os.path.relpath(path, run_dir))
    return sorted(removed)


def migration_key_dirs(run_dir: str) -> list[str]:
    """The ``key-tls-*`` directories at the top of the run_dir: the only
    kind a live migration may still read (a destination's ``keys.psk``)."""
    prefix = f"{KEY_DIR_PREFIX}{MIGRATION_KEY_DIR}-"
    return sorted(e.name for e in os.scandir(run_dir) if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False))


def key_dir_name(run_dir: str, path: str) -> str | None:
    """``path``'s entry name if it is a migration key directory directly in
    ``run_dir`` (a real directory, ours, not a link); None for anything else."""
    if not isinstance(path, str) or os.path.dirname(path.rstrip("/")) != run_dir:
        return None
    name = os.path.basename(path.rstrip("/"))
    if not name.startswith(f"{KEY_DIR_PREFIX}{MIGRATION_KEY_DIR}-"):
        return None
    try:
        st = os.lstat(os.path.join(run_dir, name))
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return None
    return name


def make_key_dir(run_dir: str, purpose: str) -> str:
    """A fresh 0700 directory for one key's files."""
    # os.urandom, as secrets.token_hex would, without loading hmac and OpenSSL's libcrypto
    name = f"{KEY_DIR_PREFIX}{purpose}-{os.urandom(6).hex()}"
    path = os.path.join(run_dir, name)
    os.mkdir(path, 0o700)
    return path


def write_key_file(directory: str, name: str, data: bytes | bytearray | memoryview) -> str:
    """Write ``data`` to a new 0600 file; never follows or reuses a path."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def write_new_files(files: list[tuple[str, bytes]], what: str) -> None:
    """Write key files for a user (``--out-dir``, ``--keys-out``): each new,
    0600, O_EXCL|O_NOFOLLOW; all or nothing.  ``what`` names the flag in the
    one-line error."""
    from agent.common.errors import UsageError

    written: list[str] = []
    try:
        for target, data in files:
            try:
                written.append(write_key_file(os.path.dirname(target) or ".", os.path.basename(target), data))
            except FileExistsError:
                raise UsageError(f"{what}: {target} already exists; not overwriting it") from None
            except OSError as exc:
                raise UsageError(f"{what}: cannot write {target}: {exc.strerror}") from None
    except BaseException:
        for target in written:
            try:
                os.unlink(target)
            except OSError:
                pass
        raise


def remove_key_dir(path: str) -> None:
    """Remove a key directory and what it holds, quietly (it may be gone).

    A key directory holds files only (:func:`make_key_dir`, then
    :func:`write_new_files`): they are unlinked and the directory removed
    without shutil, whose import (zlib, bz2, lzma) would otherwise sit in
    every migration's cleanup.  Anything else goes to ``shutil.rmtree``.
    """
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except FileNotFoundError:
        return
    except OSError:
        entries = None
    try:
        if entries is None or any(entry.is_dir(follow_symlinks=False) for entry in entries):
            raise IsADirectoryError(path)
        for entry in entries:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
        os.rmdir(path)
    except OSError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
