"""A small QEMU stand-in for tests that need a monitor but not a guest.

:class:`TinyQemu` is an asyncio unix server in a thread speaking just enough
QMP for the SEV launch, and able to flood events (``tests/e2e/test_flood.py``)
or send raw bytes (``tests/test_fuzz.py``); :func:`start_agent` runs a real
``keyagent run`` against it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import time
from pathlib import Path

from tests.e2e.harness import KEYAGENT

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}
SEV_INFO = {
    "enabled": True,
    "api-major": 1,
    "api-minor": 55,
    "build-id": 21,
    "policy": 1,
    "state": "launch-secret",
    "handle": 1,
}
MIGRATION_STATUSES = [
    "setup",
    "active",
    "completed",
    "failed",
    "cancelled",
    "cancelling",
    "postcopy-active",
    "device",
    "pre-switchover",
    "x-future-status",
]


def flood_message(i: int) -> bytes:
    ts = {"seconds": 1700000000 + i // 1000, "microseconds": i % 1000}
    kind = i % 4
    if kind == 0:
        msg = {"event": "MIGRATION", "data": {"status": MIGRATION_STATUSES[i % 10]}}
    elif kind == 1:
        msg = {
            "event": "BLOCK_JOB_COMPLETED",
            "data": {"device": f"job{i}", "len": i, "offset": i, "speed": 0, "type": "mirror"},
        }
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


def start_agent(tmp: Path, owner_url: str | None, *extra: str) -> subprocess.Popen:
    args = [
        *KEYAGENT,
        "run",
        "--qmp",
        f"unix:{tmp / 'qmp.sock'}",
        "--vm-name",
        "flood",
        "--vm-run-dir",
        str(tmp / "run"),
        "--secrets-master-key",
        "file",
        "--log-level",
        "info",
        *extra,
    ]
    if owner_url:
        args += ["--owner-url", owner_url, "--sev-timeout-s", "120"]
    return subprocess.Popen(
        args, stdout=open(tmp / "agent.stdout", "wb"), stderr=open(tmp / "agent.stderr", "wb"), stdin=subprocess.DEVNULL
    )
