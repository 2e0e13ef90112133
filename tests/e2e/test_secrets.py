"""Master key and encrypted secret objects, proven by a real LUKS unlock (QEMU 7.2)."""

from __future__ import annotations

import json
import os

import pytest

from agent.io import keyring
from tests.e2e.harness import World, ctl, wait_for
from tests.e2e.qemu import QEMU, make_luks, start_tcg_qemu
from tests.leakscan import ArgvWatcher, LeakScan

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
KEYRING_PROBLEM = keyring.usable()
PASSPHRASE = "LUKS passphrase ünïcode " + os.urandom(6).hex()  # QEMU wants UTF-8 for LUKS


def master_mode_params():
    keyring_mode = pytest.param(
        "keyring", marks=pytest.mark.skipif(KEYRING_PROBLEM is not None, reason=KEYRING_PROBLEM or "")
    )
    return [keyring_mode, "file"]


def agent_keys(vm: str) -> list[str]:
    if KEYRING_PROBLEM is not None:
        return []
    return [desc for _serial, desc in keyring.find(f"keyagent:{vm}:")]


class Vm:
    def __init__(self, world: World, mode: str) -> None:
        tmp = world.tmp
        self.tmp, self.name = tmp, f"sec-{mode}-{os.getpid()}"
        self.agent_qmp, self.test_qmp = str(tmp / "qmp.sock"), str(tmp / "test.sock")
        self.qemu = start_tcg_qemu(self.agent_qmp, self.test_qmp, extra=["-S"], stderr=tmp / "qemu.stderr")
        wait_for(lambda: os.path.exists(self.test_qmp), what="QEMU monitor")
        self.run_dir = tmp / "run"
        self.control = self.run_dir / "control.sock"
        self.agent = world.spawn(
            "agent",
            [
                "run",
                "--qmp",
                f"unix:{self.agent_qmp}",
                "--vm-name",
                self.name,
                "--vm-run-dir",
                str(self.run_dir),
                "--secrets-master-key",
                mode,
                "--event-log",
                str(tmp / "events.jsonl"),
                "--log-level",
                "debug",
            ],
        )
        wait_for(lambda: ctl(self.control, "status").returncode == 0, what="agent")

    def qmp(self, command: str, args: dict | None = None):
        from tests.e2e.qemu import Qemu

        return Qemu.attach(self.name, self.test_qmp).qmp(command, args)

    def unlock(self, secret_id: str, node: str):
        return self.qmp(
            "blockdev-add",
            {
                "driver": "luks",
                "node-name": node,
                "key-secret": secret_id,
                "file": {"driver": "file", "filename": str(self.tmp / "disk.luks")},
            },
        )

    def leftovers(self) -> list[str]:
        files = [str(p) for p in self.run_dir.rglob("*") if p.name != "control.sock"]
        return files + agent_keys(self.name)


@pytest.fixture
def vm_world(tmp_path):
    world = World(tmp_path)
    (tmp_path / "pass.txt").write_text(PASSPHRASE)
    (tmp_path / "wrong.txt").write_text("not the passphrase")
    make_luks(tmp_path / "disk.luks", tmp_path / "pass.txt")
    scan = LeakScan()
    scan.secret("passphrase", PASSPHRASE.encode())
    vms = []
    with ArgvWatcher() as argv:
        scan.argv = argv
        world.scan = scan
        world.make_vm = lambda mode: vms.append(Vm(world, mode)) or vms[-1]
        try:
            yield world
        finally:
            world.close()
            for vm in vms:
                if vm.qemu.poll() is None:
                    vm.qemu.kill()
                    vm.qemu.wait()
    for proc in world.procs:
        scan.text(f"{proc.name} stderr", proc.stderr)
    if (tmp_path / "events.jsonl").exists():
        scan.file(str(tmp_path / "events.jsonl"))
    scan.dirs.append(str(tmp_path / "run"))
    scan.check()


