"""``keyagent bench [--json]``: what one agent per VM costs, next to the floor.

There is one keyagent per VM, so its cost is paid hundreds of times per host
and its latency sits on every VM's boot path.  Each figure is measured in
this run only, on this machine, and quoted as a median (or a ratio of
medians): the machine is shared and noisy.

How each figure is taken, and why that way:

* ``launch_ratio``, ``launch_added_ms_p50``: SEV launches against one
  ``keyagent simulate`` and one local ``keyagent owner serve``.  The agent is
  the real ``keyagent run`` (a process per launch, as in production); the
  floor is :func:`agent.tools.benchfloor.bare_launch` (qemu.qmp and http.client,
  also a process per launch).  Both are timed the same way, from outside:
  the simulator stamps when it accepted the connection and when ``cont``
  arrived (``x-sim-query-clients``, CLOCK_MONOTONIC).  So process start is
  out of both windows and in ``startup_ms``.  Agent and floor alternate, so
  drift in the machine's load hits both; ``x-sim-reset`` holds the VM at
  ``-S`` again with a fresh MNONCE between launches.  The ratio is
  median(agent) / median(floor); the added latency is the median of the
  paired differences.
* ``startup_ms``: from just before exec of ``keyagent run`` to the
  simulator receiving its ``qmp_capabilities``, from the same launches.
* ``idle_rss_mb``: ``keyagent run`` with a run_dir (control socket on), after
  its launch finished and ``ctl status`` answers, settled for a second:
  VmRSS of the process (PSS in the details).
* ``replay_events_per_s``: a generated log of launch and migration flows
  recorded with :class:`agent.app.eventlog.EventLog` (the flows fed by a small
  driver, as the runtime would), checked by the real ``keyagent replay LOG
  --check`` process: its records (recorded events and the actions compared
  with them) per second of wall time, start-up included.  The rate of the
  recorded events alone and the CPU time are in the details.
* ``replay_html_records_per_s``: the same log drawn by ``keyagent replay LOG
  --html OUT`` (a process, start-up included): records per second of wall
  time; the page's size is in the details.  How fast a browser then shows
  the page is measured by hand (docs/replay.md), not here.
* ``migration_ratio``: two real QEMUs (TCG), the same ``max-bandwidth`` on
  both variants, agent and floor back to back, the median of the pairs'
  ratios.  The agent: two ``keyagent run`` driven over their control
  sockets from this process (prepare, begin, accept, start, wait, wait),
  timed from the first request to the last answer.  The floor:
  :func:`agent.tools.benchfloor.bare_migration`, the same QMP calls from this
  process, timed from writing its key files to its cleanup.
* ``density_*``: N simulators (processes) already up, N ``keyagent run``
  (run_dir, control socket on) started at once against one owner; per-VM
  connect-to-``cont`` from each simulator's stamps; RSS of the N sidecars
  once all have launched (PSS in the details).

Targets are reported (``targets_met``), not asserted: exit 0 when the run
completed, 1 when a measurement itself failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from agent.common.errors import FlowFailed, UsageError

#: key -> (comparison, target, what)
TARGETS: dict[str, tuple[str | None, float | None, str]] = {
    "launch_ratio": ("<=", 1.3, "SEV launch connect->cont, agent / bare qemu.qmp script (medians)"),
    "launch_added_ms_p50": ("<=", 2.0, "agent's added latency per launch (median of paired differences)"),
    "idle_rss_mb": ("<=", 24.0, "RSS of an idle sidecar (launched, control socket on)"),
    "startup_ms": ("<=", 120.0, "exec of keyagent run to QMP negotiated (median)"),
    "replay_events_per_s": (">=", 500000.0, "keyagent replay --check on a generated log: records/s"),
    "replay_html_records_per_s": (">=", 20000.0, "keyagent replay --html on the same log: records/s"),
    "migration_ratio": ("<=", 1.05, "TLS-PSK migration on real QEMU, agent / bare script (median of paired ratios)"),
    "migration_fixed_ms": ("<=", 20.0, "both agents' CPU per sealed migration, outside QEMU (median)"),
    "density_launch_p99_ms": ("<=", 50.0, "N sidecars x N simulators launching at once: p99 connect->cont"),
    "density_rss_mb_total": (None, None, "the same N sidecars: total RSS"),
    # host mode (agent.tools.bench_host)
    "host_density_ratio": ("<=", 1.3, "N VMs at once under keyagent host: p99 ready->cont / one-process floor's"),
    "host_density_p99_ms": (None, None, "the same p99 under keyagent host (QEMU ready -> cont)"),
    "host_rss_kb_per_vm": ("<=", 512.0, "keyagent host: (RSS with N idle VMs - RSS with none) / N"),
    "agent_cpu_ms_per_launch": ("<=", 1.0, "keyagent host's CPU time over the N launches / N"),
    # agent.tools.bench_owner: keyagent owner serve --db, 50 clients, every request a first release
    "owner_secret_rps_sqlite": (None, None, "owner releases/s at 50 concurrent clients, SQLite"),
    "owner_secret_rps_postgresql": (None, None, "owner releases/s at 50 concurrent clients, PostgreSQL"),
    "owner_p99_ms": ("<=", 20.0, "owner release latency p99 at that load, SQLite"),
}
GROUPS = {
    "launch": ("launch_ratio", "launch_added_ms_p50", "startup_ms"),
    "idle": ("idle_rss_mb",),
    "replay": ("replay_events_per_s", "replay_html_records_per_s"),
    "migration": ("migration_ratio",),
    "migration_fixed": ("migration_fixed_ms",),
    "density": ("density_launch_p99_ms", "density_rss_mb_total"),
    "host": ("host_density_ratio", "host_density_p99_ms", "host_rss_kb_per_vm", "agent_cpu_ms_per_launch"),
    "owner": ("owner_secret_rps_sqlite", "owner_p99_ms"),
    "owner_pg": ("owner_secret_rps_postgresql",),
}

FULL = {"launches": 200, "density": 100, "replay_events": 200_000, "migrations": 5, "idle": 3, "owner_releases": 5000}
SMOKE = {"launches": 3, "density": 3, "replay_events": 3_000, "migrations": 1, "idle": 1, "owner_releases": 100}

OWNER_SECRET = b"keyagent bench disk passphrase"
MIGRATION_BANDWIDTH = 4 << 30  # bytes/s, both variants: effectively no cap on loopback
# The guest: 256 MiB of RAM of which FILL MiB hold random bytes (loaded at
# 16 MiB by QEMU's generic loader), i.e. a small VM whose memory is in use.
# An empty guest migrates in ~40 ms here, less than the agent's fixed cost of
# a migration (two sealed hand-over requests, a key file, six control
# requests), which the details report in milliseconds either way.
MIGRATION_RAM_MB = 256
MIGRATION_FILL_MB = {"full": 64, "smoke": 0}


class BenchError(FlowFailed):
    """A measurement could not be taken (a process failed, a timeout)."""


# -- small statistics ------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# -- the machine -----------------------------------------------------------------------


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    mem = ""
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            first = f.readline().split()
            mem = f"{int(first[1]) / (1 << 20):.1f} GiB"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def process_cpu_ns(pid: int) -> int:
    """User + system CPU time of process ``pid`` so far, in nanoseconds (0 when gone).

    Read from the process's CPU-time clock (``clock_getcpuclockid(3)``; Linux
    encodes it as ``~pid << 3 | CPUCLOCK_SCHED``), which counts every thread,
    those that ended included, to the nanosecond.  ``/proc/PID/stat`` has the
    same sum in clock ticks of 10 ms: a few launches' CPU read that way is 0
    or 10 ms, so a small run's per-launch figure was noise around 0.
    """
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)
    except OSError:
        return 0


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of a process in kB (0 when gone)."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    return rss, pss


# -- processes ---------------------------------------------------------------------------


def keyagent_argv() -> list[str]:
    """The installed ``keyagent`` next to this Python (as deployed), else ``-m``."""
    script = os.path.join(os.path.dirname(sys.executable), "keyagent")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "agent.cli"]


@dataclass
class Ctx:
    work: str
    keyagent: list[str]
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    owner_url: str | None = None
    vms: list[str] = field(default_factory=list)
    handover_ms: list[float] = field(default_factory=list)  # sealed prepare + begin
    _n: int = 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def errfile(self, name: str):
        return open(self.path(f"{name}.stderr"), "wb")

    async def spawn(
        self, name: str, argv: list[str], stdout=subprocess.DEVNULL, track: bool = True, stdin=subprocess.DEVNULL
    ) -> asyncio.subprocess.Process:
        with self.errfile(name) as err:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=stdin, stdout=stdout, stderr=err, cwd=self.work)
        if track:
            self.procs.append(proc)
        return proc

    async def ready_line(self, proc, name: str, timeout: float = 60.0) -> dict:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            return json.loads(line)
        except (TimeoutError, ValueError):
            raise BenchError(f"{name} did not start; see {self.path(name + '.stderr')}") from None

    async def stop(self, proc, timeout: float = 10.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(p) for p in list(self.procs)), return_exceptions=True)

    # -- the two services every launch needs -------------------------------------
    def write_keys(self) -> None:
        self._write("disk.pass", OWNER_SECRET)

    def _write(self, name: str, data: bytes) -> None:
        fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def vm_keys(self, vm: str) -> tuple[str, str]:
        """The TIK and TEK files of ``vm``: every VM has keys of its own (the
        owner refuses a TIK or TEK shared by two VMs)."""
        tik, tek = f"tik-{vm}.bin", f"tek-{vm}.bin"
        if not os.path.exists(self.path(tik)):
            self._write(tik, os.urandom(16))
            self._write(tek, os.urandom(16))
        return self.path(tik), self.path(tek)

    async def owner(self, vms: list[str]) -> str:
        from agent.tools.sim.machine import DEFAULT_DIGEST

        if self.owner_url is not None and set(vms) <= set(self.vms):
            return self.owner_url
        for proc in [p for p in self.procs if getattr(p, "bench_role", "") == "owner"]:
            await self.stop(proc)
        self.vms = sorted(set(vms) | set(self.vms))
        text = "".join(
            f'[vm.{vm}]\ntik = "{self.vm_keys(vm)[0]}"\ntek = "{self.vm_keys(vm)[1]}"\npolicy = 1\n'
            f'digest = "{DEFAULT_DIGEST.hex()}"\n'
            f'[[vm.{vm}.secret]]\nguid = "luks-key"\nfile = "disk.pass"\n'
            for vm in self.vms
        )
        self._n += 1
        _, self.owner_url = await self.serve_owner("owner", f"owner{self._n}.toml", text)
        return self.owner_url

    async def serve_owner(self, name: str, config_file: str, text: str) -> tuple[asyncio.subprocess.Process, str]:
        """``keyagent owner serve`` on 127.0.0.1:0 with ``text`` for its
        owner.toml (written to ``config_file`` in the work dir), tagged
        ``bench_role = name``: the process and the URL its ready line gives."""
        config = self.path(config_file)
        with open(config, "w") as f:
            f.write(text)
        proc = await self.spawn(
            name,
            [*self.keyagent, "owner", "serve", "--config", config, "--listen", "127.0.0.1:0", "--log-level", "warning"],
            stdout=subprocess.PIPE,
        )
        proc.bench_role = name  # type: ignore[attr-defined]
        return proc, (await self.ready_line(proc, name))["listening"]

    async def simulator(self, name: str, vm: str = "bench") -> tuple[asyncio.subprocess.Process, str]:
        path = self.path(f"{name}.qmp")
        tik, tek = self.vm_keys(vm)
        proc = await self.spawn(
            name,
            [*self.keyagent, "simulate", "--qmp", f"unix:{path}", "--tik", tik, "--tek", tek, "--log-level", "warning"],
            stdout=subprocess.PIPE,
        )
        await self.ready_line(proc, name)
        return proc, path


async def qmp_client(path: str, name: str = "bench"):
    from qemu.qmp import QMPClient

    client = QMPClient(name)
    await client.connect(path)
    return client


async def close_client(client) -> None:
    with contextlib.suppress(Exception):
        await client.disconnect()


# -- launch: ratio, added latency, startup -----------------------------------------


async def bench_launch(ctx: Ctx, n: int) -> dict:
    owner_url = await ctx.owner(["bench"])
    sim, sim_path = await ctx.simulator("launch-sim")
    control = await qmp_client(sim_path)
    agent_argv = [*ctx.keyagent, "run", "--qmp", f"unix:{sim_path}", "--owner-url", owner_url, "--vm-name", "bench"]
    floor_argv = [
        sys.executable,
        "-m",
        "agent.tools.benchfloor",
        "launch",
        "--qmp",
        sim_path,
        "--owner-url",
        owner_url,
        "--vm",
        "bench",
    ]
    seen = max(c["client"] for c in await control.execute("x-sim-query-clients"))
    samples: dict[str, list[float]] = {"agent": [], "floor": []}
    startup: list[float] = []
    floor_startup: list[float] = []
    try:
        for i in range(n):
            for side in ("agent", "floor") if i % 2 == 0 else ("floor", "agent"):
                await control.execute("x-sim-reset")
                t_exec = time.monotonic()
                proc = await ctx.spawn(f"launch-{side}", agent_argv if side == "agent" else floor_argv, track=False)
                try:
                    code = await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    code = -1
                clients = await control.execute("x-sim-query-clients")
                mine = [c for c in clients if c["client"] > seen and c["cont"] is not None]
                seen = max(c["client"] for c in clients)
                if code != 0 or len(mine) != 1:
                    raise BenchError(
                        f"{side} launch {i + 1} failed (exit {code}); see {ctx.path(f'launch-{side}.stderr')}"
                    )
                rec = mine[0]
                samples[side].append((rec["cont"] - rec["connected"]) * 1000)
                if side == "agent":
                    startup.append((rec["negotiated"] - t_exec) * 1000)
                else:  # the floor: a bare qemu.qmp script, exec'd the same way
                    floor_startup.append((rec["negotiated"] - t_exec) * 1000)
    finally:
        await close_client(control)
        await ctx.stop(sim)
    agent, floor = samples["agent"], samples["floor"]
    added = [a - f for a, f in zip(agent, floor)]
    return {
        "launch_ratio": statistics.median(agent) / statistics.median(floor),
        "launch_added_ms_p50": statistics.median(added),
        "startup_ms": statistics.median(startup),
        "details": {
            "launches_per_side": n,
            "agent_ms": {"p50": _r(statistics.median(agent)), "p90": _r(percentile(agent, 90)), "min": _r(min(agent))},
            "floor_ms": {"p50": _r(statistics.median(floor)), "p90": _r(percentile(floor, 90)), "min": _r(min(floor))},
            "startup_ms": {
                "p50": _r(statistics.median(startup)),
                "p90": _r(percentile(startup, 90)),
                "min": _r(min(startup)),
                "samples": len(startup),
            },
            "floor_startup_ms": {
                "p50": _r(statistics.median(floor_startup)),
                "min": _r(min(floor_startup)),
            },
            "python_floor_ms": python_floor_ms(max(3, min(20, n))),
        },
    }


# Python's own floor on this machine: an interpreter that does nothing, with
# and without site (the venv's .pth files), and one that imports asyncio.
PYTHON_FLOOR = {
    "pass": ["-c", "pass"],
    "pass_no_site": ["-S", "-c", "pass"],
    "import_asyncio": ["-c", "import asyncio"],
}


def python_floor_ms(reps: int = 20) -> dict[str, float | None]:
    """Median wall time of exec to exit of each PYTHON_FLOOR command, in ms."""
    out: dict[str, float | None] = {}
    for name, args in PYTHON_FLOOR.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = _r(statistics.median(times), 1)
    return out


FLOOR_IDLE = """
import asyncio, sys
from qemu.qmp import QMPClient
async def main():
    client = QMPClient("floor")
    await client.connect(sys.argv[1])
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def floor_idle_rss_kb(ctx: Ctx, sim_path: str) -> tuple[int, int]:
    """(VmRSS, Pss) of the floor's idle process: asyncio and qemu.qmp, connected, waiting."""
    proc = await ctx.spawn("idle-floor", [sys.executable, "-c", FLOOR_IDLE, sim_path], stdout=subprocess.PIPE)
    try:
        await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        await asyncio.sleep(1.0)
        return rss_kb(proc.pid)
    finally:
        await ctx.stop(proc)


