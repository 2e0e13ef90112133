"""An agent killed (SIGKILL) in the middle of an SEV launch, then started again.

Real processes: ``keyagent simulate`` (QEMU 7.2 with an SEV guest at -S),
``keyagent owner serve`` and two ``keyagent run`` over the same config and
run_dir.  The simulator's test-only hold (``--x-test-hold COMMAND``: the
first such request is never executed nor answered) stops the first agent at
an exact step; the test kills it there and starts the second, which must
finish the launch from what QEMU and the run_dir say: attest again, get the
owner's same answer, inject (again) and only then ``cont``.  A second agent
that cannot verify leaves the VM paused.  Plain VMs (the owner's offline
TIK/TEK) and ``session = true`` VMs (a launch session from ``POST
/v1/session``) both.  Every output, event log and the run_dir go through the
leak scan.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.harness import (
    DIGEST,
    DISK_PASS,
    KEYAGENT,
    LUKS_GUID,
    StandInOwner,
    World,
    ctl_json,
    free_port,
    leak_checked,
    scan_launch_secrets,
    wait_for,
)

EVENT_LOGS = ("events-1.jsonl", "events-2.jsonl", "events-3.jsonl")


class Crash:
    """One test's VM: simulator, owner, and the agents started over it in turn."""

    def __init__(self, world: World, session: bool) -> None:
        self.world = world
        self.tmp = world.tmp
        self.session = session
        self.run_dir = self.tmp / "run"
        self.agents = 0
        self.owner_url = ""

    # -- the owner, and the simulator that matches it -------------------------
    def owner(self, port: int | None = None, name: str = "owner") -> str:
        table = f'policy = 1\ndigest = "{DIGEST.hex()}"\n'
        if self.session:
            table += 'session = true\nplatform = "any"\n'
        else:
            table += 'tik = "tik.bin"\ntek = "tek.bin"\n'
        (self.tmp / "owner.toml").write_text(
            f'[vm.vm1]\n{table}[[vm.vm1.secret]]\nguid = "luks-key"\nfile = "disk.pass"\n'
        )
        listen = f"127.0.0.1:{port or 0}"
        proc = self.world.spawn(name, ["owner", "serve", "--config", "owner.toml", "--listen", listen])
        self.owner_url = proc.listening(what="owner line")
        return self.owner_url

    def simulator(self, *extra: str):
        if not self.session:
            return self.world.simulator(*extra)
        godh, session = self._launch_session()
        proc = self.world.spawn(
            "sim",
            [
                "simulate",
                "--qmp",
                f"unix:{self.world.qmp}",
                "--sev",
                "--pdh-key",
                "pdh.pem",
                "--dh-cert-file",
                godh,
                "--session-file",
                session,
                "--policy",
                "1",
                "--digest",
                DIGEST.hex(),
                *extra,
            ],
        )
        wait_for(lambda: os.path.exists(self.world.qmp) or proc.popen.poll() is not None, what="simulator socket")
        assert proc.popen.poll() is None, proc.stderr
        return proc

    def _launch_session(self) -> tuple[str, str]:
        """The platform's PDH (from a first simulator run), then the owner's session for it."""
        from agent.io.http import request_json
        from agent.sev.session import open_session

        key = ec.generate_private_key(ec.SECP384R1())
        fd = os.open(self.tmp / "pdh.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        platform = self.world.spawn(
            "platform", ["simulate", "--qmp", f"unix:{self.world.qmp}", "--pdh-key", "pdh.pem", "--pdh-out", "pdh.b64"]
        )
        wait_for(lambda: (self.tmp / "pdh.b64").exists() and os.path.exists(self.world.qmp), what="platform PDH")
        self.world.sim_query("quit")
        assert platform.wait(timeout=10) == 0
        wait_for(lambda: not os.path.exists(self.world.qmp), what="platform socket gone")
        request = {"vm": "vm1", "pdh": (self.tmp / "pdh.b64").read_text().strip(), "policy": 1}
        status, body = asyncio.run(request_json("POST", self.owner_url + "/v1/session", request, timeout=10))
        assert status == 200, body
        tek, tik = open_session(key, base64.b64decode(body["godh"]), base64.b64decode(body["session"]), 1)
        self.world.scan.secret("session TIK", tik)
        self.world.scan.secret("session TEK", tek)
        (self.tmp / "godh.b64").write_text(body["godh"])
        (self.tmp / "session.b64").write_text(body["session"])
        return "godh.b64", "session.b64"

    # -- agents ---------------------------------------------------------------
    def agent(self, owner_url: str | None = None, *extra: str):
        self.agents += 1
        self.current = self.world.spawn(
            f"agent{self.agents}",
            [
                "run",
                "--qmp",
                f"unix:{self.world.qmp}",
                "--owner-url",
                owner_url or self.owner_url,
                "--vm-name",
                "vm1",
                "--vm-run-dir",
                str(self.run_dir),
                "--event-log",
                str(self.tmp / EVENT_LOGS[self.agents - 1]),
                "--log-level",
                "debug",
                *extra,
            ],
        )
        return self.current

    def held(self, sim, command: str) -> None:
        wait_for(lambda: f'"command": "{command}"' in sim.stderr and "sim.test_hold" in sim.stderr, 30, "the hold")

    def agent_held_at(self, command: str):
        """An owner, a simulator that holds ``command`` once, and an agent
        that has got as far as sending it: what a kill test kills."""
        self.owner()
        sim = self.simulator("--x-test-hold", command)
        first = self.agent()
        self.held(sim, command)
        return first

    def kill(self, agent) -> None:
        agent.popen.send_signal(signal.SIGKILL)
        assert agent.wait() == -signal.SIGKILL

    def launch_result(self) -> dict:
        """The launch flow's result, as the living agent's control socket tells it."""
        control = self.run_dir / "control.sock"

        def finished() -> bool:
            assert self.current.popen.poll() is None, self.current.stderr
            if not control.exists():
                return False
            try:
                status = ctl_json(control, "status")
            except AssertionError:
                return False
            return "result" in status["flows"].get("launch", {})

        wait_for(finished, 60, "the restarted agent's launch")
        return ctl_json(control, "status")["flows"]["launch"]["result"]

    # -- what the simulator says ------------------------------------------------
    def state(self) -> dict:
        return self.world.sim_query("x-sim-query-state")

    def assert_launched(self, injections: int) -> None:
        state = self.state()
        assert state["status"] == "running" and state["cont-before-secret"] is False, state
        assert state["injections"] == injections, state
        secrets = self.world.sim_query("x-sim-query-secrets")
        assert secrets["table-valid"] is True
        assert secrets["entries"] == [
            {"guid": LUKS_GUID, "length": len(DISK_PASS), "sha256": hashlib.sha256(DISK_PASS).hexdigest()}
        ]

    def assert_no_key_material_left(self) -> None:
        left = [p.name for p in self.run_dir.iterdir() if p.name.startswith("key-") or p.name == "keys.psk"]
        assert left == []

    def kill_owner(self) -> None:
        owner = [p for p in self.world.procs if p.name.startswith("owner")][-1]
        owner.popen.send_signal(signal.SIGKILL)
        owner.wait()

    def start_owner_again(self) -> None:
        """A new owner on the same address and database."""
        port = int(self.owner_url.rsplit(":", 1)[1])
        assert self.owner(port, name="owner-again") == f"http://127.0.0.1:{port}"

    def kill_owner_and_start_it_again(self) -> None:
        self.kill_owner()
        self.start_owner_again()

    def owner_decisions(self) -> list[str]:
        decisions = []
        for owner in (p for p in self.world.procs if p.name.startswith("owner")):
            lines = [json.loads(ln) for ln in owner.stderr.splitlines() if "owner decision" in ln]
            decisions += [rec["decision"] for rec in lines if rec.get("decision") != "session"]
        return decisions

    def assert_restarted_agent_launches(self, *agent_args: str, injections: int, decisions: list[str]) -> None:
        """A new agent (``agent_args`` as :meth:`agent` takes them) finishes
        the launch, the owner decided ``decisions``, every event log replays."""
        second = self.agent(*agent_args)
        assert self.launch_result()["code"] == 0
        self.assert_launched(injections=injections)
        assert self.owner_decisions() == decisions
        stop(second)
        self.replay_each()

    def replay_each(self) -> None:
        for name in EVENT_LOGS[: self.agents]:
            out = subprocess.run(
                [*KEYAGENT, "replay", "--check", str(self.tmp / name)], capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, (name, out.stdout, out.stderr)


@pytest.fixture(params=[False, True], ids=["plain", "session"])
def crash(request, tmp_path):
    w = World(tmp_path)
    with leak_checked(w, files=EVENT_LOGS) as scan:
        scan_launch_secrets(scan, w)
        c = Crash(w, session=request.param)
        yield c
        c.assert_no_key_material_left()


def stop(agent) -> None:
    agent.popen.send_signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.stderr


def test_killed_after_the_release_before_the_injection_then_restarted_launches(crash):
    first = crash.agent_held_at("sev-inject-launch-secret")
    assert crash.owner_decisions() == ["released"]
    crash.kill(first)
    assert crash.state()["injections"] == 0 and crash.state()["status"] == "prelaunch"

    crash.assert_restarted_agent_launches(injections=1, decisions=["released", "resent"])


def test_agent_and_owner_both_killed_after_the_release_then_restarted_launches(crash):
    first = crash.agent_held_at("sev-inject-launch-secret")
    crash.kill(first)
    crash.kill_owner_and_start_it_again()  # the release is in its database, not its memory

    crash.assert_restarted_agent_launches(injections=1, decisions=["released", "resent"])


def test_killed_after_the_injection_before_cont_then_restarted_injects_again_and_runs(crash):
    first = crash.agent_held_at("cont")
    state = crash.state()
    assert state["injections"] == 1 and state["status"] == "prelaunch" and state["sev-state"] == "launch-secret"
    crash.kill(first)

    # LAUNCH_SECRET again, allowed in the LSECRET state.
    crash.assert_restarted_agent_launches(injections=2, decisions=["released", "resent"])


@pytest.mark.parametrize("step", ["query-status", "query-sev-launch-measure"])
def test_killed_before_the_owner_was_asked_then_restarted_launches(crash, step):
    first = crash.agent_held_at(step)
    crash.kill(first)

    crash.assert_restarted_agent_launches(injections=1, decisions=["released"])


def test_killed_while_waiting_for_the_owner_then_restarted_launches(crash):
    crash.owner()
    crash.simulator()
    down = f"http://127.0.0.1:{free_port()}"  # nobody listens: the agent keeps trying
    first = crash.agent(down)
    wait_for(lambda: "guest owner gave no answer, trying again" in first.stderr, 30, "a retry")
    crash.kill(first)
    state = crash.state()
    assert state["status"] == "prelaunch" and state["injections"] == 0

    # A list of owners: the first still down.
    crash.assert_restarted_agent_launches(down, "--owner-url", crash.owner_url, injections=1, decisions=["released"])


def test_an_owner_down_when_the_agent_asks_is_found_by_the_retries_once_it_is_back(crash):
    crash.owner()
    crash.simulator()
    crash.kill_owner()  # a session VM's pending session is in the owner's database
    agent = crash.agent()
    wait_for(lambda: "guest owner gave no answer, trying again" in agent.stderr, 30, "a retry")
    crash.start_owner_again()
    assert crash.launch_result()["code"] == 0
    crash.assert_launched(injections=1)
    assert crash.owner_decisions() == ["released"]
    stop(agent)
    crash.replay_each()


def test_a_restarted_agent_that_cannot_verify_leaves_the_injected_vm_paused(crash):
    first = crash.agent_held_at("cont")
    crash.kill(first)
    assert crash.state()["injections"] == 1

    refusing = StandInOwner(status=403, body=b'{"error": "this launch is not released any more"}')
    try:
        second = crash.agent(refusing.url, "--sev-on-refusal", "pause")
        assert second.wait() == 1
    finally:
        refusing.close()
    assert "guest owner refused: this launch is not released any more (HTTP 403)" in second.stderr
    state = crash.state()
    assert state["status"] == "prelaunch" and state["cont"] is False and state["injections"] == 1
    crash.replay_each()


def test_a_restarted_agent_over_a_running_vm_has_nothing_to_do(crash):
    crash.owner()
    crash.simulator()
    first = crash.agent()
    assert crash.launch_result()["code"] == 0
    crash.kill(first)
    crash.assert_launched(injections=1)

    second = crash.agent()
    result = crash.launch_result()
    assert result["code"] == 0 and "already launched" in result["reason"], result
    crash.assert_launched(injections=1)
    assert crash.owner_decisions() == ["released"]
    stop(second)
    crash.replay_each()
