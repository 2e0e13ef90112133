"""A guest owner directory in tmp_path: keys, a secret file and owner.toml."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.sev.measurement import measurement_blob

TIK = bytes(range(16))
TEK = bytes(range(16, 32))
DIGEST = bytes.fromhex("ab" * 32)
OTHER_DIGEST = bytes.fromhex("cd" * 32)
# Recognisable, and long enough for the raw/hex/base64 leak checks.
PASSPHRASE = b"correct-horse-battery-staple-42"
API = (1, 49, 21)
POLICY = 1


@dataclass
class OwnerDir:
    root: Path
    toml: Path
    tik: Path
    tek: Path
    secret: Path

    def blob(
        self,
        mnonce: bytes = b"n" * 16,
        *,
        digest: bytes = DIGEST,
        tik: bytes = TIK,
        api: tuple[int, int, int] = API,
        policy: int = POLICY,
    ) -> bytes:
        return measurement_blob(tik, api[0], api[1], api[2], policy, digest, mnonce)

    def request(self, mnonce: bytes = b"n" * 16, **over) -> dict:
        blob = self.blob(mnonce)
        body = {
            "vm": "vm1",
            "measurement": base64.b64encode(blob).decode(),
            "api_major": API[0],
            "api_minor": API[1],
            "build_id": API[2],
            "policy": POLICY,
        }
        body.update(over)
        return body


def write_owner_dir(root: Path, extra: str = "") -> OwnerDir:
    (root / "keys").mkdir()
    tik = root / "keys" / "vm1_tik.bin"
    tek = root / "keys" / "vm1_tek.bin"
    secret = root / "vm1-disk.pass"
    tik.write_bytes(TIK)
    tek.write_bytes(TEK)
    secret.write_bytes(PASSPHRASE)
    toml = root / "owner.toml"
    toml.write_text(f"""
[vm.vm1]
tik = "keys/vm1_tik.bin"
tek = "keys/vm1_tek.bin"
policy = {POLICY}
digest = ["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]
min_api = "1.49"
build_ids = [21, 22]
gpa = 8192
{extra}
[[vm.vm1.secret]]
guid = "luks-key"
file = "vm1-disk.pass"
""")
    return OwnerDir(root, toml, tik, tek, secret)


@pytest.fixture
def owner_dir(tmp_path: Path) -> OwnerDir:
    return write_owner_dir(tmp_path)


def write_firmware_owner_dir(root: Path, firmware: bytes, extra: str = "") -> OwnerDir:
    """The same owner dir, vm1 given by ``firmware = "fw.fd"`` instead of digests and gpa."""
    d = write_owner_dir(root, extra)
    (root / "fw.fd").write_bytes(firmware)
    text = d.toml.read_text().replace(f'digest = ["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]', 'firmware = "fw.fd"')
    d.toml.write_text(text.replace("gpa = 8192\n", ""))
    return d


def firmware_blob(d: OwnerDir, mnonce: bytes = b"n" * 16) -> bytes:
    """A measurement of the launch of ``fw.fd`` (SEV: the digest is SHA-256 of the image)."""
    from agent.sev.digest import launch_digest

    return d.blob(mnonce, digest=launch_digest((d.root / "fw.fd").read_bytes()))


# -- a throwaway PostgreSQL cluster (agent.tools.pgcluster), one per test session ------------


@pytest.fixture(scope="session")
def pg_cluster():
    from agent.tools.pgcluster import find_bindir, start_cluster, stop_cluster

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl, postgres): install Debian's postgresql")
    cluster = start_cluster(bindir)
    yield cluster
    stop_cluster(cluster)


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh, empty database in the session's cluster."""
    return pg_cluster.new_database()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request, tmp_path) -> str:
    """A database URL of each kind; PostgreSQL in the session's throwaway cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'owner.db'}"
    return request.getfixturevalue("pg_url")
