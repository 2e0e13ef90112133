"""Core dumps off and the dumpable flag cleared, for the commands that hold keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.e2e.harness import KEYAGENT, wait_for
from tests.leakscan import ArgvWatcher

ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def core_limit(pid: int | str) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max core file size"):
                soft, hard = line.split()[4:6]
                return soft, hard
    raise AssertionError("no core limit line")


def test_harden_process_disables_core_dumps_and_clears_dumpable():
    out = python("""
        import ctypes, resource
        from agent.app.hardening import PR_GET_DUMPABLE, harden_process
        libc = ctypes.CDLL(None)
        before = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
        problems = harden_process()
        after = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
        print(before, after, resource.getrlimit(resource.RLIMIT_CORE), problems)
        limits = open("/proc/self/limits").read()
        print([l for l in limits.splitlines() if l.startswith("Max core file size")][0])
    """)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "1 0 (0, 0) []"
    assert second.split()[4:6] == ["0", "0"]


def test_hardening_cannot_be_undone_by_raising_the_limit_again():
    out = python("""
        import resource
        from agent.app.hardening import harden_process, is_dumpable
        harden_process()
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20))
        except ValueError:
            print("refused")
        print(is_dumpable())
    """)
    # Root may raise a hard limit again (CAP_SYS_RESOURCE); anyone else may not.
    expected = "refused" if os.geteuid() != 0 else None
    lines = out.stdout.splitlines()
    assert lines[-1] == "False"
    if expected:
        assert lines[0] == expected


@pytest.fixture
def short_tmp():
    path = Path(tempfile.mkdtemp(prefix="khd", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_keyagent_run_is_hardened_and_still_reachable(short_tmp):
    from tests.e2e.harness import ctl
    from tests.e2e.tinyqemu import TinyQemu, start_agent

    qemu = TinyQemu(str(short_tmp / "qmp.sock"))
    agent = start_agent(short_tmp, None)
    control = short_tmp / "run" / "control.sock"
    try:
        with ArgvWatcher() as watcher:
            # SO_PEERCRED on the control socket is unaffected.
            wait_for(
                lambda: ctl(control, "status").returncode == 0 or agent.poll() is not None,
                timeout=20,
                what="agent ready",
            )
            assert agent.poll() is None, (short_tmp / "agent.stderr").read_text()
        assert core_limit(agent.pid) == ("0", "0")
        # /proc/PID/cmdline (the ArgvWatcher of the leak scans) and status
        # (VmRSS for benchmarks) stay readable: both are mode 0444.
        assert any(b"agent.cli\0run\0" in argv for argv in watcher.seen)
        assert "VmRSS:" in Path(f"/proc/{agent.pid}/status").read_text()
        assert oct(os.stat(f"/proc/{agent.pid}/status").st_mode & 0o777) == "0o444"
        if os.geteuid() == 0 and shutil.which("setpriv"):
            # Even for another uid, without CAP_SYS_PTRACE.
            out = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", f"/proc/{agent.pid}/status"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert out.returncode == 0 and "VmRSS:" in out.stdout, out.stderr
            # ... while the memory is not (it never was for another uid; for
            # the same uid the cleared dumpable flag is what refuses it).
            out = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", f"/proc/{agent.pid}/environ"],
                capture_output=True,
                timeout=10,
            )
            assert out.returncode != 0
    finally:
        agent.terminate()
        agent.wait(10)
        qemu.close()


def test_keyagent_launch_is_hardened_and_its_qemu_inherits_no_core_files(short_tmp):
    # A stand-in QEMU that reports its own and its parent's (the agent's) core
    # limits, then exits: the launcher reports a QEMU that died early.
    report = short_tmp / "limits.txt"
    fake = short_tmp / "fake-qemu"
    fake.write_text(f"""#!{sys.executable}
import os
def limit(pid):
    for line in open(f"/proc/{{pid}}/limits"):
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
open({str(report)!r}, "w").write(limit("self") + "\\n" + limit(os.getppid()) + "\\n")
""")
    fake.chmod(0o755)
    out = subprocess.run(
        [
            *KEYAGENT,
            "launch",
            "--vm-name",
            "hd",
            "--vm-run-dir",
            str(short_tmp / "run"),
            "--secrets-master-key",
            "file",
            "--",
            str(fake),
            "-machine",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    qemu_limit, agent_limit = report.read_text().splitlines()
    assert agent_limit == "0 0"
    assert qemu_limit == "0 0"
