"""``keyagent bench``: the guest owner's releases per second and latency, with its database.

* ``owner_secret_rps_sqlite``, ``owner_p99_ms``: one real ``keyagent owner
  serve --db sqlite:///...`` (a process, as deployed, logging at warning),
  :data:`CLIENTS` clients in this process, each on its own keep-alive
  connection sending ``POST /v1/secret`` one after another; every request is
  a distinct launch (its own VM of :data:`CLIENTS`, a fresh MNONCE), so
  every answer is a first release: read, verify, build the packet, write
  the release, its sealed secret and its audit row (SQLite in WAL mode,
  ``synchronous=FULL``).  Releases per second of wall time over the timed
  requests (one warm-up request per client first, untimed); the p99 of the
  per-request latency seen by the clients.
* ``owner_secret_rps_postgresql``: the same against a throwaway PostgreSQL
  cluster (:mod:`agent.tools.pgcluster`, ``fsync=on``) on a unix socket;
  null, with the reason, when there are no PostgreSQL binaries.

The clients share the machine with the owner (2 cores here), so the
figures include their cost; each client builds its measurement blobs
before the clock starts.  Measured: the clients use 11 to 16 % of a core,
the owner (one event loop, one core's worth under the GIL) the rest of
one: the client is not what limits the figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import time
from typing import Any

CLIENTS = 50
OWNER_SECRET = b"keyagent bench owner secret"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _owner_dir(root: str, state_key: bool) -> tuple[str, list[tuple[str, bytes]]]:
    """owner.toml with CLIENTS VMs (each its own TIK/TEK); the VMs and their TIKs."""
    from agent.tools.sim.machine import DEFAULT_DIGEST

    os.makedirs(root, mode=0o700)
    _write(os.path.join(root, "disk.pass"), OWNER_SECRET)
    text = '[owner]\nstate_key = "file:state.key"\n' if state_key else ""
    if state_key:
        _write(os.path.join(root, "state.key"), os.urandom(32))
    vms = []
    for i in range(CLIENTS):
        vm, tik, tek = f"ob{i}", os.urandom(16), os.urandom(16)
        _write(os.path.join(root, f"{vm}.tik"), tik)
        _write(os.path.join(root, f"{vm}.tek"), tek)
        text += (
            f'[vm.{vm}]\ntik = "{vm}.tik"\ntek = "{vm}.tek"\npolicy = 1\ndigest = "{DEFAULT_DIGEST.hex()}"\n'
            f'[[vm.{vm}.secret]]\nguid = "luks-key"\nfile = "disk.pass"\n'
        )
        vms.append((vm, tik))
    config = os.path.join(root, "owner.toml")
    with open(config, "w") as f:
        f.write(text)
    return config, vms


def _requests(vm: str, tik: bytes, first: int, count: int) -> list[bytes]:
    """``count`` ready-to-send HTTP requests, each a distinct launch of ``vm``."""
    import base64

    from agent.sev.measurement import measurement_blob
    from agent.tools.sim.machine import DEFAULT_DIGEST

    out = []
    for n in range(first, first + count):
        blob = measurement_blob(tik, 1, 49, 21, 1, DEFAULT_DIGEST, n.to_bytes(16, "big"))
        body = json.dumps(
            {
                "vm": vm,
                "measurement": base64.b64encode(blob).decode(),
                "api_major": 1,
                "api_minor": 49,
                "build_id": 21,
                "policy": 1,
            }
        ).encode()
        head = (
            "POST /v1/secret HTTP/1.1\r\nHost: owner\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _client(host: str, port: int, warm: bytes, timed: list[bytes], latencies: list[float]) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    refused = 0
    try:
        if await asyncio.wait_for(_exchange(reader, writer, warm), 60) != 200:
            refused += 1
        for raw in timed:
            t = time.perf_counter()
            status = await asyncio.wait_for(_exchange(reader, writer, raw), 60)
            latencies.append((time.perf_counter() - t) * 1000)
            refused += status != 200
    finally:
        writer.close()
    return refused


async def _measure(ctx: Any, name: str, db: str, releases: int, state_key: bool) -> dict:
    from urllib.parse import urlsplit

    from agent.tools.bench import BenchError

    config, vms = _owner_dir(ctx.path(name), state_key)
    per_client = max(1, releases // CLIENTS)
    work = [(_requests(vm, tik, 0, 1)[0], _requests(vm, tik, 1, per_client)) for vm, tik in vms]
    proc = await ctx.spawn(
        name,
        [*ctx.keyagent, "owner", "serve", "--config", config, "--listen", "127.0.0.1:0", "--db", db]
        + ["--log-level", "warning", "--max-connections", str(4 * CLIENTS)],
        stdout=subprocess.PIPE,
    )
    url = urlsplit((await ctx.ready_line(proc, name))["listening"])
    latencies: list[float] = []
    try:
        t0 = time.perf_counter()
        refused = await asyncio.gather(
            *(_client(url.hostname or "", url.port or 0, warm, timed, latencies) for warm, timed in work)
        )
        wall = time.perf_counter() - t0
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        raise BenchError(f"{name}: a client failed: {type(exc).__name__}; see {ctx.path(name + '.stderr')}") from None
    finally:
        await ctx.stop(proc)
    if sum(refused):
        raise BenchError(f"{name}: {sum(refused)} releases refused; see {ctx.path(name + '.stderr')}")
    timed_count = len(latencies)
    return {
        "rps": timed_count / wall,  # the warm-ups overlap the start; they are few and counted out
        "p50_ms": statistics.median(latencies),
        "p99_ms": _percentile(latencies, 99),
        "releases": timed_count,
        "clients": CLIENTS,
        "seconds": round(wall, 2),
    }


async def bench_owner_sqlite(ctx: Any, releases: int) -> dict:
    x = await _measure(ctx, "owner-sqlite", f"sqlite:///{ctx.path('owner-sqlite.db')}", releases, state_key=False)
    return {
        "owner_secret_rps_sqlite": x["rps"],
        "owner_p99_ms": x["p99_ms"],
        "details": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()},
    }


async def bench_owner_postgresql(ctx: Any, releases: int) -> dict:
    from agent.tools.pgcluster import find_bindir, start_cluster, stop_cluster

    bindir = find_bindir()
    if bindir is None:
        return {"skipped": "no PostgreSQL binaries (initdb, pg_ctl, postgres): install Debian's postgresql"}
    loop = asyncio.get_running_loop()
    cluster = await loop.run_in_executor(None, lambda: start_cluster(bindir, fsync=True))
    try:
        db = await loop.run_in_executor(None, cluster.new_database)
        x = await _measure(ctx, "owner-postgresql", db, releases, state_key=True)
    finally:
        await loop.run_in_executor(None, stop_cluster, cluster)
    return {
        "owner_secret_rps_postgresql": x["rps"],
        "details": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()},
    }