# -- idle RSS -----------------------------------------------------------------------------


async def _status(control_sock: str) -> dict | None:
    from agent.io.http import HttpError, request_json

    try:
        code, body = await request_json("GET", "http://localhost/v1/status", None, timeout=5, unix_path=control_sock)
    except HttpError:
        return None
    return body if code == 200 and isinstance(body, dict) else None


async def _wait_launched(ctx: Ctx, proc, control_sock: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            break
        status = await _status(control_sock) if os.path.exists(control_sock) else None
        result = ((status or {}).get("flows", {}).get("launch") or {}).get("result")
        if result is not None:
            if result.get("code") == 0:
                return
            break
        await asyncio.sleep(0.05)
    raise BenchError(f"{name} did not launch; see {ctx.path(name + '.stderr')}")


async def start_migration_agent(
    ctx: Ctx, name: str, qmp: str, run_dir: str, keys: list[str], incoming: bool
) -> tuple[Any, str]:
    """``keyagent run`` for VM "mig" on ``qmp`` (one side of a migration:
    ``incoming`` for the destination), waited for until its control socket
    answers ``status`` (30 s; Ctx tracks the process, so a failed start is
    still stopped).  Returns the process and its control socket."""
    proc = await ctx.spawn(
        name,
        [
            *ctx.keyagent,
            "run",
            "--qmp",
            f"unix:{qmp}",
            "--vm-name",
            "mig",
            "--vm-run-dir",
            run_dir,
            *keys,
            *(["--incoming"] if incoming else []),
        ],
    )
    sock = os.path.join(run_dir, "control.sock")
    deadline = time.monotonic() + 30
    while not os.path.exists(sock) or await _status(sock) is None:
        if proc.returncode is not None or time.monotonic() > deadline:
            raise BenchError(f"{name} did not start; see {ctx.path(name + '.stderr')}")
        await asyncio.sleep(0.05)
    return proc, sock


def _run_dir(ctx: Ctx, name: str) -> str:
    path = ctx.path(name)
    os.mkdir(path, 0o700)
    return path


def _host_keys(ctx: Ctx) -> dict[str, list[str]]:
    """Two host identities that trust each other (the sealed hand-over needs them):
    role -> the agent's flags.  Made once per run."""
    from agent.crypto import hostkey

    root = ctx.path("hostkeys")
    if not os.path.isdir(root):
        os.mkdir(root, 0o700)
        for role in ("src", "dst"):
            os.mkdir(os.path.join(root, f"{role}-trusted"), 0o755)
        for role in ("src", "dst"):
            public = hostkey.init(os.path.join(root, f"{role}.key"))
            other = "dst" if role == "src" else "src"
            with open(os.path.join(root, f"{other}-trusted", role), "w") as f:
                f.write(public + "\n")
    return {
        role: [
            "--migration-host-key",
            os.path.join(root, f"{role}.key"),
            "--migration-trusted-hosts",
            os.path.join(root, f"{role}-trusted"),
        ]
        for role in ("src", "dst")
    }


async def bench_idle(ctx: Ctx, reps: int) -> dict:
    owner_url = await ctx.owner(["bench"])
    sim, sim_path = await ctx.simulator("idle-sim")
    control = await qmp_client(sim_path)
    rss: list[int] = []
    pss: list[int] = []
    try:
        for i in range(reps):
            await control.execute("x-sim-reset")
            run_dir = _run_dir(ctx, f"idle-run{i}")
            proc = await ctx.spawn(
                f"idle-agent{i}",
                [
                    *ctx.keyagent,
                    "run",
                    "--qmp",
                    f"unix:{sim_path}",
                    "--owner-url",
                    owner_url,
                    "--vm-name",
                    "bench",
                    "--vm-run-dir",
                    run_dir,
                ],
            )
            try:
                await _wait_launched(ctx, proc, os.path.join(run_dir, "control.sock"), f"idle-agent{i}")
                await asyncio.sleep(1.0)
                r, p = rss_kb(proc.pid)
                rss.append(r)
                pss.append(p)
            finally:
                await ctx.stop(proc)
        await control.execute("x-sim-reset")
        floor_rss, floor_pss = await floor_idle_rss_kb(ctx, sim_path)
    finally:
        await close_client(control)
        await ctx.stop(sim)
    return {
        "idle_rss_mb": statistics.median(rss) / 1024,
        "details": {
            "rss_kb": rss,
            "pss_kb": pss,
            "pss_mb_p50": _r(statistics.median(pss) / 1024, 2),
            "floor_rss_mb": _r(floor_rss / 1024, 2),
            "floor_pss_mb": _r(floor_pss / 1024, 2),
        },
    }


# -- replay ------------------------------------------------------------------------------------


def generate_log(path: str, want_events: int) -> dict:
    """A valid event log of launch flows and migration flows, about ``want_events``
    inputs long, recorded the way the runtime records (event, then its actions)."""
    import base64

    from agent.app.eventlog import EventLog
    from agent.common.secret import Secret
    from agent.core.actions import PostOwner, SendQmp, WriteKeyDir
    from agent.core.events import Event, KeyDirReady, KeyProvided, OwnerReleased, QmpEvent, QmpReply, Start
    from agent.core.flow import Flow
    from agent.core.launch import LaunchParams, SevLaunchFlow
    from agent.core.migration import MigrationFlow, MigrationParams

    log = EventLog(path)
    log.write("start", version="bench", vm="bench")
    counts = {"events": 0, "actions": 0, "flows": 0}
    measure = base64.b64encode(os.urandom(48)).decode()
    header = base64.b64encode(os.urandom(52)).decode()
    sev = {
        "enabled": True,
        "api-major": 1,
        "api-minor": 55,
        "build-id": 21,
        "policy": 1,
        "state": "launch-secret",
        "handle": 1,
    }
    answers = {
        "query-status": {"status": "prelaunch", "singlestep": False, "running": False},
        "query-sev": sev,
        "query-sev-launch-measure": {"data": measure},
    }

    def feed(fid: str, flow, event, queue: list) -> None:
        log.event(fid, event)
        counts["events"] += 1
        for action in flow.handle(event):
            log.action(fid, action)
            counts["actions"] += 1
            queue.append(action)

    def drive(fid: str, flow, first: list) -> None:
        queue: list = []
        for event in first:
            feed(fid, flow, event, queue)
        while queue:
            action = queue.pop(0)
            if isinstance(action, SendQmp):
                feed(fid, flow, QmpReply(action.tag, answers.get(action.command, {})), queue)
            elif isinstance(action, PostOwner):
                feed(fid, flow, OwnerReleased(header, Secret(os.urandom(64))), queue)
            elif isinstance(action, WriteKeyDir):
                feed(fid, flow, KeyDirReady(action.name, f"/run/keyagent/bench/key-{fid}"), queue)
                for status in ("setup", "active", *["active"] * 8, "device", "completed"):
                    queue.append(QmpEvent("MIGRATION", {"status": status}))
            elif isinstance(action, QmpEvent):  # scheduled input, after the replies so far
                feed(fid, flow, action, queue)

    i = 0
    while counts["events"] < want_events:
        i += 1
        flow: Flow
        first: list[Event]
        if i % 10:
            fid, flow = f"launch-{i}", SevLaunchFlow(LaunchParams(vm=f"vm{i}"))
            first = [Start()]
        else:
            fid = f"migrate-{i}"
            flow = MigrationFlow(
                MigrationParams(
                    role="source", uri="tcp:10.0.0.2:4444", reply_to=f"ctl-{i}", creds_id=f"keyagent-tls-{fid}"
                )
            )
            first = [Start(), KeyProvided("psk", Secret(os.urandom(32)))]
        log.flow(fid, flow)
        counts["flows"] += 1
        drive(fid, flow, first)
    log.write("exit", code=0, reason="")
    log.close()
    counts["records"] = counts["events"] + counts["actions"] + counts["flows"] + 2
    return counts


async def bench_replay(ctx: Ctx, want_events: int) -> dict:
    """The figure counts every record the check goes through (the recorded
    events and the actions it re-computes and compares), per second of the
    whole ``keyagent replay --check`` process; the rate of recorded inputs
    alone and the process's CPU time are in the details."""
    import resource

    path = ctx.path("replay.jsonl")
    t0 = time.perf_counter()
    counts = generate_log(path, want_events)
    generate_s = time.perf_counter() - t0
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = await ctx.spawn("replay", [*ctx.keyagent, "replay", path, "--check"], stdout=subprocess.PIPE, track=False)
    out, _ = await proc.communicate()
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0 or b"replay check passed" not in out:
        raise BenchError(f"replay --check failed (exit {proc.returncode}); see {ctx.path('replay.stderr')}")
    page = ctx.path("replay.html")
    t0 = time.monotonic()
    html = await ctx.spawn("replay-html", [*ctx.keyagent, "replay", path, "--html", page], track=False)
    await html.wait()
    html_wall = time.monotonic() - t0
    if html.returncode != 0:
        raise BenchError(f"replay --html failed (exit {html.returncode}); see {ctx.path('replay-html.stderr')}")
    return {
        "replay_events_per_s": counts["records"] / wall,
        "replay_html_records_per_s": counts["records"] / html_wall,
        "details": {
            **counts,
            "log_mb": _r(os.path.getsize(path) / (1 << 20), 1),
            "html_s": _r(html_wall),
            "html_mb": _r(os.path.getsize(page) / (1 << 20), 1),
            "process_s": _r(wall),
            "process_cpu_s": _r(cpu),
            "inputs_per_s": round(counts["events"] / wall),
            "records_per_cpu_s": round(counts["records"] / cpu) if cpu else None,
            "generate_s": _r(generate_s),
            "summary": out.decode(errors="replace").strip(),
        },
    }


# -- migration on real QEMU -------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _qemu(ctx: Ctx, qemu: str, name: str, incoming: bool, fill: str | None = None) -> tuple[Any, str, str]:
    agent_sock, test_sock = ctx.path(f"{name}.qmp"), ctx.path(f"{name}-test.qmp")
    argv = [
        qemu,
        "-machine",
        "q35,accel=tcg",
        "-m",
        str(MIGRATION_RAM_MB),
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "none",
        "-qmp",
        f"unix:{agent_sock},server=on,wait=off",
        "-qmp",
        f"unix:{test_sock},server=on,wait=off",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    elif fill:
        argv += ["-device", f"loader,file={fill},addr=0x1000000,force-raw=on"]
    proc = await ctx.spawn(name, argv)
    deadline = time.monotonic() + 30
    while not (os.path.exists(agent_sock) and os.path.exists(test_sock)):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise BenchError(f"QEMU {name} did not start; see {ctx.path(name + '.stderr')}")
        await asyncio.sleep(0.02)
    return proc, agent_sock, test_sock


async def _ctl(sock: str, route: tuple[str, str], body: dict, timeout: float = 120) -> dict:
    """One control request (a route of agent.protocol.control) that must answer 200."""
    from agent.io.http import request_json

    method, path = route
    code, answer = await request_json(method, f"http://localhost{path}", body, timeout=timeout, unix_path=sock)
    if code != 200:
        raise BenchError(f"control {path}: HTTP {code} {answer}")
    return answer


async def _one_migration(ctx: Ctx, qemu: str, side: str, rep: int, fill: str | None) -> float:
    from agent.core.dhparams import ffdhe2048_pem
    from agent.protocol import control as wire
    from agent.tools.benchfloor import bare_migration

    procs = []
    try:
        src, src_sock, src_test = await _qemu(ctx, qemu, f"mig{rep}-{side}-src", False, fill)
        dst, dst_sock, dst_test = await _qemu(ctx, qemu, f"mig{rep}-{side}-dst", True)
        procs += [src, dst]
        for test_sock in (src_test, dst_test):
            client = await qmp_client(test_sock)
            await client.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
            await close_client(client)
        uri = f"tcp:127.0.0.1:{free_port()}"
        if side == "agent":
            socks = {}
            host_keys = _host_keys(ctx)
            for role, qmp in (("src", src_sock), ("dst", dst_sock)):
                run_dir = _run_dir(ctx, f"mig{rep}-{role}-run")
                name = f"mig{rep}-{role}-agent"
                proc, socks[role] = await start_migration_agent(
                    ctx, name, qmp, run_dir, host_keys[role], incoming=role == "dst"
                )
                procs.append(proc)
            # A key both hosts have (--psk-file), as the floor has: the same QMP
            # calls on both sides.  The sealed hand-over (prepare/begin) adds
            # Ed25519 signatures, HPKE and, in a fresh sidecar, cryptography's import
            # (~50 ms): it is timed on its own below, not inside the ratio.
            psk_file = ctx.path(f"mig{rep}.psk")
            fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, os.urandom(32))
            os.close(fd)
            ref = {"psk_ref": f"file:{psk_file}"}
            t0 = time.monotonic()
            await _ctl(socks["dst"], wire.MIGRATE_ACCEPT, {**ref, "uri": uri})
            await _ctl(socks["src"], wire.MIGRATE_START, {**ref, "uri": uri})
            s = (await _ctl(socks["src"], wire.MIGRATE_WAIT, {"timeout": 120}))["status"]
            d = (await _ctl(socks["dst"], wire.MIGRATE_WAIT, {"timeout": 120}))["status"]
            elapsed = time.monotonic() - t0
            status = s if s != "completed" else d
            t1 = time.monotonic()
            offer = (await _ctl(socks["dst"], wire.MIGRATE_PREPARE, {}))["offer"]
            await _ctl(socks["src"], wire.MIGRATE_BEGIN, {"offer": offer})
            ctx.handover_ms.append((time.monotonic() - t1) * 1000)
        else:
            src_c, dst_c = await qmp_client(src_sock), await qmp_client(dst_sock)
            key_root = _run_dir(ctx, f"mig{rep}-floor-keys")
            dh = ffdhe2048_pem().encode()
            try:
                t0 = time.monotonic()
                status = await asyncio.wait_for(bare_migration(src_c, dst_c, uri, key_root, dh), 120)
                elapsed = time.monotonic() - t0
            finally:
                await close_client(src_c)
                await close_client(dst_c)
        if status != "completed":
            raise BenchError(f"{side} migration {rep + 1} ended {status!r}; see {ctx.work}")
        return elapsed * 1000
    finally:
        for proc in reversed(procs):
            await ctx.stop(proc)


async def bench_migration(ctx: Ctx, reps: int, fill_mb: int) -> dict:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"skipped": "qemu-system-x86_64 is not installed"}
    from agent.core.dhparams import ffdhe2048_pem

    ffdhe2048_pem()  # computed once per process in both variants: not in either window
    fill = None
    if fill_mb:
        fill = ctx.path("guest-fill.bin")
        with open(fill, "wb") as f:
            for _ in range(fill_mb):
                f.write(os.urandom(1 << 20))
    samples: dict[str, list[float]] = {"agent": [], "floor": []}
    for rep in range(reps):
        for side in ("agent", "floor") if rep % 2 == 0 else ("floor", "agent"):
            samples[side].append(await _one_migration(ctx, qemu, side, rep, fill))
    agent, floor = samples["agent"], samples["floor"]
    added = [a - f for a, f in zip(agent, floor)]
    # Pairs run back to back: the median of their ratios is robust to the
    # machine's drift between pairs, which a few repetitions cannot average out.
    ratios = [a / f for a, f in zip(agent, floor)]
    return {
        "migration_ratio": statistics.median(ratios),
        "details": {
            "migrations_per_side": reps,
            "max_bandwidth": MIGRATION_BANDWIDTH,
            "ratio_of_medians": _r(statistics.median(agent) / statistics.median(floor)),
            "guest_ram_mb": MIGRATION_RAM_MB,
            "guest_fill_mb": fill_mb,
            "added_ms_p50": _r(statistics.median(added), 1),
            "sealed_handover_ms_p50": (_r(statistics.median(ctx.handover_ms), 1) if ctx.handover_ms else None),
            "agent_ms": [_r(x, 1) for x in agent],
            "floor_ms": [_r(x, 1) for x in floor],
            "agent_ms_p50": _r(statistics.median(agent), 1),
            "floor_ms_p50": _r(statistics.median(floor), 1),
        },
    }


