"""The control socket and the run_dir under hostile or careless use.

Real agents (``keyagent run`` next to the simulator), real unix sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.harness import KEYAGENT, World, ctl, wait_for


def plain_agent(world: World, name: str, run_dir, *extra: str):
    return world.spawn(
        name,
        [
            "run",
            "--qmp",
            f"unix:{world.qmp}",
            "--vm-name",
            "vm1",
            "--vm-run-dir",
            str(run_dir),
            "--secrets-master-key",
            "file",
            *extra,
        ],
    )


def test_second_agent_on_the_same_run_dir_exits_2_and_touches_nothing(tmp_path):
    world = World(tmp_path)
    try:
        world.simulator()
        run = tmp_path / "run"
        first = plain_agent(world, "first", run)
        wait_for(lambda: ctl(run / "control.sock", "status").returncode == 0, what="first agent")
        live = run / "key-tls-live"  # stands for the first agent's key directory in use
        live.mkdir(mode=0o700)
        (live / "keys.psk").write_bytes(b"qemu:00")
        sock_inode = os.stat(run / "control.sock").st_ino

        second = plain_agent(world, "second", run)
        assert second.wait(timeout=30) == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another agent" in lines[0], second.stderr
        assert (live / "keys.psk").exists()  # not swept
        assert os.stat(run / "control.sock").st_ino == sock_inode  # not taken over
        assert ctl(run / "control.sock", "status").returncode == 0
        assert first.popen.poll() is None

        # keyagent launch refuses the same way, before starting anything.
        out = subprocess.run(
            [*KEYAGENT, "launch", "--vm-run-dir", str(run), "--", sys.executable, "-c", "raise SystemExit(7)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and "in use by another agent" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr

        # Once the first is gone, the run_dir is free for the next agent.
        first.stop()
        third = plain_agent(world, "third", run)
        wait_for(lambda: ctl(run / "control.sock", "status").returncode == 0, what="third agent")
        assert not live.exists()  # now it really was stale, and is swept
        third.stop()
    finally:
        world.close()


def test_fifo_as_a_file_reference_is_refused_and_the_agent_keeps_answering(tmp_path):
    world = World(tmp_path)
    try:
        world.simulator()
        run = tmp_path / "run"
        plain_agent(world, "agent", run)
        wait_for(lambda: ctl(run / "control.sock", "status").returncode == 0, what="agent")
        fifo = tmp_path / "key.fifo"
        os.mkfifo(fifo, 0o600)  # nobody will ever write to it
        add = subprocess.Popen(
            [
                *KEYAGENT,
                "ctl",
                "--control",
                f"unix:{run / 'control.sock'}",
                "--timeout",
                "20",
                "secret",
                "add",
                "--id",
                "s0",
                "--ref",
                f"file:{fifo}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            try:  # let the request reach the agent (a blocked agent never answers it)
                add.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            health = subprocess.run(
                [*KEYAGENT, "ctl", "--control", f"unix:{run / 'control.sock'}", "--timeout", "5", "health"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert health.returncode == 0, health.stderr  # the loop was never blocked
            _out, err = add.communicate(timeout=30)
        finally:
            if add.poll() is None:
                add.kill()
                add.wait()
        assert add.returncode == 2 and "not a regular file" in err, err
        assert ctl(run / "control.sock", "status").returncode == 0
    finally:
        world.close()


# A client run as another user: the venv's interpreter may not be reachable
# by that user, the system's is.
SYSTEM_PYTHON = "/usr/bin/python3"
HEALTH_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__); sys.exit(0)
s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
print(s.recv(100).split(b"\\r\\n")[0].decode())
"""
LIST_CLIENT = """
import os, sys
try:
    print(os.listdir(sys.argv[1]))
except OSError as exc:
    print(type(exc).__name__)
"""


def as_user(script: str, arg: str, uid: int, gid: int, groups: list[int]) -> str:
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", script, arg],
        user=uid,
        group=gid,
        extra_groups=groups,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="running a client as another user needs root and /usr/bin/python3",
)
def test_control_group_reaches_the_default_socket_but_not_the_keys(tmp_path):
    for d in (tmp_path, *tmp_path.parents):  # let the other users reach the run_dir
        if d == d.parent:
            break
        os.chmod(d, os.stat(d).st_mode | 0o711)
    world = World(tmp_path)
    try:
        world.simulator()
        run = tmp_path / "run"
        plain_agent(world, "agent", run, "--control-gid", "4242")
        sock = run / "control.sock"
        wait_for(lambda: ctl(sock, "status").returncode == 0, what="agent")
        key_dir = run / "key-tls-probe"
        key_dir.mkdir(mode=0o700)
        st = os.stat(run)
        assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o710", 4242)
        # A member by a supplementary group, as well as by its primary one.
        assert as_user(HEALTH_CLIENT, str(sock), 65534, 65534, [4242]).endswith("200 OK")
        assert as_user(HEALTH_CLIENT, str(sock), 65534, 4242, []).endswith("200 OK")
        # Others do not get in; members may enter but not list, and no key dir.
        assert as_user(HEALTH_CLIENT, str(sock), 65534, 65534, []) == "PermissionError"
        assert as_user(LIST_CLIENT, str(run), 65534, 4242, []) == "PermissionError"
        assert as_user(LIST_CLIENT, str(key_dir), 65534, 4242, []) == "PermissionError"
    finally:
        world.close()


def test_second_agent_on_the_same_control_socket_exits_2_and_leaves_it(tmp_path):
    world = World(tmp_path)
    try:
        world.simulator()
        sock = tmp_path / "shared-control.sock"
        plain_agent(world, "first", tmp_path / "run1", "--control", f"unix:{sock}")
        wait_for(lambda: ctl(sock, "status").returncode == 0, what="first agent")
        inode = os.stat(sock).st_ino
        second = plain_agent(world, "second", tmp_path / "run2", "--control", f"unix:{sock}")
        assert second.wait(timeout=30) == 2
        assert "is in use by another agent" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert os.stat(sock).st_ino == inode and ctl(sock, "status").returncode == 0
    finally:
        world.close()
