"""``keyagent run``: the sidecar next to one QEMU process.

It connects to QEMU's monitor, sweeps stale key files from the run_dir,
starts the flows the configuration asks for (the SEV launch when ``[sev]``
is configured), serves the control socket, and exits:

* 1 as soon as a flow is refused or fails (the flow has already quit QEMU or
  left it paused, as ``on_refusal`` says);
* 0 when its work is done: after the launch if there is no control socket,
  otherwise when QEMU goes away (the sidecar lives as long as its VM);
* on SIGTERM/SIGINT: 0 if every flow had finished well, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import stat
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.app.config import Config
from agent.app.eventlog import EventLog
from agent.app.runtime import Runtime
from agent.common.errors import FlowFailed, KeyagentError, UsageError
from agent.common.logs import get_logger
from agent.core.actions import Finish
from agent.core.events import Event
from agent.core.flow import Flow
from agent.core.launch import LaunchParams, SevLaunchFlow
from agent.io import qmp as qmpio
from agent.io.monitor import Monitor
from agent.io.rundir import (
    RunDirLock,
    check_socket_length,
    check_socket_path,
    lock_run_dir,
    migration_key_dirs,
    prepare_run_dir,
    set_run_dir_group,
    sweep_stale_keys,
)

if TYPE_CHECKING:
    from agent.app.adopt import Found
    from agent.app.control import ControlServer
    from agent.app.flowhost import VerbTable
    from agent.app.verbs.migrate import MigrationControl
    from agent.app.verbs.secrets import SecretsControl
    from agent.app.vtpm import Vtpm
    from agent.io.rundir import RunDirLock

if TYPE_CHECKING:  # imported where used: an idle sidecar loads none of them
    from agent.app.control import ControlServer
    from agent.app.verbs.migrate import MigrationControl
    from agent.app.verbs.secrets import SecretsControl
    from agent.app.vtpm import Vtpm

QMP_CONNECT_TIMEOUT_S = 10.0


@dataclass
class SidecarOptions:
    qmp_path: str
    control_path: str | None
    event_log: str | None
    qmp_timeout: float = QMP_CONNECT_TIMEOUT_S
    incoming: bool = False  # QEMU runs with -incoming: its vTPM state arrives by migration
    # SIGTERM/SIGINT handlers belong to the process: ``keyagent host`` owns
    # them and calls Sidecar.stop() on each of its VMs instead.
    own_signals: bool = True
    # ``keyagent host``: the user keyring's keyagent:* keys as listed once for
    # every VM its scan starts (agent.io.keyring.sweep), so that each VM does
    # not list and describe the whole keyring again
    keyring_listing: list[tuple[int, str]] | None = None
    # ``keyagent host``: runs a VM's blocking set-up calls (its control socket)
    # on a worker thread, batched with the other VMs' (agent.app.offloop.OffLoop)
    off_loop: Any = None


def check_qmp_path(path: str) -> None:
    """Refuse at once what can never become a QMP socket (exit 2)."""
    check_socket_length(path, "QMP socket")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"QMP socket directory {parent} does not exist")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # QEMU may not have created it yet: connect() waits for it
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} is not a unix socket")


def check_host_keys(cfg: Config) -> None:
    """``[migration] host_key`` and ``trusted_hosts`` go together and must be usable (exit 2).

    Checked without ``cryptography`` (an idle sidecar does not load it); the
    verbs read both again when they use them.
    """
    key, trusted = cfg.migration_host_key, cfg.migration_trusted_hosts
    if (key is None) != (trusted is None):
        raise UsageError(
            "[migration] host_key and trusted_hosts go together (--migration-host-key, --migration-trusted-hosts)"
        )
    if key is None:
        return
    from agent.crypto import hostkey

    assert trusted is not None  # they go together
    try:
        hostkey.check_private(key)
        hostkey.load_trusted(trusted)
    except hostkey.HostKeyError as exc:
        raise UsageError(str(exc)) from None


class Sidecar:
    adopts = True  # takes over what a killed predecessor left in QEMU (agent.app.adopt)
    #: True where the agent's exit always ends its QEMU (``keyagent launch``):
    #: nothing it noted for a restarted agent can matter after it
    ends_with_its_vm = False

    def __init__(self, cfg: Config, opts: SidecarOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.log = get_logger("keyagent", vm=cfg.vm_name)
        self.done = asyncio.Event()
        self.exit_code = 0
        self.exit_reason = ""
        self.runtime: Runtime | None = None
        self.control: ControlServer | None = None
        self.migration: MigrationControl | None = None
        self.secrets: SecretsControl | None = None
        self.run_dir: str | None = None
        self.vtpm: Vtpm | None = None
        from agent.app.metrics import Metrics

        self.metrics = Metrics()
        self.tpm_args: list[str] = []
        self.incoming = getattr(opts, "incoming", False)
        self._stopping = False
        self._idle_preloaded = False  # preload_idle ran or is due: once per sidecar
        self._run_dir_lock: RunDirLock | None = None
        self.found: Found | None = None  # what a restarted agent found in QEMU (agent.app.adopt)
        self._attempt: asyncio.Future[Any] | None = None  # the monitor being opened (_unless_stopped)
        self.deferred_key_dirs: list[str] | None = None  # what the claim's sweep left for agent.app.adopt

    # -- policy: when is the sidecar done? ------------------------------------
    def _stays(self) -> bool:
        return self.control is not None

    def _on_finish(self, flow_id: str, fin: Finish) -> None:
        # Only the launch decides the sidecar's fate; a failed migration or
        # secret request is answered to its caller and the VM goes on.
        if flow_id == "launch" and fin.code != 0 and self.exit_code == 0:
            self.exit_code, self.exit_reason = fin.code, fin.reason
            self.done.set()
        if flow_id == "launch":
            self._schedule_preload_idle()
        self._maybe_done()

    def _maybe_done(self) -> None:
        rt = self.runtime
        if rt is None or rt.active():
            return
        if not self._stays() or rt.qmp_gone is not None:
            self.done.set()
        elif getattr(self.opts, "own_signals", True):  # idle from now on, maybe for the VM's whole life
            # (one sidecar per process; under `keyagent host` one trim per VM would trim the
            # whole process a hundred times in a burst)
            from agent.app.hardening import release_free_memory

            release_free_memory()

    async def _watch(self, rt: Runtime) -> None:
        await rt.watch_qmp()
        self.metrics.qmp_connected = False
        # Flows that were waiting get QmpDisconnected through the queue; once
        # they have finished, _on_finish ends the sidecar.  With none active:
        await asyncio.sleep(0)
        self._maybe_done()

    def _on_signal(self, signame: str) -> None:
        self.log.info("signal received, stopping", signal=signame)
        self.stop(signame)

    def stop(self, signame: str) -> None:
        """End the flows the way a signal does (QEMU is not touched; a launch
        not yet completed leaves the VM paused and makes the exit status 1)."""
        launch = self.runtime.flows.get("launch") if self.runtime is not None else None
        unfinished = (launch is not None and launch.finished is None) or (
            self.runtime is None and (self.cfg.sev_enabled or self.cfg.snp_enabled)
        )  # no monitor yet
        if unfinished and self.exit_code == 0:
            # The VM stays where it is (paused): never resumed without its secret.
            self.exit_code = 1
            self.exit_reason = f"stopped by {signame} before the launch completed"
        self.done.set()
        if self._attempt is not None:  # still waiting for the monitor (_unless_stopped)
            self._attempt.cancel()

    # -- hooks for other ways of running (``keyagent launch``, libvirt) ----------
    def check(self) -> None:
        """Refuse bad usage before anything is created (exit 2)."""
        check_qmp_path(self.opts.qmp_path)

    def preflight(self) -> None:
        """Every check that needs no I/O beyond looking: before anything is created.

        A control socket or swtpm socket that cannot be bound, a key file
        that is a FIFO, a group the socket cannot be given to: each is a
        one-line exit 2 here, not a traceback (or a half-made vTPM state)
        once the run_dir, the event log and swtpm exist.
        """
        cfg = self.cfg
        check_host_keys(cfg)
        if cfg.sev_enabled and not cfg.sev_owner_url:
            raise UsageError("[sev] owner_url (or --owner-url) is required for the SEV launch")
        run_dir = os.path.abspath(cfg.vm_run_dir) if cfg.vm_run_dir else None
        if self.opts.control_path:
            check_socket_path(self.opts.control_path, "control socket", run_dir)
            gid = cfg.control_gid
            if gid is not None and os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
                raise UsageError(
                    f"[control] gid {gid}: the control socket can only be given to a group we are in (or as root)"
                )
        if "vtpm" in cfg.sections_present or cfg.vtpm_state_dir is not None:
            from agent.app.vtpm import Vtpm

            if Vtpm.enabled(cfg):
                if not run_dir:
                    raise UsageError("[vtpm] needs [vm] run_dir for swtpm's control socket")
                Vtpm.from_config(cfg, run_dir).preflight()

    async def _unless_stopped(self, coro):
        """``await coro``, unless a signal stops the agent first: then cancel it
        and return None.  Waiting for QEMU's monitor can take ``--qmp-timeout``
        (a vTPM sidecar waits for QEMU to be started); SIGTERM acts at once:
        :meth:`stop` cancels the attempt (one task, no watcher of ``done``
        beside it: ``keyagent host`` starts 100 of these at once)."""
        if self.done.is_set():
            coro.close()
            return None
        task = asyncio.ensure_future(coro)
        self._attempt = task
        try:
            return await task
        except BaseException:
            me = asyncio.current_task()
            if self.done.is_set() and task.done() and (me is None or not me.cancelling()):
                return None  # stopped meanwhile: whatever the attempt ended with
            raise
        finally:
            self._attempt = None

    async def open_monitor(self, events: set[str]) -> Monitor:
        """Connect to QEMU's monitor (a QMP socket here; libvirt's, a launcher's own QEMU in subclasses)."""
        qmp = qmpio.QmpConnection(f"keyagent.{self.cfg.vm_name}", events=events)
        try:
            await qmp.connect(self.opts.qmp_path, self.opts.qmp_timeout)
        except BaseException:  # refused, timed out, or cancelled by a signal
            await qmp.close()
            raise
        self.log.info("QMP connected", qmp=self.opts.qmp_path, qemu=qmp.qemu_version)
        return qmp

    def sev_launch_flow(self, launched: str | None = None) -> SevLaunchFlow:
        """The SEV launch flow for this VM, as the sidecar and the launcher start it."""
        cfg = self.cfg
        return SevLaunchFlow(
            LaunchParams(
                vm=cfg.vm_name,
                timeout_s=cfg.sev_timeout_s,
                on_refusal=cfg.sev_on_refusal,
                # an MH VM arriving by migration: the owner gives it the source's key (docs/mh.md)
                migrating_from=cfg.vm_name if (self.incoming and cfg.sev_mh) else None,
                launched=launched,
            )
        )

    def start_flows(self, rt: Runtime) -> None:
        cfg = self.cfg
        if self.run_dir:
            from agent.app.verbs.secrets import SecretsControl

            self.secrets = SecretsControl(self)
            self.secrets.start(in_qemu=self.found.secret_ids if self.found is not None else None)
        if cfg.sev_enabled:
            launched = None
            if self.run_dir:  # a previous agent's note: a running VM may need nothing (docs/crash-only.md)
                from agent.app.resume_launch import read_launch_note

                launched = read_launch_note(self.run_dir)
            rt.start_flow("launch", self.sev_launch_flow(launched))
        elif cfg.snp_enabled:  # SEV-SNP: check the guest QEMU holds at -S, then cont (agent.core.snp_launch)
            from agent.core.snp_launch import SnpLaunchFlow, SnpLaunchParams

            rt.start_flow(
                "launch",
                SnpLaunchFlow(SnpLaunchParams(vm=cfg.vm_name, policy=cfg.snp_policy, timeout_s=cfg.snp_timeout_s)),
            )

    def preload(self) -> None:
        """Import, before QMP connects, what the flows need once it is up.

        An import after connecting sits inside the launch, on the VM's boot
        path (``keyagent bench``: h11 and the owner client were ~10 ms of a
        20 ms launch).  Only what this configuration uses: every module is
        RSS in every idle sidecar.
        """
        if self.cfg.sev_enabled:
            import agent.core.owner_answer  # noqa: F401
            import agent.io.owner_client  # noqa: F401
        if self.opts.control_path:
            import agent.app.control  # noqa: F401
        if self.run_dir:
            import agent.app.verbs.secrets  # noqa: F401
            import agent.io.keyring  # noqa: F401
        cfg = self.cfg
        if self.incoming and self.opts.control_path and cfg.migration_host_key and cfg.migration_trusted_hosts:
            # A VM that arrives by migration, with host keys: its agent will open a
            # sealed PSK (cryptography, ~10 ms to load) inside the migration, maybe
            # before it is ever idle (an SEV launch that waits for the migration).
            # Without host keys the PSK comes from a file: no cryptography.
            import agent.crypto.seal  # noqa: F401

    def _schedule_preload_idle(self) -> None:
        """:meth:`preload_idle`, next on the loop (not inside the callback that
        finished the launch), once: after the launch, or at start without one."""
        if self._idle_preloaded or self._stopping:
            return
        self._idle_preloaded = True
        asyncio.get_running_loop().call_soon(self._preload_idle_unless_stopping)

    def _preload_idle_unless_stopping(self) -> None:
        if not self._stopping and not self.done.is_set():
            self.preload_idle()

    def preload_idle(self) -> None:
        """Load, once the sidecar has started, what its first migration needs.

        With host keys (``[migration] host_key``) either side of a sealed
        migration may be asked for it; loading cryptography, cryptography's
        OpenSSL backend and OpenSSL's algorithms (``seal.warm``), the migrate
        verbs and the destination's DH parameters inside the first migration
        was ~20 ms of the agents' CPU (``keyagent bench``:
        ``migration_fixed_ms``).  Here it is after start-up (QMP negotiated,
        the launch done: neither ``startup_ms`` nor a VM's boot waits for
        it), when the sidecar has nothing to do until it is asked.  It costs
        ~9 MB of RSS in a sidecar with host keys; one without them and
        without ``--incoming`` loads nothing.  On the loop: this is bounded
        work (~10 ms) that no peer controls, and a request that comes
        meanwhile waits no longer than it would have inside the migration.
        """
        cfg = self.cfg
        host_keys = bool(cfg.migration_host_key and cfg.migration_trusted_hosts)
        if not self.opts.control_path or not (host_keys or self.incoming):
            return
        import agent.app.verbs.migrate  # noqa: F401
        from agent.core.dhparams import ffdhe2048_pem

        ffdhe2048_pem()  # a destination's dh-params.pem: computed once (~1 ms), then cached
        if host_keys:
            from agent.crypto import seal

            seal.warm()

    # The QMP events of flows this module does not import before one starts
    # (each is RSS in every idle sidecar); tests/app/test_sidecar.py checks
    # they are the flows' own.
    SNP_LAUNCH_EVENTS = frozenset({"RESUME", "SHUTDOWN"})  # agent.core.snp_launch.SnpLaunchFlow.wanted_events
    MIGRATION_EVENTS = frozenset({"MIGRATION", "SHUTDOWN"})  # agent.core.migration.MigrationFlow.wanted_events

    def wanted_events(self) -> set[str]:
        wanted = {"SHUTDOWN"} | (set(SevLaunchFlow.wanted_events) if self.cfg.sev_enabled else set())
        if self.cfg.snp_enabled:
            wanted |= self.SNP_LAUNCH_EVENTS
        if self.opts.control_path:
            wanted |= self.MIGRATION_EVENTS
        return wanted

    async def on_exit(self) -> None:
        """Called after the monitor is closed, before the exit record."""

    # -- the vTPM ------------------------------------------------------------------
    async def start_vtpm(self) -> None:
        """swtpm first: QEMU's -tpmdev connects to it when QEMU starts."""
        if "vtpm" not in self.cfg.sections_present and self.cfg.vtpm_state_dir is None:
            return  # Vtpm.enabled(), without loading agent.app.vtpm and agent.io.swtpm (~10 ms)
        from agent.app.vtpm import Vtpm

        if not Vtpm.enabled(self.cfg):
            return
        if not self.run_dir:
            raise UsageError("[vtpm] needs [vm] run_dir for swtpm's control socket")
        self.vtpm = Vtpm.from_config(self.cfg, self.run_dir)
        self.tpm_args = await self.vtpm.start(incoming=self.incoming, adopt=self.adopts)
        self.log.info("vTPM ready: start QEMU with these arguments", qemu_args=self.tpm_args)

    async def _supervise_vtpm(self) -> None:
        assert self.vtpm is not None  # started only when there is one
        status = await self.vtpm.wait()
        rt = self.runtime
        # swtpm --terminate exits when QEMU closes its socket, which may be a
        # moment before we see the monitor close: give QEMU's end a second.
        for _ in range(20):
            if self._stopping or rt is None or rt.qmp_gone is not None:
                return
            await asyncio.sleep(0.05)
        if self._stopping or self.done.is_set() or rt is None or rt.qmp_gone is not None:
            return  # swtpm followed QEMU out (--terminate), as it should
        self.log.error("swtpm died while QEMU runs: stopping QEMU", status=status)
        if self.exit_code == 0:  # status None: an adopted swtpm, not our child
            self.exit_code, self.exit_reason = 1, "swtpm exited" + ("" if status is None else f" with status {status}")
        await rt.command_outside_flows("quit")

    # -- the whole life -------------------------------------------------------
    async def run(self) -> int:
        """Run until done; the exit status may still change while shutting down."""
        await self._run()
        return self.exit_code

    async def _run(self) -> None:
        self.check()
        self.preflight()
        self.run_dir = None
        try:
            await self._run_locked()
        finally:
            if self._run_dir_lock is not None:
                self._run_dir_lock.release()
                self._run_dir_lock = None

    def _own_run_dir(self) -> None:
        """Create or check the run_dir, lock it for our life, set its group.

        Before the sweep: a second agent given the same run_dir stops here
        (exit 2) and touches nothing of the first's.
        """
        cfg = self.cfg
        assert cfg.vm_run_dir is not None  # called only with one
        self.run_dir = prepare_run_dir(cfg.vm_run_dir)
        self._run_dir_lock = lock_run_dir(self.run_dir)
        control = self.opts.control_path
        group = None
        if (
            cfg.control_gid is not None
            and control
            and os.path.commonpath([self.run_dir, os.path.abspath(control)]) == self.run_dir
        ):
            group = cfg.control_gid
            # The group may now enter the run_dir: whatever else appears in it
            # (QEMU's QMP socket under ``keyagent launch``, swtpm's sockets)
            # must not be open to that group by a lax umask.
            os.umask(0o077)
        set_run_dir_group(self._run_dir_lock, group)

    async def _run_locked(self) -> None:
        """The life after the run_dir is ours: each step below, then the exit."""
        self._claim_run_dir()
        event_log = self._open_event_log()
        try:
            await self.start_vtpm()
        except BaseException:
            event_log.close()
            raise
        loop = asyncio.get_running_loop()
        own_signals = getattr(self.opts, "own_signals", True)
        for sig in (signal.SIGTERM, signal.SIGINT) if own_signals else ():
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        tasks: list[asyncio.Task] = []
        qmp = None
        self.preload()
        try:
            qmp = await self._monitor_or_exit()
            if qmp is not None:
                await self._serve(qmp, event_log, tasks)
        except KeyagentError as exc:  # e.g. the control socket, in a race with preflight
            self.exit_code, self.exit_reason = exc.exit_code, exc.reason
            raise
        finally:
            self._stopping = True
            for sig in (signal.SIGTERM, signal.SIGINT) if own_signals else ():
                loop.remove_signal_handler(sig)
            await self._shut_down(qmp, tasks, event_log)

    async def _monitor_or_exit(self):
        """The monitor connection, or None when there is none to serve: it
        failed (exit 1, its reason) or a signal came first (_on_signal said how)."""
        try:
            return await self._unless_stopped(self.open_monitor(self.wanted_events()))
        except (qmpio.MonitorGone, FlowFailed) as exc:
            self.exit_code, self.exit_reason = 1, str(exc)
            return None

    async def _serve(self, qmp, event_log: EventLog, tasks: list[asyncio.Task]) -> None:
        """Run the flows and the control socket until done; ``tasks`` gets the
        loops started, for _shut_down to stop whatever happens."""
        rt = self._start_runtime(qmp, event_log)
        if self.adopts and self.run_dir:  # before any request or flow: agent.app.adopt
            from agent.app import adopt

            self.found = await adopt.take_over(self, qmp, event_log)
            adopt.start_migrations(self, self.found)  # before the control socket takes requests
        await self._start_control()
        tasks += self._start_tasks(rt)
        self.start_flows(rt)
        if "launch" not in rt.active():
            self._schedule_preload_idle()
        self._maybe_done()
        await self.done.wait()
        self._stopping = True
        await rt.drain_qmp()

    def _claim_run_dir(self) -> None:
        """Own the run_dir, check the control socket is free, and sweep what a
        previous agent left (key files, keyring keys) before making new ones."""
        cfg, opts = self.cfg, self.opts
        if cfg.vm_run_dir:
            self._own_run_dir()
        if opts.control_path:
            from agent.app.control import check_socket_free

            check_socket_free(opts.control_path)
        if self.run_dir:
            # A migration key dir may still be QEMU's: agent.app.adopt decides once QMP is up
            # (and has nothing left to sweep when there is none).
            self.deferred_key_dirs = migration_key_dirs(self.run_dir) if self.adopts else []
            removed = sweep_stale_keys(self.run_dir, keep=self.deferred_key_dirs)
            from agent.io import keyring

            removed += keyring.sweep(f"keyagent:{cfg.vm_name}:", listing=opts.keyring_listing)
            if removed:
                self.log.warning(
                    "swept stale key material left by a previous agent", run_dir=self.run_dir, removed=removed
                )

    def _open_event_log(self) -> EventLog:
        event_log = EventLog(self.opts.event_log)
        # The wall-clock time of this record, so a replay can say when each
        # step happened (the records' t counts from here, monotonic).
        event_log.write(
            "start",
            version=__version__,
            vm=self.cfg.vm_name,
            wall=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        )
        return event_log

    def _start_runtime(self, qmp: Monitor, event_log: EventLog) -> Runtime:
        """The runtime that runs the flows over this monitor connection."""
        cfg = self.cfg
        rt = self.runtime = Runtime(
            qmp=qmp,
            event_log=event_log,
            owner_url=cfg.sev_owner_url,
            owner_timeout=cfg.sev_timeout_s,
            on_finish=self._on_finish,
            log=self.log,
            run_dir=self.run_dir,
            metrics=self.metrics,
        )
        # ``keyagent host``: one loop for every VM, so the launch note is
        # written on a worker thread (Runtime._note_launched)
        rt.note_off_loop = self.opts.off_loop
        self.metrics.qmp_connected = True
        events = getattr(qmp, "events", None)
        self.metrics.events_dropped = lambda: getattr(events, "dropped", 0)
        return rt

    async def _start_control(self) -> None:
        """Serve the control socket, if there is one (after the runtime: the
        verbs need it)."""
        cfg, opts = self.cfg, self.opts
        if opts.control_path:
            from agent.app.control import ControlServer

            self.control = ControlServer(self, opts.control_path, gid=cfg.control_gid, ref_dirs=cfg.control_ref_dirs)
            # keyagent host: the socket's file-system calls on a worker thread, not on every VM's loop
            await self.control.start(off_loop=opts.off_loop)

    def _start_tasks(self, rt: Runtime) -> list[asyncio.Task]:
        """The runtime's loops, the monitor watcher and the swtpm supervisor."""
        tasks = [
            asyncio.ensure_future(rt.dispatch()),
            asyncio.ensure_future(rt.pump_qmp_events()),
            asyncio.ensure_future(self._watch(rt)),
        ]
        if self.vtpm is not None:
            tasks.append(asyncio.ensure_future(self._supervise_vtpm()))
        for task in tasks:
            task.add_done_callback(self._task_ended)
        return tasks

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """One of our loops raised (a bug: a flow step, an executor): stop,
        exit 1, rather than live on with nothing dispatching.  QEMU is left
        where it is (a VM still paused for its secret stays paused)."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        from agent.common.logs import scrub

        text = scrub(str(exc)).splitlines()
        reason = f"internal error: {type(exc).__name__}" + (f": {text[0]}" if text else "")
        self.log.error("an agent loop raised: stopping", reason=reason)
        if self.exit_code == 0:
            self.exit_code, self.exit_reason = 1, reason
        self.done.set()

    async def _shut_down(self, qmp: Monitor | None, tasks: list[asyncio.Task[Any]], event_log: EventLog) -> None:
        """Every exit path: stop the runtime, wipe keys, close the control
        socket and the monitor, stop swtpm, write the exit record."""
        log = self.log
        vm_gone = self.runtime is not None and self.runtime.qmp_gone is not None  # before we close it ourselves
        if self.runtime is not None:
            self.runtime.close()
        if self.adopts and self.run_dir and self.found is None:  # QEMU never asked: nothing is live
            sweep_stale_keys(self.run_dir)
        self.wipe_held_keys()
        if self.control is not None:
            await self.control.close()
        # Close QMP before cancelling the watcher: cancelling it inside
        # qemu.qmp's disconnect() would orphan qemu.qmp's own futures.
        if qmp is not None:
            await qmp.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.on_exit()
        if self.run_dir and (vm_gone or self.ends_with_its_vm):
            from agent.app.resume_launch import drop_launch_note

            drop_launch_note(self.run_dir)  # QEMU is gone: no running VM for it to speak of
        if self.vtpm is not None:
            await self.vtpm.stop()
        event_log.write("exit", code=self.exit_code, reason=self.exit_reason)
        event_log.close()
        if self.exit_code:
            log.error("keyagent exiting", code=self.exit_code, reason=self.exit_reason)
        else:
            log.info("keyagent exiting", code=0)

    def wipe_held_keys(self) -> None:
        """At exit: zero the key material this process still holds.

        The master key (the secret objects' keyid, alive as long as QEMU may
        take another secret), the one-time offer keys of pending hand-overs and
        a sealed PSK that no ``migrate start`` used.  Best effort: see the
        README for the copies Python and the libraries keep.
        """
        secrets, migration = self.secrets, self.migration
        if secrets is not None and secrets.master is not None:
            secrets.master.wipe()
        if migration is not None:
            migration.wipe()

    # -- FlowHost (agent.app.flowhost): all the control verbs see of us -------
    def _rt(self) -> Runtime:
        """The runtime: the control server (and so every verb) starts after it."""
        assert self.runtime is not None
        return self.runtime

    def start_flow(self, flow_id: str, flow: Flow) -> None:
        self._rt().start_flow(flow_id, flow)

    def feed(self, flow_id: str, event: Event) -> None:
        self._rt().feed(flow_id, event)

    def new_request(self) -> tuple[str, asyncio.Future[tuple[int, dict[str, Any]]]]:
        return self._rt().new_request()

    def finished(self, flow_id: str) -> Awaitable[None]:
        return self._rt().finished(flow_id)

    def flows(self) -> Mapping[str, Flow]:
        return MappingProxyType(self._rt().flows)

    def control_verbs(self) -> VerbTable:
        """(method, path) -> handler(args) for the control socket."""
        from agent.protocol import control as wire

        if self.migration is None:
            from agent.app.verbs.migrate import MigrationControl

            self.migration = MigrationControl(self)
        m, s = self.migration, self.secrets
        secrets: dict[tuple[str, str], Any] = (
            {} if s is None else {wire.SECRET_ADD: s.add, wire.SECRET_REMOVE: s.remove}
        )
        return {
            **secrets,
            wire.MIGRATE_PREPARE: m.prepare,
            wire.MIGRATE_BEGIN: m.begin,
            wire.MIGRATE_ACCEPT: m.accept,
            wire.MIGRATE_START: m.start,
            wire.MIGRATE_WAIT: m.wait,
            wire.MIGRATE_CANCEL: m.cancel,
            wire.MIGRATE_MH_TARGET: m.mh_target,
        }

    def status(self) -> dict:
        rt = self.runtime
        flows = {}
        if rt is not None:
            for fid, flow in rt.flows.items():
                entry = {"kind": flow.kind, "state": getattr(getattr(flow, "state", None), "value", None)}
                if flow.finished is not None:
                    entry["result"] = {"code": flow.finished.code, "reason": flow.finished.reason}
                flows[fid] = entry
        return {
            "vm": self.cfg.vm_name,
            "version": __version__,
            "qmp": "disconnected" if (rt is None or rt.qmp_gone is not None) else "connected",
            "flows": flows,
        }