# -- density --------------------------------------------------------------------------------


async def _resumed(client) -> None:
    async for event in client.events:
        if event.get("event") == "RESUME":
            return


async def bench_density(ctx: Ctx, n: int) -> dict:
    names = [f"d{i:03d}" for i in range(n)]
    owner_url = await ctx.owner(names)
    sims: list = []
    clients: list = []
    agents: list = []
    gate = asyncio.Semaphore(8)

    async def start_sim(name: str):
        async with gate:
            proc, path = await ctx.simulator(f"{name}-sim", name)
            client = await qmp_client(path)
            return proc, path, client

    try:
        started = await asyncio.gather(*(start_sim(name) for name in names), return_exceptions=True)
        ok = [item for item in started if not isinstance(item, BaseException)]
        for item in started:
            if isinstance(item, BaseException):
                for other in ok:
                    sims.append(other[0])
                    clients.append(other[2])
                raise item
        sims = [s[0] for s in ok]
        clients = [s[2] for s in ok]
        waits = [asyncio.ensure_future(_resumed(c)) for c in clients]
        # "At once": every sidecar waits in a shell on one pipe, and execs
        # keyagent when the pipe closes.  Spawning them one by one would
        # spread their starts over the seconds the first ones take.
        gate_r, gate_w = os.pipe()
        t_spawn = time.monotonic()
        try:
            for name, (_proc, path, _client) in zip(names, ok):
                run_dir = _run_dir(ctx, f"{name}-run")
                agents.append(
                    await ctx.spawn(
                        f"{name}-agent",
                        [
                            "/bin/sh",
                            "-c",
                            'read _; exec "$@" </dev/null',
                            "sh",
                            *ctx.keyagent,
                            "run",
                            "--qmp",
                            f"unix:{path}",
                            "--owner-url",
                            owner_url,
                            "--vm-name",
                            name,
                            "--vm-run-dir",
                            run_dir,
                        ],
                        stdin=gate_r,
                    )
                )
        finally:
            os.close(gate_r)
        spawned = time.monotonic() - t_spawn
        await asyncio.sleep(1.0)  # the shells are waiting, the simulators settled
        t0 = time.monotonic()
        os.close(gate_w)
        done, pending = await asyncio.wait(waits, timeout=max(120.0, n * 2.0))
        for w in pending:
            w.cancel()
        if pending:
            raise BenchError(f"{len(pending)} of {n} VMs were not resumed; see {ctx.work}")
        launch_ms, owner_ms, conts = [], [], []
        for name, client in zip(names, clients):
            rec = [c for c in await client.execute("x-sim-query-clients") if c["cont"] is not None]
            if len(rec) != 1:
                raise BenchError(f"{name}: no single client sent cont")
            launch_ms.append((rec[0]["cont"] - rec[0]["connected"]) * 1000)
            owner_ms.append((rec[0]["injected"] - rec[0]["measured"]) * 1000)
            conts.append(rec[0]["cont"])
        makespan = (max(conts) - t0) * 1000
        await asyncio.sleep(1.0)  # settle: every sidecar idle, control socket on
        rss = [rss_kb(a.pid) for a in agents]
        alive = sum(1 for a in agents if a.returncode is None)
    finally:
        await asyncio.gather(*(ctx.stop(a) for a in agents), return_exceptions=True)
        for client in clients:
            await close_client(client)
        await asyncio.gather(*(ctx.stop(s) for s in sims), return_exceptions=True)
    return {
        "density_launch_p99_ms": percentile(launch_ms, 99),
        "density_rss_mb_total": sum(r for r, _ in rss) / 1024,
        "details": {
            "vms": n,
            "alive_after_launch": alive,
            "launch_ms": {
                "p50": _r(statistics.median(launch_ms)),
                "p90": _r(percentile(launch_ms, 90)),
                "p99": _r(percentile(launch_ms, 99)),
                "max": _r(max(launch_ms)),
            },
            # measurement in hand -> packet injected: the owner's round trip
            "owner_round_trip_ms": {"p50": _r(statistics.median(owner_ms)), "p99": _r(percentile(owner_ms, 99))},
            "spawn_gated_ms": _r(spawned * 1000, 1),
            "exec_to_last_cont_ms": _r(makespan, 1),
            "pss_mb_total": _r(sum(p for _, p in rss) / 1024, 1),
            "rss_mb_per_sidecar_p50": _r(statistics.median(r for r, _ in rss) / 1024, 2),
        },
    }


