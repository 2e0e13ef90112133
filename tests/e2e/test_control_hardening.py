"""The control socket and the run_dir under hostile or careless use.

Real agents (``keyagent run`` next to the simulator), real unix sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e.harness import KEYAGENT, World, wait_for
from tests.e2e.test_migration import ctl


def plain_agent(world: World, name: str, run_dir, *extra: str):
    return world.spawn(name, ["run", "--qmp", f"unix:{world.qmp}", "--vm-name", "vm1",
                              "--vm-run-dir", str(run_dir), "--secrets-master-key", "file",
                              *extra])


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
        out = subprocess.run([*KEYAGENT, "launch", "--vm-run-dir", str(run), "--",
                              sys.executable, "-c", "raise SystemExit(7)"],
                             capture_output=True, text=True, timeout=60)
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
        add = subprocess.Popen([*KEYAGENT, "ctl", "--control", f"unix:{run / 'control.sock'}",
                                "--timeout", "20", "secret", "add", "--id", "s0",
                                "--ref", f"file:{fifo}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            try:  # let the request reach the agent (a blocked agent never answers it)
                add.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            health = subprocess.run([*KEYAGENT, "ctl", "--control", f"unix:{run / 'control.sock'}",
                                     "--timeout", "5", "health"],
                                    capture_output=True, text=True, timeout=30)
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
