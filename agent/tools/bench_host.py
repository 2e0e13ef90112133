"""``keyagent bench``'s host-mode figures: one ``keyagent host`` for N VMs.

Everything runs against one ``keyagent simulate --vms N`` process (N
simulated QEMUs, one socket each) and one ``keyagent owner serve``, so that
neither N simulators nor N owners are measured.  Each round, on the same VMs:

1. the floor, :mod:`agent.tools.hostfloor`: one bare qemu.qmp process, started
   and imported beforehand, told "go" on stdin, launches every VM at once;
2. ``x-sim-reset`` holds every VM at ``-S`` again (same keys, new MNONCE);
3. ``keyagent host --config-dir DIR``, started with DIR empty and settled;
   then every VM's config file is renamed into DIR at once;
4. the floor with the agent's per-VM duties (``hostfloor --duties``), run
   and timed as the floor is, first, in the middle or last in turn: it is in
   the details only (``floor_duties_cpu_ms_per_launch``, ``floor_duties_p99_ms``).

"QEMU ready" is the moment of "go" (floor) or of the first rename (host):
every simulated QEMU is listening by then.  Each VM's time to ``cont`` is
taken from the simulator's stamps (CLOCK_MONOTONIC, as the bench's own
clock), the same way for both rounds, so the host's own detection of new
files is inside its figure; how much of it that was is in the details
(``ready_to_connect_ms``).

* ``host_density_ratio``: p99(host) / p99(floor), same run, same VMs.
* ``host_density_p99_ms``: p99(host).
* ``host_rss_kb_per_vm``: (VmRSS of the host with N launched, idle VMs -
  VmRSS with none, both after a settling second) / N.
* ``agent_cpu_ms_per_launch``: the host's utime + stime (its CPU-time clock)
  from just before the renames until every VM was resumed and a settling
  second passed, / N.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from agent.tools.bench import BenchError, Ctx, _r, close_client, percentile, process_cpu_ns, qmp_client, rss_kb

__all__ = ["bench_host", "cpu_ms", "notes"]

OWNER_SECRET_NAME = "host-disk.pass"
_SETTLE_S = 1.0


def cpu_ms(pid: int) -> float:
    """utime + stime of ``pid`` in milliseconds, to the nanosecond (:func:`process_cpu_ns`)."""
    return process_cpu_ns(pid) / 1e6


def host_available() -> bool:
    return importlib.util.find_spec("agent.app.host") is not None


async def _start_owner(ctx: Ctx, names: list[str], keys_dir: str) -> tuple[Any, str]:
    from agent.tools.sim.machine import DEFAULT_DIGEST

    secret = ctx.path(OWNER_SECRET_NAME)
    if not os.path.exists(secret):
        ctx._write(OWNER_SECRET_NAME, b"keyagent bench host-mode disk passphrase")
    text = "".join(
        f'[vm.{vm}]\ntik = "{keys_dir}/{vm}/tik.bin"\ntek = "{keys_dir}/{vm}/tek.bin"\npolicy = 1\n'
        f'digest = "{DEFAULT_DIGEST.hex()}"\n'
        f'[[vm.{vm}.secret]]\nguid = "luks-key"\nfile = "{secret}"\n'
        for vm in names
    )
    return await ctx.serve_owner("host-owner", "host-owner.toml", text)


async def _resumed(client) -> None:
    async for event in client.events:
        if event.get("event") == "RESUME":
            return


class _Vms:
    """The bench's own QMP client on every simulated VM: RESUME events and stamps."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.clients: list = []
        self.seen: list[int] = []

    async def open(self) -> None:
        for path in self.paths:
            self.clients.append(await qmp_client(path, "bench-host"))
        self.seen = [await self._last_client(c) for c in self.clients]

    @staticmethod
    async def _last_client(client) -> int:
        return max(c["client"] for c in await client.execute("x-sim-query-clients"))

    def watch(self) -> list[asyncio.Future]:
        for client in self.clients:
            client.events.clear()
        return [asyncio.ensure_future(_resumed(c)) for c in self.clients]

    async def stamps(self, names: list[str]) -> list[dict]:
        """Each VM's one connection since the last call that sent ``cont``."""
        out = []
        for i, (name, client) in enumerate(zip(names, self.clients)):
            clients = await client.execute("x-sim-query-clients")
            mine = [c for c in clients if c["client"] > self.seen[i] and c["cont"] is not None]
            self.seen[i] = max(c["client"] for c in clients)
            if len(mine) != 1:
                raise BenchError(f"{name}: {len(mine)} connections sent cont, not one")
            out.append(mine[0])
        return out

    async def reset(self) -> None:
        for client in self.clients:
            await client.execute("x-sim-reset")

    async def close(self) -> None:
        for client in self.clients:
            await close_client(client)