# -- the run -----------------------------------------------------------------------------------


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(TARGETS)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TARGETS]
    if unknown:
        raise UsageError(f"--only: unknown figure {unknown[0]!r} (known: {', '.join(TARGETS)})")
    return keys


def _count(args, name: str, attr: str, minimum: int) -> int:
    value = getattr(args, attr)
    if value is None:
        value = (SMOKE if args.smoke else FULL)[name]
    if value < minimum:
        raise UsageError(f"--{attr.replace('_', '-')} must be at least {minimum}")
    return value


def met(key: str, value: float | None) -> bool | None:
    op, target, _ = TARGETS[key]
    if value is None or op is None or target is None:
        return None
    return value <= target if op == "<=" else value >= target


async def _run_all(ctx: Ctx, keys: list[str], counts: dict) -> tuple[dict, dict, dict, dict]:
    from agent.tools import bench_owner

    figures: dict[str, Any] = {k: None for k in TARGETS}
    details: dict[str, Any] = {}
    skipped: dict[str, str] = {k: "not selected (--only)" for k in TARGETS if k not in keys}
    errors: dict[str, str] = {}
    from agent.tools.bench_host import bench_host  # it imports this module: not at the top

    runners = {
        "launch": lambda: bench_launch(ctx, counts["launches"]),
        "idle": lambda: bench_idle(ctx, counts["idle"]),
        "replay": lambda: bench_replay(ctx, counts["replay_events"]),
        "migration": lambda: bench_migration(ctx, counts["migrations"], counts["migration_fill_mb"]),
        "migration_fixed": lambda: _bench_migration_fixed(ctx, counts["migrations"]),
        "density": lambda: bench_density(ctx, counts["density"]),
        "host": lambda: bench_host(ctx, counts["host"], counts["host_rounds"]),
        "owner": lambda: bench_owner.bench_owner_sqlite(ctx, counts["owner_releases"]),
        "owner_pg": lambda: bench_owner.bench_owner_postgresql(ctx, counts["owner_releases"]),
    }
    try:
        for group, members in GROUPS.items():
            if not any(k in keys for k in members):
                continue
            t0 = time.monotonic()
            try:
                result = await runners[group]()
            except BenchError as exc:
                for k in members:
                    errors[k] = exc.reason
                continue
            if "skipped" in result:
                for k in members:
                    skipped[k] = result["skipped"]
                continue
            for k in members:
                if k in keys:
                    figures[k] = result[k]
            details[group] = {**result.get("details", {}), "seconds": round(time.monotonic() - t0, 1)}
    finally:
        await ctx.stop_all()
    return figures, details, skipped, errors


