"""Host-mode bench: the one-process floor, the CPU reading, the host_* keys in a smoke run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from agent.tools.bench_host import cpu_ms, host_available
from agent.tools.sim.machine import DEFAULT_DIGEST
from tests.executable import KEYAGENT

HOST_KEYS = ("host_density_ratio", "host_density_p99_ms", "host_rss_kb_per_vm", "agent_cpu_ms_per_launch")


def test_cpu_ms_counts_this_process_user_and_system_time():
    before = cpu_ms(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert cpu_ms(os.getpid()) - before >= 30  # clock ticks are 10 ms


def test_the_floor_imports_none_of_the_agents_modules():
    code = "import sys, agent.tools.hostfloor; print(sorted(m for m in sys.modules if m.startswith('agent')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    # benchfloor (the QMP sequence both floors share) imports none of them either.
    floors = ["agent", "agent.tools", "agent.tools.benchfloor", "agent.tools.hostfloor"]
    assert json.loads(out.stdout.replace("'", '"')) == floors


def _line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read().decode() if proc.stderr else ""
    return json.loads(line)


def _query_status(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        f = s.makefile("rb")
        f.readline()
        for cmd in ("qmp_capabilities", "query-status"):
            s.sendall(json.dumps({"execute": cmd}).encode())
            reply = json.loads(f.readline())
        return reply["return"]["status"]


def test_the_floor_launches_every_vm_at_once_through_one_simulator_and_owner(tmp_path):
    qmp_dir, keys = tmp_path / "q", tmp_path / "k"
    qmp_dir.mkdir()
    if len(str(qmp_dir / "vm-000.sock")) > 100:
        pytest.skip("tmp_path too long for unix sockets")
    procs = []
    try:
        sim = subprocess.Popen(
            [*KEYAGENT, "simulate", "--vms", "3", "--qmp-dir", str(qmp_dir), "--keys-out", str(keys)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(sim)
        sockets = [s.removeprefix("unix:") for s in _line(sim)["qmp_sockets"]]
        (tmp_path / "disk.pass").write_bytes(b"floor test passphrase")
        owner_toml = tmp_path / "owner.toml"
        owner_toml.write_text(
            "".join(
                f'[vm.vm-{i:03d}]\ntik = "{keys}/vm-{i:03d}/tik.bin"\ntek = "{keys}/vm-{i:03d}/tek.bin"\n'
                f'policy = 1\ndigest = "{DEFAULT_DIGEST.hex()}"\n'
                f'[[vm.vm-{i:03d}.secret]]\nguid = "luks-key"\nfile = "disk.pass"\n'
                for i in range(3)
            )
        )
        owner = subprocess.Popen(
            [*KEYAGENT, "owner", "serve", "--config", str(owner_toml), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(owner)
        url = _line(owner)["listening"]
        floor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.tools.hostfloor",
                "--qmp-dir",
                str(qmp_dir),
                "--vms",
                "3",
                "--owner-url",
                url,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(floor)
        assert _line(floor) == {"ready": True}
        floor.stdin.write(b"go\n")
        floor.stdin.flush()
        result = _line(floor)
        assert floor.wait(timeout=30) == 0
        assert result["failed"] == {} and sorted(result["launched_ms"]) == ["vm-000", "vm-001", "vm-002"]
        assert [_query_status(p) for p in sockets] == ["running"] * 3
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


@pytest.mark.skipif(not host_available(), reason="this build has no keyagent host")
def test_a_smoke_run_of_the_host_keys_reports_all_four():
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "--smoke", "--json", "--only", ",".join(HOST_KEYS)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    report = json.loads(out.stdout)
    assert report["errors"] == {} and report["counts"]["host"] == 3
    for key in HOST_KEYS:
        assert isinstance(report[key], (int, float)), key
    assert report["host_density_ratio"] > 0 and report["host_density_p99_ms"] > 0
    details = report["details"]["host"]
    assert details["vms"] == 3 and details["host_exit"] == [0]
    assert details["v1_vms"] == {"status": 200, "states": {"running:0": 3}}
