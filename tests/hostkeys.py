"""Host identities for tests of the authenticated hand-over: keys and trust directories."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.crypto import hostkey


@dataclass
class Host:
    name: str
    key: Path  # the private host key (PKCS#8 PEM, 0600)
    public: str  # its one-line public key
    trusted: Path  # the directory of the hosts it trusts

    def private(self):
        return hostkey.load_private(str(self.key))

    def seed(self) -> bytes:
        """The raw private bytes, for the leak scan."""
        from cryptography.hazmat.primitives import serialization

        return self.private().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def trust(self, *others: Host) -> None:
        for other in others:
            (self.trusted / other.name).write_text(other.public + "\n")

    def trusted_map(self) -> dict[bytes, str]:
        return hostkey.load_trusted(str(self.trusted))

    def flags(self) -> list[str]:
        return ["--migration-host-key", str(self.key), "--migration-trusted-hosts", str(self.trusted)]


def make_host(root: Path, name: str) -> Host:
    """A new host key under ``root/name/`` and an empty trust directory."""
    base = root / f"hostid-{name}"
    base.mkdir(mode=0o755)
    trusted = base / "trusted"
    trusted.mkdir(mode=0o755)
    os.chmod(trusted, 0o755)
    key = base / "host.key"
    public = hostkey.init(str(key))
    return Host(name, key, public, trusted)


def make_pair(root: Path, a: str = "src-host", b: str = "dst-host") -> tuple[Host, Host]:
    """Two hosts that trust each other."""
    one, two = make_host(root, a), make_host(root, b)
    one.trust(two)
    two.trust(one)
    return one, two
