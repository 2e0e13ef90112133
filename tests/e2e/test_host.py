"""``keyagent host`` end to end: one host process, several VMs.

Simulated SEV VMs (one ``keyagent simulate`` per VM, each with its own TIK
and TEK, one owner for all), and a real QEMU (TCG) VM.  Each test checks
what the host's ``/v1/vms`` says, what QEMU (or the simulator) says, that
no other VM noticed a failing one, that SIGTERM ends the host with 0 and
no key file left, and scans every output for the secrets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.control_client import get
from tests.e2e.harness import DIGEST, DISK_PASS, KEYAGENT, World, ctl, leak_checked, wait_for
from tests.e2e.qemu import QEMU, Qemu


class HostWorld:
    """A World with one owner for many simulated VMs and a ``keyagent host``."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.tmp = world.tmp
        self.conf = self.tmp / "conf"
        self.conf.mkdir()
        self.events = self.tmp / "ev"
        self.events.mkdir()
        self.control = self.tmp / "host.sock"
        (self.tmp / "run").mkdir(mode=0o700)
        self.keys: dict[str, tuple[Path, Path]] = {}
        self.sims: dict[str, object] = {}
        self.host = None
        self.owner_url = ""

    def qmp(self, vm: str) -> str:
        return str(self.tmp / f"{vm}.qmp")

    def run_dir(self, vm: str) -> Path:
        return self.tmp / "run" / vm

    def owner(self, *vms: str) -> str:
        """One owner that knows every VM named, each with its own TIK/TEK."""
        (self.tmp / "disk.pass").write_bytes(DISK_PASS)
        lines = []
        for vm in vms:
            tik, tek = self.tmp / f"{vm}.tik", self.tmp / f"{vm}.tek"
            for path in (tik, tek):
                path.write_bytes(os.urandom(16))
                os.chmod(path, 0o600)
                self.world.scan.secret(f"{vm} {path.suffix}", path.read_bytes())
            self.keys[vm] = (tik, tek)
            lines += [
                f"[vm.{vm}]",
                f'tik = "{tik.name}"',
                f'tek = "{tek.name}"',
                "policy = 1",
                f'digest = "{DIGEST.hex()}"',
                f"[[vm.{vm}.secret]]",
                'guid = "luks-key"',
                'file = "disk.pass"',
            ]
        (self.tmp / "owner.toml").write_text("\n".join(lines) + "\n")
        proc = self.world.spawn(
            "owner", ["owner", "serve", "--config", str(self.tmp / "owner.toml"), "--listen", "127.0.0.1:0"]
        )
        wait_for(
            lambda: proc.stdout_path.stat().st_size > 0 or proc.popen.poll() is not None,
            timeout=30,
            what="owner listening line",
        )
        assert proc.popen.poll() is None, proc.stderr
        self.owner_url = json.loads(proc.stdout.splitlines()[0])["listening"]
        return self.owner_url

    def simulator(self, vm: str, digest: bytes = DIGEST):
        tik, tek = self.keys[vm]
        proc = self.world.spawn(
            f"sim-{vm}",
            [
                "simulate",
                "--qmp",
                f"unix:{self.qmp(vm)}",
                "--sev",
                "--tik",
                str(tik),
                "--tek",
                str(tek),
                "--digest",
                digest.hex(),
            ],
        )
        wait_for(lambda: os.path.exists(self.qmp(vm)) or proc.popen.poll() is not None, what=f"{vm} simulator")
        assert proc.popen.poll() is None, proc.stderr
        self.sims[vm] = proc
        return proc

    def sim_query(self, vm: str, command: str) -> dict:
        saved = self.world.qmp
        self.world.qmp = self.qmp(vm)
        try:
            return self.world.sim_query(command)
        finally:
            self.world.qmp = saved

    def vm_file(self, vm: str, text: str | None = None, **extra: str) -> Path:
        """``conf/<vm>.toml``: a simulated SEV VM, or ``text`` as given."""
        path = self.conf / f"{vm}.toml"
        if text is None:
            text = (
                f'[vm]\nqmp = "unix:{self.qmp(vm)}"\nrun_dir = "{self.run_dir(vm)}"\n'
                f'[sev]\nowner_url = "{self.owner_url}"\n'
            )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(path)  # whole, as an admin's tool would put it
        return path

    def start(self, *extra: str):
        self.host = self.world.spawn(
            "host",
            [
                "host",
                "--config-dir",
                str(self.conf),
                "--control",
                f"unix:{self.control}",
                "--event-log-dir",
                str(self.events),
                "--log-level",
                "debug",
                *extra,
            ],
        )
        wait_for(
            lambda: ctl(self.control, "ready").returncode == 0 or self.host.popen.poll() is not None,
            timeout=30,
            what="host ready",
        )
        assert self.host.popen.poll() is None, self.host.stderr
        return self.host

    def vms(self) -> dict[str, dict]:
        out = ctl(self.control, "vms", "--json")
        assert out.returncode == 0, out.stderr
        return {vm["name"]: vm for vm in json.loads(out.stdout)["vms"]}

    def wait_vm(self, vm: str, predicate, timeout: float = 30.0, what: str = "") -> dict:
        seen: dict = {}

        def check() -> bool:
            seen.update(self.vms().get(vm) or {"state": None})
            return predicate(self.vms().get(vm))

        try:
            wait_for(check, timeout=timeout, what=f"{vm}: {what}")
        except AssertionError:
            raise AssertionError(f"{vm}: {what}; last seen {seen}\n{self.host.stderr[-3000:]}") from None
        return self.vms()[vm]

    def wait_launched(self, vm: str) -> dict:
        return self.wait_vm(
            vm,
            lambda e: e is not None and e["result"] is not None and e["result"]["flow"] == "launch",
            what="launch finished",
        )

    def terminate(self) -> int:
        assert self.host is not None
        self.host.popen.send_signal(signal.SIGTERM)
        return self.host.wait(timeout=60)

    def key_files(self) -> list[str]:
        run = self.tmp / "run"
        # .lock, and launch.json: the public measurement a restarted agent compares (docs/crash-only.md)
        keep = (".lock", "launch.json")
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name not in keep)