async def _wait_all(waits: list[asyncio.Future], n: int, what: str, ctx: Ctx) -> None:
    done, pending = await asyncio.wait(waits, timeout=max(120.0, n * 2.0))
    for w in pending:
        w.cancel()
    if pending:
        raise BenchError(f"{what}: {len(pending)} of {n} VMs were not resumed; see {ctx.work}")


def _latencies(stamps: list[dict], t0: float) -> dict[str, list[float]]:
    return {
        "ready_to_cont": [(s["cont"] - t0) * 1000 for s in stamps],
        "ready_to_connect": [(s["connected"] - t0) * 1000 for s in stamps],
        "connect_to_cont": [(s["cont"] - s["connected"]) * 1000 for s in stamps],
        "owner_round_trip": [(s["injected"] - s["measured"]) * 1000 for s in stamps],
    }


def _summary(values: list[float]) -> dict:
    return {
        "p50": _r(statistics.median(values)),
        "p90": _r(percentile(values, 90)),
        "p99": _r(percentile(values, 99)),
        "max": _r(max(values)),
    }


async def _get(sock: str, path: str) -> tuple[int, Any]:
    from agent.io.http import HttpError, request_json

    try:
        return await request_json("GET", f"http://localhost{path}", None, timeout=5, unix_path=sock)
    except HttpError:
        return 0, None


