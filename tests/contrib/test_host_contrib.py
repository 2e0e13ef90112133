"""contrib for host mode: keyagent-host.service and the libvirt hook that feeds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.main import build_parser
from tests.contrib.support import CONTRIB, expand_exec, parse_env_file, parse_unit, value, values

UNIT = CONTRIB / "systemd" / "keyagent-host.service"
SIDECAR_UNIT = CONTRIB / "systemd" / "keyagent@.service"
HOOK = CONTRIB / "libvirt" / "qemu-host"


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT.read_text())


def host_argv(unit, env: dict[str, str] | None = None) -> list[str]:
    return expand_exec(value(unit, "Service", "ExecStart"), env or {}, "")


def test_exec_start_is_a_valid_host_command_line_with_and_without_libvirt(unit):
    argv = host_argv(unit)
    assert argv[0] == "/usr/bin/keyagent"
    args = build_parser(argv[1:]).parse_args(argv[1:])
    assert args.command == "host" and args.libvirt is None
    assert args.control == "unix:/run/" + value(unit, "Service", "RuntimeDirectory") + "/host.sock"
    assert args.event_log_dir == "/var/log/" + value(unit, "Service", "LogsDirectory")
    # The configuration directory outlives a restart of the host: not its RuntimeDirectory.
    assert not args.config_dir.startswith("/run/" + value(unit, "Service", "RuntimeDirectory") + "/")
    assert any(args.config_dir in pre for pre in values(unit, "Service", "ExecStartPre"))
    env = parse_env_file("KEYAGENT_HOST_ARGS=--libvirt qemu:///system --log-level debug\n")
    args = build_parser(host_argv(unit, env)[1:]).parse_args(host_argv(unit, env)[1:])
    assert args.libvirt == "qemu:///system" and args.log_level == "debug"


def test_the_host_unit_keeps_the_sidecar_units_hardening_and_user(unit):
    sidecar = parse_unit(SIDECAR_UNIT.read_text())
    same = (
        "User",
        "Group",
        "KeyringMode",
        "NoNewPrivileges",
        "CapabilityBoundingSet",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectProc",
        "ProcSubset",
        "RestrictAddressFamilies",
        "MemoryDenyWriteExecute",
        "SystemCallErrorNumber",
        "LimitCORE",
        "UMask",
        "RuntimeDirectoryMode",
    )
    for key in same:
        assert values(unit, "Service", key) == values(sidecar, "Service", key), key
    assert values(unit, "Service", "SystemCallFilter") == values(sidecar, "Service", "SystemCallFilter")


def test_reload_is_sighup_and_only_bad_arguments_are_not_restarted(unit):
    assert value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(unit, "Service", "Restart") == "on-failure"
    # 1 is a crash of the host (a VM's failure never ends it): restart it.
    assert value(unit, "Service", "RestartPreventExitStatus").split() == ["2"]


def _systemd_analyze(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    keyagent = Path(sys.executable).parent / "keyagent"
    if not os.access(keyagent, os.X_OK):
        keyagent = tmp_path / "keyagent"
        keyagent.write_text("#!/bin/sh\nexit 0\n")
        keyagent.chmod(0o755)
    (tmp_path / UNIT.name).write_text(UNIT.read_text().replace("/usr/bin/keyagent", str(keyagent)))
    return subprocess.run(
        [tool, *args, str(tmp_path / UNIT.name)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:", "SYSTEMD_LOG_COLOR": "0"},
    )


def test_systemd_analyze_verify_accepts_the_host_unit(tmp_path):
    proc = _systemd_analyze(tmp_path, "verify")
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and "keyagent" not in output:
        pytest.skip(f"systemd-analyze verify cannot run here: {output.splitlines()[:1]}")
    assert proc.returncode == 0 and output == "", output


def test_systemd_analyze_security_rates_the_host_unit_ok(tmp_path):
    import re

    proc = _systemd_analyze(tmp_path, "security", "--offline=true", "--no-pager")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or m is None:
        pytest.skip("systemd-analyze security --offline is not available here (systemd < 250?)")
    assert float(m.group(1)) <= 2.0, proc.stdout


# -- the hook -------------------------------------------------------------------------


class Hook:
    def __init__(self, tmp_path: Path) -> None:
        self.config_dir = tmp_path / "etc-keyagent"
        self.config_dir.mkdir()
        self.host_dir = tmp_path / "run-keyagent-host.d"
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.calls = tmp_path / "systemctl.calls"
        fake = self.bin / "systemctl"
        fake.write_text(
            '#!/bin/sh\nprintf "%s\\n" "$*" >> "$FAKE_SYSTEMCTL_CALLS"\n'
            'echo "fake systemctl output"\nexit "${FAKE_SYSTEMCTL_STATUS:-0}"\n'
        )
        fake.chmod(0o755)

    def configure(self, domain: str) -> str:
        text = f'[vm]\ndomain = "{domain}"\nrun_dir = "/run/keyagent-host/{domain}"\n'
        (self.config_dir / f"{domain}.toml").write_text(text)
        return text

    def run(self, domain: str, op: str, subop: str = "begin", status: int = 0):
        env = {
            "LC_ALL": "C",
            "PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "KEYAGENT_CONFIG_DIR": str(self.config_dir),
            "KEYAGENT_HOST_DIR": str(self.host_dir),
            "FAKE_SYSTEMCTL_CALLS": str(self.calls),
            "FAKE_SYSTEMCTL_STATUS": str(status),
        }
        return subprocess.run(
            [str(HOOK), domain, op, subop, "-"], input=b"<domain/>", capture_output=True, env=env, timeout=10
        )

    def systemctl_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def handed(self) -> list[str]:
        return sorted(p.name for p in self.host_dir.iterdir()) if self.host_dir.exists() else []


@pytest.fixture
def hook(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    return Hook(tmp_path)


def test_host_hook_is_an_executable_bash_script_with_valid_syntax():
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text().startswith("#!/bin/bash\n")
    subprocess.run(["bash", "-n", str(HOOK)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(HOOK)], check=True)


def test_prepare_hands_a_copy_to_the_host_and_release_takes_it_back(hook):
    text = hook.configure("vm1")
    proc = hook.run("vm1", "prepare")
    assert proc.returncode == 0 and proc.stdout == b"", proc.stderr
    assert hook.handed() == ["vm1.toml"]  # no temporary file left for the host to see
    copy = hook.host_dir / "vm1.toml"
    assert copy.read_text() == text and not copy.is_symlink()
    assert hook.systemctl_calls() == ["start --no-block keyagent-host.service"]
    proc = hook.run("vm1", "release", "end")
    assert proc.returncode == 0 and proc.stdout == b""
    assert hook.handed() == []
    assert hook.systemctl_calls() == ["start --no-block keyagent-host.service"]  # the host stays


def test_a_domain_without_a_configuration_or_with_a_bad_name_is_left_alone(hook):
    hook.configure("vm1")
    for domain in ("other", "../vm1", "-rf"):
        for op in ("prepare", "reconnect", "release"):
            proc = hook.run(domain, op)
            assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b""
    assert hook.handed() == [] and hook.systemctl_calls() == []


def test_prepare_fails_the_domain_start_when_the_host_cannot_be_started_but_reconnect_never_fails(hook):
    hook.configure("vm1")
    proc = hook.run("vm1", "prepare", status=5)
    assert proc.returncode == 1 and b"vm1 is not started" in proc.stderr and proc.stdout == b""
    proc = hook.run("vm1", "reconnect", status=5)
    assert proc.returncode == 0 and proc.stdout == b""


def test_the_copy_is_a_file_the_host_takes(hook, tmp_path):
    """What the hook hands over, the host reads as a libvirt VM (no [vm] qmp)."""
    from agent.app.host import Host, HostOptions

    hook.configure("vm1")
    assert hook.run("vm1", "prepare").returncode == 0
    host = Host(HostOptions(str(hook.host_dir), libvirt="qemu:///system"))
    cfg, extras = host._load("vm1.toml")
    assert cfg.vm_name == "vm1" and extras[("vm", "domain")] == "vm1"
    assert host._sidecar_options(cfg, extras).control_path == "/run/keyagent-host/vm1/control.sock"
