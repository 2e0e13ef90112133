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
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.control_client import get
from tests.e2e.harness import DIGEST, DISK_PASS, KEYAGENT, World, ctl, leak_checked, wait_for


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
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != ".lock")


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