def compile_agent() -> str:
    """Byte-compile the agent's modules where they lack a current ``.pyc``.

    An installed keyagent has them (pip compiles a wheel at install); a
    source checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (as this
    machine's environment sets) has none, and every sidecar would compile
    each of its ~60 modules from source at every start: about 35 ms of CPU,
    a cost of this checkout and not of the agent.  compileall writes only
    what is stale; a tree it cannot write is measured as it is.
    """
    import compileall

    import agent

    root = os.path.dirname(os.path.abspath(agent.__file__))
    try:
        ok = compileall.compile_dir(root, quiet=2)
    except OSError as exc:
        return f"not compiled: {exc.strerror}"
    return "compiled (as installed)" if ok else "not all compiled"


def run(args) -> int:
    from agent.common.logs import setup_logging

    setup_logging("error")
    keys = _selected(args.only)
    counts = {
        "launches": _count(args, "launches", "launches", 1),
        "density": _count(args, "density", "density", 1),
        "migrations": _count(args, "migrations", "migrations", 1),
        "replay_events": _count(args, "replay_events", "replay_events", 10),
        "idle": (SMOKE if args.smoke else FULL)["idle"],
        "host": {"full": 100, "smoke": 3}["smoke" if args.smoke else "full"],  # agent.tools.bench_host
        "host_rounds": {"full": 3, "smoke": 1}["smoke" if args.smoke else "full"],
        "owner_releases": (SMOKE if args.smoke else FULL)["owner_releases"],
        "migration_fill_mb": (
            args.migration_fill_mb
            if args.migration_fill_mb is not None
            else MIGRATION_FILL_MB["smoke" if args.smoke else "full"]
        ),
    }
    if not 0 <= counts["migration_fill_mb"] <= MIGRATION_RAM_MB - 32:
        raise UsageError(f"--migration-fill-mb must be 0..{MIGRATION_RAM_MB - 32}")
    # Short: unix socket paths are limited to 107 bytes.
    work = tempfile.mkdtemp(prefix="kab-", dir="/tmp")
    os.chmod(work, 0o700)
    began = datetime.datetime.now(datetime.UTC)
    machine = machine_info()
    machine["agent_bytecode"] = compile_agent()
    t0 = time.monotonic()
    ctx = Ctx(work=work, keyagent=keyagent_argv())
    errors: dict[str, str] = {"bench": "interrupted"}
    try:
        ctx.write_keys()
        figures, details, skipped, errors = asyncio.run(_run_all(ctx, keys, counts))
    finally:
        if not args.keep and not errors:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        **{k: (_r(v, 4) if isinstance(v, float) else v) for k, v in figures.items()},
        "targets_met": {k: met(k, figures[k]) for k in TARGETS},
        "targets": {k: (f"{op} {t:g}" if op else "report") for k, (op, t, _) in TARGETS.items()},
        "skipped": skipped,
        "errors": errors,
        "mode": "smoke" if args.smoke else "full",
        "counts": counts,
        "date": began.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.monotonic() - t0, 1),
        "machine": machine,
        "command": ctx.keyagent,
        "details": details,
    }
    if errors:
        report["work_dir"] = work
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 1 if errors else 0


