"""A flood of QMP events: the agent's memory stays bounded and its flows react.

A small QEMU stand-in (:class:`TinyQemu`, an asyncio unix server in a thread
speaking just enough QMP for the SEV launch) sends 100,000 events of mixed
kinds (MIGRATION with every status, BLOCK_JOB_*, RTC_CHANGE, an unknown
X_FLOOD; no RESUME or SHUTDOWN, which would rightly end the launch) while a
real ``keyagent run`` waits for the guest owner.  Checked:

* ``ctl status`` answers during and after the flood;
* the agent's VmRSS stays within ``RSS_BOUND_MB`` of its idle value;
* the launch still completes after the flood: the owner answers, the agent
  injects the secret and sends ``cont``.

The figures are printed (``-s`` shows them) and listed in the report.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.harness import StandInOwner, ctl, wait_for
from tests.e2e.tinyqemu import TinyQemu, start_agent

FLOOD_EVENTS = 100_000
RSS_BOUND_MB = 30


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def short_tmp():
    path = Path(tempfile.mkdtemp(prefix="kfl", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_event_flood_keeps_memory_bounded_and_the_launch_going(short_tmp):
    tmp = short_tmp
    qemu = TinyQemu(str(tmp / "qmp.sock"))
    # The owner holds its answer until the flood is over: the launch is in flight.
    owner = StandInOwner(
        200,
        json.dumps(
            {"packet_header": base64.b64encode(bytes(52)).decode(), "secret": base64.b64encode(bytes(64)).decode()}
        ).encode(),
    )
    release = threading.Event()
    handler_cls = owner.server.RequestHandlerClass
    original = handler_cls.do_POST

    def held_post(self):
        release.wait(120)
        original(self)

    handler_cls.do_POST = held_post
    agent = start_agent(tmp, owner.url)
    control = tmp / "run" / "control.sock"
    try:
        wait_for(
            lambda: ctl(control, "status").returncode == 0 or agent.poll() is not None, timeout=20, what="agent ready"
        )
        assert agent.poll() is None, (tmp / "agent.stderr").read_text()
        wait_for(lambda: "query-sev-launch-measure" in qemu.commands, what="measurement asked")
        time.sleep(0.5)  # let the agent settle: its idle footprint
        idle = rss_kb(agent.pid)

        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], rss_kb(agent.pid))
                except (OSError, AssertionError):
                    return
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        latencies: list[float] = []
        status_during = []

        def poll_status() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                out = ctl(control, "status", timeout=60)
                latencies.append(time.monotonic() - t0)
                status_during.append(out.returncode)

        poller = threading.Thread(target=poll_status, daemon=True)
        poller.start()
        t0 = time.monotonic()
        sent_s = qemu.flood(FLOOD_EVENTS)
        # The agent has read everything once it answers a command sent after the flood.
        out = ctl(control, "status", timeout=120)
        drained_s = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["flows"]["launch"]["state"] == "ask-owner"
        stop.set()
        sampler.join()
        poller.join(120)
        grown_mb = (peak[0] - idle) / 1024

        # Now the owner answers: the flow must still react.
        release.set()
        wait_for(lambda: "cont" in qemu.commands or agent.poll() is not None, timeout=60, what="cont after the flood")
        assert qemu.commands.index("sev-inject-launch-secret") < qemu.commands.index("cont")
        assert all(code == 0 for code in status_during), status_during
        print(
            f"\nflood: {FLOOD_EVENTS} events written in {sent_s:.2f}s, read by the agent "
            f"within {drained_s:.2f}s; VmRSS idle {idle / 1024:.1f} MB, peak "
            f"{peak[0] / 1024:.1f} MB (+{grown_mb:.1f} MB); ctl status during the flood: "
            f"{len(latencies)} calls, max {max(latencies or [0]):.2f}s"
        )
        assert grown_mb < RSS_BOUND_MB, f"VmRSS grew by {grown_mb:.1f} MB under the flood"
        stderr = (tmp / "agent.stderr").read_text()
        assert "Traceback" not in stderr
    finally:
        release.set()
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        owner.close()
        qemu.close()
