"""The simulated QEMU 9.1 machine with an SEV-SNP guest (``keyagent simulate --snp``).

What the QMP client sees follows QEMU 9.1 (target/i386/sev.c, qapi/misc-target.json):

* ``query-version`` says 9.1.0;
* ``query-sev`` is the flat union ``SevInfo`` with ``sev-type: "sev-snp"``: the
  base (``enabled``, ``api-major``, ``api-minor``, ``build-id``, ``state``,
  ``sev-type``) plus ``SevSnpGuestInfo``'s single member ``snp-policy``
  (uint64).  There is no ``handle`` and no ``policy`` for SNP;
* ``query-sev-launch-measure`` and ``sev-inject-launch-secret`` fail as for
  any guest that is not SEV (no measurement; never in LAUNCH_SECRET);
* under ``-S`` the guest is in ``launch-update``: QEMU runs SNP_LAUNCH_FINISH
  (with the ID block and ID auth, host data and author-key flag of the
  ``sev-snp-guest`` object) when the VM first runs, i.e. at ``cont``.  The PSP
  refuses an ID block whose launch digest or policy differs from the launch, or
  whose signatures do not verify; QEMU then reports the error and exits 1
  inside ``cont``: no answer, the connection closes.  So does the simulator.

Not QEMU: ``x-sim-snp-guest-report {"report-data": b64}`` is what a running guest
gets from the PSP through SNP_GUEST_REQUEST (MSG_REPORT_REQ) together with its
VCEK (an extended report): an ATTESTATION_REPORT signed by the simulated chip's
VCEK, chained to a test ARK/ASK made at start (``agent.sev.snp_sign``) that
``--amd-roots-out`` writes as ``<product>-ark.pem`` / ``<product>-ask.pem``.  The
report_data is the guest's choice; everything else is what the PSP knows.

Sans-IO like :mod:`agent.tools.sim.machine`: the wire is :mod:`agent.tools.sim.qmp_server`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.common.errors import SimQmpError
from agent.common.logs import get_logger
from agent.tools.sim.machine import _check_args, request_quit, stop_vm

if TYPE_CHECKING:
    from agent.sev.snp_sign import TestAuthority

__all__ = ["SnpSimConfig", "SnpMachine", "QEMU_91_VERSION", "DEFAULT_SNP_DIGEST", "DEFAULT_SNP_POLICY"]

QEMU_91_VERSION = {"qemu": {"micro": 0, "minor": 1, "major": 9}, "package": "keyagent-sim"}
#: The launch digest the simulated SNP firmware measures to unless told otherwise.
DEFAULT_SNP_DIGEST = hashlib.sha384(b"keyagent-simulated-snp-firmware").digest()
#: QEMU's sev-snp-guest default policy (bit 17 reserved-one, SMT allowed).
DEFAULT_SNP_POLICY = 0x30000
SNP_PRODUCT = "milan"

KEY_INFO_AUTHOR_KEY_EN = 1


@dataclass
class SnpSimConfig:
    """What the ``sev-snp-guest`` object says (policy, id-block, id-auth, host-data,
    author-key-enabled, QEMU's decoded bytes) and what the firmware measures to."""

    policy: int = DEFAULT_SNP_POLICY
    digest: bytes = DEFAULT_SNP_DIGEST
    id_block: bytes | None = None
    id_auth: bytes | None = None
    host_data: bytes = bytes(32)
    author_key_enabled: bool = False
    api_major: int = 1
    api_minor: int = 55
    build_id: int = 21
    authority: TestAuthority | None = field(default=None, repr=False)
    chip_id: bytes = field(default_factory=lambda: os.urandom(64), repr=False)

    def __post_init__(self) -> None:
        from agent.sev.snp_idblock import policy_problem

        problem = policy_problem(self.policy)
        if problem:
            raise ValueError(problem)
        if len(self.digest) != 48:
            raise ValueError("an SNP launch digest is 48 bytes (SHA-384)")
        if len(self.host_data) != 32:
            raise ValueError("host-data is 32 bytes")
        if (self.id_block is None) != (self.id_auth is None):
            raise ValueError("id-block and id-auth go together")
        if self.author_key_enabled and self.id_auth is None:
            raise ValueError("author-key-enabled needs id-auth")

    @property
    def effective_policy(self) -> int:
        return self.policy

    snp = True  # agent.tools.sim.qmp_server picks SnpMachine for this config


class SnpMachine:
    """QEMU 9.1's run state and SNP commands, the PSP's SNP_LAUNCH_FINISH and guest reports."""

    def __init__(
        self,
        config: SnpSimConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str, dict | None], None] | None = None,
    ) -> None:
        from agent.sev.snp_report import Tcb
        from agent.sev.snp_sign import TestAuthority

        self.config = config
        self._emit = emit or (lambda name, data: None)
        self._log = get_logger("keyagent.sim")
        self.authority = config.authority or TestAuthority.make(SNP_PRODUCT)
        self.tcb = Tcb(bootloader=3, tee=0, snp=8, microcode=115)
        self.vcek_key, self.vcek = self.authority.issue_vcek(config.chip_id, self.tcb)
        self.status = "prelaunch"
        self.state = "launch-update"
        self.policy = config.policy
        self.quit_requested = False
        self.died = False  # QEMU exit(1) inside a command: the server answers nothing more
        self.exit_status = 0
        self.reports = 0
        self.cont_happened = False
        self._id_key_digest = bytes(48)
        self._author_key_digest = bytes(48)
        self._commands: dict[str, tuple[Callable[[dict], Any], dict]] = {
            "query-status": (self._query_status, {}),
            "query-version": (lambda _a: dict(QEMU_91_VERSION), {}),
            "query-sev": (self._query_sev, {}),
            "query-sev-launch-measure": (self._query_sev_launch_measure, {}),
            "sev-inject-launch-secret": (
                self._sev_inject_launch_secret,
                {"packet-header": ("str", True), "secret": ("str", True), "gpa": ("uint64", False)},
            ),
            "cont": (self._cont, {}),
            "stop": (self._stop, {}),
            "quit": (self._quit, {}),
            "x-sim-query-state": (self._x_sim_query_state, {}),
            "x-sim-snp-guest-report": (self._x_sim_snp_guest_report, {"report-data": ("str", True)}),
        }

    qemu_version = QEMU_91_VERSION

    # the interface agent.tools.sim.qmp_server uses
    @property
    def psp(self) -> SnpMachine:
        return self

    @property
    def command_names(self) -> list[str]:
        return list(self._commands)

    def has_command(self, name: str) -> bool:
        return name in self._commands

    def execute(self, name: str, args: dict) -> Any:
        handler, spec = self._commands[name]
        return handler(_check_args(args, spec))

    def shutdown(self) -> None:
        pass

    def roots_pems(self) -> dict[str, bytes]:
        return self.authority.pems()

    # -- commands --------------------------------------------------------
    def _query_status(self, _args: dict) -> dict:
        return {"status": self.status, "singlestep": False, "running": self.status == "running"}

    def _query_sev(self, _args: dict) -> dict:
        return {
            "enabled": True,
            "api-major": self.config.api_major,
            "api-minor": self.config.api_minor,
            "build-id": self.config.build_id,
            "state": self.state,
            "sev-type": "sev-snp",
            "snp-policy": self.config.policy,
        }

    def _query_sev_launch_measure(self, _args: dict) -> dict:
        # sev_get_launch_measurement(): only an SEV (not SNP) guest has one
        raise SimQmpError("SEV launch measurement is not available")

    def _sev_inject_launch_secret(self, _args: dict) -> dict:
        # sev_inject_launch_secret(): an SNP guest never reaches LAUNCH_SECRET
        index = {"launch-update": 1, "running": 3}[self.state]
        raise SimQmpError(f"SEV: Not in correct state. (LSECRET) {index:x}")

    def _launch_finish(self) -> str | None:
        """SNP_LAUNCH_FINISH: the PSP's checks of the ID block; the reason it fails, or None."""
        from agent.sev.snp_idblock import IdBlock, SnpFormatError, check_id_auth

        cfg = self.config
        if cfg.id_block is None:
            return None
        try:
            block = IdBlock.from_bytes(cfg.id_block)
            auth = check_id_auth(cfg.id_block, cfg.id_auth or b"")
        except SnpFormatError as exc:
            return f"malformed ID block ({exc})"
        if block.launch_digest != cfg.digest:
            return "ID block launch digest differs from the launch (BAD_MEASUREMENT)"
        if block.policy != cfg.policy:
            return "ID block policy differs from the guest policy (POLICY_FAILURE)"
        if not auth.block_signature:
            return "ID block signature does not verify (BAD_SIGNATURE)"
        if cfg.author_key_enabled and not auth.id_key_signature:
            return "ID key signature by the author key does not verify (BAD_SIGNATURE)"
        self._id_key_digest = auth.id_key_digest or bytes(48)
        if cfg.author_key_enabled:
            self._author_key_digest = auth.author_key_digest or bytes(48)
        return None

    def _cont(self, _args: dict) -> dict:
        if self.status == "running":
            return {}
        if self.state != "running":
            self.cont_happened = True
            problem = self._launch_finish()
            if problem is not None:
                # QEMU: error_report("SNP_LAUNCH_FINISH ...") and exit(1), inside cont
                self._log.error("sim.snp_launch_finish_failed", reason=problem)
                self.died = True
                self.exit_status = 1
                return {}
            self.state = "running"
            self._log.info("sim.snp_launch_finished", id_block=self.config.id_block is not None)
        self.status = "running"
        self._emit("RESUME", None)
        return {}

    def _stop(self, _args: dict) -> dict:
        return stop_vm(self)

    def _quit(self, _args: dict) -> dict:
        return request_quit(self)

    def _x_sim_query_state(self, _args: dict) -> dict:
        return {"status": self.status, "sev-state": self.state, "cont": self.cont_happened, "reports": self.reports}

    def _x_sim_snp_guest_report(self, args: dict) -> dict:
        from agent.sev.snp_sign import build_report, encode_tcb

        if self.state != "running" or self.status != "running":
            raise SimQmpError("the SNP guest is not running: no guest request before SNP_LAUNCH_FINISH")
        try:
            report_data = base64.b64decode(args["report-data"], validate=True)
        except (binascii.Error, ValueError):
            raise SimQmpError("report-data is not valid base64") from None
        if len(report_data) != 64:
            raise SimQmpError(f"report-data must be 64 bytes, got {len(report_data)}")
        cfg = self.config
        block = None
        if cfg.id_block is not None:
            from agent.sev.snp_idblock import IdBlock

            block = IdBlock.from_bytes(cfg.id_block)
        tcb = encode_tcb(self.tcb, SNP_PRODUCT)
        fields = dict(
            version=2,
            guest_svn=block.guest_svn if block else 0,
            policy=cfg.policy,
            family_id=block.family_id if block else bytes(16),
            image_id=block.image_id if block else bytes(16),
            vmpl=0,
            signature_algo=1,
            current_tcb=tcb,
            platform_info=0,
            key_info=KEY_INFO_AUTHOR_KEY_EN if cfg.author_key_enabled else 0,
            report_data=report_data,
            measurement=cfg.digest,
            host_data=cfg.host_data,
            id_key_digest=self._id_key_digest,
            author_key_digest=self._author_key_digest,
            report_id=hashlib.sha256(cfg.chip_id + cfg.digest).digest(),
            reported_tcb=tcb,
            chip_id=cfg.chip_id,
            committed_tcb=tcb,
            launch_tcb=tcb,
            current_build=cfg.build_id,
            current_minor=cfg.api_minor,
            current_major=cfg.api_major,
            committed_build=cfg.build_id,
            committed_minor=cfg.api_minor,
            committed_major=cfg.api_major,
        )
        report = build_report(self.vcek_key, **fields)
        self.reports += 1
        self._log.info("sim.snp_guest_report")
        from cryptography.hazmat.primitives import serialization

        return {
            "report": base64.b64encode(report).decode(),
            "vcek": base64.b64encode(self.vcek.public_bytes(serialization.Encoding.DER)).decode(),
        }
