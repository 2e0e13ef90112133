"""Secret references: ``file:PATH``, ``keyring:DESCRIPTION``, ``libvirt:UUID``.

Resolving a reference reads the secret into a :class:`Secret`; the reference
itself (a path, a description, a UUID) may be logged, the bytes never.  A
key file holds the raw key bytes, used as they are (no newline trimming).
"""

from __future__ import annotations

import os
import re
import stat

from agent.core.secret import Secret
from agent.errors import UsageError

MAX_SECRET_FILE = 64 * 1024
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def read_secret_file(path: str, what: str = "secret file") -> Secret:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path} is not a regular file")
        if st.st_size > MAX_SECRET_FILE:
            raise UsageError(f"{what} {path} is larger than {MAX_SECRET_FILE} bytes")
        buf = bytearray()
        while True:
            chunk = os.read(fd, MAX_SECRET_FILE + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_SECRET_FILE:
                raise UsageError(f"{what} {path} is larger than {MAX_SECRET_FILE} bytes")
    finally:
        os.close(fd)
    if not buf:
        raise UsageError(f"{what} {path} is empty")
    secret = Secret(buf)
    buf[:] = bytes(len(buf))
    return secret


def _keyring(description: str) -> Secret:
    from agent.io import keyring

    try:
        serial = keyring.search(description)
    except OSError as exc:
        raise UsageError(f"keyring:{description}: {exc.strerror}") from None
    try:
        data = keyring.read(serial)
    except OSError as exc:
        raise UsageError(f"keyring:{description}: cannot read: {exc.strerror}") from None
    if not data:
        raise UsageError(f"keyring:{description} is empty")
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


def resolve(ref: str, what: str = "secret") -> Secret:
    """Read the secret a reference names; UsageError (one line) otherwise."""
    scheme, sep, rest = ref.partition(":")
    if not sep or not rest:
        raise UsageError(f"{what} reference {ref!r} must be file:PATH, keyring:DESCRIPTION "
                         "or libvirt:UUID")
    if scheme == "file":
        return read_secret_file(rest, what)
    if scheme == "keyring":
        return _keyring(rest)
    if scheme == "libvirt":
        return _libvirt(rest)
    raise UsageError(f"unknown {what} reference scheme {scheme!r} (use file:, keyring: or libvirt:)")
