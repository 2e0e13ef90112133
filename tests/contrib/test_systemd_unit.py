"""contrib/systemd: the template unit, its environment file and drop-in."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli.main import build_parser
from tests.contrib.support import CONTRIB, expand_exec, parse_env_file, parse_unit, value, values

UNIT = CONTRIB / "systemd" / "keyagent@.service"
ENV_EXAMPLE = CONTRIB / "systemd" / "vm.env.example"
DROP_IN = CONTRIB / "systemd" / "libvirt.conf.example"
VM = "vm1"


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT.read_text())


def test_unit_has_the_sections_and_runs_keyagent_run(unit):
    assert set(unit) == {"Unit", "Service", "Install"}
    exec_start = value(unit, "Service", "ExecStart")
    assert exec_start.startswith("/usr/bin/keyagent run ")
    assert value(unit, "Service", "Type") == "exec"
    assert "multi-user.target" in value(unit, "Install", "WantedBy")


def test_hardening_directives_are_set(unit):
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "LimitCORE": "0",
        "UMask": "0077",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }
    for key, want in expected.items():
        assert value(unit, "Service", key) == want, key
    assert set(value(unit, "Service", "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    allowed, denied = [], []
    for line in values(unit, "Service", "SystemCallFilter"):
        (denied if line.startswith("~") else allowed).extend(line.lstrip("~").split())
    assert "@system-service" in allowed  # holds @keyring: add_key, keyctl
    assert "seccomp" in allowed  # swtpm installs its own filter or exits
    # libffi's fallback under MemoryDenyWriteExecute is a memfd mapped twice.
    assert "memfd_create" not in denied
    assert not {"@keyring", "keyctl", "add_key", "seccomp"} & set(denied)


def test_not_root_and_keyring_shared_with_the_user(unit):
    assert value(unit, "Service", "User") not in ("root", "0")
    # private: the agent cannot setperm/read the key it adds to @u (EACCES).
    assert value(unit, "Service", "KeyringMode") == "shared"
    assert not values(unit, "Service", "PrivateUsers")
    assert not values(unit, "Service", "RemoveIPC")


def test_restart_only_after_a_crash(unit):
    assert value(unit, "Service", "Restart") == "on-failure"
    prevented = value(unit, "Service", "RestartPreventExitStatus").split()
    assert {"1", "2"} <= set(prevented)
    assert values(unit, "Unit", "StartLimitBurst")


def test_run_dir_is_the_runtime_directory_mode_0700(unit):
    assert value(unit, "Service", "RuntimeDirectory") == "keyagent/%i"
    assert value(unit, "Service", "RuntimeDirectoryMode") == "0700"
    assert value(unit, "Service", "StateDirectory") == "keyagent/%i"
    argv = expand_exec(value(unit, "Service", "ExecStart"), parse_env_file(ENV_EXAMPLE.read_text()), VM)
    run_dir = argv[argv.index("--vm-run-dir") + 1]
    assert run_dir == "/run/" + value(unit, "Service", "RuntimeDirectory").replace("%i", VM)


def test_exec_start_with_the_example_env_is_a_valid_run_command_line(unit):
    assert value(unit, "Service", "EnvironmentFile") == "/etc/keyagent/%i.env"
    env = parse_env_file(ENV_EXAMPLE.read_text())
    assert env["KEYAGENT_MONITOR"].startswith("--qmp unix:")
    argv = expand_exec(value(unit, "Service", "ExecStart"), env, VM)
    assert argv[0] == "/usr/bin/keyagent"
    args = build_parser(argv[1:]).parse_args(argv[1:])
    assert args.command == "run"
    assert args.qmp == env["KEYAGENT_MONITOR"].split()[1]
    assert args.config == f"/etc/keyagent/{VM}.toml"
    assert args.vm_name == VM
    # QEMU's socket is not in the agent's run_dir, which systemd removes on stop.
    assert not args.qmp[5:].startswith(args.vm_run_dir + "/")


def _run_options() -> set[str]:
    parser = build_parser(["run"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {opt for action in sub.choices["run"]._actions for opt in action.option_strings}


def test_the_libvirt_monitor_line_parses_once_the_backend_exists(unit):
    line = next(text for text in ENV_EXAMPLE.read_text().splitlines() if text.startswith("#KEYAGENT_MONITOR=--libvirt"))
    if "--libvirt" not in _run_options():
        pytest.skip("keyagent run has no --libvirt yet (libvirt backend being written)")
    env = parse_env_file(line[1:])
    argv = expand_exec(value(unit, "Service", "ExecStart"), env, VM)
    args = build_parser(argv[1:]).parse_args(argv[1:])
    assert args.command == "run" and args.config == f"/etc/keyagent/{VM}.toml"


def test_extra_args_line_parses(unit):
    line = next(text for text in ENV_EXAMPLE.read_text().splitlines() if text.startswith("#KEYAGENT_ARGS="))
    env = parse_env_file(ENV_EXAMPLE.read_text() + line[1:] + "\n")
    argv = expand_exec(value(unit, "Service", "ExecStart"), env, VM)
    args = build_parser(argv[1:]).parse_args(argv[1:])
    logs = "/var/log/" + value(unit, "Service", "LogsDirectory").replace("%i", VM)
    assert args.event_log.startswith(logs + "/")


def _expand_filter(tool: str, name: str, seen: dict) -> set[str]:
    if name not in seen:
        out = subprocess.run(
            [tool, "syscall-filter", "--no-pager", name], capture_output=True, text=True, timeout=30
        ).stdout
        calls: set[str] = set()
        for line in out.splitlines()[1:]:
            word = line.strip()
            if word and not word.startswith("#"):
                calls |= _expand_filter(tool, word, seen) if word.startswith("@") else {word}
        seen[name] = calls
    return seen[name]


def test_syscall_filter_allows_the_keyring_memfd_and_seccomp(unit):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    seen: dict = {}
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in values(unit, "Service", "SystemCallFilter"):
        target = denied if line.startswith("~") else allowed
        for name in line.lstrip("~").split():
            target |= _expand_filter(tool, name, seen) if name.startswith("@") else {name}
    if not allowed:
        pytest.skip("systemd-analyze syscall-filter lists nothing here")
    effective = allowed - denied
    needed = {
        "add_key",
        "keyctl",  # master key, keyring: references
        "memfd_create",  # libffi's W^X fallback
        "seccomp",  # swtpm's own filter
        "socket",
        "connect",
        "bind",
        "listen",
        "accept4",  # QMP, owner, control
        "execve",
        "clone3",
        "wait4",
        "pipe2",
        "prlimit64",
    }  # swtpm, ldconfig
    assert needed <= effective, sorted(needed - effective)


def _verify_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart on an executable that exists here, plus the drop-in."""
    keyagent = Path(sys.executable).parent / "keyagent"
    if not os.access(keyagent, os.X_OK):
        keyagent = tmp_path / "keyagent"
        keyagent.write_text("#!/bin/sh\nexit 0\n")
        keyagent.chmod(0o755)
    text = UNIT.read_text().replace("/usr/bin/keyagent", str(keyagent))
    (tmp_path / UNIT.name).write_text(text)
    drop_in_dir = tmp_path / "keyagent@.service.d"
    drop_in_dir.mkdir()
    shutil.copy(DROP_IN, drop_in_dir / "libvirt.conf")
    return tmp_path / f"keyagent@{VM}.service"


def _systemd_analyze(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(
        [tool, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:", "SYSTEMD_LOG_COLOR": "0"},
    )


def test_systemd_analyze_verify_accepts_the_unit_and_drop_in(tmp_path):
    instance = _verify_copy(tmp_path)
    proc = _systemd_analyze(tmp_path, "verify", str(instance))
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and "keyagent" not in output:
        pytest.skip(f"systemd-analyze verify cannot run here: {output.splitlines()[:1]}")
    # verify exits 0 on unknown keys and bad values too: any line is a finding.
    assert proc.returncode == 0 and output == "", output


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    instance = _verify_copy(tmp_path)
    proc = _systemd_analyze(tmp_path, "security", "--offline=true", "--no-pager", str(instance))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or m is None:
        pytest.skip("systemd-analyze security --offline is not available here (systemd < 250?)")
    assert float(m.group(1)) <= 2.0, proc.stdout
