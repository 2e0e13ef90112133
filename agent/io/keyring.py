"""The Linux kernel keyring, through the add_key(2) and keyctl(2) syscalls.

No keyutils binary and no new dependency: ``ctypes`` calls libc's
``syscall()``.  Payloads travel as memory, never as argv.  Used for the
per-VM master key (``secret_keyring`` in QEMU reads it at ``object-add``)
and for ``keyring:DESCRIPTION`` secret references.

QEMU checked here: a key in the agent's own session keyring (``@s``) is not
readable by QEMU ("Permission denied"); the user keyring (``@u``) works.
"""

from __future__ import annotations

import ctypes
import errno
import os

# Syscall numbers (asm-generic and x86_64 differ).
_SYSCALLS = {
    "x86_64": {"add_key": 248, "keyctl": 250},
    "aarch64": {"add_key": 217, "keyctl": 219},
    "riscv64": {"add_key": 217, "keyctl": 219},
}

KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_PROCESS_KEYRING = -2

KEYCTL_REVOKE = 3
KEYCTL_SETPERM = 5
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_DESCRIBE = 6

# Possessor: all; user: view, read, search (what QEMU needs to read it).
KEY_POS_ALL = 0x3F000000
KEY_USR_VIEW, KEY_USR_READ, KEY_USR_SEARCH = 0x00010000, 0x00020000, 0x00080000

KEYRINGS = {"@u": KEY_SPEC_USER_KEYRING, "@s": KEY_SPEC_SESSION_KEYRING, "@p": KEY_SPEC_PROCESS_KEYRING}


class KeyringError(OSError):
    pass


_libc = None


def _syscall(name: str, *args) -> int:
    global _libc
    if _libc is None:
        # The libc this Python is linked with (agent.app.hardening does the same):
        # ctypes.util.find_library would run ldconfig in a subprocess at start-up.
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    machine = os.uname().machine  # what platform.machine() returns, without importing platform
    numbers = _SYSCALLS.get(machine)
    if numbers is None:
        raise KeyringError(errno.ENOSYS, f"keyring syscalls unknown on {machine}")
    ret = _libc.syscall(ctypes.c_long(numbers[name]), *args)
    if ret == -1:
        err = ctypes.get_errno()
        raise KeyringError(err, os.strerror(err))
    return ret


def add_key(
    description: str,
    payload: bytes | bytearray | memoryview,
    keyring: int = KEY_SPEC_USER_KEYRING,
    key_type: str = "user",
) -> int:
    """Add (or update) a key; returns its serial.  ``payload`` is copied once, into
    a ctypes buffer that is zeroed after the call (no immutable copy)."""
    buf = (ctypes.c_char * len(payload)).from_buffer_copy(payload)
    try:
        return _syscall(
            "add_key",
            ctypes.c_char_p(key_type.encode()),
            ctypes.c_char_p(description.encode()),
            buf,
            ctypes.c_size_t(len(payload)),
            ctypes.c_int(keyring),
        )
    finally:
        ctypes.memset(buf, 0, len(payload))


def search(description: str, keyring: int = KEY_SPEC_USER_KEYRING, key_type: str = "user") -> int:
    return _syscall(
        "keyctl",
        ctypes.c_int(KEYCTL_SEARCH),
        ctypes.c_int(keyring),
        ctypes.c_char_p(key_type.encode()),
        ctypes.c_char_p(description.encode()),
        ctypes.c_int(0),
    )


def read(serial: int) -> bytearray:
    size = _syscall("keyctl", ctypes.c_int(KEYCTL_READ), ctypes.c_int(serial), None, ctypes.c_size_t(0))
    buf = ctypes.create_string_buffer(max(size, 1))
    got = _syscall("keyctl", ctypes.c_int(KEYCTL_READ), ctypes.c_int(serial), buf, ctypes.c_size_t(size))
    out = bytearray(buf.raw[: min(got, size)])
    ctypes.memset(buf, 0, max(size, 1))
    return out


def describe(serial: int) -> str:
    """``type;uid;gid;perm;description`` as the kernel gives it."""
    size = _syscall("keyctl", ctypes.c_int(KEYCTL_DESCRIBE), ctypes.c_int(serial), None, ctypes.c_size_t(0))
    buf = ctypes.create_string_buffer(max(size, 1))
    _syscall("keyctl", ctypes.c_int(KEYCTL_DESCRIBE), ctypes.c_int(serial), buf, ctypes.c_size_t(size))
    return buf.value.decode(errors="replace")


def list_keys(keyring: int = KEY_SPEC_USER_KEYRING) -> list[int]:
    """Serials linked into a keyring (reading a keyring yields its serials)."""
    import struct

    raw = read(keyring)
    return list(struct.unpack(f"<{len(raw) // 4}i", bytes(raw[: len(raw) // 4 * 4])))


def find(prefix: str, keyring: int = KEY_SPEC_USER_KEYRING) -> list[tuple[int, str]]:
    """(serial, description) of the keys in ``keyring`` whose description starts with ``prefix``."""
    try:
        serials = list_keys(keyring)
    except OSError:
        return []
    found = []
    for serial in serials:
        try:
            desc = describe(serial).split(";", 4)[-1]
        except OSError:
            continue
        if desc.startswith(prefix):
            found.append((serial, desc))
    return found


def sweep(prefix: str, keyring: int = KEY_SPEC_USER_KEYRING, listing: list[tuple[int, str]] | None = None) -> list[str]:
    """Revoke and unlink every user key whose description starts with ``prefix``.

    ``listing`` is what one :func:`find` of a shorter prefix gave, taken for
    many sweeps at once: listing the keyring describes every key in it (one
    ``keyctl`` call each), and ``keyagent host`` starting 100 VMs made that
    2,389 calls when each VM listed for itself; it lists once per scan of
    its configuration directory instead."""
    if listing is None:
        keys = find(prefix, keyring)
    else:
        keys = [(serial, desc) for serial, desc in listing if desc.startswith(prefix)]
    removed = []
    for serial, desc in keys:
        for step in (revoke, lambda s: unlink(s, keyring)):
            try:
                step(serial)
            except OSError:
                pass
        removed.append(desc)
    return removed


def setperm(serial: int, perm: int) -> None:
    _syscall("keyctl", ctypes.c_int(KEYCTL_SETPERM), ctypes.c_int(serial), ctypes.c_uint(perm))


def unlink(serial: int, keyring: int = KEY_SPEC_USER_KEYRING) -> None:
    _syscall("keyctl", ctypes.c_int(KEYCTL_UNLINK), ctypes.c_int(serial), ctypes.c_int(keyring))


def revoke(serial: int) -> None:
    _syscall("keyctl", ctypes.c_int(KEYCTL_REVOKE), ctypes.c_int(serial))


def usable() -> str | None:
    """None if the user keyring works here; otherwise why not (for skips and errors)."""
    try:
        serial = add_key(f"keyagent-probe-{os.getpid()}", b"probe")
    except OSError as exc:
        return f"the kernel keyring is not usable here: {exc.strerror}"
    try:
        revoke(serial)
        unlink(serial)
    except OSError:
        pass
    return None
