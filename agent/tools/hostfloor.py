"""The floor for host mode: one bare qemu.qmp process launching N SEV VMs at once.

``keyagent bench`` compares ``keyagent host`` (one agent process for every
VM on a host) with this script: one process, one asyncio loop, that for every
VM makes the same QMP calls and the same guest-owner round trip as the
agent's SEV launch (as its event log lists them: ``query-status``,
``query-sev``, ``query-sev-launch-measure``, ``POST /v1/secret``,
``sev-inject-launch-secret``, ``cont``), all VMs concurrently, with nothing
else: no event log, no structured logs, no redaction, no control sockets,
no state machine, no checks beyond what it needs to go on.

The owner round trip is one HTTP/1.1 request per connection over asyncio
streams, framed by h11 (what the agent's own client does, without the agent):
a blocking ``http.client`` call, as :mod:`agent.tools.benchfloor` makes for a
single VM, would serialise 100 VMs behind one another and flatter the agent.

Protocol with the bench: start it (``python -m agent.tools.hostfloor
--qmp-dir DIR --vms N --owner-url URL``); it imports everything, prints
``{"ready": true}`` and waits for a line on stdin; that line is "QEMU ready"
for every VM.  It then launches them all and prints one JSON line: per VM,
milliseconds from the go line to ``cont`` answered, or the reason it failed;
exit 0 when every VM launched.  The bench times both sides the same way,
from the simulator's stamps; this script's own figures are a cross-check.

Not part of the agent, and it imports none of the agent's modules (the
socket names ``vm-000.sock`` ... are the simulator's ``--vms`` naming); the
QMP sequence is :mod:`agent.tools.benchfloor`'s, which imports none either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import h11
from qemu.qmp import QMPClient

from agent.tools.benchfloor import sev_launch


def vm_name(index: int, count: int) -> str:
    """``keyagent simulate --vms``'s naming: vm-000, vm-001, ..."""
    return f"vm-{index:0{max(3, len(str(count - 1)))}d}"


async def post_json(url: str, body: dict, timeout: float) -> tuple[int, Any]:
    """One POST with a JSON body, one connection, h11 framing; (status, JSON answer)."""
    parts = urlsplit(url)
    assert parts.hostname is not None  # the bench's own owner URL

    async def exchange() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            conn = h11.Connection(h11.CLIENT)
            data = json.dumps(body).encode()
            headers = [
                ("Host", parts.netloc),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Connection", "close"),
            ]
            writer.write(
                conn.send(h11.Request(method="POST", target=parts.path, headers=headers))
                + conn.send(h11.Data(data=data))
                + conn.send(h11.EndOfMessage())
            )
            await writer.drain()
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            return status, json.loads(b"".join(chunks) or b"null")
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)


async def launch_one(qmp_path: str, owner_url: str, vm: str, timeout: float = 30.0) -> None:
    """The agent's SEV launch, bare (benchfloor's :func:`sev_launch`, the owner
    asked over h11); raises on anything unexpected."""

    async def post(body: dict) -> tuple[int, Any]:
        return await post_json(owner_url.rstrip("/") + "/v1/secret", body, timeout)

    client = QMPClient(vm)
    await client.connect(qmp_path)
    try:
        stopped = await sev_launch(client, vm, post)
        if stopped is not None:
            raise RuntimeError(stopped)
    finally:
        await client.disconnect()


async def launch_all(qmp_dir: str, count: int, owner_url: str) -> dict:
    """Every VM at once; per VM the ms from now to its ``cont``, or why it failed."""
    t0 = time.monotonic()

    async def timed(i: int) -> tuple[str, float | str]:
        name = vm_name(i, count)
        try:
            await launch_one(os.path.join(qmp_dir, f"{name}.sock"), owner_url, name)
        except Exception as exc:
            return name, f"{type(exc).__name__}: {exc}"[:200]
        return name, round((time.monotonic() - t0) * 1000, 3)

    results = await asyncio.gather(*(timed(i) for i in range(count)))
    return {
        "launched_ms": {name: r for name, r in results if isinstance(r, float)},
        "failed": {name: r for name, r in results if isinstance(r, str)},
    }


async def _main(args: argparse.Namespace) -> int:
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "QEMU ready" for every VM
    result = await launch_all(args.qmp_dir, args.vms, args.owner_url)
    print(json.dumps(result), flush=True)
    return 0 if not result["failed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.tools.hostfloor")
    p.add_argument("--qmp-dir", required=True)
    p.add_argument("--vms", type=int, required=True)
    p.add_argument("--owner-url", required=True)
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
