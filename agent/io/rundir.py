"""The VM's run_dir: the only place the agent writes key material.

The run_dir belongs to the agent alone: it must be a real directory (not a
symlink), owned by us, mode 0700.  Key files live in fresh 0700
subdirectories named ``key-*``, each holding 0600 files created with
O_EXCL|O_NOFOLLOW, removed on every ending.  Anything of that shape found at
start is the wreck of a crashed predecessor and is swept.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat

from agent.errors import UsageError

KEY_DIR_PREFIX = "key-"
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
    # on emptyDirs) gives nobody access to a 0700 directory.
    if st.st_mode & 0o777 != 0o700:
        raise UsageError(f"run_dir {path} has mode {stat.S_IMODE(st.st_mode):04o}, expected 0700")
    return path


def check_socket_length(path: str, what: str) -> None:
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise UsageError(f"{what} path {path} is {size} bytes, longer than a unix socket "
                         f"allows ({SUN_PATH_MAX})")


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


def sweep_stale_keys(run_dir: str) -> list[str]:
    """Remove key directories and key files left by a crashed agent.

    ``key-*`` directories at the top, and a ``keys.psk`` anywhere below
    (the run_dir is the agent's alone, so any is stale).  Links are not
    followed.
    """
    removed = []
    for entry in os.scandir(run_dir):
        if entry.name.startswith(KEY_DIR_PREFIX) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        for name in files:
            if name in STALE_FILE_NAMES:
                path = os.path.join(root, name)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(os.path.relpath(path, run_dir))
    return sorted(removed)


def make_key_dir(run_dir: str, purpose: str) -> str:
    """A fresh 0700 directory for one key's files."""
    name = f"{KEY_DIR_PREFIX}{purpose}-{secrets.token_hex(6)}"
    path = os.path.join(run_dir, name)
    os.mkdir(path, 0o700)
    return path


def write_key_file(directory: str, name: str, data: bytes) -> str:
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
    from agent.errors import UsageError

    written: list[str] = []
    try:
        for target, data in files:
            try:
                written.append(write_key_file(os.path.dirname(target) or ".",
                                              os.path.basename(target), data))
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
    shutil.rmtree(path, ignore_errors=True)
