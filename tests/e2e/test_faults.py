"""Faults around the agent: disk full, read-only run_dir, SIGKILL of the agent or
of QEMU mid-flow, and the agent as PID 1.  After each: no key material left, the
VM never resumed without its secret, QEMU in a known state."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.e2e.harness import DISK_PASS, KEYAGENT, StandInOwner, World, ctl, ctl_json, free_port, wait_for
from tests.e2e.qemu import QEMU, Qemu
from tests.leakscan import LeakScan

needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def tiny_run_dir():
    """A 64 KiB tmpfs as run_dir, so that the disk can really be full."""
    mnt = Path(tempfile.mkdtemp(prefix="ka-tmpfs-"))
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
    shutil.rmtree(mnt, ignore_errors=True)


def fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 1024):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def destination(world: World, run_dir: Path) -> tuple[Qemu, object]:
    (world.tmp / "dst.img").write_bytes(bytes(1024 * 1024))
    q = Qemu(world.tmp, "dst", world.tmp / "dst.img", incoming=True)
    agent = world.spawn(
        "dst-agent",
        [
            "run",
            "--qmp",
            f"unix:{q.agent_qmp}",
            "--vm-name",
            "dst",
            "--vm-run-dir",
            str(run_dir),
            "--secrets-master-key",
            "file",
            "--log-level",
            "debug",
        ],
    )
    wait_for(lambda: ctl(run_dir / "control.sock", "status").returncode == 0, what="agent")
    return q, agent


@needs_qemu
@needs_root
@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_key_file_that_cannot_be_written_fails_the_request_and_leaves_nothing(tmp_path, tiny_run_dir, fault):
    world = World(tmp_path)
    q, agent = destination(world, tiny_run_dir)
    try:
        psk = os.urandom(32)
        (tmp_path / "psk.bin").write_bytes(psk)
        if fault == "disk-full":
            fill(tiny_run_dir)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(tiny_run_dir)], check=True)
        out = ctl(
            tiny_run_dir / "control.sock",
            "migrate",
            "accept",
            "--psk-file",
            str(tmp_path / "psk.bin"),
            "--uri",
            f"tcp:127.0.0.1:{free_port()}",
        )
        assert out.returncode == 1
        why = "No space left on device" if fault == "disk-full" else "Read-only file system"
        assert "cannot write the PSK" in out.stderr and why in out.stderr
        assert not list(tiny_run_dir.glob("key-*"))
        assert q.tls_objects() == [] and q.tls_creds() == ""
        # The agent is still there for the next request.
        assert ctl(tiny_run_dir / "control.sock", "status").returncode == 0
        scan = LeakScan()
        scan.secret("PSK", psk)
        scan.text("agent stderr", agent.stderr)
        scan.dirs.append(str(tiny_run_dir))
        scan.check()
    finally:
        world.close()
        q.stop()


@needs_qemu
def test_qemu_killed_mid_migration_leaves_no_key_behind(tmp_path):
    world = World(tmp_path)
    run_dir = tmp_path / "run"
    q, agent = destination(world, run_dir)
    try:
        (tmp_path / "psk.bin").write_bytes(os.urandom(32))
        ctl_json(
            run_dir / "control.sock",
            "migrate",
            "accept",
            "--psk-file",
            str(tmp_path / "psk.bin"),
            "--uri",
            f"tcp:127.0.0.1:{free_port()}",
        )
        assert list(run_dir.glob("key-*/keys.psk"))
        q.popen.kill()
        assert agent.wait(timeout=20) == 0
        assert sorted(p.name for p in run_dir.iterdir()) == []
    finally:
        world.close()
        q.stop()


def test_agent_killed_during_attestation_never_resumes_and_a_new_agent_finishes(tmp_path):
    world = World(tmp_path)
    stalling = StandInOwner(stall=30)
    try:
        world.simulator()
        first = world.agent(stalling.url)
        wait_for(lambda: "asking the guest owner" in first.stderr, what="owner request")
        first.popen.kill()
        first.popen.wait()
        assert world.sim_query("x-sim-query-state")["status"] == "prelaunch"
        second = world.agent(world.owner())
        assert second.wait(timeout=30) == 0, second.stderr
        assert world.sim_query("x-sim-query-state")["status"] == "running"
        # And a third agent, over a VM that runs: too late, hands off.
        third = world.agent(f"http://127.0.0.1:{free_port()}")  # never asked: too late
        assert third.wait(timeout=30) == 1
        assert "too late to attest" in third.stderr
        assert world.sim_query("x-sim-query-state")["status"] == "running"
        scan = LeakScan()
        scan.secret("disk passphrase", DISK_PASS)
        for proc in world.procs:
            scan.text(proc.name, proc.stderr)
        scan.check()
    finally:
        stalling.close()
        world.close()


@needs_qemu
@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root for a PID namespace"
)
def test_launch_as_pid_1_reaps_orphans_and_exits_with_qemus_status(tmp_path):
    """In its own PID namespace the launcher is PID 1: an orphan re-parented to it
    is reaped, and the agent still gets QEMU's own exit status."""
    run = tmp_path / "run"
    test_qmp = tmp_path / "t.sock"
    # The "QEMU" is a shell that leaves an orphan behind, then becomes QEMU.
    script = (
        f"(sleep 0.3 &) ; exec {QEMU} -machine q35,accel=tcg -m 64 -nodefaults "
        f'-display none -qmp unix:{test_qmp},server=on,wait=off "$@"'
    )
    proc = subprocess.Popen(
        [
            "unshare",
            "--fork",
            "--pid",
            "--mount-proc",
            *KEYAGENT,
            "launch",
            "--vm-run-dir",
            str(run),
            "--secrets-master-key",
            "file",
            "--",
            "/bin/sh",
            "-c",
            script,
            "sh",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "agent.stderr", "wb"),
    )
    try:
        wait_for(lambda: test_qmp.exists(), timeout=20, what="QEMU monitor")
        wait_for(lambda: ctl(run / "control.sock", "ready").returncode == 0, what="agent")
        ns_pids = subprocess.run(["pgrep", "-f", str(test_qmp)], capture_output=True, text=True).stdout.split()
        agent_host_pid = None
        for pid in ns_pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if "NSpid:" in status and status.split("NSpid:")[1].split("\n")[0].split()[-1] == "1":
                agent_host_pid = int(pid)
        assert agent_host_pid is not None

        def zombies() -> list[str]:
            found = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    if fields[0] == "Z" and int(fields[1]) == agent_host_pid:
                        found.append(entry)
            return found

        # The orphan exits 0.3 s after QEMU's start; the reaper takes a zombie
        # only when it still is one a second after it first saw it (ChildReaper).
        wait_for(lambda: zombies() == [], timeout=15, what="the orphan reaped")
        Qemu.attach("pid1", test_qmp).qmp("quit")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@needs_qemu
def test_stale_keyring_key_and_key_dir_are_swept_at_start(tmp_path):
    from agent.io import keyring

    if keyring.usable() is not None:
        pytest.skip(keyring.usable())
    world = World(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    (run_dir / "key-tls-deadbeef").mkdir(mode=0o700)
    (run_dir / "key-tls-deadbeef" / "keys.psk").write_text("qemu:00\n")
    serial = keyring.add_key("keyagent:dst:master", os.urandom(32))
    try:
        q, agent = destination(world, run_dir)
        try:
            assert not (run_dir / "key-tls-deadbeef").exists()
            with pytest.raises(OSError):
                keyring.search("keyagent:dst:master")
            assert "swept stale key material" in agent.stderr
        finally:
            world.close()
            q.stop()
    finally:
        for step in (keyring.revoke, keyring.unlink):
            try:
                step(serial)
            except OSError:
                pass
