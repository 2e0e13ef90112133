"""SEV launch end to end: simulator, owner over HTTP, agent as a subprocess.

Each test checks the VM's fate (running only with a valid secret), the
agent's exit status and one-line reason, replays the event log, and scans
every output for the disk passphrase, TEK and TIK.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.e2e.harness import (
    DISK_PASS,
    LUKS_GUID,
    StandInOwner,
    World,
    free_port,
    leak_checked,
    scan_launch_secrets,
    wait_for,
)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    with leak_checked(w) as scan:
        scan_launch_secrets(scan, w)
        yield w


def last_error_line(proc) -> dict:
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    return [rec for rec in lines if rec.get("level") == "error"][-1]


def test_good_path_injects_the_secret_and_runs_the_vm(world):
    world.simulator()
    agent = world.agent(world.owner())
    assert agent.wait() == 0, agent.stderr
    state = world.sim_query("x-sim-query-state")
    assert state["status"] == "running"
    assert state["cont-before-secret"] is False
    secrets = world.sim_query("x-sim-query-secrets")
    assert secrets["injected"] is True
    entry = secrets["entries"][0]
    assert entry["guid"] == LUKS_GUID
    assert entry["sha256"] == hashlib.sha256(DISK_PASS).hexdigest()
    check = world.replay_check()
    assert check.returncode == 0, check.stdout + check.stderr


def test_sev_es_takes_the_same_path(world):
    world.simulator(sev_es=True)
    agent = world.agent(world.owner(policy=0x5))
    assert agent.wait() == 0, agent.stderr
    assert world.sim_query("x-sim-query-state")["status"] == "running"


def test_measurement_that_is_late_is_retried(world):
    world.simulator("--measure-delay", "0.6")
    agent = world.agent(world.owner())
    assert agent.wait() == 0, agent.stderr
    assert world.sim_query("x-sim-query-state")["status"] == "running"


def test_wrong_measurement_is_refused_and_qemu_quits(world):
    sim = world.simulator()
    agent = world.agent(world.owner(digest=hashlib.sha256(b"other firmware").digest()))
    assert agent.wait() == 1
    assert "measurement" in last_error_line(agent)["reason"]
    assert sim.wait(timeout=10) == 0  # the agent sent quit
    assert world.replay_check().returncode == 0


def test_refusal_with_pause_leaves_the_vm_paused(world):
    world.simulator()
    agent = world.agent(world.owner(digest=bytes(32)), "--sev-on-refusal", "pause")
    assert agent.wait() == 1
    state = world.sim_query("x-sim-query-state")
    assert state["status"] != "running"
    assert world.sim_query("x-sim-query-secrets")["injected"] is False


def test_owner_down_never_resumes(world):
    sim = world.simulator()
    # retried until [sev] timeout_s: the flow's deadline or the client's last failure ends it
    agent = world.agent(f"http://127.0.0.1:{free_port()}", "--sev-timeout-s", "2")
    assert agent.wait() == 1
    reason = last_error_line(agent)["reason"]
    assert "unreachable" in reason or "waiting for the guest owner" in reason
    assert "guest owner gave no answer, trying again" in agent.stderr
    assert sim.wait(timeout=10) == 0


def test_owner_that_stalls_past_the_timeout_is_given_up(world):
    stalling = StandInOwner(stall=5)
    try:
        world.simulator()
        agent = world.agent(stalling.url, "--sev-timeout-s", "1", "--sev-on-refusal", "pause")
        assert agent.wait() == 1
        assert "timed out after 1s waiting for the guest owner" in agent.stderr
        assert world.sim_query("x-sim-query-state")["status"] != "running"
    finally:
        stalling.close()


@pytest.mark.parametrize(
    "status, body",
    [
        (200, b"not json at all"),
        (200, b'{"packet_header": "!!!", "secret": "AAAA"}'),
        (200, json.dumps({"packet_header": "AAAA", "secret": "AAAA"}).encode()),
        (302, b"{}"),
    ],
)
def test_malformed_owner_answer_never_resumes(world, status, body):
    owner = StandInOwner(status=status, body=body)
    try:
        sim = world.simulator()
        agent = world.agent(owner.url)
        assert agent.wait() == 1
        assert "malformed owner answer" in last_error_line(agent)["reason"]
        assert sim.wait(timeout=10) == 0
    finally:
        owner.close()


def test_vm_already_running_is_too_late_and_left_alone(world):
    world.simulator("--running")
    agent = world.agent(world.owner())
    assert agent.wait() == 1
    assert "too late to attest" in agent.stderr
    assert world.sim_query("x-sim-query-state")["status"] == "running"


def test_qmp_disconnect_while_waiting_for_the_owner(world):
    stalling = StandInOwner(stall=3)
    try:
        sim = world.simulator()
        agent = world.agent(stalling.url)
        wait_for(lambda: "asking the guest owner" in agent.stderr, what="owner request")
        sim.popen.kill()
        assert agent.wait() == 1
        assert "QMP connection lost" in agent.stderr
    finally:
        stalling.close()


def test_with_a_control_socket_the_sidecar_stays_until_qemu_quits(world):
    sim = world.simulator()
    run_dir = world.tmp / "run"
    agent = world.agent(world.owner(), "--vm-run-dir", str(run_dir))
    control = run_dir / "control.sock"
    wait_for(lambda: control.exists(), what="control socket")

    def launched():
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "ctl", "--control", f"unix:{control}", "status"],
            capture_output=True,
            text=True,
        )
        return out.returncode == 0 and '"code": 0' in out.stdout

    wait_for(launched, what="launch finished per ctl status")
    assert agent.popen.poll() is None
    from prometheus_client.parser import text_string_to_metric_families

    from tests.control_client import get

    status, body, _ = get(str(control), "/metrics")
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if not s.labels or s.labels.get("kind") == "sev-launch"
    }
    assert status == 200
    assert samples["keyagent_attestation_seconds_count"] == 1
    assert samples["keyagent_qmp_connected"] == 1
    assert oct(os.stat(control).st_mode & 0o777) == "0o600"
    world.sim_query("quit")
    assert agent.wait() == 0
    assert sim.wait() == 0
    assert not control.exists()