@pytest.mark.parametrize("mode", master_mode_params())
def test_luks_image_unlocks_through_the_agents_encrypted_secret(vm_world, mode):
    vm = vm_world.make_vm(mode)
    out = ctl(vm.control, "secret", "add", "--id", "luks0", "--file", str(vm_world.tmp / "pass.txt"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"id": "luks0", "status": "added"}
    # QEMU holds ciphertext only.
    data = vm.qmp("qom-get", {"path": "/objects/luks0", "property": "data"})
    assert PASSPHRASE not in data
    assert vm.qmp("qom-get", {"path": "/objects/luks0", "property": "keyid"}) == "keyagent-master"
    assert vm.unlock("luks0", "disk0") == {}
    # No master key copy anywhere once QEMU has it.
    assert vm.leftovers() == []


@pytest.mark.parametrize("mode", master_mode_params())
def test_wrong_passphrase_does_not_unlock(vm_world, mode):
    vm = vm_world.make_vm(mode)
    assert ctl(vm.control, "secret", "add", "--id", "bad0", "--file", str(vm_world.tmp / "wrong.txt")).returncode == 0
    from qemu.qmp import ExecuteError

    with pytest.raises(ExecuteError, match="Invalid password"):
        vm.unlock("bad0", "disk1")


def test_each_secret_gets_a_fresh_iv(vm_world):
    vm = vm_world.make_vm("file")
    for sid in ("a0", "a1"):
        assert ctl(vm.control, "secret", "add", "--id", sid, "--file", str(vm_world.tmp / "pass.txt")).returncode == 0
    ivs = {vm.qmp("qom-get", {"path": f"/objects/{sid}", "property": "iv"}) for sid in ("a0", "a1")}
    datas = {vm.qmp("qom-get", {"path": f"/objects/{sid}", "property": "data"}) for sid in ("a0", "a1")}
    assert len(ivs) == 2 and len(datas) == 2


def test_remove_and_reuse_of_an_id(vm_world):
    vm = vm_world.make_vm("file")
    args = ["--file", str(vm_world.tmp / "pass.txt")]
    assert ctl(vm.control, "secret", "add", "--id", "s1", *args).returncode == 0
    dup = ctl(vm.control, "secret", "add", "--id", "s1", *args)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert ctl(vm.control, "secret", "remove", "--id", "s1").returncode == 0
    ids = [o["name"] for o in vm.qmp("qom-list", {"path": "/objects"})]
    assert "s1" not in ids
    assert ctl(vm.control, "secret", "add", "--id", "s1", *args).returncode == 0
    missing = ctl(vm.control, "secret", "remove", "--id", "nope")
    assert missing.returncode == 1 and "no secret" in missing.stderr


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda t: ["--id", "9bad", "--file", str(t / "pass.txt")], "invalid secret id"),
        (lambda t: ["--id", "e0", "--file", str(t / "empty.txt")], "is empty"),
        (lambda t: ["--id", "b0", "--file", str(t / "big.bin")], "larger than"),
        (lambda t: ["--id", "u0", "--ref", "vault:thing"], "unknown secret reference scheme"),
        (lambda t: ["--id", "m0", "--file", str(t / "missing")], "cannot read"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(vm_world, make, words):
    tmp = vm_world.tmp
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "big.bin").write_bytes(b"x" * (64 * 1024 + 1))
    vm = vm_world.make_vm("file")
    before = vm.qmp("qom-list", {"path": "/objects"})
    out = ctl(vm.control, "secret", "add", *make(tmp))
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert vm.qmp("qom-list", {"path": "/objects"}) == before


def test_binary_secret_is_accepted(vm_world):
    (vm_world.tmp / "bin.key").write_bytes(bytes(range(256)))
    vm_world.scan.secret("binary secret", bytes(range(256)))
    vm = vm_world.make_vm("file")
    assert ctl(vm.control, "secret", "add", "--id", "bin0", "--file", str(vm_world.tmp / "bin.key")).returncode == 0


@pytest.mark.parametrize("how", ["quit", "sigkill"])
def test_nothing_is_left_after_qemu_exits(vm_world, how):
    mode = "keyring" if KEYRING_PROBLEM is None else "file"
    vm = vm_world.make_vm(mode)
    assert ctl(vm.control, "secret", "add", "--id", "x0", "--file", str(vm_world.tmp / "pass.txt")).returncode == 0
    if how == "quit":
        vm.qmp("quit")
    else:
        vm.qemu.kill()
    vm.qemu.wait(timeout=10)
    assert vm.agent.wait(timeout=10) == 0
    assert vm.leftovers() == []
    assert not vm.control.exists()
