"""The agent's vTPM with real swtpm 0.7.1 and QEMU 7.2: launch, sidecar, migration."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent.io import swtpm
from tests.e2e.harness import World, ctl, ctl_json, free_port, leak_checked, wait_for
from tests.e2e.qemu import QEMU, Qemu, start_tcg_qemu, tcg_qemu_argv

pytestmark = pytest.mark.skipif(
    QEMU is None or shutil.which("swtpm") is None, reason="qemu-system-x86_64 or swtpm is not installed"
)


@pytest.fixture
def world():
    # Unix socket paths must fit 107 bytes: pytest's tmp_path can be too long.
    tmp = Path(tempfile.mkdtemp(prefix="ka-vtpm-"))
    w = World(tmp)
    w.key = os.urandom(32)
    (tmp / "tpm.key").write_bytes(w.key)
    try:
        with leak_checked(w, dirs=("run", "src-run", "dst-run"), files=()) as scan:
            scan.secret("vTPM key", w.key)
            try:
                yield w
            finally:
                subprocess.run(["pkill", "-f", str(tmp)], check=False)
            # Besides the agent's own reference to it, the key's path is in no
            # argv: swtpm and swtpm_setup get fd numbers.
            assert not any(str(tmp / "tpm.key").encode() in a for a in scan.argv.seen if b"--vtpm-key" not in a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def launch(world: World, name: str, *qemu_extra: str, run: str = "run", state: str = "tpm", key: str = "tpm.key"):
    tmp = world.tmp
    test_qmp = str(tmp / f"{name}-t.sock")
    proc = world.spawn(
        name,
        [
            "launch",
            "--vm-name",
            name,
            "--vm-run-dir",
            str(tmp / run),
            "--vtpm-state-dir",
            str(tmp / state),
            "--vtpm-key",
            f"file:{tmp / key}",
            "--secrets-master-key",
            "file",
            "--launch-shutdown-grace-s",
            "1",
            "--log-level",
            "debug",
            "--",
            *tcg_qemu_argv(test_qmp, extra=qemu_extra),
        ],
    )
    return proc, Qemu.attach(name, test_qmp)


def running(proc, control: Path):
    wait_for(
        lambda: ctl(control, "ready").returncode == 0 or proc.popen.poll() is not None, timeout=30, what="agent ready"
    )
    assert proc.popen.poll() is None, proc.stderr


def swtpm_pids(tmp: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"swtpm socket.*{tmp}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_launch_creates_an_encrypted_state_and_stops_cleanly(world):
    proc, q = launch(world, "vm1")
    running(proc, world.tmp / "run" / "control.sock")
    assert q.qmp("query-tpm")[0]["model"] == "tpm-crb"
    info = swtpm.inspect_state(str(world.tmp / "tpm"), "2.0")
    assert info.kind is swtpm.StateKind.ENCRYPTED
    assert swtpm_pids(world.tmp)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr
    wait_for(lambda: not swtpm_pids(world.tmp), what="swtpm to exit")
    assert sorted(p.name for p in (world.tmp / "run").iterdir()) == []


def test_restart_with_the_right_key_reads_the_state(world):
    proc, _q = launch(world, "vm1")
    running(proc, world.tmp / "run" / "control.sock")
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    before = (world.tmp / "tpm" / "tpm2-00.permall").read_bytes()
    proc, q = launch(world, "vm1b")
    running(proc, world.tmp / "run" / "control.sock")
    assert q.qmp("query-tpm")
    assert "created" not in proc.stderr or '"created": false' in proc.stderr
    assert swtpm.inspect_state(str(world.tmp / "tpm"), "2.0").kind is swtpm.StateKind.ENCRYPTED
    assert before  # the state existed and was reused, not re-created


def test_wrong_key_fails_with_one_line_and_no_qemu(world):
    proc, _q = launch(world, "vm1")
    running(proc, world.tmp / "run" / "control.sock")
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    (world.tmp / "wrong.key").write_bytes(os.urandom(32))
    proc, q = launch(world, "vm2", key="wrong.key")
    assert proc.wait(timeout=30) == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("keyagent: error:") and "wrong key" in last
    assert not os.path.exists(q.test_qmp)  # QEMU never started
    assert not swtpm_pids(world.tmp)


def test_sidecar_starts_swtpm_before_qemu_and_stops_qemu_when_swtpm_dies(world):
    tmp = world.tmp
    qmp = str(tmp / "qmp.sock")
    agent = sidecar(world, qmp, logs=False)
    ctrl = tmp / "run" / "swtpm-ctrl.sock"
    wait_for(lambda: ctrl.exists(), timeout=20, what="swtpm control socket")
    qemu = start_tcg_qemu(qmp, extra=swtpm.qemu_tpm_args(str(ctrl)))
    try:
        running(agent, tmp / "run" / "control.sock")
        for pid in swtpm_pids(tmp):
            os.kill(pid, signal.SIGKILL)
        assert qemu.wait(timeout=30) == 0  # the agent quit it
        assert agent.wait(timeout=30) == 1
        assert "swtpm died" in agent.stderr
    finally:
        if qemu.poll() is None:
            qemu.kill()


def test_vm_with_a_vtpm_migrates_between_two_agents(world):
    tmp = world.tmp
    src, sq = launch(world, "src", run="src-run", state="src-tpm")
    dst, dq = launch(world, "dst", "-incoming", "defer", run="dst-run", state="dst-tpm")
    running(src, tmp / "src-run" / "control.sock")
    running(dst, tmp / "dst-run" / "control.sock")
    (tmp / "psk.bin").write_bytes(os.urandom(32))
    world.scan.secret("PSK", (tmp / "psk.bin").read_bytes())
    uri = f"tcp:127.0.0.1:{free_port()}"
    ctl_json(tmp / "dst-run" / "control.sock", "migrate", "accept", "--psk-file", str(tmp / "psk.bin"), "--uri", uri)
    ctl_json(tmp / "src-run" / "control.sock", "migrate", "start", "--psk-file", str(tmp / "psk.bin"), "--uri", uri)
    out = ctl(tmp / "src-run" / "control.sock", "migrate", "wait", "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: dq.qmp("query-status")["status"] == "running", timeout=30, what="destination running")
    assert dq.qmp("query-tpm")[0]["model"] == "tpm-crb"
    sq.qmp("quit")
    assert src.wait(timeout=30) == 0
    dst.popen.send_signal(signal.SIGTERM)
    assert dst.wait(timeout=30) == 0
    # The destination's swtpm wrote the migrated state, encrypted under the same key.
    assert swtpm.inspect_state(str(tmp / "dst-tpm"), "2.0").kind is swtpm.StateKind.ENCRYPTED


def sidecar(world: World, qmp: str, logs: bool = True):
    """``keyagent run`` for VM "side" with a vTPM; ``logs``: an event log and debug logs."""
    tmp = world.tmp
    logged = ["--event-log", str(tmp / "events.jsonl"), "--log-level", "debug"] if logs else []
    return world.spawn(
        f"agent{len(world.procs)}",
        [
            "run",
            "--qmp",
            f"unix:{qmp}",
            "--qmp-timeout",
            "30",
            "--vm-name",
            "side",
            "--vm-run-dir",
            str(tmp / "run"),
            "--vtpm-state-dir",
            str(tmp / "tpm"),
            "--vtpm-key",
            f"file:{tmp / 'tpm.key'}",
            "--secrets-master-key",
            "file",
            *logged,
        ],
    )


def secret_objects(q: Qemu) -> list[str]:
    return sorted(o["name"] for o in q.qmp("qom-list", {"path": "/objects"}) if o["type"] == "child<secret>")


def test_restarted_sidecar_adopts_the_live_swtpm_leaves_the_master_key_alone_and_still_supervises(world):
    tmp = world.tmp
    qmp, ctrl, control = str(tmp / "qmp.sock"), tmp / "run" / "swtpm-ctrl.sock", tmp / "run" / "control.sock"
    first = sidecar(world, qmp)
    wait_for(lambda: ctrl.exists(), timeout=20, what="swtpm control socket")
    q = Qemu.attach("side", tmp / "side-t.sock")
    qemu = start_tcg_qemu(qmp, q.test_qmp, extra=swtpm.qemu_tpm_args(str(ctrl)))
    try:
        running(first, control)
        (pid,) = swtpm_pids(tmp)
        assert secret_objects(q) == ["keyagent-master"]
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait()
        second = sidecar(world, qmp)
        running(second, control)
        assert swtpm_pids(tmp) == [pid]  # not started twice
        assert "vtpm_adopted" in second.stderr and "swtpm_started" not in second.stderr
        assert q.qmp("query-tpm")[0]["model"] == "tpm-crb"
        # The predecessor's master key: left alone, no second object-add, no key file.
        assert secret_objects(q) == ["keyagent-master"]
        assert sorted(p.name for p in (tmp / "run").iterdir()) == ["control.sock", "swtpm-ctrl.sock", "swtpm.pid"]
        # Secrets still work: our own master key goes in when the first one needs it.
        ctl_json(control, "secret", "add", "--id", "s1", "--file", str(tmp / "disk.pass"))
        assert secret_objects(q) == ["keyagent-master", "keyagent-master-2", "s1"]
        assert not list((tmp / "run").glob("key-*"))
        # Still supervised: swtpm dies, the agent quits QEMU and says why.
        os.kill(pid, signal.SIGKILL)
        assert qemu.wait(timeout=30) == 0
        assert second.wait(timeout=30) == 1
        assert "swtpm died" in second.stderr
        assert not list((tmp / "run").glob("key-*"))
    finally:
        if qemu.poll() is None:
            qemu.kill()


def test_a_pid_file_naming_another_process_is_not_adopted(world):
    """A recycled or planted PID: not that swtpm, so a new one is started (and fails on the lock, or not)."""
    tmp = world.tmp
    (tmp / "run").mkdir(mode=0o700)
    decoy = subprocess.Popen(["sleep", "60"])
    try:
        (tmp / "run" / "swtpm.pid").write_text(f"{decoy.pid}\n")
        agent = sidecar(world, str(tmp / "qmp.sock"))
        wait_for(lambda: "swtpm_not_adopted" in agent.stderr or agent.popen.poll() is not None, timeout=20)
        wait_for(lambda: "swtpm_ready" in agent.stderr, timeout=20, what="a swtpm of its own")
        assert decoy.poll() is None  # never signalled
        assert '"reason": "not swtpm socket"' in agent.stderr
    finally:
        decoy.kill()
        decoy.wait()
