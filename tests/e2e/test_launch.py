"""``keyagent launch`` with real QEMU 7.2: the container entrypoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.harness import KEYAGENT, World, ctl, leak_checked, wait_for
from tests.e2e.qemu import QEMU, Qemu, tcg_qemu_argv

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


class Launched:
    def __init__(self, world: World, *qemu_extra: str, agent_extra=()) -> None:
        tmp = world.tmp
        self.run_dir = tmp / "run"
        self.control = self.run_dir / "control.sock"
        self.test_qmp = str(tmp / "test.sock")
        self.proc = world.spawn(
            "launch",
            [
                "launch",
                "--vm-name",
                "lvm",
                "--vm-run-dir",
                str(self.run_dir),
                "--secrets-master-key",
                "file",
                "--launch-shutdown-grace-s",
                "1",
                "--event-log",
                str(tmp / "events.jsonl"),
                "--log-level",
                "debug",
                *agent_extra,
                "--",
                *tcg_qemu_argv(self.test_qmp, extra=qemu_extra),
            ],
        )

    def ready(self):
        wait_for(
            lambda: ctl(self.control, "ready").returncode == 0 or self.proc.popen.poll() is not None,
            timeout=20,
            what="agent ready",
        )
        assert self.proc.popen.poll() is None, self.proc.stderr
        return self

    def qmp(self, command, args=None):
        return Qemu.attach("launched", self.test_qmp).qmp(command, args)

    def files(self):
        return sorted(p.name for p in self.run_dir.rglob("*"))


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    with leak_checked(w, dirs=()):
        yield w


def qemu_pid(launched) -> int:
    out = subprocess.run(["pgrep", "-f", launched.test_qmp], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    own = [p for p in pids if p != launched.proc.popen.pid]
    return own[0]


def test_vm_runs_with_the_master_key_and_no_key_file_left(world):
    vm = Launched(world).ready()
    wait_for(lambda: vm.qmp("query-status")["status"] == "running", what="VM running")
    names = [o["name"] for o in vm.qmp("qom-list", {"path": "/objects"})]
    assert "keyagent-master" in names
    assert vm.files() == ["control.sock", "qmp.sock"]
    pw = world.tmp / "pw"
    pw.write_text("launch-secret-" + os.urandom(4).hex())
    world.scan.secret("secret", pw.read_bytes())
    assert ctl(vm.control, "secret", "add", "--id", "s0", "--file", str(pw)).returncode == 0


def test_sigterm_powers_down_then_quits_and_leaves_an_empty_run_dir(world):
    vm = Launched(world).ready()
    vm.proc.popen.send_signal(signal.SIGTERM)
    assert vm.proc.wait(timeout=30) == 0, vm.proc.stderr
    assert "signal received: powering the VM down" in vm.proc.stderr
    assert vm.files() == []


def test_user_asked_for_s_stays_paused(world):
    vm = Launched(world, "-S").ready()
    assert vm.qmp("query-status")["status"] == "prelaunch"


def test_qemu_exit_status_propagates(world):
    vm = Launched(world).ready()
    os.kill(qemu_pid(vm), signal.SIGKILL)
    assert vm.proc.wait(timeout=30) == 128 + signal.SIGKILL
    assert vm.files() == []


def test_qemu_quit_from_its_monitor_exits_zero(world):
    vm = Launched(world).ready()
    vm.qmp("quit")
    assert vm.proc.wait(timeout=30) == 0


def test_qemu_that_fails_to_start_gives_its_own_error_in_one_line(world):
    vm = Launched(world, "-no-such-option")
    assert vm.proc.wait(timeout=30) == 1
    last = [json.loads(line) for line in vm.proc.stderr.splitlines() if line.startswith("{")][-1]
    assert "QEMU failed to start" in last["reason"]
    assert "-no-such-option: invalid option" in last["reason"]
    assert vm.files() == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["launch", "--", "qemu-system-x86_64"], "run_dir"),
        (["launch", "--vm-run-dir", "RUN", "--", "/no/such/qemu"], "not found"),
        (["launch", "--vm-run-dir", "RUN"], "QEMU command"),
    ],
)
def test_bad_usage_exits_two(tmp_path, args, words):
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    out = subprocess.run([*KEYAGENT, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- a signal while the agent waits for QEMU's monitor --------------------------


@pytest.fixture
def short_world():
    """A World in a short directory: swtpm's socket path must fit 107 bytes."""
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="ka-sig-"))
    w = World(tmp)
    try:
        with leak_checked(w, dirs=("run",)):
            yield w
    finally:
        for pid in _pids_under(tmp):  # swtpm, if the agent left it behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _pids_under(tmp) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"swtpm socket.*{tmp}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")
