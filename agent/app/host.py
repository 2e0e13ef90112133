"""``keyagent host``: one agent process for every VM of a host.

Each ``*.toml`` in the configuration directory is one VM, configured as
``keyagent run --config`` reads it plus ``[vm] qmp = "unix:PATH"`` (or, with
``--libvirt``, ``[vm] domain = NAME``).  Each VM runs as a
:class:`~agent.app.sidecar.Sidecar`: the same object, the same code path as
``keyagent run``, with its run_dir lock, control socket
(``<run_dir>/control.sock``), event log (``<event-log-dir>/<vm>.jsonl``) and
stale-key sweep.  What belongs to the process is here instead: the signal
handlers (the sidecars are told ``own_signals=False``), the host's control
socket and its ``/metrics`` (every VM's counters with a ``vm`` label).

Why a poll and not inotify: no new dependency, and a listing of a directory
of a few hundred files twice a second costs microseconds.  A new file starts
its VM at the next poll; a removed file stops it (:meth:`Sidecar.stop`, which
never sends QEMU a command); a changed file is noticed only on SIGHUP, so an
editor's half-written file never restarts a VM.

Isolation: each VM's life is one task whose every exception ends there; the
VM is marked ``failed`` with a one-line reason and logged with its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.app.config import MAX_CONFIG_FILE, Config, load_config, unix_path
from agent.app.sidecar import QMP_CONNECT_TIMEOUT_S, Sidecar, SidecarOptions
from agent.common.errors import KeyagentError, UsageError
from agent.common.logs import get_logger, scrub
from agent.protocol import control as wire

POLL_S = 0.5
#: how long SIGTERM waits for every VM's shutdown (each has its own deadlines
#: inside: QMP drain 5 s, swtpm 5 s); what is still running then is cancelled
STOP_DEADLINE_S = 30.0
HOST_MAX_CONNECTIONS = 32
#: the cyclic collector's first threshold while a host runs (Python's is 700
#: allocations): launching 100 VMs at once makes tens of thousands of
#: short-lived containers (tasks, futures, coroutine frames, QMP messages)
#: that each collection of the young generation walks while they are still
#: alive; at 5000 it runs 7 times less often and most of them are gone by
#: then.  Measured (instructions of the host over 100 launches, callgrind):
#: the collector's share 4.9% -> 2.3%, the window's total -3%; 20000 did no
#: better (docs/hostbench.md, Session 5).  Garbage cycles wait longer, not
#: forever; a sidecar (one VM) keeps Python's default.
HOST_GC_THRESHOLD0 = 5000

#: the [vm] keys ``keyagent host`` reads itself (besides the schema's)
HOST_KEYS = (("vm", "qmp"), ("vm", "domain"), ("vm", "name"))


@dataclass
class HostOptions:
    config_dir: str
    control_path: str | None = None
    event_log_dir: str | None = None
    libvirt: str | None = None
    poll_s: float = POLL_S
    qmp_timeout: float = QMP_CONNECT_TIMEOUT_S


@dataclass
class Vm:
    """One configuration file and the sidecar running it."""

    file: str  # name in the config directory
    digest: bytes | None  # of the file's bytes as started, for SIGHUP
    name: str = ""
    state: wire.VmState = "starting"
    reason: str = ""
    code: int = 0
    sidecar: Sidecar | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    stopping: str | None = None  # why the host stops it: removed, changed, SIGTERM

    @property
    def ended(self) -> bool:
        return self.task is None or self.task.done()

    def entry(self) -> wire.VmEntry:
        flows: list[str] = []
        result: wire.VmResult | None = None
        rt = self.sidecar.runtime if self.sidecar is not None else None
        if rt is not None:
            for fid, flow in rt.flows.items():
                if flow.finished is None:
                    flows.append(fid)
                else:
                    result = {"flow": fid, "code": flow.finished.code, "reason": flow.finished.reason}
        if self.state in ("done", "failed", "stopped"):
            result = {"flow": None, "code": self.code, "reason": self.reason}
        return {
            "name": self.name,
            "config": self.file,
            "state": self.state,
            "flows": flows if not self.ended else [],
            "result": result,
        }


def check_host_args(opts: HostOptions) -> None:
    """Bad host arguments: one line, exit 2, before anything is created."""
    if not os.path.isdir(opts.config_dir):
        raise UsageError(f"--config-dir {opts.config_dir} is not a directory")
    if opts.event_log_dir is not None and not os.path.isdir(opts.event_log_dir):
        raise UsageError(f"--event-log-dir {opts.event_log_dir} is not a directory")
    if opts.control_path is not None:
        from agent.app.control import check_socket_free
        from agent.io.rundir import check_socket_path

        check_socket_path(opts.control_path, "control socket", None)
        check_socket_free(opts.control_path)
    if opts.libvirt is not None:
        if not opts.libvirt:
            raise UsageError("--libvirt needs a connection URI")
        from agent.io import libvirt_monitor

        libvirt_monitor.load_api()  # UsageError without libvirt-python


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _read(path: str) -> bytes | None:
    """The file's bytes, or None when it cannot be read (load_config then
    reads it itself and says why, in its own words)."""
    from agent.io.files import read_regular_file

    try:
        return read_regular_file(path, "config", MAX_CONFIG_FILE)
    except (OSError, UsageError):
        return None


def _digest(path: str, data: bytes | None = None) -> bytes | None:
    if data is None:
        data = _read(path)
    return None if data is None else hashlib.sha256(data).digest()


SidecarFactory = Callable[[Config, SidecarOptions, "dict[tuple[str, str], Any]"], Sidecar]


class Host:
    def __init__(self, opts: HostOptions, make_sidecar: SidecarFactory | None = None) -> None:
        self.opts = opts
        self.log = get_logger("keyagent.host")
        self.vms: dict[str, Vm] = {}
        self.make_sidecar = self._make_sidecar if make_sidecar is None else make_sidecar
        self.stopping = False
        self.scanned = False
        self._wake = asyncio.Event()
        self._hup = False
        # this scan's one listing of the keyring's keyagent: keys (_keyring_listing)
        self._keys: list[tuple[int, str]] | None = None
        # every VM's blocking set-up calls, batched on a worker thread (agent.app.offloop)
        from agent.app.offloop import OffLoop

        self._off_loop = OffLoop()

    # -- the directory ------------------------------------------------------------
    def files(self) -> list[str]:
        """The configuration files now in the directory, by name."""
        try:
            with os.scandir(self.opts.config_dir) as it:
                # is_file() follows links as os.path.isfile does, from what the listing
                # already knows where it can (no stat per file every poll)
                return sorted(
                    e.name for e in it if e.name.endswith(".toml") and not e.name.startswith(".") and _is_file(e)
                )
        except OSError as exc:
            self.log.error("cannot list the config directory", error=exc.strerror)
            return [name for name, vm in self.vms.items() if vm.stopping is None]

    def scan(self, reload: bool = False) -> None:
        """Start the VMs of new files, stop those of removed ones; with
        ``reload`` (SIGHUP), restart those whose file changed."""
        present = self.files()
        self._keys = None  # listed again, at most once, for the VMs this scan starts
        for file in sorted(set(self.vms) - set(present)):
            vm = self.vms[file]
            if vm.ended:
                del self.vms[file]
            elif vm.stopping is None:
                self._stop(vm, "removed")
        for file in present:
            known = self.vms.get(file)
            if known is None or (known.ended and known.stopping is not None):
                self._start(file)
            elif reload and _digest(self._path(file)) != known.digest:
                if known.ended:
                    self._start(file)
                elif known.stopping is None:
                    self._stop(known, "changed")
        self.scanned = True

    def _path(self, file: str) -> str:
        return os.path.join(self.opts.config_dir, file)

    # -- one VM -------------------------------------------------------------------
    def _start(self, file: str) -> None:
        path = self._path(file)
        data = _read(path)  # read once: its digest is of the bytes the VM is configured from
        vm = self.vms[file] = Vm(file=file, digest=_digest(path, data), name=file.removesuffix(".toml"))
        try:
            cfg, extras = self._load(file, data)
            vm.name = cfg.vm_name
            self._check_name_free(vm)
            opts = self._sidecar_options(cfg, extras)
            vm.sidecar = self.make_sidecar(cfg, opts, extras)
        except KeyagentError as exc:
            self._ended(vm, "failed", exc.exit_code, exc.reason)
            return
        except Exception as exc:  # a bug must not stop the host
            self._ended(vm, "failed", 1, _internal(exc))
            return
        self.log.info("VM starting", vm=vm.name, config=file)
        vm.task = asyncio.ensure_future(self._run_vm(vm))

    def _load(self, file: str, data: bytes | None = None) -> tuple[Config, dict[tuple[str, str], Any]]:
        extras: dict[tuple[str, str], Any] = dict.fromkeys(HOST_KEYS)
        cfg = load_config(self._path(file), None, extras, data=data)
        if extras[("vm", "name")] is None:  # no [vm] name: the file's name
            from agent.app.config import KEYS

            stem = file.removesuffix(".toml")
            check = KEYS[("vm", "name")].check
            problem = check(stem) if check is not None else None
            if problem:
                raise UsageError(f"{self._path(file)}: no [vm] name, and the file's name {problem}")
            cfg = dataclasses.replace(cfg, vm_name=stem)
        return cfg, extras

    def _check_name_free(self, vm: Vm) -> None:
        for other in self.vms.values():
            if other is not vm and other.name == vm.name and not other.ended:
                raise UsageError(f"VM name {vm.name} is already the VM of {other.file}")

    def _sidecar_options(self, cfg: Config, extras: dict[tuple[str, str], Any]) -> SidecarOptions:
        qmp, domain = extras[("vm", "qmp")], extras[("vm", "domain")]
        where = f"{cfg.source}:"
        if self.opts.libvirt is not None:
            if domain is None:
                raise UsageError(f"{where} [vm] domain is required with --libvirt")
            if qmp is not None:
                raise UsageError(f"{where} [vm] qmp is not for --libvirt (libvirt owns the monitor)")
            qmp_path = ""
        else:
            if domain is not None:
                raise UsageError(f"{where} [vm] domain is only for --libvirt")
            if qmp is None:
                raise UsageError(f'{where} [vm] qmp = "unix:PATH" is required')
            qmp_path = unix_path(qmp, f"{where} [vm] qmp")
            if not os.path.isabs(qmp_path):
                qmp_path = os.path.join(os.path.dirname(os.path.abspath(cfg.source or ".")), qmp_path)
        event_log = None
        if self.opts.event_log_dir is not None:
            event_log = os.path.join(self.opts.event_log_dir, f"{cfg.vm_name}.jsonl")
        return SidecarOptions(
            keyring_listing=self._keyring_listing() if cfg.vm_run_dir else None,
            qmp_path=qmp_path,
            control_path=os.path.join(cfg.vm_run_dir, "control.sock") if cfg.vm_run_dir else None,
            event_log=event_log,
            qmp_timeout=self.opts.qmp_timeout,
            own_signals=False,
            off_loop=self._off_loop,
        )

    def _keyring_listing(self) -> list[tuple[int, str]]:
        """The user keyring's ``keyagent:`` keys, listed once per scan for
        every VM it starts (each VM's stale-key sweep takes its own from it).
        Keys a VM adds later are its own, made after its sweep; a VM whose
        file changed starts only once its old VM has ended and removed its
        keys, so one listing per scan sees what a listing per VM would."""
        if self._keys is None:
            from agent.io import keyring

            self._keys = keyring.find("keyagent:")
        return self._keys

    def _make_sidecar(self, cfg: Config, opts: SidecarOptions, extras: dict[tuple[str, str], Any]) -> Sidecar:
        if self.opts.libvirt is None:
            return Sidecar(cfg, opts)
        from agent.app.libvirt_sidecar import LibvirtSidecar

        return LibvirtSidecar(cfg, opts, self.opts.libvirt, str(extras[("vm", "domain")]))

    async def _run_vm(self, vm: Vm) -> None:
        """One VM's whole life; nothing it raises leaves this task."""
        sidecar = vm.sidecar
        assert sidecar is not None  # set before the task starts
        vm.state = "running"
        try:
            code = await sidecar.run()
        except asyncio.CancelledError:
            self._ended(vm, "stopped", 1, "cancelled: its shutdown took too long")
            raise
        except KeyagentError as exc:
            self._ended(vm, "stopped" if vm.stopping else "failed", exc.exit_code, exc.reason)
            return
        except Exception as exc:
            self._ended(vm, "failed", 1, _internal(exc))
            return
        finally:
            self._wake.set()
        reason = sidecar.exit_reason
        rt = sidecar.runtime
        if vm.stopping is not None:
            self._ended(vm, "stopped", code, f"{vm.stopping}" + (f": {reason}" if reason else ""))
        elif code != 0:
            self._ended(vm, "failed", code, reason or f"exit status {code}")
        elif rt is not None and rt.qmp_gone is not None:
            self._ended(vm, "failed", 1, f"QEMU went away: {rt.qmp_gone}")
        else:
            self._ended(vm, "done", 0, reason or "flows completed")

    def _ended(self, vm: Vm, state: wire.VmState, code: int, reason: str) -> None:
        vm.state, vm.code, vm.reason = state, code, reason
        if state == "failed":
            self.log.error("VM failed", vm=vm.name, config=vm.file, reason=reason)
        else:
            self.log.info("VM ended", vm=vm.name, state=state, reason=reason)

    def _stop(self, vm: Vm, why: str) -> None:
        vm.stopping = why
        self.log.info("VM stopping", vm=vm.name, why=why)
        if vm.sidecar is not None:
            vm.sidecar.stop(why)

    # -- the process ----------------------------------------------------------------
    def on_signal(self, signame: str) -> None:
        if signame == "SIGHUP":
            self.log.info("SIGHUP: reading changed configuration files")
            self._hup = True
            self._wake.set()
            return
        self.log.info("signal received, stopping every VM", signal=signame)
        self.stopping = True
        self._wake.set()

    @staticmethod
    def preload() -> None:
        """Import, before the first VM, what nearly every VM's flows import
        lazily (the sidecar's preload(), for any configuration but a sealed
        migration's cryptography; the configuration parser, the start-up
        inspection and the launch note): otherwise the first VMs of a batch
        pay for 30-odd modules inside their launches (``keyagent bench``'s
        host keys, docs/hostbench.md)."""
        import concurrent.futures.thread  # noqa: F401  (the launch note's fsync: agent.app.resume_launch)
        import tomllib  # noqa: F401  (every VM's file)

        import agent.app.adopt  # noqa: F401
        import agent.app.control  # noqa: F401
        import agent.app.metrics  # noqa: F401
        import agent.app.resume_launch  # noqa: F401
        import agent.app.verbs.migrate  # noqa: F401
        import agent.app.verbs.secrets  # noqa: F401
        import agent.core.migration  # noqa: F401
        import agent.core.owner_answer  # noqa: F401
        import agent.io.files  # noqa: F401
        import agent.io.keyring  # noqa: F401
        import agent.io.owner_client  # noqa: F401

    async def run(self) -> int:
        with _young_generation(HOST_GC_THRESHOLD0):
            return await self._run()

    async def _run(self) -> int:
        self.preload()
        loop = asyncio.get_running_loop()
        _start_workers(loop)
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in sigs:
            loop.add_signal_handler(sig, self.on_signal, sig.name)
        server = None
        try:
            if self.opts.control_path is not None:
                server = await self._serve_control(self.opts.control_path)
            self.log.info("keyagent host running", config_dir=self.opts.config_dir)
            try:
                await self._poll()
            finally:  # after SIGTERM, and after a bug of the host's own: every VM ends as a sidecar would
                await self.stop_all("SIGTERM")
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)
            if server is not None:
                await server.close()
        self.log.info("keyagent host exiting", code=0)
        return 0

    async def _poll(self) -> None:
        while not self.stopping:
            reload, self._hup = self._hup, False
            self.scan(reload=reload)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.opts.poll_s)
            except TimeoutError:
                pass

    async def stop_all(self, why: str) -> None:
        """End every VM's flows the way a sidecar ends on ``why``."""
        for vm in self.vms.values():
            if not vm.ended and vm.stopping is None:
                self._stop(vm, why)
        tasks = [vm.task for vm in self.vms.values() if vm.task is not None and not vm.task.done()]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=STOP_DEADLINE_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    # -- the host's control socket ----------------------------------------------
    async def _serve_control(self, path: str):
        from agent.app.control import peer_check
        from agent.io.http import HttpError, HttpServer

        server = HttpServer(
            self.handle, allow_peer=peer_check(None), max_body=4096, max_connections=HOST_MAX_CONNECTIONS
        )
        try:
            await server.start_unix(path, mode=0o600)
        except HttpError as exc:
            raise UsageError(f"control socket: {exc}") from None
        except OSError as exc:
            raise UsageError(f"cannot listen on control socket {path}: {exc.strerror or type(exc).__name__}") from None
        return _UnlinkOnClose(server, path)

    def vms_answer(self) -> dict[str, Any]:
        return wire.vms_body([vm.entry() for _, vm in sorted(self.vms.items())])

    def metrics_source(self):
        latest: dict[str, Any] = {}  # one VM per name: a name's running VM over its ended one
        for vm in self.vms.values():
            if vm.sidecar is not None and (vm.name not in latest or not vm.ended):
                latest[vm.name] = vm.sidecar.metrics
        per_vm = sorted(latest.items())
        states: dict[str, int] = dict.fromkeys(wire.vm_states(), 0)
        for vm in self.vms.values():
            states[vm.state] += 1
        return per_vm, states

    async def handle(self, request):
        from agent.io.http import Response

        route = (request.method, request.path.split("?", 1)[0])
        if route == wire.HEALTHZ:
            return Response.json(200, wire.health_body())
        if route == wire.READYZ:
            return Response.json(*wire.ready_answer(self.scanned and not self.stopping))
        if route == wire.VMS:
            return Response.json(200, self.vms_answer())
        if route == wire.METRICS:
            from agent.app.metrics import HostMetrics

            body, content_type = HostMetrics(self.metrics_source).render()
            return Response(200, body, content_type)
        return Response.json(404, wire.not_found(request.method, route[1]))


