"""The simulator's migration handlers (``simulate --mh``, agent.tools.sim.mh), in process and as a command."""

from __future__ import annotations

import base64
import os
import subprocess

import pytest

from agent.common.errors import SimQmpError
from agent.owner.mh import MhRecord, MhRefusal, mh_for_boot, mh_for_migration
from agent.sev import mh as mhkeys
from agent.sev.guids import LUKS_KEY_GUID
from agent.tools.sim.machine import Machine, SimConfig
from agent.tools.sim.mh import PAGES, SimMh
from tests.executable import KEYAGENT
from tests.tools.sim.conftest import TEK, TIK

SRC, DST = os.urandom(32), os.urandom(32)


def pair() -> tuple[SimMh, SimMh, bytes, bytes]:
    """A booted source MH and an attested target MH, as the owner provisions them; (src, dst, key, tag)."""
    boot = mh_for_boot(MhRecord(), SRC)
    target = mh_for_migration("vm1", "vm1", boot.record, DST)
    assert not isinstance(target, MhRefusal) and target.record.target is not None
    src, dst = SimMh("vm1"), SimMh("vm1")
    src.on_table([(LUKS_KEY_GUID, b"pass"), *boot.entries])
    dst.on_table([(LUKS_KEY_GUID, b"pass"), *target.entries])
    return src, dst, target.record.target.public, target.record.target.tag


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_the_table_decides_the_role():
    src, dst, _key, _tag = pair()
    assert src.query()["role"] == "boot" and src.query()["key-digest"] is None
    assert dst.query()["role"] == "target" and dst.query()["key-digest"]
    assert dst.query()["source-public-key"] == b64(mhkeys.public_key(SRC))


def test_both_sides_derive_the_same_key_and_the_pages_arrive_intact():
    src, dst, key, tag = pair()
    src.set_peer_key(b64(key), b64(tag))
    assert src.query()["key-digest"] == dst.query()["key-digest"]
    for i, sealed in enumerate(src.encrypted_pages()):
        dst.receive_page(i, sealed)
    assert src.query()["sent-digest"] == dst.query()["received-digest"]
    assert dst.query()["pages-received"] == PAGES


def test_a_peer_key_without_the_owners_tag_is_refused():
    src, _dst, key, tag = pair()
    other = mhkeys.public_key(os.urandom(32))
    with pytest.raises(SimQmpError, match="tag does not verify"):
        src.set_peer_key(b64(other), b64(tag))
    assert src.query()["role"] == "boot"
    with pytest.raises(SimQmpError, match="no transport key"):
        src.encrypted_pages()


def test_a_page_changed_on_the_way_does_not_open():
    src, dst, key, tag = pair()
    src.set_peer_key(b64(key), b64(tag))
    sealed = bytearray(src.encrypted_pages()[0])
    sealed[5] ^= 1
    with pytest.raises(ValueError, match="does not open"):
        dst.receive_page(0, bytes(sealed))
    with pytest.raises(ValueError, match="does not open"):  # a page moved to another index
        dst.receive_page(1, src.encrypted_pages()[0])


def test_migration_commands_exist_only_with_mh():
    plain = Machine(SimConfig(tik=TIK, tek=TEK))
    with_mh = Machine(SimConfig(tik=TIK, tek=TEK, mh_vm="vm1"))
    for name in ("x-mh-set-peer-key", "x-mh-query", "migrate", "migrate-incoming"):
        assert with_mh.has_command(name) and not plain.has_command(name)
    with pytest.raises(SimQmpError, match="Invalid migration URI"):
        with_mh.execute("migrate", {"uri": "exec:cat"})


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--mh-secrets-out", "{out}"], "--mh-secrets-out only applies with --mh"),
        (["--mh", "--mh-secrets-out", "{file}"], "exists"),
        (["--mh", "--mh-vm", ""], "--mh-vm must be 1..255 bytes"),
        (["--snp", "--mh"], "--mh does not apply to --snp"),
    ],
)
def test_bad_mh_arguments_exit_2_with_one_line(tmp_path, args, reason):
    (tmp_path / "plain").write_text("x")
    subst = {"out": str(tmp_path / "keys.json"), "file": str(tmp_path / "plain")}
    sock = tmp_path / "qmp.sock"
    argv = [a.format(**subst) for a in args]
    proc = subprocess.run(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{sock}", *argv], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], proc.stderr
    assert not sock.exists()