def test_sigterm_while_waiting_for_the_monitor_stops_the_agent_and_swtpm_at_once(short_world):
    w = short_world
    key = os.urandom(32)
    (w.tmp / "tpm.key").write_bytes(key)
    w.scan.secret("vTPM key", key)
    agent = w.spawn(
        "agent",
        [
            "run",
            "--qmp",
            f"unix:{w.tmp / 'qmp.sock'}",
            "--qmp-timeout",
            "120",
            "--vm-name",
            "side",
            "--vm-run-dir",
            str(w.tmp / "run"),
            "--vtpm-state-dir",
            str(w.tmp / "tpm"),
            "--vtpm-key",
            f"file:{w.tmp / 'tpm.key'}",
            "--secrets-master-key",
            "file",
            "--event-log",
            str(w.tmp / "events.jsonl"),
        ],
    )
    wait_for(lambda: "vTPM ready" in agent.stderr or agent.popen.poll() is not None, timeout=30, what="swtpm started")
    assert _pids_under(w.tmp), agent.stderr  # swtpm runs; QEMU is not there yet
    start = time.monotonic()
    agent.popen.send_signal(signal.SIGTERM)
    try:
        assert agent.wait(timeout=30) == 0, agent.stderr
    except subprocess.TimeoutExpired:
        raise AssertionError(agent.stderr) from None
    assert time.monotonic() - start < 5  # not when --qmp-timeout (120 s) runs out
    assert "signal received, stopping" in agent.stderr
    wait_for(lambda: not _pids_under(w.tmp), timeout=10, what="swtpm to exit")
    assert "Traceback" not in agent.stderr
    assert sorted(p.name for p in (w.tmp / "run").iterdir()) == []


def test_sigterm_while_waiting_for_the_monitor_of_an_sev_launch_exits_1_at_once(tmp_path):
    w = World(tmp_path)
    with leak_checked(w, dirs=()):
        agent = w.spawn(
            "agent",
            [
                "run",
                "--qmp",
                f"unix:{tmp_path / 'absent.sock'}",
                "--qmp-timeout",
                "120",
                "--owner-url",
                "http://127.0.0.1:9",
                "--event-log",
                str(tmp_path / "events.jsonl"),
            ],
        )
        wait_for(lambda: (tmp_path / "events.jsonl").exists() or agent.popen.poll() is not None, what="agent started")
        time.sleep(0.3)
        start = time.monotonic()
        agent.popen.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 1, agent.stderr
        assert time.monotonic() - start < 5
        last = json.loads(agent.stderr.strip().splitlines()[-1])
        assert last["reason"] == "stopped by SIGTERM before the launch completed"


def test_sigterm_before_qemus_monitor_answers_stops_qemu_and_drops_the_master_key(short_world):
    # A "QEMU" that never opens its monitor: the agent waits (up to 30 s) for it.
    w = short_world
    fake_qemu = w.tmp / "fake-qemu"
    fake_qemu.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    fake_qemu.chmod(0o755)
    agent = w.spawn(
        "launch",
        [
            "launch",
            "--vm-name",
            "lvm",
            "--vm-run-dir",
            str(w.tmp / "run"),
            "--secrets-master-key",
            "file",
            "--",
            str(fake_qemu),
        ],
    )
    wait_for(lambda: "starting QEMU" in agent.stderr or agent.popen.poll() is not None, what="QEMU started")
    wait_for(
        lambda: any(p.name.startswith("key-master") for p in (w.tmp / "run").iterdir()), what="master key directory"
    )
    start = time.monotonic()
    agent.popen.send_signal(signal.SIGTERM)
    try:
        code = agent.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(agent.stderr) from None
    assert time.monotonic() - start < 5, agent.stderr
    assert code == 128 + signal.SIGTERM  # QEMU's own end: it was terminated
    assert "Traceback" not in agent.stderr
    assert sorted(p.name for p in (w.tmp / "run").iterdir()) == []  # no key-master-* left
