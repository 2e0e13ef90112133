"""The floor ``keyagent bench`` compares the agent with: bare qemu.qmp scripts.

Each script makes the same QMP calls (and, for the launch, the same HTTP
request to the guest owner) as the agent's flow, with nothing else: no
event log, no structured logs, no redaction, no control socket, no state
machine, no checks beyond what it needs to go on.  What the agent costs on
top of this is what the benchmark reports.

* :func:`bare_launch` runs in a fresh process per launch
  (``python -m agent.tools.benchfloor launch ...``), as the agent does, so both
  pay the same cold first pass through qemu.qmp and asyncio.  Everything is
  imported before it connects: its connect-to-``cont`` window holds only
  the exchange.
* :func:`bare_migration` is awaited in the bench process, as the bench
  drives the agents' control sockets from that process too.

Not part of the agent, and it imports none of the agent's modules: only
``agent.tools.bench`` and the host-mode floor (``agent.tools.hostfloor``) import it.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from qemu.qmp import QMPClient


def _post_json(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    """One blocking HTTP POST with the stdlib client (the script does nothing
    else meanwhile, so blocking the loop costs nothing)."""
    parts = urlsplit(url)
    assert parts.hostname is not None  # the script's own owner URL
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json", "Connection": "close"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


#: ``duty(step, data)``, awaited at each step of :func:`sev_launch` where the
#: agent does something besides QMP and HTTP (a log line, the launch note):
#: "sev" (query-sev's answer), "asking", "released" (the owner's answer),
#: "injected", "cont" (the measurement: before ``cont``), "resumed"
Duty = Callable[[str, Any], Awaitable[None]]


async def sev_launch(
    client: QMPClient, vm: str, post: Callable[[dict], Awaitable[tuple[int, Any]]], duty: Duty | None = None
) -> str | None:
    """query-status, query-sev, query-sev-launch-measure, ``post`` (the owner's
    POST /v1/secret), sev-inject-launch-secret, cont on a connected client:
    the agent's SEV launch with nothing around it.  None once ``cont`` is
    answered, or why it stopped (a refused launch quits the VM, as the agent
    does); anything unexpected raises.  Both floors run it: this module's
    :func:`bare_launch` and :mod:`agent.tools.hostfloor` (whose ``--duties``
    passes ``duty``: the agent's per-VM duties, done barely)."""
    status: Any = await client.execute("query-status")
    if status["status"] not in ("prelaunch", "paused"):
        return f"status {status['status']}"
    sev: Any = await client.execute("query-sev")
    if duty is not None:
        await duty("sev", sev)
    while True:  # the simulator measures at once; QEMU may need a moment
        try:
            measure: Any = await client.execute("query-sev-launch-measure")
            break
        except Exception:
            await asyncio.sleep(0.1)
    body = {
        "vm": vm,
        "measurement": measure["data"],
        "api_major": sev["api-major"],
        "api_minor": sev["api-minor"],
        "build_id": sev["build-id"],
        "policy": sev["policy"],
    }
    if duty is not None:
        await duty("asking", None)
    code, answer = await post(body)
    if code != 200:
        await client.execute("quit")
        return f"owner answered {code}"
    if duty is not None:
        await duty("released", answer)
    args = {"packet-header": answer["packet_header"], "secret": answer["secret"]}
    if answer.get("gpa") is not None:
        args["gpa"] = answer["gpa"]
    await client.execute("sev-inject-launch-secret", args)
    if duty is not None:
        await duty("injected", None)
        await duty("cont", measure["data"])
    await client.execute("cont")
    if duty is not None:
        await duty("resumed", None)
    return None


async def bare_launch(qmp_path: str, owner_url: str, vm: str, timeout: float = 10.0) -> int:
    """:func:`sev_launch` on its own connection, the owner asked with a
    blocking ``http.client`` POST; 0 when launched, 1 when it stopped."""

    async def post(body: dict) -> tuple[int, Any]:
        return _post_json(owner_url.rstrip("/") + "/v1/secret", body, timeout)

    client = QMPClient("floor")
    await client.connect(qmp_path)
    try:
        return 0 if await sev_launch(client, vm, post) is None else 1
    finally:
        await client.disconnect()


def _write_key_dir(path: str, files: dict[str, bytes]) -> None:
    os.mkdir(path, 0o700)
    for name, data in files.items():
        fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


async def _wait_status(events, final=("completed", "failed", "cancelled")) -> str:
    async for event in events:
        if event.get("event") == "MIGRATION":
            status = (event.get("data") or {}).get("status")
            if status in final:
                return str(status)
    return "disconnected"


async def bare_migration(src: QMPClient, dst: QMPClient, uri: str, key_root: str, dh_params_pem: bytes) -> str:
    """TLS-PSK migration with the agent's QMP calls, in the agent's order.

    ``src`` and ``dst`` are connected clients; ``key_root`` a 0700 directory
    for the two ``keys.psk`` directories.  Returns the source's final status.
    """
    psk_line = b"qemu:" + os.urandom(32).hex().encode() + b"\n"
    dst_dir, src_dir = os.path.join(key_root, "dst"), os.path.join(key_root, "src")
    caps = {"capabilities": [{"capability": "events", "state": True}, {"capability": "multifd", "state": False}]}
    src_events, dst_events = src.events, dst.events
    src_events.clear()
    dst_events.clear()
    # Destination: keys.psk + dh-params.pem, server creds, listen.
    _write_key_dir(dst_dir, {"keys.psk": psk_line, "dh-params.pem": dh_params_pem})
    await dst.execute(
        "object-add", {"qom-type": "tls-creds-psk", "id": "floor-tls", "dir": dst_dir, "endpoint": "server"}
    )
    await dst.execute("migrate-set-capabilities", caps)
    await dst.execute("migrate-set-parameters", {"tls-creds": "floor-tls"})
    await dst.execute("migrate-incoming", {"uri": uri})
    # Source: client creds (the file goes right after object-add), migrate.
    _write_key_dir(src_dir, {"keys.psk": psk_line})
    await src.execute(
        "object-add", {"qom-type": "tls-creds-psk", "id": "floor-tls", "dir": src_dir, "endpoint": "client"}
    )
    shutil.rmtree(src_dir)
    await src.execute("migrate-set-capabilities", caps)
    await src.execute("migrate-set-parameters", {"tls-creds": "floor-tls"})
    await src.execute("migrate", {"uri": uri})
    src_status, dst_status = await asyncio.gather(_wait_status(src_events), _wait_status(dst_events))
    for client in (src, dst):
        await client.execute("migrate-set-parameters", {"tls-creds": ""})
        await client.execute("object-del", {"id": "floor-tls"})
    shutil.rmtree(dst_dir)
    return src_status if src_status != "completed" else dst_status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.tools.benchfloor")
    sub = p.add_subparsers(dest="what", required=True)
    launch = sub.add_parser("launch")
    launch.add_argument("--qmp", required=True)
    launch.add_argument("--owner-url", required=True)
    launch.add_argument("--vm", required=True)
    args = p.parse_args(argv)
    return asyncio.run(bare_launch(args.qmp, args.owner_url, args.vm))


if __name__ == "__main__":
    sys.exit(main())