class _UnlinkOnClose:
    def __init__(self, server, path: str) -> None:
        self.server, self.path = server, path

    async def close(self) -> None:
        from agent.app.control import close_and_unlink

        await close_and_unlink(self.server, self.path)


@contextlib.contextmanager
def _young_generation(threshold0: int) -> Iterator[None]:
    """The collector's first threshold at ``threshold0`` while the host runs,
    Python's own again after (tests run hosts inside the test process)."""
    before = gc.get_threshold()
    gc.set_threshold(threshold0, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _start_workers(loop: asyncio.AbstractEventLoop) -> None:
    """The worker threads of the VMs' blocking calls (agent.app.offloop: their
    notes, their control sockets), all started now, before any VM: the
    executor starts a thread at a call that finds none idle, and the loop
    waits for it to run (0.3-0.6 ms under load), inside a batch of launches.
    As many as asyncio's default executor would start (cores + 4)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    workers = min(32, (os.cpu_count() or 1) + 4)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keyagent-host")
    started = threading.Barrier(workers)
    for _ in range(workers):  # each waits for the others: no idle thread, so each call starts one
        pool.submit(started.wait, 5.0)
    loop.set_default_executor(pool)


def _internal(exc: BaseException) -> str:
    """A one-line reason for an exception nobody expected (scrubbed: it is
    text we do not control)."""
    text = scrub(str(exc)).splitlines()
    return f"internal error: {type(exc).__name__}" + (f": {text[0]}" if text else "")
