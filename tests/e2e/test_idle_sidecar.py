"""What an idle sidecar holds after a real launch: the modules of ``idle_rss_mb``.

``keyagent bench``'s ``idle_rss_mb`` is the RSS of a sidecar with a run_dir
and a control socket, once its SEV launch is done; every module it holds is
RSS in every such sidecar, one per VM.  tests/cli/test_run_imports.py checks
what the start loads before QMP connects; this test runs the launch and the
control requests too (the launch note, the owner client, the server), which
is where ``secrets`` (and with it hashlib: every OpenSSL digest instantiated)
once came in.  The agent runs under a small wrapper whose SIGUSR1 handler
writes ``sys.modules``; nothing in the agent knows about it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.harness import Proc, World, ctl, ctl_json, leak_checked, scan_launch_secrets, wait_for

# module -> why an idle sidecar (launched, control socket up, no host keys) does without it
NOT_HELD_WHEN_IDLE = {
    "hashlib": "instantiates every OpenSSL digest at import (~0.5 MB); the launch hashes nothing",
    "hmac": "imports hashlib",
    "secrets": "imports hmac; the launch note's name comes from os.urandom",
    "random": "the owner client's back-off jitter, imported at the first retry",
    "http": "an enum of every status; the server's reason phrases are a table",
    "agent.core.migration": "the first migration (or an adopted one) imports it",
    "cryptography": "host keys only (agent.app.sidecar.preload_idle)",
    "tomllib": "--config only",
    "shutil": "zlib, bz2, lzma",
}

WRAPPER = """
import json, os, signal, sys

def dump(*_):
    names = sorted(name for name, module in sys.modules.items() if module is not None)
    with open(os.environ["KEYAGENT_TEST_MODULES"] + ".tmp", "w") as f:
        json.dump(names, f)
    os.rename(os.environ["KEYAGENT_TEST_MODULES"] + ".tmp", os.environ["KEYAGENT_TEST_MODULES"])

signal.signal(signal.SIGUSR1, dump)
from agent.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    with leak_checked(w) as scan:
        scan_launch_secrets(scan, w)
        yield w


def spawn_wrapped(world: World, name: str, args: list[str], modules: str) -> Proc:
    out, err = world.tmp / f"{name}.stdout", world.tmp / f"{name}.stderr"
    popen = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *args],
        stdout=open(out, "wb"),
        stderr=open(err, "wb"),
        stdin=subprocess.DEVNULL,
        cwd=world.tmp,
        env={**os.environ, "KEYAGENT_TEST_MODULES": modules},
    )
    proc = Proc(name, popen, out, err)
    world.procs.append(proc)
    return proc


def test_an_idle_sidecar_after_its_launch_holds_none_of_the_modules_it_does_without(world):
    world.simulator()
    run_dir = world.tmp / "run"
    modules = str(world.tmp / "modules.json")
    agent = spawn_wrapped(
        world,
        "agent",
        ["run", "--qmp", f"unix:{world.qmp}", "--owner-url", world.owner(), "--vm-name", "vm1"]
        + ["--vm-run-dir", str(run_dir)],
        modules,
    )
    control = run_dir / "control.sock"

    def launched() -> bool:
        if agent.popen.poll() is not None:
            return True
        if not control.exists():
            return False
        out = ctl(control, "status")  # the socket may be bound a moment before it listens
        if out.returncode != 0:
            return False
        launch = json.loads(out.stdout).get("flows", {}).get("launch") or {}
        return launch.get("result") is not None

    wait_for(launched, timeout=30, what="the launch")
    assert agent.popen.poll() is None, agent.stderr
    assert ctl_json(control, "status")["flows"]["launch"]["result"]["code"] == 0
    os.kill(agent.popen.pid, signal.SIGUSR1)
    wait_for(lambda: os.path.exists(modules), timeout=10, what="the module list")
    loaded = set(json.loads(open(modules).read()))
    assert {"agent.io.owner_client", "agent.app.resume_launch", "agent.app.control", "h11"} <= loaded  # it did all that
    packages = loaded | {name.split(".")[0] for name in loaded}
    held = {m: why for m, why in NOT_HELD_WHEN_IDLE.items() if m in packages}
    assert held == {}
    assert world.sim_query("x-sim-query-state")["status"] == "running"
