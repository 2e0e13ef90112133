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

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.harness import KEYAGENT, StandInOwner, wait_for

FLOOD_EVENTS = 100_000
RSS_BOUND_MB = 30
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}
SEV_INFO = {"enabled": True, "api-major": 1, "api-minor": 55, "build-id": 21, "policy": 1,
            "state": "launch-secret", "handle": 1}
MIGRATION_STATUSES = ["setup", "active", "completed", "failed", "cancelled", "cancelling",
                      "postcopy-active", "device", "pre-switchover", "x-future-status"]


def flood_message(i: int) -> bytes:
    ts = {"seconds": 1700000000 + i // 1000, "microseconds": i % 1000}
    kind = i % 4
    if kind == 0:
        msg = {"event": "MIGRATION", "data": {"status": MIGRATION_STATUSES[i % 10]}}
    elif kind == 1:
        msg = {"event": "BLOCK_JOB_COMPLETED", "data": {"device": f"job{i}", "len": i,
                                                          "offset": i, "speed": 0,
                                                          "type": "mirror"}}
    elif kind == 2:
        msg = {"event": "RTC_CHANGE", "data": {"offset": i, "qom-path": "/machine/unattached"}}
    else:
        msg = {"event": "X_FLOOD", "data": {"n": i, "pad": "x" * 40, "nested": {"a": [1, 2]}}}
    return json.dumps({**msg, "timestamp": ts}).encode() + b"\r\n"


class TinyQemu:
    """QMP in a thread: greeting, capabilities, the SEV launch queries, and a flood."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.commands: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.writers: list[asyncio.StreamWriter] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_unix_server(self._serve, self.path))
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer) -> None:
        self.writers.append(writer)
        decoder = json.JSONDecoder()
        buf = ""
        try:
            writer.write(json.dumps(GREETING).encode() + b"\r\n")
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    writer.write(self._answer(msg))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.remove(writer)
            writer.close()

    def _answer(self, msg: dict) -> bytes:
        command = msg.get("execute")
        self.commands.append(command)
        result: object = {}
        if command == "query-status":
            result = {"status": "prelaunch", "running": False, "singlestep": False}
        elif command == "query-sev":
            result = SEV_INFO
        elif command == "query-sev-launch-measure":
            result = {"data": base64.b64encode(bytes(range(48))).decode()}
        return json.dumps({"return": result, "id": msg.get("id")}).encode() + b"\r\n"

    def flood(self, n: int) -> float:
        """Send ``n`` events to every client; return the seconds it took to write them."""
        async def go() -> float:
            t0 = time.monotonic()
            batch = 1000
            for start in range(0, n, batch):
                chunk = b"".join(flood_message(i) for i in range(start, min(n, start + batch)))
                for writer in list(self.writers):
                    writer.write(chunk)
                    await writer.drain()
            return time.monotonic() - t0

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=300)

    def send(self, raw: bytes) -> None:
        """Write ``raw`` to every client as it is (events, garbage)."""
        async def go() -> None:
            for writer in list(self.writers):
                writer.write(raw)
                await writer.drain()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=30)

    def close(self) -> None:
        def stop() -> None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def ctl(control: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*KEYAGENT, "ctl", "--control", f"unix:{control}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def short_tmp():
    path = Path(tempfile.mkdtemp(prefix="kfl", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_agent(tmp: Path, owner_url: str | None, *extra: str) -> subprocess.Popen:
    args = [*KEYAGENT, "run", "--qmp", f"unix:{tmp / 'qmp.sock'}", "--vm-name", "flood",
            "--vm-run-dir", str(tmp / "run"), "--secrets-master-key", "file",
            "--log-level", "info", *extra]
    if owner_url:
        args += ["--owner-url", owner_url, "--sev-timeout-s", "120"]
    return subprocess.Popen(args, stdout=open(tmp / "agent.stdout", "wb"),
                            stderr=open(tmp / "agent.stderr", "wb"), stdin=subprocess.DEVNULL)


def test_event_flood_keeps_memory_bounded_and_the_launch_going(short_tmp):
    tmp = short_tmp
    qemu = TinyQemu(str(tmp / "qmp.sock"))
    # The owner holds its answer until the flood is over: the launch is in flight.
    owner = StandInOwner(200, json.dumps({"packet_header": base64.b64encode(bytes(52)).decode(),
                                          "secret": base64.b64encode(bytes(64)).decode()}).encode())
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
        wait_for(lambda: ctl(control, "status").returncode == 0 or agent.poll() is not None,
                 timeout=20, what="agent ready")
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
        wait_for(lambda: "cont" in qemu.commands or agent.poll() is not None, timeout=60,
                 what="cont after the flood")
        assert qemu.commands.index("sev-inject-launch-secret") < qemu.commands.index("cont")
        assert all(code == 0 for code in status_during), status_during
        print(f"\nflood: {FLOOD_EVENTS} events written in {sent_s:.2f}s, read by the agent "
              f"within {drained_s:.2f}s; VmRSS idle {idle / 1024:.1f} MB, peak "
              f"{peak[0] / 1024:.1f} MB (+{grown_mb:.1f} MB); ctl status during the flood: "
              f"{len(latencies)} calls, max {max(latencies or [0]):.2f}s")
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
