"""contrib/libvirt/qemu: the hook, run with libvirt's arguments and a fake systemctl."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.contrib.support import CONTRIB

HOOK = CONTRIB / "libvirt" / "qemu"
DOMAIN_XML = b"<domain type='kvm'><name>vm1</name><uuid>8f0c2f44-2d3c-4b6b-9d0e-2a4b1d2c3e4f</uuid></domain>\n"
UNIT = "keyagent@vm1.service"

# Every call libvirt makes to the qemu hook (docs/hooks.rst), as (op, sub-op, extra).
NOTHING_TO_DO = [
    ("start", "begin", "-"),
    ("started", "begin", "-"),
    ("stopped", "end", "-"),
    ("migrate", "begin", "-"),
    ("restore", "begin", "-"),
]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


class Hook:
    def __init__(self, tmp_path: Path) -> None:
        self.config_dir = tmp_path / "etc-keyagent"
        self.config_dir.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.calls = tmp_path / "systemctl.calls"
        self.systemctl_status = 0
        fake = self.bin / "systemctl"
        fake.write_text(
            '#!/bin/sh\nprintf "%s\\n" "$*" >> "$FAKE_SYSTEMCTL_CALLS"\n'
            'echo "fake systemctl output"\nexit "${FAKE_SYSTEMCTL_STATUS:-0}"\n'
        )
        fake.chmod(0o755)

    def configure(self, domain: str, env: bool = True) -> None:
        (self.config_dir / f"{domain}.toml").write_text(f'[vm]\nname = "{domain}"\n')
        if env:
            (self.config_dir / f"{domain}.env").write_text(
                f"KEYAGENT_MONITOR=--libvirt qemu:///system --domain {domain}\n"
            )

    def run(self, domain: str, op: str, subop: str = "begin", extra: str = "-"):
        # libvirt's environment for hooks: LC_ALL, PATH, HOME, USER, LOGNAME.
        env = {
            "LC_ALL": "C",
            "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "KEYAGENT_CONFIG_DIR": str(self.config_dir),
            "FAKE_SYSTEMCTL_CALLS": str(self.calls),
            "FAKE_SYSTEMCTL_STATUS": str(self.systemctl_status),
        }
        start = time.monotonic()
        proc = subprocess.run(
            [str(HOOK), domain, op, subop, extra], input=DOMAIN_XML, capture_output=True, env=env, timeout=10
        )
        elapsed = time.monotonic() - start
        assert elapsed < 2.0, f"{op}: the hook took {elapsed:.2f} s; libvirt waits for it"
        return proc

    def systemctl_calls(self) -> list[str]:
        if not self.calls.exists():
            return []
        return self.calls.read_text().splitlines()


@pytest.fixture
def hook(tmp_path):
    return Hook(tmp_path)


def test_hook_is_an_executable_bash_script_with_valid_syntax():
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text().startswith("#!/bin/bash\n")
    subprocess.run(["bash", "-n", str(HOOK)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(HOOK)], check=True)


def test_prepare_queues_the_agent_start_without_waiting(hook):
    hook.configure("vm1")
    proc = hook.run("vm1", "prepare", "begin")
    assert proc.returncode == 0, proc.stderr
    assert hook.systemctl_calls() == [f"start --no-block {UNIT}"]
    assert proc.stdout == b""  # systemctl's chatter goes to stderr


def test_release_queues_the_agent_stop(hook):
    hook.configure("vm1")
    proc = hook.run("vm1", "release", "end", "shutdown")
    assert proc.returncode == 0, proc.stderr
    assert hook.systemctl_calls() == [f"stop --no-block {UNIT}"]
    assert proc.stdout == b""


@pytest.mark.parametrize("op", ["reconnect", "attach"])
def test_reconnect_and_attach_start_the_agent_if_needed(hook, op):
    hook.configure("vm1")
    proc = hook.run("vm1", op, "begin")
    assert proc.returncode == 0, proc.stderr
    assert hook.systemctl_calls() == [f"start --no-block {UNIT}"]


@pytest.mark.parametrize("op,subop,extra", NOTHING_TO_DO)
def test_other_operations_do_nothing_and_leave_the_xml_alone(hook, op, subop, extra):
    hook.configure("vm1")
    proc = hook.run("vm1", op, subop, extra)
    assert proc.returncode == 0, proc.stderr
    assert hook.systemctl_calls() == []
    # migrate/restore: stdout replaces the domain XML; empty keeps it.
    assert proc.stdout == b""


@pytest.mark.parametrize(
    "op,subop",
    [("prepare", "begin"), ("reconnect", "begin"), ("attach", "begin"), ("release", "end")]
    + [(o, s) for o, s, _ in NOTHING_TO_DO],
)
def test_domains_without_a_keyagent_config_are_ignored(hook, op, subop):
    hook.configure("other")
    proc = hook.run("vm1", op, subop)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b""
    assert hook.systemctl_calls() == []


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "-rf", "", "vm 1", ".hidden", "a" * 65, "vm1;reboot", "vm1\nrelease"]
)
def test_names_the_agent_would_refuse_are_ignored(hook, name):
    hook.configure("vm1")
    proc = hook.run(name, "prepare", "begin")
    assert proc.returncode == 0
    assert hook.systemctl_calls() == []


def test_prepare_fails_when_the_agent_cannot_start(hook):
    hook.configure("vm1", env=False)
    proc = hook.run("vm1", "prepare", "begin")
    assert proc.returncode == 1
    assert b"vm1.env" in proc.stderr and proc.stderr.count(b"\n") == 1
    assert hook.systemctl_calls() == []

    hook.configure("vm1")
    hook.systemctl_status = 5  # e.g. the unit file is not installed
    proc = hook.run("vm1", "prepare", "begin")
    assert proc.returncode == 1 and b"cannot queue the start" in proc.stderr


@pytest.mark.parametrize("op,subop", [("reconnect", "begin"), ("attach", "begin"), ("release", "end")])
def test_reconnect_attach_and_release_never_fail(hook, op, subop):
    # A failed reconnect makes libvirt kill the running QEMU; a failed release
    # undoes nothing.
    hook.configure("vm1", env=False)
    hook.systemctl_status = 1
    proc = hook.run("vm1", op, subop)
    assert proc.returncode == 0, proc.stderr
    assert b"cannot queue" in proc.stderr


def test_hook_names_match_the_unit_and_config_paths():
    text = HOOK.read_text()
    assert 'unit="keyagent@$domain.service"' in text
    assert "${KEYAGENT_CONFIG_DIR:-/etc/keyagent}" in text
    unit = (CONTRIB / "systemd" / "keyagent@.service").read_text()
    assert "EnvironmentFile=/etc/keyagent/%i.env" in unit
    assert "--config /etc/keyagent/%i.toml" in unit
