"""``keyagent launch``: the container entrypoint that starts QEMU itself.

It is the sidecar (same flows, same control socket) plus QEMU's life:

* QEMU's argv gets ``-S`` (if missing: nothing runs before the agent is
  attached) and a QMP socket in the run_dir;
* the per-VM master key goes on QEMU's command line as ``-object
  secret,file=...`` in a fresh 0700 key directory, deleted as soon as the
  monitor answers (QEMU read it at start);
* the VM is resumed by the SEV flow after attestation, or, without SEV,
  right away unless the user asked for ``-S``;
* SIGTERM/SIGINT: ``system_powerdown``, then ``quit`` after
  ``[launch] shutdown_grace_s``; a second signal quits at once;
* QEMU's stderr is relayed as log lines; a QEMU that dies before its
  monitor answers is reported with its own last error line;
* as PID 1 it reaps orphans; it exits with QEMU's status (1 if a flow was
  refused, 128+N if QEMU died of signal N).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections import deque
from typing import TYPE_CHECKING

from agent.app.config import Config
from agent.app.runtime import Runtime
from agent.app.sidecar import Sidecar, SidecarOptions
from agent.common.errors import UsageError
from agent.common.secret import Secret
from agent.core.resume import ResumeFlow, ResumeParams
from agent.io import qmp as qmpio
from agent.io.monitor import Monitor
from agent.io.rundir import check_socket_path, make_key_dir, remove_key_dir, write_key_file

if TYPE_CHECKING:
    from agent.app.snp_launch import SnpLaunch

QMP_SOCKET = "qmp.sock"
MASTER_ID = "keyagent-master"
KILL_AFTER_QUIT_S = 10.0


def prepare_argv(argv: list[str], qmp_path: str) -> tuple[list[str], bool]:
    """-> (argv with -S and our QMP socket, whether the user asked for -S)."""
    if not argv:
        raise UsageError("launch needs a QEMU command after --")
    if shutil.which(argv[0]) is None and not os.path.isfile(argv[0]):
        raise UsageError(f"QEMU binary {argv[0]!r} not found")
    user_stopped = "-S" in argv[1:]
    out = list(argv)
    if not user_stopped:
        out.append("-S")
    out += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    return out, user_stopped


class Launcher(Sidecar):
    adopts = False  # its QEMU is new: nothing to take over (agent.app.adopt)
    ends_with_its_vm = True  # on_exit stops QEMU

    def __init__(self, cfg: Config, opts: SidecarOptions, qemu_argv: list[str]) -> None:
        super().__init__(cfg, opts)
        self.qemu_argv = qemu_argv
        self.incoming = "-incoming" in qemu_argv[1:]
        self.qemu: subprocess.Popen | None = None
        self.qemu_lines: deque[str] = deque(maxlen=20)
        self.user_stopped = False
        self.master: Secret | None = None
        self._master_dir: str | None = None
        self._session_dir: str | None = None
        self._signals = 0
        self._stderr_task: asyncio.Task | None = None
        self._qemu_done = asyncio.Event()
        self.snp: SnpLaunch | None = None  # set by check() with [snp]

    def check(self) -> None:
        if not self.cfg.vm_run_dir:
            raise UsageError("keyagent launch needs [vm] run_dir (or --vm-run-dir)")
        prepare_argv(self.qemu_argv, "")  # the QEMU binary must exist
        if self.cfg.snp_enabled:  # SEV-SNP: checked now, before anything is created (agent.app.snp_launch)
            from agent.app.snp_launch import refuse_own_sev_objects, snp_launch_from_config

            refuse_own_sev_objects(self.qemu_argv)
            self.snp = snp_launch_from_config(self.cfg)
        check_socket_path(
            os.path.join(os.path.abspath(self.cfg.vm_run_dir), QMP_SOCKET), "QMP socket", self.cfg.vm_run_dir
        )

    # -- starting QEMU -------------------------------------------------------------
    async def open_monitor(self, events: set[str]) -> Monitor:
        """Start QEMU with the master key (and any launch session) as files it
        reads at start, and connect to its monitor; the files are gone
        whatever happens."""
        qmp_path = os.path.join(self._own_dir(), QMP_SOCKET)
        self.opts.qmp_path = qmp_path
        argv, self.user_stopped = prepare_argv(self.qemu_argv, qmp_path)
        await self._launch_session(argv)
        argv += ["-object", f"secret,id={MASTER_ID},file={self._write_master_key()},format=raw", *self.tpm_args]
        if self.snp is not None:
            from agent.app.snp_launch import snp_qemu_args

            argv += snp_qemu_args(self.snp)
        self._start_qemu(argv)
        qmp = qmpio.QmpConnection(f"keyagent.{self.cfg.vm_name}", events=events)
        try:
            await self._connect_unless_qemu_dies(qmp, qmp_path)
        finally:
            # QEMU read the master key when it created the object at start;
            # on every other path it is not needed any more either.
            self._drop_master_file()
        self.log.info("QMP connected", qmp=qmp_path, qemu=qmp.qemu_version)
        return qmp

    def _own_dir(self) -> str:
        """The run_dir, ours by now (``_claim_run_dir`` comes first)."""
        assert self.run_dir is not None
        return self.run_dir

    def _write_master_key(self) -> str:
        """A fresh master key for the secret objects, as a 0600 file for QEMU."""
        self.master = Secret(os.urandom(32))
        self._master_dir = make_key_dir(self._own_dir(), "master")
        with self.master.view() as raw:
            return write_key_file(self._master_dir, "master.key", raw)

    def _start_qemu(self, argv: list[str]) -> None:
        """QEMU in its own session (signals are ours to handle), its stderr relayed."""
        self.log.info("starting QEMU", argv0=argv[0], args=len(argv) - 1)
        try:
            self.qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True, start_new_session=True
            )
        except OSError as exc:
            self._drop_master_file()
            raise qmpio.MonitorGone(f"cannot start QEMU: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        self._stderr_task = asyncio.ensure_future(self._relay_stderr(loop))
        asyncio.ensure_future(self._wait_qemu(loop))

    async def _connect_unless_qemu_dies(self, qmp: qmpio.QmpConnection, qmp_path: str) -> None:
        """Connect (30 s at most) or fail with QEMU's last words if it exits first."""
        connect = asyncio.ensure_future(qmp.connect(qmp_path, 30.0))
        died = asyncio.ensure_future(self._qemu_done.wait())
        try:
            await asyncio.wait({connect, died}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # a signal before the monitor answered
            died.cancel()
            connect.cancel()
            await asyncio.gather(connect, return_exceptions=True)
            await qmp.close()
            raise  # on_exit stops QEMU
        if not connect.done():
            connect.cancel()
            await asyncio.gather(connect, return_exceptions=True)
            await qmp.close()
            self._drop_master_file()
            assert self._stderr_task is not None and self.qemu is not None
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 5)
            last = next((line for line in reversed(self.qemu_lines) if line.strip()), "")
            raise qmpio.MonitorGone(f"QEMU failed to start (exit {self.qemu.returncode}): {last or 'no error text'}")
        died.cancel()
        connect.result()  # MonitorGone: the caller drops the key files

    async def _launch_session(self, argv: list[str]) -> None:
        """SEV with ``[sev] pdh``: the owner's launch session, as files QEMU reads."""
        from agent.app import launch_session as ls

        cfg = self.cfg
        index = ls.find_sev_object(argv)
        if not cfg.sev_enabled or not cfg.sev_pdh or index is None:
            return
        assert cfg.sev_owner_url is not None and self.run_dir is not None  # preflight, check()
        godh, session = await ls.fetch_session(
            cfg.sev_owner_url,
            cfg.vm_name,
            cfg.sev_pdh,
            cfg.sev_cert_chain,
            ls.sev_policy(argv[index]),
            cfg.sev_timeout_s,
            cek_path=cfg.sev_cek,
        )
        self._session_dir = make_key_dir(self._own_dir(), "session")
        godh_path = write_key_file(self._session_dir, "godh.b64", godh)
        session_path = write_key_file(self._session_dir, "session.b64", session)
        argv[index] = ls.with_session_files(argv[index], godh_path, session_path)
        self.log.info("launch session from the guest owner written for QEMU", dir=self._session_dir)

    def _drop_master_file(self) -> None:
        """Launch material QEMU read at start: the master key and the SEV session."""
        for attr in ("_master_dir", "_session_dir"):
            path = getattr(self, attr, None)
            if path is not None:
                remove_key_dir(path)
                setattr(self, attr, None)

    async def _relay_stderr(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.qemu is not None  # started before this task
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.qemu.stderr)
        try:
            while line := await reader.readline():
                text = line.decode(errors="replace").rstrip()
                self.qemu_lines.append(text)
                self.log.warning("qemu", line=text)
        finally:
            transport.close()

    async def _wait_qemu(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.qemu is not None  # started before this task
        await loop.run_in_executor(None, self.qemu.wait)
        self._qemu_done.set()

    def start_flows(self, rt: Runtime) -> None:
        from agent.app.verbs.secrets import SecretsControl

        self.secrets = SecretsControl(self)
        self.secrets.start(master=self.master)
        cfg = self.cfg
        if self.snp is not None:
            from agent.core.snp_launch import SnpLaunchFlow, SnpLaunchParams

            rt.start_flow(
                "launch",
                SnpLaunchFlow(SnpLaunchParams(vm=cfg.vm_name, policy=self.snp.policy, timeout_s=cfg.snp_timeout_s)),
            )
        elif cfg.sev_enabled:  # its QEMU is new: no launch note to read
            rt.start_flow("launch", self.sev_launch_flow())
        elif not self.user_stopped:
            rt.start_flow("resume", ResumeFlow(ResumeParams(vm=cfg.vm_name)))

    def _stays(self) -> bool:
        return True  # the launcher lives as long as its QEMU

    def children(self) -> set[int]:
        """Our own children (QEMU, swtpm): their statuses are awaited elsewhere."""
        pids = set()
        if self.qemu is not None:
            pids.add(self.qemu.pid)
        if self.vtpm is not None and self.vtpm.process is not None:
            pids.add(self.vtpm.process.pid)
        return pids

    # -- stopping -----------------------------------------------------------------
    def _on_signal(self, signame: str) -> None:
        self._signals += 1
        rt = self.runtime
        if rt is None or rt.qmp is None or rt.qmp_gone is not None:
            super()._on_signal(signame)
            return
        if self._signals == 1:
            grace = self.cfg.launch_shutdown_grace_s
            self.log.info("signal received: powering the VM down", signal=signame, grace_s=grace)
            asyncio.ensure_future(self._shutdown(grace))
        else:
            self.log.info("second signal: quitting QEMU now", signal=signame)
            asyncio.ensure_future(self._quit())

    async def _shutdown(self, grace: float) -> None:
        await self._rt().command_outside_flows("system_powerdown")
        try:
            await asyncio.wait_for(self._qemu_done.wait(), grace)
        except TimeoutError:
            self.log.info("grace period over: quitting QEMU", grace_s=grace)
            await self._quit()

    async def _quit(self) -> None:
        await self._rt().command_outside_flows("quit")

    async def on_exit(self) -> None:
        self._drop_master_file()
        if self.qemu is None:
            return

        if self.qemu.poll() is None and (self.runtime is None or self.runtime.qmp_gone is None):
            # We are leaving while QEMU lives (a refused launch that left it
            # paused, a failure, a signal before its monitor answered): an
            # entrypoint does not leave QEMU behind.
            self.qemu.terminate()  # the monitor is closed by now: SIGTERM is what is left
        try:
            await asyncio.wait_for(self._qemu_done.wait(), KILL_AFTER_QUIT_S)
        except TimeoutError:
            self.log.warning("QEMU did not exit: killing it")
            self.qemu.kill()
            await self._qemu_done.wait()
        if self._stderr_task is not None:
            await asyncio.gather(self._stderr_task, return_exceptions=True)
        try:
            os.unlink(self.opts.qmp_path)  # ours; a killed QEMU leaves it behind
        except OSError:
            pass
        status = self.qemu.returncode
        code = 128 - status if status < 0 else status
        self.log.info("QEMU exited", status=code)
        if self.exit_code == 0:
            self.exit_code = code
            if code:
                last = next((ln for ln in reversed(self.qemu_lines) if ln.strip()), "")
                self.exit_reason = f"QEMU exited with status {code}" + (f": {last}" if last else "")


class ChildReaper:
    """As PID 1, reap orphans that were re-parented to us (never our own children:
    their statuses belong to whoever waits for them).

    ``own`` names QEMU and swtpm, but not the short-lived children asyncio
    waits for (swtpm_setup).  So a zombie is reaped only when it still is one
    AGE_S after it was first seen: its waiter would have had it long before.
    Reaping at first sight raced asyncio's watcher, which then reported 255
    ("Unknown child process"): swtpm_setup "failed" in the entrypoint image.
    """

    AGE_S = 1.0

    def __init__(self, own) -> None:
        self.own = own  # () -> the pids whose statuses others wait for
        self._seen: dict[int, float] = {}  # zombie pid -> when first seen
        self._again: asyncio.TimerHandle | None = None

    def _zombies(self) -> set[int]:
        me = os.getpid()
        own = self.own()
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid in own:
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                found.add(pid)
        return found

    def reap(self) -> None:
        now = time.monotonic()
        self._seen = {pid: self._seen.get(pid, now) for pid in self._zombies()}
        for pid, since in list(self._seen.items()):
            if now - since >= self.AGE_S:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                del self._seen[pid]
        if self._seen and self._again is None:
            self._again = asyncio.get_running_loop().call_later(self.AGE_S, self._look_again)

    def _look_again(self) -> None:
        self._again = None
        self.reap()