async def _bench_migration_fixed(ctx: Ctx, reps: int) -> dict:
    from agent.tools.bench_migration import bench_migration_fixed

    return await bench_migration_fixed(ctx, reps)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_per_s"):
        return f"{value:,.0f}"
    if key.endswith("_ratio"):
        return f"{value:.3f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _notes(key: str, report: dict) -> str:
    d = report["details"]
    if key in report["skipped"]:
        return f"skipped: {report['skipped'][key]}"
    if key in report["errors"]:
        return f"failed: {report['errors'][key]}"
    if key in ("launch_ratio", "launch_added_ms_p50") and "launch" in d:
        x = d["launch"]
        return (
            f"agent {x['agent_ms']['p50']:.2f} ms / floor {x['floor_ms']['p50']:.2f} ms, "
            f"{x['launches_per_side']} launches each"
        )
    if key == "startup_ms" and "launch" in d:
        x = d["launch"]
        return (
            f"{x['startup_ms']['samples']} starts, p90 {x['startup_ms']['p90']:.0f} ms; floor (bare qemu.qmp "
            f"script) {x['floor_startup_ms']['p50']:.0f} ms; python -c pass {x['python_floor_ms']['pass']:.0f} ms, "
            f"import asyncio {x['python_floor_ms']['import_asyncio']:.0f} ms"
        )
    if key == "idle_rss_mb" and "idle" in d:
        x = d["idle"]
        return f"PSS {x['pss_mb_p50']:.1f} MB; floor (asyncio + qemu.qmp, connected, idle) {x['floor_rss_mb']:.1f} MB"
    if key == "replay_events_per_s" and "replay" in d:
        x = d["replay"]
        return (
            f"records/s: {x['records']:,} records ({x['events']:,} recorded events, "
            f"{x['actions']:,} actions) in {x['process_s']:.2f} s; recorded events alone "
            f"{x['inputs_per_s']:,}/s; {x['records_per_cpu_s']:,} records per CPU-second"
        )
    if key == "replay_html_records_per_s" and "replay" in d:
        x = d["replay"]
        return f"{x['records']:,} records drawn in {x['html_s']:.2f} s, a {x['html_mb']:.1f} MB page"
    if key == "migration_ratio" and "migration" in d:
        x = d["migration"]
        return (
            f"agent {x['agent_ms_p50']:.0f} ms / floor {x['floor_ms_p50']:.0f} ms "
            f"(+{x['added_ms_p50']:.0f} ms), {x['migrations_per_side']} each, guest "
            f"{x['guest_ram_mb']} MiB RAM with {x['guest_fill_mb']} MiB in use"
        )
    if key in GROUPS["host"] and "host" in d:
        from agent.tools.bench_host import notes

        return notes(key, d["host"])
    if key == "migration_fixed_ms" and "migration_fixed" in d:
        x = d["migration_fixed"]
        return (
            f"source {x['src_cpu_ms_p50']:.1f} + destination {x['dst_cpu_ms_p50']:.1f} ms CPU, "
            f"{x['migrations']} sealed migrations; wall outside QEMU's transfer {x['wall_outside_qemu_ms_p50']:.0f} ms"
        )
    if key.startswith("density") and "density" in d:
        x = d["density"]
        if key == "density_launch_p99_ms":
            return (
                f"{x['vms']} VMs exec'd at once: p50 {x['launch_ms']['p50']:.1f} ms, of "
                f"which owner round trip p50 {x['owner_round_trip_ms']['p50']:.1f} ms; "
                f"exec->last cont {x['exec_to_last_cont_ms']:.0f} ms"
            )
        return f"PSS total {x['pss_mb_total']:.0f} MB, {x['rss_mb_per_sidecar_p50']:.1f} MB each"
    group = "owner_pg" if key == "owner_secret_rps_postgresql" else "owner"
    if key.startswith("owner_") and group in d:
        x = d[group]
        return f"{x['releases']} releases by {x['clients']} clients: p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms"
    return ""


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"keyagent bench ({report['mode']}), {report['date']}, {m['nproc']} x {m['cpu']}, "
        f"{m['memory']}, Python {m['python']}, Linux {m['kernel']}, "
        f"load {' '.join(map(str, m['loadavg_at_start']))}",
        "",
        "| key | value | target | met | notes |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for key in TARGETS:
        ok = report["targets_met"][key]
        mark = "-" if ok is None else ("yes" if ok else "no")
        lines.append(
            f"| {key} | {_fmt(key, report[key])} | {report['targets'][key]} | {mark} | {_notes(key, report)} |"
        )
    return "\n".join(lines)
