"""``keyagent run`` / ``launch`` refuse what can never work: one line, exit 2, nothing created.

Each case used to get past the checks and fail later: with a traceback (an
out-of-range gid, a control socket that cannot be bound), by hanging (a FIFO
as the config or the vTPM key, ``--qmp-timeout nan``), or after creating the
run_dir, the event log and a vTPM state (a swtpm socket path that is too long).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.executable import KEYAGENT


def limit_memory() -> None:
    """In the child: 2 GiB of address space, so that a regression that reads
    /dev/zero fails there instead of filling this shared machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def keyagent(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*KEYAGENT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit_memory,
    )


def long_dir(tmp_path: Path, total: int) -> Path:
    """A path under tmp_path exactly ``total`` bytes long."""
    base = str(tmp_path) + "/"
    assert len(base) < total
    return Path(base + "d" * (total - len(base)))


@pytest.fixture
def paths(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    not_socket_run = tmp_path / "taken"
    not_socket_run.mkdir(mode=0o700)
    (not_socket_run / "control.sock").write_text("not a socket")
    return {
        "T": str(tmp_path),
        "FIFO": str(fifo),
        "TAKEN": str(not_socket_run),
        # control.sock fits sun_path (107 bytes), swtpm-ctrl.sock does not.
        "RUN93": str(long_dir(tmp_path, 93)),
        "LONG": str(long_dir(tmp_path, 120)) + ".sock",
        "KEY": str(tmp_path / "tpm.key"),
    }


RUN = ["run", "--qmp", "unix:{T}/qmp.sock", "--qmp-timeout", "1", "--event-log", "{T}/events.jsonl"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--vm-run-dir", "{T}/run", "--control-gid", "99999999999"], "[control] gid must be at most 4294967294"),
        (
            ["--vm-run-dir", "{T}/run", "--control", "unix:/nonexistent/x.sock"],
            "control socket directory /nonexistent does not exist",
        ),
        (["--vm-run-dir", "{T}/run", "--control", "unix:{LONG}"], "longer than a unix socket allows (107)"),
        (["--vm-run-dir", "{TAKEN}"], "control socket {TAKEN}/control.sock exists and is not a socket"),
        (["--config", "/dev/zero"], "config /dev/zero is not a regular file"),
        (["--config", "{FIFO}"], "config {FIFO} is not a regular file"),
        (
            ["--vm-run-dir", "{T}/run", "--vtpm-state-dir", "{T}/tpm", "--vtpm-key", "file:{FIFO}"],
            "vTPM key file {FIFO} is not a regular file",
        ),
        (
            ["--vm-run-dir", "{RUN93}", "--vtpm-state-dir", "{T}/tpm", "--vtpm-key", "file:{KEY}"],
            "swtpm control socket path {RUN93}/swtpm-ctrl.sock is 109 bytes",
        ),
        (["--qmp-timeout", "nan"], "--qmp-timeout: must be a finite number of seconds above 0"),
        (["--qmp-timeout", "inf"], "--qmp-timeout: must be a finite number of seconds above 0"),
        (["--owner-url", "https://owner.example:8443"], "scheme 'https' is not supported"),
        (["--owner-url", "http://owner.example:99999"], "invalid port (must be 1..65535)"),
    ],
    ids=[
        "gid-overflow",
        "control-dir-missing",
        "control-path-too-long",
        "control-not-a-socket",
        "config-dev-zero",
        "config-fifo",
        "vtpm-key-fifo",
        "vtpm-socket-too-long",
        "qmp-timeout-nan",
        "qmp-timeout-inf",
        "owner-url-https",
        "owner-url-port",
    ],
)
def test_run_refuses_in_one_line_before_creating_anything(paths, tmp_path, args, words):
    (tmp_path / "tpm.key").write_bytes(os.urandom(32))
    before = sorted(p.name for p in tmp_path.iterdir())
    taken = sorted(p.name for p in Path(paths["TAKEN"]).iterdir())
    proc = keyagent(*[a.format(**paths) for a in RUN + args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("keyagent: error: ")
    assert words.format(**paths) in lines[0]
    # No run_dir, no event log, no vTPM state: nothing was created.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in Path(paths["TAKEN"]).iterdir()) == taken
    assert (Path(paths["TAKEN"]) / "control.sock").read_text() == "not a socket"


def test_launch_refuses_a_control_socket_it_cannot_bind_before_starting_qemu(tmp_path):
    # sys.executable stands in for QEMU: it must never be started.
    proc = keyagent(
        "launch",
        "--vm-run-dir",
        str(tmp_path / "run"),
        "--control",
        "unix:/nonexistent/x.sock",
        "--",
        sys.executable,
        "-c",
        "raise SystemExit(9)",
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "keyagent: error: control socket directory /nonexistent does not exist"
    assert not (tmp_path / "run").exists()


def test_launch_refuses_a_run_dir_too_long_for_its_qmp_socket(tmp_path):
    run = long_dir(tmp_path, 100)  # + "/qmp.sock" is 109 bytes
    proc = keyagent("launch", "--vm-run-dir", str(run), "--", sys.executable, "-c", "pass")
    assert proc.returncode == 2, proc.stderr
    assert "QMP socket path" in proc.stderr and "longer than a unix socket allows" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not run.exists()


def test_a_control_gid_we_cannot_give_the_socket_to_is_refused_before_anything(tmp_path, monkeypatch):
    # As root every group works; as anybody else only our own groups do (chown(2)).
    from agent.app.config import load_config
    from agent.app.sidecar import Sidecar, SidecarOptions
    from agent.common.errors import UsageError

    cfg = load_config(None, {"vm_run_dir": str(tmp_path / "run"), "control_gid": "4242"})
    sidecar = Sidecar(
        cfg,
        SidecarOptions(
            qmp_path=str(tmp_path / "qmp.sock"), control_path=str(tmp_path / "run" / "control.sock"), event_log=None
        ),
    )
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 27])
    with pytest.raises(UsageError, match=r"\[control\] gid 4242: the control socket can only be given"):
        sidecar.preflight()
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 4242])
    sidecar.preflight()  # a group we are in
    assert not (tmp_path / "run").exists()
