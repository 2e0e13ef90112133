"""Host identity keys for the authenticated migration hand-over.

Every host (every agent that migrates) holds one Ed25519 signing key, its
*host key*, and a directory of the public keys of the hosts it may migrate
with (*trusted hosts*).  The destination signs its offer with its host key,
the source signs its cookie with its own (``agent.crypto.seal`` has the
construction; ``docs/handover.md`` the whole specification).

Formats:

* private key: PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``), unencrypted,
  mode 0600, as ``cryptography`` and ``openssl genpkey -algorithm ed25519``
  write it (RFC 8410);
* public key: one line ``keyagent-host-ed25519 <base64 of the 32 raw bytes>``.

Parsing and checking the files needs no ``cryptography``: an idle sidecar
checks its configuration at start without paying for that import (~7 MB of
RSS); the key itself is loaded by the verb that signs with it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat

PUBLIC_PREFIX = "keyagent-host-ed25519"
PUBLIC_LEN = 32
PEM_BEGIN = "-----BEGIN PRIVATE KEY-----"
PEM_END = "-----END PRIVATE KEY-----"
# RFC 8410 section 7 / 10.3: OneAsymmetricKey v1 (PKCS#8), id-Ed25519
# (1.3.101.112), then the 32-byte seed as an OCTET STRING inside the
# privateKey OCTET STRING.  48 bytes in all.
PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
MAX_KEY_FILE = 4096
MAX_TRUSTED = 4096


class HostKeyError(ValueError):
    """A one-line reason; never holds key bytes."""


# -- public keys -------------------------------------------------------------------


def format_public(raw: bytes) -> str:
    """The one-line text form of a 32-byte Ed25519 public key."""
    return f"{PUBLIC_PREFIX} {base64.b64encode(raw).decode()}"


def parse_public(text: str, where: str) -> bytes:
    """``keyagent-host-ed25519 B64`` (one line, optional trailing newline) -> 32 raw bytes."""
    line = text[:-1] if text.endswith("\n") else text
    if "\n" in line or "\r" in line:
        raise HostKeyError(f"{where}: a host public key is one line")
    parts = line.split(" ")
    if len(parts) != 2 or parts[0] != PUBLIC_PREFIX:
        raise HostKeyError(f"{where}: not a host public key (expected '{PUBLIC_PREFIX} BASE64')")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise HostKeyError(f"{where}: the public key is not valid base64") from None
    if len(raw) != PUBLIC_LEN:
        raise HostKeyError(f"{where}: the public key is {len(raw)} bytes, expected {PUBLIC_LEN}")
    return raw


def load_trusted(directory: str) -> dict[bytes, str]:
    """The trusted hosts: raw public key -> its file's name (the host's name in logs).

    Every regular file in ``directory`` whose name does not start with "."
    holds one public key.  A directory (or file) that others may write to
    is refused: whoever can write there decides whom this host trusts.
    """
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise HostKeyError(f"trusted_hosts {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise HostKeyError(f"trusted_hosts {directory} is not a directory")
    if st.st_mode & 0o022:
        raise HostKeyError(f"trusted_hosts {directory} is writable by group or others")
    trusted: dict[bytes, str] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise HostKeyError(f"trusted_hosts {directory}: {exc.strerror}") from None
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if len(trusted) >= MAX_TRUSTED:
            raise HostKeyError(f"trusted_hosts {directory}: more than {MAX_TRUSTED} keys")
        try:
            if os.stat(path).st_mode & 0o022:
                raise HostKeyError(f"trusted host key {path} is writable by group or others")
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_FILE + 1)
        except OSError as exc:
            raise HostKeyError(f"trusted host key {path}: {exc.strerror}") from None
        if len(data) > MAX_KEY_FILE:
            raise HostKeyError(f"trusted host key {path} is too large")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise HostKeyError(f"{path}: not a host public key (not ASCII text)") from None
        raw = parse_public(text, path)
        if raw in trusted:
            raise HostKeyError(f"{path}: the same key as {trusted[raw]}")
        trusted[raw] = name
    return trusted


# -- the private key -------------------------------------------------------------------


def _read_private_file(path: str) -> bytes:
    """The PEM text of a host key file that only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise HostKeyError(f"host_key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HostKeyError(f"host_key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise HostKeyError(
                f"host_key {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}, want 0600)"
            )
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise HostKeyError(f"host_key {path} is too large for a host key")
    return data


def _der_from_pem(data: bytes, path: str) -> bytes:
    """The DER inside a PKCS#8 PEM, checked to be an Ed25519 key (RFC 8410)."""
    try:
        lines = data.decode("ascii").strip().splitlines()
    except UnicodeDecodeError:
        lines = []
    if len(lines) < 3 or lines[0].strip() != PEM_BEGIN or lines[-1].strip() != PEM_END:
        raise HostKeyError(f"host_key {path} is not a PKCS#8 PEM private key (make one with 'keyagent hostkey init')")
    try:
        der = base64.b64decode("".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise HostKeyError(f"host_key {path}: the PEM body is not valid base64") from None
    if len(der) != len(PKCS8_ED25519_PREFIX) + 32 or not der.startswith(PKCS8_ED25519_PREFIX):
        raise HostKeyError(f"host_key {path} is not an Ed25519 private key")
    return der


def check_private(path: str) -> None:
    """Check a host key file without loading cryptography (the agent's start)."""
    _der_from_pem(_read_private_file(path), path)


def load_private(path: str):
    """The host key as a ``cryptography`` Ed25519PrivateKey.

    From the 32-byte seed that :func:`_der_from_pem` has found after the
    fixed RFC 8410 prefix, so without cryptography's ``serialization``
    package (its PEM/SSH/PKCS#12 modules: ~5 ms of CPU on the first
    migration, ~0.5 MB).  It accepts exactly the files it accepted before:
    every file :func:`_der_from_pem` passes is a PKCS#8 v1 Ed25519 key, the
    one form ``load_pem_private_key`` read from them.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    der = _der_from_pem(_read_private_file(path), path)
    try:
        return Ed25519PrivateKey.from_private_bytes(der[len(PKCS8_ED25519_PREFIX) :])
    except ValueError:
        raise HostKeyError(f"host_key {path} does not load as a private key") from None


def public_raw(key) -> bytes:
    """The 32 raw bytes of the public half of an Ed25519 private key."""
    return bytes(key.public_key().public_bytes_raw())


def init(path: str) -> str:
    """Write a new host key to ``path`` (0600, never over an existing file); its public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise HostKeyError(f"{path} exists: a host key is never overwritten") from None
    except OSError as exc:
        raise HostKeyError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise HostKeyError(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    return format_public(public_raw(key))