@pytest.fixture
def hw(tmp_path):
    w = World(tmp_path)
    with leak_checked(w, dirs=("run", "ev"), files=()) as scan:
        scan.secret("disk passphrase", DISK_PASS)
        h = HostWorld(w)
        yield h
        for path in sorted((tmp_path / "ev").glob("*.jsonl")):
            scan.file(str(path))


def test_every_vm_launches_a_new_file_starts_and_a_removed_one_stops_without_touching_qemu(hw):
    hw.owner("a", "b", "c")
    for vm in ("a", "b", "c"):
        hw.simulator(vm)
    hw.vm_file("a")
    hw.vm_file("b")
    hw.start()
    for vm in ("a", "b"):
        entry = hw.wait_launched(vm)
        assert entry["result"]["code"] == 0, entry
        assert entry["state"] == "running"
        assert hw.sim_query(vm, "x-sim-query-state")["status"] == "running"
        secrets = hw.sim_query(vm, "x-sim-query-secrets")
        assert secrets["entries"][0]["sha256"] == hashlib.sha256(DISK_PASS).hexdigest()
    assert "c" not in hw.vms()
    # Each VM keeps its own control socket, with the sidecar's verbs.
    status = json.loads(ctl(hw.run_dir("a") / "control.sock", "status").stdout)
    assert status["vm"] == "a" and status["flows"]["launch"]["result"]["code"] == 0

    started = time.monotonic()
    hw.vm_file("c")
    assert hw.wait_launched("c")["result"]["code"] == 0
    assert time.monotonic() - started < 10  # within the poll, plus a launch on a loaded machine

    table = ctl(hw.control, "vms")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "FLOWS", "RESULT"]
    assert [line.split()[:2] for line in lines[1:]] == [["a", "running"], ["b", "running"], ["c", "running"]]

    status, body, _ = get(str(hw.control), "/metrics")
    assert status == 200
    text = body.decode()
    for vm in ("a", "b", "c"):
        assert f'keyagent_flows_finished_total{{kind="sev-launch",result="completed",vm="{vm}"}} 1.0' in text
    assert 'keyagent_host_vms{state="running"} 3.0' in text

    (hw.conf / "b.toml").unlink()
    wait_for(lambda: "b" not in hw.vms(), timeout=10, what="b gone from the table")
    assert not (hw.run_dir("b") / "control.sock").exists()
    # The simulator was not told anything: still running, still connected to nobody.
    assert hw.sim_query("b", "x-sim-query-state")["status"] == "running"
    assert hw.sims["b"].popen.poll() is None
    assert {vm: e["state"] for vm, e in hw.vms().items()} == {"a": "running", "c": "running"}
    records = [json.loads(line) for line in (hw.events / "b.jsonl").read_text().splitlines()]
    launched = max(i for i, r in enumerate(records) if r.get("action", {}).get("type") == "Finish")
    assert not [r for r in records[launched + 1 :] if r.get("action", {}).get("type") == "SendQmp"]
    assert records[-1]["kind"] == "exit" and records[-1]["code"] == 0

    assert hw.terminate() == 0, hw.host.stderr
    assert hw.key_files() == []
    for vm in ("a", "c"):
        assert hw.sim_query(vm, "x-sim-query-state")["status"] == "running"
        log = (hw.events / f"{vm}.jsonl").read_text().splitlines()
        assert json.loads(log[0])["kind"] == "start" and json.loads(log[-1])["kind"] == "exit"
        check = subprocess.run(
            [*KEYAGENT, "replay", "--check", str(hw.events / f"{vm}.jsonl")], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_refused_vm_a_bad_file_and_a_killed_qemu_fail_alone(hw):
    hw.owner("good", "refused", "killed")
    hw.simulator("good")
    hw.simulator("refused", digest=hashlib.sha256(b"some other firmware").digest())
    hw.simulator("killed")
    for vm in ("good", "refused", "killed"):
        hw.vm_file(vm)
    hw.vm_file("broken", "[vm]\nqmp = 'unix:/nowhere/q.sock'\n[sev]\nowner_url = 'ftp://x'\n")
    hw.vm_file("nomonitor", f"[vm]\nqmp = 'unix:{hw.tmp}/absent/q.sock'\n")
    hw.start()
    assert hw.wait_launched("good")["result"]["code"] == 0
    assert hw.wait_launched("killed")["result"]["code"] == 0
    refused = hw.wait_vm("refused", lambda e: e["state"] == "failed", what="refused")
    assert refused["result"]["code"] == 1 and refused["result"]["reason"]
    # The refused VM is quit, as on_refusal says; the simulator ends with it.
    wait_for(lambda: hw.sims["refused"].popen.poll() is not None, timeout=20, what="refused VM quit")
    vms = hw.vms()
    assert (
        vms["broken"]["state"] == "failed"
        and "[sev] owner_url must be an http:// URL" in (vms["broken"]["result"]["reason"])
    )
    assert vms["nomonitor"]["state"] == "failed" and "does not exist" in vms["nomonitor"]["result"]["reason"]

    hw.sims["killed"].popen.kill()
    killed = hw.wait_vm("killed", lambda e: e["state"] == "failed", what="QEMU gone")
    assert killed["result"]["reason"].startswith("QEMU went away")
    host_log = [json.loads(line) for line in hw.host.stderr.splitlines() if line.startswith("{")]
    failed = {rec["vm"] for rec in host_log if rec.get("event") == "VM failed"}
    assert failed == {"refused", "killed", "broken", "nomonitor"}

    # Nobody else noticed: the good VM runs on, its control socket answers.
    assert hw.vms()["good"]["state"] == "running"
    assert ctl(hw.run_dir("good") / "control.sock", "ready").returncode == 0
    assert hw.sim_query("good", "x-sim-query-state")["status"] == "running"
    assert hw.terminate() == 0, hw.host.stderr
    assert hw.key_files() == []


def test_sighup_restarts_a_vm_whose_file_changed_and_leaves_the_rest(hw):
    hw.owner("a", "b")
    hw.simulator("a")
    hw.simulator("b")
    hw.vm_file("a")
    hw.vm_file("b", "[vm]\nqmp = 'unix:/nowhere/q.sock'\n")  # broken until fixed
    hw.start()
    assert hw.wait_launched("a")["result"]["code"] == 0
    assert hw.wait_vm("b", lambda e: e["state"] == "failed", what="b broken")
    hw.vm_file("b")
    time.sleep(1.5)  # a changed file waits for SIGHUP
    assert hw.vms()["b"]["state"] == "failed"
    # a's file changes too: a run_dir of its own elsewhere.  Its SEV launch is
    # over; its restarted flows begin again with the new configuration.
    hw.vm_file(
        "a",
        f'[vm]\nqmp = "unix:{hw.qmp("a")}"\nrun_dir = "{hw.tmp / "run" / "a2"}"\n',
    )
    hw.host.popen.send_signal(signal.SIGHUP)
    assert hw.wait_launched("b")["result"]["code"] == 0
    hw.wait_vm("a", lambda e: e["state"] == "running" and e["result"] is None, what="a restarted")
    wait_for(lambda: (hw.tmp / "run" / "a2" / "control.sock").exists(), what="a's new control socket")
    assert not (hw.run_dir("a") / "control.sock").exists()
    assert hw.sim_query("a", "x-sim-query-state")["status"] == "running"
    assert hw.terminate() == 0, hw.host.stderr
    assert hw.key_files() == []


def test_sigterm_during_a_launch_leaves_that_vm_paused_and_the_host_exits_0(hw):
    hw.owner("slow")
    # The simulator measures late: the launch is still waiting at SIGTERM.
    tik, tek = hw.keys["slow"]
    proc = hw.world.spawn(
        "sim-slow",
        [
            "simulate",
            "--qmp",
            f"unix:{hw.qmp('slow')}",
            "--sev",
            "--tik",
            str(tik),
            "--tek",
            str(tek),
            "--digest",
            DIGEST.hex(),
            "--measure-delay",
            "30",
        ],
    )
    wait_for(lambda: os.path.exists(hw.qmp("slow")), what="slow simulator")
    hw.vm_file("slow")
    hw.start()
    hw.wait_vm("slow", lambda e: "launch" in e["flows"], what="launch running")
    assert hw.terminate() == 0, hw.host.stderr
    assert hw.sim_query("slow", "x-sim-query-state")["status"] != "running"  # never resumed without its secret
    assert proc.popen.poll() is None
    log = [json.loads(line) for line in (hw.events / "slow.jsonl").read_text().splitlines()]
    assert log[-1]["kind"] == "exit" and log[-1]["code"] == 1 and "SIGTERM" in log[-1]["reason"]
    assert hw.key_files() == []


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_a_real_qemu_vm_takes_a_secret_through_its_own_socket_and_its_death_touches_no_other_vm(hw):
    hw.owner("sim")
    hw.simulator("sim")
    hw.vm_file("sim")
    secret = hw.tmp / "secret.txt"
    secret.write_text("qemu secret " + os.urandom(8).hex())
    hw.world.scan.secret("secret object", secret.read_bytes())
    qemu = subprocess.Popen(
        [
            QEMU,
            "-machine",
            "q35,accel=tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            f"unix:{hw.qmp('tcg')},server=on,wait=off",
            "-qmp",
            f"unix:{hw.tmp / 'tcg-test.sock'},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(hw.tmp / "tcg-qemu.stderr", "wb"),
    )
    try:
        wait_for(lambda: os.path.exists(hw.tmp / "tcg-test.sock"), what="QEMU monitor")
        hw.vm_file(
            "tcg",
            f'[vm]\nqmp = "unix:{hw.qmp("tcg")}"\nrun_dir = "{hw.run_dir("tcg")}"\n[secrets]\nmaster_key = "file"\n',
        )
        hw.start()
        assert hw.wait_launched("sim")["result"]["code"] == 0
        control = hw.run_dir("tcg") / "control.sock"
        wait_for(lambda: ctl(control, "ready").returncode == 0, timeout=30, what="tcg VM's control socket")
        out = ctl(control, "secret", "add", "--id", "disk0", "--file", str(secret))
        assert out.returncode == 0, out.stderr
        probe = Qemu.__new__(Qemu)
        probe.name, probe.test_qmp = "tcg", str(hw.tmp / "tcg-test.sock")
        objects = {o["name"] for o in probe.qmp("qom-list", {"path": "/objects"})}
        assert "disk0" in objects
        assert hw.vms()["tcg"]["state"] == "running"

        qemu.kill()
        qemu.wait()
        gone = hw.wait_vm("tcg", lambda e: e["state"] == "failed", what="QEMU killed")
        assert gone["result"]["reason"].startswith("QEMU went away")
        assert not control.exists()
        assert hw.vms()["sim"]["state"] == "running"
        assert ctl(hw.run_dir("sim") / "control.sock", "ready").returncode == 0
        assert hw.terminate() == 0, hw.host.stderr
        assert hw.key_files() == []
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--config-dir", "{tmp}/nope"], "--config-dir {tmp}/nope is not a directory"),
        (["--config-dir", "{tmp}", "--control", "tcp:1"], "--control must be unix:PATH"),
        (["--config-dir", "{tmp}", "--event-log-dir", "{tmp}/nope"], "--event-log-dir {tmp}/nope is not a directory"),
        (["--config-dir", "{tmp}", "--qmp-timeout", "nan"], "--qmp-timeout"),
        (["--config-dir", "{tmp}", "--libvirt", ""], "--libvirt needs a connection URI"),
    ],
)
def test_bad_host_arguments_exit_2_with_one_line(tmp_path, args, reason):
    out = subprocess.run(
        [*KEYAGENT, "host", *(a.format(tmp=tmp_path) for a in args)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and reason.format(tmp=tmp_path) in out.stderr, out.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(
    QEMU is None or shutil.which("swtpm") is None, reason="qemu-system-x86_64 or swtpm is not installed"
)
def test_two_vtpm_vms_each_get_their_swtpm_and_one_swtpm_dying_quits_only_its_qemu():
    from agent.io import swtpm

    tmp = Path(tempfile.mkdtemp(prefix="ka-hv-"))  # unix socket paths must fit 107 bytes
    world = World(tmp)
    qemus: dict[str, subprocess.Popen] = {}
    try:
        with leak_checked(world, dirs=("run",), files=()) as scan:
            hw = HostWorld(world)
            for vm in ("v1", "v2"):
                key = os.urandom(32)
                (tmp / f"{vm}.key").write_bytes(key)
                scan.secret(f"{vm} vTPM key", key)
                hw.vm_file(
                    vm,
                    f'[vm]\nqmp = "unix:{hw.qmp(vm)}"\nrun_dir = "{hw.run_dir(vm)}"\n'
                    f'[vtpm]\nstate_dir = "{tmp / (vm + "-tpm")}"\nkey = "file:{tmp / (vm + ".key")}"\n'
                    '[secrets]\nmaster_key = "file"\n',
                )
            hw.start("--qmp-timeout", "30")
            for vm in ("v1", "v2"):
                ctrl = hw.run_dir(vm) / "swtpm-ctrl.sock"
                wait_for(lambda ctrl=ctrl: ctrl.exists(), timeout=30, what=f"{vm}'s swtpm")
                qemus[vm] = subprocess.Popen(
                    [
                        QEMU,
                        "-machine",
                        "q35,accel=tcg",
                        "-m",
                        "64",
                        "-nodefaults",
                        "-display",
                        "none",
                        "-qmp",
                        f"unix:{hw.qmp(vm)},server=on,wait=off",
                        "-qmp",
                        f"unix:{tmp / (vm + '-test.sock')},server=on,wait=off",
                        *swtpm.qemu_tpm_args(str(ctrl)),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            for vm in ("v1", "v2"):
                control = hw.run_dir(vm) / "control.sock"
                wait_for(lambda c=control: ctl(c, "ready").returncode == 0, timeout=30, what=f"{vm} ready")
            pids = subprocess.run(
                ["pgrep", "-f", f"swtpm socket.*{hw.run_dir('v1')}/"], capture_output=True, text=True
            ).stdout.split()
            assert pids
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            assert qemus["v1"].wait(timeout=30) == 0  # the agent quit it, as a sidecar does
            v1 = hw.wait_vm("v1", lambda e: e["state"] == "failed", what="swtpm died")
            assert "swtpm exited" in v1["result"]["reason"]
            assert qemus["v2"].poll() is None
            probe = Qemu.__new__(Qemu)
            probe.name, probe.test_qmp = "v2", str(tmp / "v2-test.sock")
            assert probe.qmp("query-tpm")[0]["model"] == "tpm-crb"
            assert hw.vms()["v2"]["state"] == "running"
            assert hw.terminate() == 0, hw.host.stderr
            wait_for(
                lambda: not subprocess.run(["pgrep", "-f", f"swtpm socket.*{tmp}/"], capture_output=True).stdout,
                what="every swtpm to exit",
            )
            assert hw.key_files() == []
    finally:
        for q in qemus.values():
            if q.poll() is None:
                q.kill()
                q.wait()
        shutil.rmtree(tmp, ignore_errors=True)