async def _wait_host_up(ctx: Ctx, proc, sock: str, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            break
        if os.path.exists(sock):
            code, _ = await _get(sock, "/healthz")
            if code == 200:
                return
        await asyncio.sleep(0.05)
    raise BenchError(f"keyagent host did not come up; see {ctx.path(name + '.stderr')}")


def fs_type(path: str) -> str:
    """The type of the filesystem ``path`` is on: the longest mount point
    above it in /proc/self/mounts."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mount = fields[1].replace("\\040", " ")
            above = path == mount or path.startswith(mount.rstrip("/") + "/")
            if above and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


def run_root(ctx: Ctx) -> tuple[str, bool]:
    """Where the VMs' run_dirs go, and whether it is ours to remove.

    On a tmpfs, as a host's /run is: docs/host.md puts them in
    /run/keyagent-host/<vm>, as libvirt keeps its own in /run/libvirt/qemu.
    On a disk filesystem the launch note's fsync and rename and each control
    socket's bind go through its journal, about half of the duties' CPU here
    (docs/hostbench.md, session 5): that would measure the disk, not the
    agent.  /run when it is a tmpfs, else /dev/shm, else the work directory
    (the details say which filesystem it was)."""
    for parent in ("/run", "/dev/shm"):
        if os.path.isdir(parent) and fs_type(parent) == "tmpfs" and os.access(parent, os.W_OK | os.X_OK):
            return tempfile.mkdtemp(prefix="keyagent-bench-", dir=parent), True
    return ctx.work, False


def _write_configs(ctx: Ctx, names: list[str], paths: list[str], owner_url: str, root: str) -> list[tuple[str, str]]:
    """Each VM's config in a staging directory: (staged, final) pairs; the
    run_dirs under ``root``."""
    stage, config_dir = ctx.path("host-stage"), ctx.path("host-conf")
    for d in (stage, config_dir, os.path.join(root, "host-run")):
        os.mkdir(d, 0o700)
    moves = []
    for name, path in zip(names, paths):
        run_dir = os.path.join(root, "host-run", name)
        os.mkdir(run_dir, 0o700)
        text = f'[vm]\nname = "{name}"\nrun_dir = "{run_dir}"\nqmp = "unix:{path}"\n[sev]\nowner_url = "{owner_url}"\n'
        staged = os.path.join(stage, f"{name}.toml")
        with open(staged, "w") as f:
            f.write(text)
        moves.append((staged, os.path.join(config_dir, f"{name}.toml")))
    return moves


async def _floor_round(
    ctx: Ctx, vms: _Vms, names: list[str], qmp_dir: str, owner_url: str, duties: str | None = None
) -> dict:
    """One launch of every VM by the floor (with ``duties``, a directory: the
    floor with the agent's per-VM duties, ``hostfloor --duties``); the latencies."""
    n = len(names)
    argv = [sys.executable, "-m", "agent.tools.hostfloor", "--qmp-dir", qmp_dir, "--vms", str(n)]
    what = "host-floor" if duties is None else "host-floor-duties"
    floor = await ctx.spawn(
        what,
        [*argv, "--owner-url", owner_url, *(["--duties", duties] if duties is not None else [])],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        await ctx.ready_line(floor, what)
        await asyncio.sleep(_SETTLE_S)
        waits = vms.watch()
        cpu0 = cpu_ms(floor.pid)
        t0 = time.monotonic()
        assert floor.stdin is not None  # spawned with stdin=PIPE
        floor.stdin.write(b"go\n")
        await floor.stdin.drain()
        await _wait_all(waits, n, what, ctx)
        cpu = cpu_ms(floor.pid) - cpu0
        out = await ctx.ready_line(floor, what)
        if out["failed"]:
            raise BenchError(f"{what}: {len(out['failed'])} VMs failed, e.g. {next(iter(out['failed'].values()))}")
        lat = _latencies(await vms.stamps(names), t0)
        lat["own"] = list(out["launched_ms"].values())
        return {"lat": lat, "cpu_ms": cpu}
    finally:
        await ctx.stop(floor)


async def _host_round(ctx: Ctx, vms: _Vms, names: list[str], moves: list[tuple[str, str]], rnd: int) -> dict:
    """Start ``keyagent host`` on an empty directory, settle, move every VM's
    file in at once, wait for every RESUME; latencies, CPU, RSS."""
    n = len(names)
    control = ctx.path("host.sock")
    config_dir = os.path.dirname(moves[0][1])
    host = await ctx.spawn(
        f"host{rnd}", [*ctx.keyagent, "host", "--config-dir", config_dir, "--control", f"unix:{control}"]
    )
    try:
        await _wait_host_up(ctx, host, control, f"host{rnd}")
        await asyncio.sleep(_SETTLE_S)
        rss_empty, pss_empty = rss_kb(host.pid)
        waits = vms.watch()
        cpu0 = cpu_ms(host.pid)
        t0 = time.monotonic()
        for staged, final in moves:
            os.rename(staged, final)
        # What a hook that wrote the files does next: tell the host to look now,
        # rather than at its next poll of the directory (poll_s in the details).
        host.send_signal(signal.SIGHUP)
        await _wait_all(waits, n, "keyagent host", ctx)
        cpu_at_last_cont = cpu_ms(host.pid) - cpu0
        lat = _latencies(await vms.stamps(names), t0)
        await asyncio.sleep(_SETTLE_S)
        cpu = cpu_ms(host.pid) - cpu0
        rss_full, pss_full = rss_kb(host.pid)
        code, listing = await _get(control, "/v1/vms")
        states: dict[str, int] = {}
        for vm in listing.get("vms", []) if isinstance(listing, dict) else []:
            state = f"{vm.get('state')}:{(vm.get('result') or {}).get('code')}"
            states[state] = states.get(state, 0) + 1
        await ctx.stop(host)
        return {
            "lat": lat,
            "cpu_ms": cpu,
            "cpu_ms_to_last_cont": cpu_at_last_cont,
            "rss_kb": (rss_empty, rss_full),
            "pss_kb": (pss_empty, pss_full),
            "v1_vms": {"status": code, "states": states},
            "exit": host.returncode,
        }
    finally:
        await ctx.stop(host)
        for staged, final in moves:  # back to the stage for the next round
            if os.path.exists(final):
                os.rename(final, staged)


async def bench_host(ctx: Ctx, n: int, rounds: int = 1) -> dict:
    """``rounds`` pairs of (floor, host), alternating which goes first; every
    figure is the median over the rounds."""
    if not host_available():
        return {"skipped": "this build has no keyagent host (agent.app.host)"}
    from agent.tools.sim.multi import vm_name

    names = [vm_name(i, n) for i in range(n)]
    qmp_dir, keys_dir = ctx.path("hq"), ctx.path("hkeys")
    os.mkdir(qmp_dir, 0o700)
    sim = owner = None
    vms: _Vms | None = None
    root, own_root = run_root(ctx)
    root_fs = fs_type(root)
    floors: list[dict] = []
    hosts: list[dict] = []
    duties: list[dict] = []  # the floor with the agent's per-VM duties (hostfloor --duties)
    try:
        argv = ["simulate", "--vms", str(n), "--qmp-dir", qmp_dir, "--keys-out", keys_dir, "--log-level", "warning"]
        sim = await ctx.spawn("host-sim", [*ctx.keyagent, *argv], stdout=subprocess.PIPE)
        ready = await ctx.ready_line(sim, "host-sim")
        paths = [s.removeprefix("unix:") for s in ready["qmp_sockets"]]
        owner, owner_url = await _start_owner(ctx, names, keys_dir)
        vms = _Vms(paths)
        await vms.open()
        moves = _write_configs(ctx, names, paths, owner_url, root)
        for rnd in range(rounds):
            sides = ["floor", "host"] if rnd % 2 == 0 else ["host", "floor"]
            sides.insert(rnd % 3, "duties")  # floor and host in their order; duties first, middle, last
            for side in sides:
                others = (cpu_ms(sim.pid), cpu_ms(owner.pid))
                if side == "floor":
                    floors.append(await _floor_round(ctx, vms, names, qmp_dir, owner_url))
                elif side == "duties":
                    duties.append(
                        await _floor_round(ctx, vms, names, qmp_dir, owner_url, os.path.join(root, "host-duties"))
                    )
                else:
                    hosts.append(await _host_round(ctx, vms, names, moves, rnd))
                # what the simulator and the owner spent meanwhile (settling included):
                # they share the cores with the side measured
                {"floor": floors, "duties": duties, "host": hosts}[side][-1]["others_cpu_ms"] = (
                    cpu_ms(sim.pid) - others[0],
                    cpu_ms(owner.pid) - others[1],
                )
                await vms.reset()
    finally:
        if vms is not None:
            await vms.close()
        for proc in (owner, sim):
            if proc is not None:
                await ctx.stop(proc)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
    host_p99 = [percentile(h["lat"]["ready_to_cont"], 99) for h in hosts]
    floor_p99 = [percentile(f["lat"]["ready_to_cont"], 99) for f in floors]
    rss_per_vm = [(h["rss_kb"][1] - h["rss_kb"][0]) / n for h in hosts]
    cpu_per_launch = [h["cpu_ms"] / n for h in hosts]
    med = statistics.median
    first = hosts[0]
    return {
        "host_density_ratio": med(host_p99) / med(floor_p99),
        "host_density_p99_ms": med(host_p99),
        "host_rss_kb_per_vm": med(rss_per_vm),
        "agent_cpu_ms_per_launch": med(cpu_per_launch),
        "details": {
            "vms": n,
            "rounds": rounds,
            "host_p99_ms": [_r(x, 1) for x in host_p99],
            "floor_p99_ms": [_r(x, 1) for x in floor_p99],
            "rss_kb_per_vm": [_r(x, 1) for x in rss_per_vm],
            "cpu_ms_per_launch": [_r(x, 3) for x in cpu_per_launch],
            # the floor's own CPU time over the same launches / N: what Python, qemu.qmp
            # and h11 cost at the least (from its go to the last RESUME)
            "floor_cpu_ms_per_launch": [_r(f["cpu_ms"] / n, 3) for f in floors],
            # the floor with the agent's per-VM duties done barely (hostfloor --duties: config,
            # run_dir lock and sweep, qom-list, control socket, master key via the keyring,
            # launch note, the host's log lines), measured as the floor is: what a perfect
            # implementation of keyagent host could reach
            "floor_duties_cpu_ms_per_launch": [_r(f["cpu_ms"] / n, 3) for f in duties],
            "floor_duties_p99_ms": [_r(percentile(f["lat"]["ready_to_cont"], 99), 1) for f in duties],
            "sim_owner_cpu_ms_per_launch": {
                "with_floor": [[_r(x / n, 3) for x in f["others_cpu_ms"]] for f in floors],
                "with_host": [[_r(x / n, 3) for x in h["others_cpu_ms"]] for h in hosts],
                "with_duties": [[_r(x / n, 3) for x in f["others_cpu_ms"]] for f in duties],
            },
            # the first round of each, in full
            "host_ms": {k: _summary(v) for k, v in first["lat"].items()},
            "floor_ms": {k: _summary(v) for k, v in floors[0]["lat"].items()},
            "host_rss_kb": {"empty": first["rss_kb"][0], "with_vms": first["rss_kb"][1]},
            "host_pss_kb": {"empty": first["pss_kb"][0], "with_vms": first["pss_kb"][1]},
            "host_cpu_ms": {"to_last_cont": _r(first["cpu_ms_to_last_cont"], 1), "with_settle": _r(first["cpu_ms"], 1)},
            "v1_vms": first["v1_vms"],
            "host_exit": [h["exit"] for h in hosts],
            # the filesystem of the run_dirs (the host's and the duties floor's)
            "run_dirs_on": root_fs,
            "poll_s": getattr(importlib.import_module("agent.app.host"), "POLL_S", None),
        },
    }


def notes(key: str, d: dict) -> str:
    """The table's notes column for a host_* key (``d``: this group's details)."""
    med = statistics.median
    if key == "host_density_ratio":
        return (
            f"{d['vms']} VMs, {d['rounds']} round(s): host p99 {med(d['host_p99_ms']):.0f} ms / floor p99 "
            f"{med(d['floor_p99_ms']):.0f} ms"
            + (f" (with duties {med(d['floor_duties_p99_ms']):.0f})" if d.get("floor_duties_p99_ms") else "")
            + " (host ready->connect p99 "
            f"{d['host_ms']['ready_to_connect']['p99']:.0f} ms, owner round trip p99 "
            f"{d['host_ms']['owner_round_trip']['p99']:.0f} ms)"
        )
    if key == "host_rss_kb_per_vm":
        r = d["host_rss_kb"]
        return f"RSS {r['empty'] / 1024:.1f} MB empty, {r['with_vms'] / 1024:.1f} MB with {d['vms']} VMs"
    if key == "agent_cpu_ms_per_launch":
        c = d["host_cpu_ms"]
        return (
            f"{c['with_settle']:.0f} ms CPU for {d['vms']} launches ({c['to_last_cont']:.0f} ms by the last cont); "
            f"the floor's {med(d['floor_cpu_ms_per_launch']):.2f} ms per launch"
            + (
                f", {med(d['floor_duties_cpu_ms_per_launch']):.2f} with the agent's duties"
                if d.get("floor_duties_cpu_ms_per_launch")
                else ""
            )
            + (f"; run_dirs on {d['run_dirs_on']}" if d.get("run_dirs_on") else "")
        )
    return ""
