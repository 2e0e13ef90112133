"""``migration_fixed_ms``: the agents' own time per migration, outside QEMU's transfer.

A TLS-PSK migration costs the agents work that does not depend on the
guest's size: the sealed hand-over (the destination's signed offer, the
source's sealed and signed cookie, its opening), the key files, the QMP
commands that set the credentials and start the migration, the MIGRATION
events, the cleanup (``object-del``, key files removed), and the control
requests that drive it all.  QEMU's own transfer runs in QEMU.

How it is measured: two real QEMUs (TCG, an empty guest: the transfer's
length does not matter here) and two ``keyagent run`` sidecars with host
keys, driven over their control sockets by this process the way an
operator would (prepare, begin, accept, start, wait, wait).  The figure is
the CPU time both sidecars spent between the first request and the last
answer, summed (the process CPU-time clock, nanoseconds; an agent
waiting for QEMU spends none).  So it counts exactly the agents' work,
whatever the machine's load does to the wall clock, and nothing of QEMU's.
The details add the wall-clock view: the requests' wall time minus QEMU's
own ``total-time`` (``query-migrate`` on the source), which also holds the
control round trips and the scheduling of three processes on a shared
machine; and ``control_floor_cpu_ms``, the same agents' CPU for six control
requests that do nothing (``GET /v1/status``, a connection each, as the
migration's six are), measured just before: the part of the figure that is
the control socket itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from typing import Any

from agent.tools.bench import (
    MIGRATION_BANDWIDTH,
    BenchError,
    Ctx,
    _ctl,
    _host_keys,
    _qemu,
    _r,
    _run_dir,
    _status,
    close_client,
    free_port,
    process_cpu_ns,
    qmp_client,
    start_migration_agent,
)

FULL_REPS = 5
SMOKE_REPS = 1


def cpu_ticks_ns(pid: int) -> int:
    """utime + stime of the process (threads that ended included), at the clock tick's resolution."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


async def _qmp_client(path: str, timeout: float = 10.0) -> Any:
    """qmp_client, retried: QEMU's socket file exists from bind(), a moment
    before it listens (ECONNREFUSED on a loaded machine)."""
    from qemu.qmp import ConnectError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await qmp_client(path)
        except ConnectError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def one(ctx: Ctx, qemu: str, rep: int) -> dict[str, float]:
    """One sealed migration; the agents' CPU and the wall-clock view, in ms."""
    from agent.protocol import control as wire

    procs: list[Any] = []
    try:
        src, src_sock, src_test = await _qemu(ctx, qemu, f"fix{rep}-src", False)
        dst, dst_sock, dst_test = await _qemu(ctx, qemu, f"fix{rep}-dst", True)
        procs += [src, dst]
        for test_sock in (src_test, dst_test):
            client = await _qmp_client(test_sock)
            await client.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
            await close_client(client)
        keys = _host_keys(ctx)
        src_agent, src_ctl = await start_migration_agent(
            ctx, f"fix{rep}-src-agent", src_sock, _run_dir(ctx, f"fix{rep}-src-run"), keys["src"], False
        )
        procs.append(src_agent)
        dst_agent, dst_ctl = await start_migration_agent(
            ctx, f"fix{rep}-dst-agent", dst_sock, _run_dir(ctx, f"fix{rep}-dst-run"), keys["dst"], True
        )
        procs.append(dst_agent)
        await asyncio.sleep(0.5)  # both idle: their start-up is not in the window
        uri = f"tcp:127.0.0.1:{free_port()}"
        pids = (src_agent.pid, dst_agent.pid)
        # The floor of driving it: as many control requests (a connection each,
        # as here) that do nothing, three to each agent, before the window.
        floor0 = [process_cpu_ns(p) for p in pids]
        for _ in range(3):
            for sock in (src_ctl, dst_ctl):
                await _status(sock)
        control_floor_ms = sum(process_cpu_ns(p) - a for p, a in zip(pids, floor0)) / 1e6
        cpu0 = [process_cpu_ns(p) for p in pids]
        ticks0 = [cpu_ticks_ns(p) for p in pids]
        t0 = time.monotonic()
        offer = (await _ctl(dst_ctl, wire.MIGRATE_PREPARE, {}))["offer"]
        cookie = (await _ctl(src_ctl, wire.MIGRATE_BEGIN, {"offer": offer}))["cookie"]
        t_handover = time.monotonic()
        cpu_handover = [process_cpu_ns(p) for p in pids]
        await _ctl(dst_ctl, wire.MIGRATE_ACCEPT, {"cookie": cookie, "uri": uri})
        await _ctl(src_ctl, wire.MIGRATE_START, {"uri": uri})
        s = (await _ctl(src_ctl, wire.MIGRATE_WAIT, {"timeout": 120}))["status"]
        d = (await _ctl(dst_ctl, wire.MIGRATE_WAIT, {"timeout": 120}))["status"]
        wall = time.monotonic() - t0
        cpu1 = [process_cpu_ns(p) for p in pids]
        ticks1 = [cpu_ticks_ns(p) for p in pids]
        if (s, d) != ("completed", "completed"):
            raise BenchError(f"sealed migration {rep + 1} ended {s!r}/{d!r}; see {ctx.work}")
        client = await qmp_client(src_test)
        try:
            info = await client.execute("query-migrate")
        finally:
            await close_client(client)
        qemu_ms = float(info.get("total-time", 0))
        src_ms, dst_ms = ((b - a) / 1e6 for a, b in zip(cpu0, cpu1))
        return {
            "cpu_ms": src_ms + dst_ms,
            "src_cpu_ms": src_ms,
            "dst_cpu_ms": dst_ms,
            "ticks_cpu_ms": sum(b - a for a, b in zip(ticks0, ticks1)) / 1e6,
            "wall_ms": wall * 1000,
            "handover_wall_ms": (t_handover - t0) * 1000,
            "handover_cpu_ms": sum(b - a for a, b in zip(cpu0, cpu_handover)) / 1e6,
            "qemu_total_ms": qemu_ms,
            "wall_outside_qemu_ms": wall * 1000 - qemu_ms,
            "control_floor_cpu_ms": control_floor_ms,
        }
    finally:
        for proc in reversed(procs):
            await ctx.stop(proc)


async def bench_migration_fixed(ctx: Ctx, reps: int) -> dict:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"skipped": "qemu-system-x86_64 is not installed"}
    runs = [await one(ctx, qemu, rep) for rep in range(reps)]

    def p50(key: str) -> float | None:
        return _r(statistics.median(r[key] for r in runs), 2)

    return {
        "migration_fixed_ms": statistics.median(r["cpu_ms"] for r in runs),
        "details": {
            "migrations": reps,
            "method": "CPU time of both sidecars from prepare to the last wait (process CPU clocks), summed",
            "cpu_ms": [_r(r["cpu_ms"], 2) for r in runs],
            "src_cpu_ms_p50": p50("src_cpu_ms"),
            "dst_cpu_ms_p50": p50("dst_cpu_ms"),
            "stat_ticks_cpu_ms_p50": p50("ticks_cpu_ms"),
            "wall_ms_p50": p50("wall_ms"),
            "handover_wall_ms_p50": p50("handover_wall_ms"),
            "handover_cpu_ms_p50": p50("handover_cpu_ms"),
            "qemu_total_ms_p50": p50("qemu_total_ms"),
            "wall_outside_qemu_ms_p50": p50("wall_outside_qemu_ms"),
            # six GET /v1/status, one connection each, on the same idle agents
            "control_floor_cpu_ms_p50": p50("control_floor_cpu_ms"),
        },
    }
