"""The vTPM of one VM: the ``[vtpm]`` settings turned into a running swtpm.

The sidecar/launcher uses this and nothing lower: ``start()`` resolves the
key reference, creates the state encrypted on the first start (``swtpm_setup``)
or refuses a state that is not encrypted, starts swtpm with the key on pipes
and returns QEMU's ``-chardev/-tpmdev/-device`` arguments.  ``wait()`` ends
when swtpm does (after QEMU exits, thanks to ``--terminate``); if it ends
while QEMU still runs, the caller stops QEMU.  The key is a :class:`Secret`
for as long as it lives here and is wiped once swtpm has it.
"""

from __future__ import annotations

import os

from agent.common.errors import FlowFailed, UsageError
from agent.common.logs import get_logger
from agent.common.secret import Secret
from agent.io import secretref, swtpm
from agent.io.files import check_regular_file
from agent.io.rundir import check_socket_length, prepare_run_dir

log = get_logger("keyagent.vtpm")


class Vtpm:
    def __init__(
        self,
        state_dir: str,
        key_ref: str,
        run_dir: str,
        *,
        version: str = "2.0",
        key_kind: str = "raw",
        device: str = "tpm-crb",
        swtpm_bin: str = swtpm.SWTPM,
        swtpm_setup_bin: str = swtpm.SWTPM_SETUP,
    ) -> None:
        if version not in swtpm.VERSIONS:
            raise UsageError(f"[vtpm] version must be one of {', '.join(swtpm.VERSIONS)}")
        if key_kind not in swtpm.KEY_KINDS:
            raise UsageError(f"[vtpm] key_kind must be one of {', '.join(swtpm.KEY_KINDS)}")
        if device not in swtpm.DEVICES:
            raise UsageError(f"[vtpm] device must be one of {', '.join(swtpm.DEVICES)}")
        self.state_dir = state_dir
        self.key_ref = key_ref
        self.run_dir = run_dir
        self.version = version
        self.key_kind = key_kind
        self.device = device
        self.swtpm_bin = swtpm_bin
        self.swtpm_setup_bin = swtpm_setup_bin
        self.process: swtpm.SwtpmProcess | swtpm.AdoptedSwtpm | None = None
        self.created = False  # True when this start ran swtpm_setup
        self.adopted = False  # True when a live swtpm of a killed predecessor was taken over

    @staticmethod
    def enabled(cfg) -> bool:
        return "vtpm" in cfg.sections_present or cfg.vtpm_state_dir is not None

    @classmethod
    def from_config(cls, cfg, run_dir: str) -> Vtpm:
        if not cfg.vtpm_state_dir:
            raise UsageError("[vtpm] state_dir is required")
        if not cfg.vtpm_key:
            raise UsageError("[vtpm] key is required (an encrypted state needs a key)")
        return cls(
            cfg.vtpm_state_dir,
            cfg.vtpm_key,
            run_dir,
            version=cfg.vtpm_version,
            key_kind=cfg.vtpm_key_kind,
            device=cfg.vtpm_device,
        )

    def preflight(self) -> None:
        """What can be refused before anything is created (exit 2).

        The swtpm control socket must fit a unix socket path (found only
        after ``swtpm_setup`` had made the state, otherwise), and a
        ``file:`` key must be a regular file: ``open()`` on a FIFO blocks
        until someone writes to it, so it is opened with ``O_NONBLOCK`` and
        checked with ``fstat`` (agent.io.files) before the reference is
        resolved.
        """
        check_socket_length(os.path.join(os.path.abspath(self.run_dir), swtpm.CTRL_SOCKET_NAME), "swtpm control socket")
        scheme, _, rest = self.key_ref.partition(":")
        if scheme == "file" and rest:
            try:
                check_regular_file(rest, "vTPM key file", secretref.MAX_SECRET_FILE)
            except OSError as exc:
                raise UsageError(f"cannot read vTPM key file {rest}: {exc.strerror}") from None

    async def start(self, incoming: bool = False, adopt: bool = False) -> list[str]:
        """Bring swtpm up on the decrypted state; return QEMU's TPM arguments.

        ``incoming``: QEMU will receive this VM by migration, and the TPM
        state with it (encrypted under the migration key, the same secret):
        an empty state dir is not set up, as libvirt does for incoming VMs.
        ``adopt`` (``keyagent run``): a live swtpm that a killed predecessor
        started for this VM and state is taken over, not started twice
        (``swtpm.find_live``); the key is not even read.
        """
        if self.process is not None:
            raise FlowFailed("vTPM already started")
        self.preflight()
        self.run_dir = prepare_run_dir(self.run_dir)
        if adopt:
            live = swtpm.find_live(self.run_dir, self.state_dir, self.swtpm_bin)
            if live is not None:
                self.process, self.adopted = live, True
                log.info("vtpm_adopted", state_dir=self.state_dir, pid=live.pid, device=self.device)
                return swtpm.qemu_tpm_args(live.ctrl_socket, self.device)
        key: Secret = secretref.resolve(self.key_ref, "vTPM key")
        try:
            swtpm.check_key(key, self.key_kind)
            info = swtpm.check_state(self.state_dir, self.version)
            if info.kind is swtpm.StateKind.ABSENT and not incoming:
                await swtpm.setup_state(
                    self.state_dir, self.version, key, self.key_kind, swtpm_setup=self.swtpm_setup_bin
                )
                self.created = True
            self.process = await swtpm.start_swtpm(
                self.state_dir, self.version, key, self.key_kind, self.run_dir, swtpm=self.swtpm_bin, incoming=incoming
            )
        finally:
            key.wipe()
        log.info("vtpm_ready", state_dir=self.state_dir, created=self.created, device=self.device, pid=self.process.pid)
        return swtpm.qemu_tpm_args(self.process.ctrl_socket, self.device)

    async def wait(self) -> int | None:
        """swtpm's exit status (None for an adopted one: not our child); returns when swtpm is gone."""
        if self.process is None:
            raise FlowFailed("vTPM not started")
        return await self.process.wait()

    async def stop(self, timeout: float = 5.0) -> int | None:
        if self.process is None:
            return None
        return await self.process.stop(timeout)
