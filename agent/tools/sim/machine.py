"""The simulated QEMU 7.2 machine behind the QMP socket: run state and SEV.

This is the part of QEMU that the QMP commands reach: the run state
(``prelaunch`` under ``-S``, ``running``, ``paused``), the ``sev-guest``
object's QMP commands from target/i386/sev.c, with their checks and error
texts, and the guest's secret area.  The PSP itself is :class:`Psp`.

Sans-IO: commands come in as ``(name, arguments)`` and leave as a return
value or a :class:`SimQmpError`; events go out through the ``emit`` callback;
time comes from the ``clock`` callable (only the simulated measurement delay
needs it).  The wire protocol lives in :mod:`agent.tools.sim.qmp_server`.

What the guest "sees" after an injection is only a summary of the secret
table (GUID, length, SHA-256 of each entry): the plaintext is wiped as soon
as it has been parsed, so the simulator holds no secret payload.

The firmware's secret area is modelled as QEMU 7.2 uses it: the OVMF table
entry (``secret_gpa``, ``secret_size``) gives the gpa an injection without
``gpa`` goes to; QEMU never looks at the size, and only a missing entry is
an error.  With Debian's stock OVMF.fd (entry base 0, size 0) QEMU injects
at gpa 0, which is RAM, and succeeds.  Whether the guest can read the secret
is a separate fact, ``secret-visible``: only a table written at the base of a
non-empty area, and no longer than it, is where OVMF publishes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.common.errors import SimQmpError
from agent.common.logs import get_logger
from agent.common.secret import Secret
from agent.sev.secret_table import parse_secret_table
from agent.tools.sim.psp import KVM_RET_FW_ERROR, SEV_POLICY_ES, FwError, Platform, Psp

__all__ = [
    "SimConfig",
    "Machine",
    "SimQmpError",
    "InjectedEntry",
    "QEMU_VERSION",
    "DEFAULT_DIGEST",
    "DEFAULT_SECRET_GPA",
    "DEFAULT_SECRET_SIZE",
]

#: ``query-version`` of the Debian bookworm QEMU the facts were checked on.
QEMU_VERSION: dict[str, Any] = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}

#: The launch digest the simulator reports unless told otherwise.
DEFAULT_DIGEST = hashlib.sha256(b"keyagent-simulated-firmware").digest()

#: Where OVMF's SEV secret area usually sits (OvmfPkg/AmdSev: 0x80C000).
DEFAULT_SECRET_GPA = 0x80C000

#: Its size in OvmfPkg/AmdSev (sevctl's OVMF.amdsev.fd: 0xC00).
DEFAULT_SECRET_SIZE = 0xC00

#: QEMU's SEV_SECRET_GUID: the OVMF table entry naming the secret area.
SEV_SECRET_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")

# GET_ID2 returns 64 bytes per socket.
_CPU_ID_LEN = 64


@dataclass(frozen=True)
class InjectedEntry:
    """What the guest found in one secret table entry (never the bytes)."""

    guid: uuid.UUID
    length: int
    sha256: str

    def to_json(self) -> dict:
        return {"guid": str(self.guid), "length": self.length, "sha256": self.sha256}


@dataclass
class SimConfig:
    """How the simulated VM and PSP are set up.

    ``tik`` / ``tek`` are the launch session keys the guest owner holds too;
    instead of them, ``session = (godh_cert_bytes, session_bytes)`` is a
    guest owner's launch session (QEMU's ``dh-cert-file`` / ``session-file``,
    decoded): the PSP unwraps TIK and TEK from it at LAUNCH_START with
    ``pdh_private_key`` (and refuses to start, :class:`FwError`, if it does
    not open).  ``pdh_private_key`` is the platform's PDH key (P-384); when
    None a fresh one is made, and ``query-sev-capabilities`` shows its
    certificate and chain either way.
    ``digest`` is SHA-256 of the launch data (what ``owner measure`` prints).
    ``state="running"`` models a VM that was launched (and measured)
    before the agent connected.  ``secret_gpa``/``secret_size`` are the
    firmware's SEV secret-block entry: ``secret_gpa=None`` models a firmware
    without the entry, where QEMU needs an explicit ``gpa``; ``0, 0`` models
    Debian's stock OVMF.fd, where QEMU injects at gpa 0 and the guest never
    sees the secret.
    """

    tik: bytes | None = field(default=None, repr=False)
    tek: bytes | None = field(default=None, repr=False)
    digest: bytes = DEFAULT_DIGEST
    policy: int = 0x1
    api_major: int = 1
    api_minor: int = 55
    build_id: int = 21
    sev_es: bool = False
    state: str = "prelaunch"
    measure_delay_s: float = 0.0
    secret_gpa: int | None = DEFAULT_SECRET_GPA
    secret_size: int = DEFAULT_SECRET_SIZE
    mnonce: bytes | None = field(default=None, repr=False)
    ram_size: int = 1 << 30
    cbitpos: int = 51
    reduced_phys_bits: int = 1
    pdh_private_key: Any = field(default=None, repr=False)  # ec.EllipticCurvePrivateKey | None
    session: tuple[bytes, bytes] | None = field(default=None, repr=False)
    # SEV fast migration (keyagent simulate --mh, agent.tools.sim.mh): the VM name the
    # migration handler binds its keys to; None: no MH and no migration commands
    mh_vm: str | None = None
    mh_secrets_out: str | None = None  # tests only: the MH's keys, for a leak scan

    def __post_init__(self) -> None:
        if self.session is not None:
            if self.tik is not None or self.tek is not None:
                raise ValueError("give TIK/TEK or a launch session, not both")
            if self.pdh_private_key is None:
                raise ValueError("a launch session needs the platform's PDH private key")
            if (
                not isinstance(self.session, tuple)
                or len(self.session) != 2
                or not all(isinstance(x, (bytes, bytearray)) for x in self.session)
            ):
                raise ValueError("session must be (godh certificate bytes, session bytes)")
        else:
            for name in ("tik", "tek"):
                value = getattr(self, name)
                if not isinstance(value, (bytes, bytearray)) or len(value) != 16:
                    raise ValueError(f"{name.upper()} must be 16 bytes")
        if not isinstance(self.digest, (bytes, bytearray)) or len(self.digest) != 32:
            raise ValueError("launch digest must be 32 bytes (SHA-256)")
        if self.mnonce is not None and len(self.mnonce) != 16:
            raise ValueError("MNONCE must be 16 bytes")
        if not 0 <= self.policy <= 0xFFFFFFFF:
            raise ValueError(f"policy must be a 32-bit unsigned value, got {self.policy}")
        for name in ("api_major", "api_minor", "build_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise ValueError(f"{name.replace('_', '-')} must be 0..255, got {value}")
        if self.state not in ("prelaunch", "running"):
            raise ValueError(f"state must be 'prelaunch' or 'running', got {self.state!r}")
        if not self.measure_delay_s >= 0:  # also refuses NaN
            raise ValueError(f"measure delay must be >= 0 seconds, got {self.measure_delay_s}")
        if self.secret_gpa is not None and not 0 <= self.secret_gpa < self.ram_size:
            raise ValueError(f"secret area gpa 0x{self.secret_gpa:x} is outside guest RAM")
        if not 0 <= self.secret_size <= 0xFFFFFFFF:  # a u32 in the OVMF table
            raise ValueError(f"secret area size must be 0..0xffffffff, got {self.secret_size}")

    @property
    def effective_policy(self) -> int:
        """The guest policy QEMU hands to LAUNCH_START (``--sev-es`` sets ES)."""
        return self.policy | (SEV_POLICY_ES if self.sev_es else 0)


# -- argument checking, with the QAPI input visitor's error texts ---------

_STR, _UINT64, _BOOL = "str", "uint64", "bool"


def _check_args(args: dict, spec: dict[str, tuple[str, bool]]) -> dict:
    """Validate ``args`` against ``{name: (type, required)}`` like QEMU 7.2."""
    out: dict[str, Any] = {}
    for name, (kind, required) in spec.items():
        if name not in args:
            if required:
                raise SimQmpError(f"Parameter '{name}' is missing")
            continue
        value = args[name]
        if kind == _STR:
            if not isinstance(value, str):
                raise SimQmpError(f"Invalid parameter type for '{name}', expected: string")
        elif kind == _BOOL:
            if not isinstance(value, bool):
                raise SimQmpError(f"Invalid parameter type for '{name}', expected: boolean")
        elif kind == _UINT64:
            # qobject_input_type_uint64: negative values wrap, for compatibility.
            if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < (1 << 64):
                raise SimQmpError(f"Parameter '{name}' expects uint64")
            value &= (1 << 64) - 1
        out[name] = value
    for name in args:
        if name not in spec:
            raise SimQmpError(f"Parameter '{name}' is unexpected")
    return out


_B64_JUNK = re.compile(r"[^A-Za-z0-9+/]")


def _g_base64_decode(text: str) -> bytes:
    """Decode like GLib's ``g_base64_decode``: skip junk, never fail."""
    clean = _B64_JUNK.sub("", text)
    usable = len(clean) - len(clean) % 4
    rest = clean[usable:]
    if len(rest) >= 2:
        clean = clean[:usable] + rest + "=" * (4 - len(rest))
    else:
        clean = clean[:usable]
    try:
        return base64.b64decode(clean)
    except binascii.Error:  # pragma: no cover - cleaned input always decodes
        return b""


def stop_vm(machine: Any) -> dict:
    """QMP ``stop`` as QEMU's do_vm_stop(): only a running VM changes state and reports STOP."""
    if machine.status == "running":
        machine.status = "paused"
        machine._emit("STOP", None)
    return {}


def request_quit(machine: Any) -> dict:
    """QMP ``quit``: the server closes once it has answered."""
    machine.quit_requested = True
    machine._log.info("sim.quit_requested")
    return {}


@dataclass
class _Command:
    handler: Callable[[dict], Any]
    args: dict[str, tuple[str, bool]]


class Machine:
    """QEMU's run state and SEV commands for one simulated VM."""

    def __init__(
        self,
        config: SimConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str, dict | None], None] | None = None,
        platform: Platform | None = None,
        name: str | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._emit = emit or (lambda name, data: None)
        # ``name``: one VM among several in one process (``simulate --vms``), in every log line.
        self._log = get_logger("keyagent.sim") if name is None else get_logger("keyagent.sim", vm=name)
        # ``platform``: the host's one PSP, shared by every VM it serves (``simulate --vms``);
        # otherwise this VM's own, made from ``config.pdh_private_key``.
        self.platform = platform or Platform(
            config.pdh_private_key, api_major=config.api_major, api_minor=config.api_minor
        )
        if config.session is not None:
            # LAUNCH_START with the owner's session; FwError if it does not open.
            tik, tek = self.platform.launch_start(*config.session, config.effective_policy)
            self._log.info("sim.launch_start", session=True, policy=config.effective_policy)
        else:
            assert config.tik is not None and config.tek is not None  # __post_init__ checked them
            tik, tek = Secret(config.tik), Secret(config.tek)
        self._launch_keys = (tik, tek)
        self._free_args: set[str] = {"object-add"}  # QAPI commands with open members
        #: the user-creatable objects (id -> qom-type) every QEMU has commands for: the
        #: agent's master key and secret objects, the migration's TLS credentials
        self.objects: dict[str, str] = {}
        self._new_launch()
        self.quit_requested = False
        if config.state == "running":
            self.psp.launch_measure()
            self.psp.launch_finish()
            self.status = "running"
        self._commands: dict[str, _Command] = {
            "query-status": _Command(self._query_status, {}),
            "query-version": _Command(self._query_version, {}),
            "query-sev": _Command(self._query_sev, {}),
            "query-sev-launch-measure": _Command(self._query_sev_launch_measure, {}),
            "query-sev-capabilities": _Command(self._query_sev_capabilities, {}),
            "sev-inject-launch-secret": _Command(
                self._sev_inject_launch_secret,
                {"packet-header": (_STR, True), "secret": (_STR, True), "gpa": (_UINT64, False)},
            ),
            "cont": _Command(self._cont, {}),
            "stop": _Command(self._stop, {}),
            "object-add": _Command(self._object_add, {}),
            "object-del": _Command(self._object_del, {"id": (_STR, True)}),
            "qom-list": _Command(self._qom_list, {"path": (_STR, True)}),
            "quit": _Command(self._quit, {}),
            "x-sim-query-secrets": _Command(self._x_sim_query_secrets, {}),
            "x-sim-query-state": _Command(self._x_sim_query_state, {}),
            "x-sim-reset": _Command(self._x_sim_reset, {}),
        }
        self.mh: Any = None
        if config.mh_vm is not None:
            self._add_mh_commands(config.mh_vm)

    def _new_launch(self) -> None:
        """A VM held at ``-S`` right after LAUNCH_START: fresh MNONCE, no secret."""
        tik, tek = self._launch_keys
        config = self.config
        self.psp = Psp(
            tik,
            tek,
            digest=config.digest,
            policy=config.effective_policy,
            api_major=config.api_major,
            api_minor=config.api_minor,
            build_id=config.build_id,
            mnonce=config.mnonce,
        )
        self.status = "prelaunch"
        self.injections = 0
        self.refused_injections = 0
        self.injected_entries: list[InjectedEntry] = []
        self.table_valid: bool | None = None
        self.secret_visible: bool | None = None  # None until a secret is injected
        self.cont_happened = False
        self.injected_before_cont: bool | None = None
        self._measure_at = self._clock() + config.measure_delay_s

    # -- state for tests and the server ---------------------------------

    @property
    def command_names(self) -> list[str]:
        return list(self._commands)

    @property
    def sev_state(self) -> str:
        self._tick()
        return self.psp.state

    @property
    def measurement(self) -> bytes | None:
        """The 48-byte LAUNCH_MEASURE blob, once the (simulated) PSP took it."""
        self._tick()
        return self.psp.measurement

    @property
    def cont_before_secret(self) -> bool:
        """True when the VM was resumed before any secret had been injected."""
        return self.cont_happened and not self.injected_before_cont

    def has_command(self, name: str) -> bool:
        return name in self._commands

    def execute(self, name: str, args: dict) -> Any:
        """Run one command; raises :class:`SimQmpError` (or KeyError if unknown)."""
        cmd = self._commands[name]
        checked = dict(args) if name in self._free_args else _check_args(args, cmd.args)
        self._tick()
        return cmd.handler(checked)

    def shutdown(self) -> None:
        """The process ends: the PSP context (and its keys) goes away, and the MH's key with it."""
        self.psp.wipe()
        if self.mh is not None:
            self.mh.retire()

    def _tick(self) -> None:
        # Real QEMU takes the measurement at machine-init-done, before the
        # monitor answers; measure_delay_s models a slow PSP for the agent's
        # retry logic.
        if self.psp.state == "launch-update" and self._clock() >= self._measure_at:
            self.psp.launch_measure()
            self._log.info("sim.launch_measured", policy=self.psp.policy)

    # -- commands -------------------------------------------------------

    def _query_status(self, _args: dict) -> dict:
        return {"status": self.status, "singlestep": False, "running": self.status == "running"}

    def _query_version(self, _args: dict) -> dict:
        return {"qemu": dict(QEMU_VERSION["qemu"]), "package": QEMU_VERSION["package"]}

    def _query_sev(self, _args: dict) -> dict:
        # QEMU 7.2's SevInfo: no "sev-type" (added in 9.1).
        psp = self.psp
        return {
            "enabled": True,
            "api-major": psp.api_major,
            "api-minor": psp.api_minor,
            "build-id": psp.build_id,
            "policy": psp.policy,
            "state": psp.state,
            "handle": psp.handle,
        }

    def _query_sev_launch_measure(self, _args: dict) -> dict:
        blob = self.psp.measurement
        if blob is None:
            raise SimQmpError("SEV launch measurement is not available")
        return {"data": base64.b64encode(blob).decode()}

    def _query_sev_capabilities(self, _args: dict) -> dict:
        # sev_get_capabilities(): PDH_CERT_EXPORT's two buffers, base64.
        return {
            "pdh": base64.b64encode(self.platform.pdh_cert.to_bytes()).decode(),
            "cert-chain": base64.b64encode(self.platform.chain.to_bytes()).decode(),
            "cpu0-id": base64.b64encode(bytes(_CPU_ID_LEN)).decode(),
            "cbitpos": self.config.cbitpos,
            "reduced-phys-bits": self.config.reduced_phys_bits,
        }

    def _sev_inject_launch_secret(self, args: dict) -> dict:
        # qmp_sev_inject_launch_secret() then sev_inject_launch_secret(),
        # target/i386/sev.c (QEMU 7.2), check for check.
        gpa = args.get("gpa")
        if gpa is None:
            if self.config.secret_gpa is None:
                self._refuse("no secret area")
                raise SimQmpError("SEV: no secret area found in OVMF, gpa must be specified.")
            gpa = self.config.secret_gpa
        psp = self.psp
        if psp.state != "launch-secret":
            self._refuse("wrong state", sev_state=psp.state)
            raise SimQmpError(f"SEV: Not in correct state. (LSECRET) {psp.state_index:x}")
        header = _g_base64_decode(args["packet-header"])
        if not header:
            self._refuse("header not base64")
            raise SimQmpError("SEV: Failed to decode sequence header")
        data = _g_base64_decode(args["secret"])
        if not data:
            self._refuse("secret not base64")
            raise SimQmpError("SEV: Failed to decode data")
        self._gpa2hva(gpa, len(data))
        try:
            plaintext = psp.launch_secret(header, data)
        except FwError as exc:
            self._refuse("psp refused", fw_error=int(exc.code), detail=exc.why)
            raise SimQmpError(
                f"SEV: failed to inject secret ret={KVM_RET_FW_ERROR} fw_error={int(exc.code)} '{exc.text}'"
            ) from None
        self._guest_reads_secret_area(plaintext, self._in_secret_area(gpa, len(data)))
        return {}

    def _in_secret_area(self, gpa: int, size: int) -> bool:
        """True when OVMF will publish what was written at ``gpa`` (its area's base)."""
        base = self.config.secret_gpa
        return base is not None and 0 < size <= self.config.secret_size and gpa == base

    def _gpa2hva(self, gpa: int, size: int) -> None:
        # monitor/misc.c gpa2hva(): guest RAM is [0, ram_size) here.
        if gpa >= self.config.ram_size:
            self._refuse("gpa not mapped")
            raise SimQmpError(f"SEV: Failed to calculate guest address: No memory is mapped at address 0x{gpa:x}")
        if gpa + size > self.config.ram_size:
            self._refuse("gpa region too small")
            raise SimQmpError(f"SEV: Failed to calculate guest address: Size of memory region at 0x{gpa:x} exceeded.")

    def _guest_reads_secret_area(self, plaintext: Secret, visible: bool) -> None:
        self.injections += 1
        self.secret_visible = visible
        if not visible:
            # QEMU reports success either way; the guest's firmware will not
            # publish a table that is not at the base of its secret area.
            self._log.warning(
                "sim.secret_outside_secret_area",
                secret_area_gpa=self.config.secret_gpa,
                secret_area_size=self.config.secret_size,
            )
        try:
            entries = parse_secret_table(plaintext.reveal())
        except ValueError as exc:
            self.table_valid = False
            self.injected_entries = []
            self._log.warning("sim.secret_injected", table_valid=False, detail=str(exc))
        else:
            self.table_valid = True
            self.injected_entries = [
                InjectedEntry(guid, len(data), hashlib.sha256(data).hexdigest()) for guid, data in entries
            ]
            self._log.info("sim.secret_injected", table_valid=True, entries=len(entries))
            if self.mh is not None and visible:
                self.mh.on_table(entries)  # the guest's migration handler reads its keys
        finally:
            plaintext.wipe()

    def _refuse(self, why: str, **fields: Any) -> None:
        self.refused_injections += 1
        self._log.warning("sim.secret_refused", why=why, **fields)

    def _cont(self, _args: dict) -> dict:
        if self.status == "running":
            return {}
        if self.psp.state != "running":
            # sev_vm_state_change(): LAUNCH_FINISH on the first run.  QEMU 7.2
            # does this with or without a secret: remember which it was.
            self.cont_happened = True
            self.injected_before_cont = self.injections > 0
            self.psp.launch_finish()
            if self.injections == 0:
                self._log.warning("sim.launch_finished", secret_injected=False)
            elif not self.secret_visible:
                self._log.warning("sim.launch_finished", secret_injected=True, secret_visible=False)
            else:
                self._log.info("sim.launch_finished", secret_injected=True, secret_visible=True)
        self.status = "running"
        self._emit("RESUME", None)
        return {}

    def _stop(self, _args: dict) -> dict:
        return stop_vm(self)

    def _quit(self, _args: dict) -> dict:
        return request_quit(self)

    # The x-sim-* answers name their members the QAPI way, with dashes.

    def _x_sim_query_secrets(self, _args: dict) -> dict:
        return {
            "injected": self.injections > 0,
            "table-valid": self.table_valid,
            "secret-visible": self.secret_visible,
            "entries": [e.to_json() for e in self.injected_entries],
        }

    def _x_sim_reset(self, _args: dict) -> dict:
        # Not QEMU: the same VM again at -S, for benchmarks that launch many
        # times without paying a new process (same session keys, new MNONCE,
        # and no objects: a new QEMU has none).
        self._new_launch()
        self.objects.clear()
        self._log.info("sim.reset")
        return {}

    def _x_sim_query_state(self, _args: dict) -> dict:
        return {
            "status": self.status,
            "sev-state": self.psp.state,
            "injections": self.injections,
            "refused-injections": self.refused_injections,
            "cont": self.cont_happened,
            "injected-before-cont": self.injected_before_cont,
            "cont-before-secret": self.cont_before_secret,
            "secret-visible": self.secret_visible,
        }

    # -- user-creatable objects: every QEMU has these commands ----

    def _object_add(self, args: dict) -> dict:
        oid, kind = args.get("id"), args.get("qom-type")
        if not isinstance(oid, str) or not isinstance(kind, str):
            raise SimQmpError("Parameter 'id' is missing")
        if oid in self.objects:
            raise SimQmpError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
        self.objects[oid] = kind
        return {}

    def _object_del(self, args: dict) -> dict:
        if self.objects.pop(args["id"], None) is None:
            raise SimQmpError(f"object '{args['id']}' not found")
        return {}

    def _qom_list(self, args: dict) -> list[dict[str, str]]:
        """``qom-list /objects`` as QEMU answers it: the container's own
        ``type`` property, then one ``child<TYPE>`` per object."""
        if args["path"] != "/objects":
            raise SimQmpError(f"Device '{args['path']}' not found")
        return [{"name": "type", "type": "string"}] + [
            {"name": oid, "type": f"child<{kind}>"} for oid, kind in self.objects.items()
        ]

    # -- SEV fast migration (--mh): the MH channel and a migration that carries its pages ----

    def _add_mh_commands(self, vm: str) -> None:
        from agent.tools.sim.mh import SimMh

        self.mh = SimMh(vm, self.config.mh_secrets_out)
        #: set by the QMP server: runs a migration coroutine (the stream is I/O)
        self.spawn: Callable[[Any], None] = lambda coro: coro.close()
        self.migration_status = "none"
        self.migration_error: str | None = None
        self.migration_cancelled = False
        self.migrate_params: dict[str, Any] = {"tls-creds": ""}
        self._incoming: Any = None  # the listening server of migrate-incoming
        self._commands.update(
            {
                "x-mh-set-peer-key": _Command(
                    lambda a: self.mh.set_peer_key(a["public-key"], a["tag"]),
                    {"public-key": (_STR, True), "tag": (_STR, True)},
                ),
                "x-mh-query": _Command(lambda a: self.mh.query(), {}),
                "migrate-set-capabilities": _Command(lambda a: {}, {}),
                "migrate-set-parameters": _Command(self._migrate_set_parameters, {}),
                "query-migrate-parameters": _Command(lambda a: dict(self.migrate_params), {}),
                "query-migrate": _Command(self._query_migrate, {}),
                "migrate": _Command(self._migrate, {"uri": (_STR, True)}),
                "migrate-incoming": _Command(self._migrate_incoming, {"uri": (_STR, True)}),
                "migrate_cancel": _Command(self._migrate_cancel, {}),
            }
        )
        for name in ("migrate-set-capabilities", "migrate-set-parameters"):
            self._free_args.add(name)

    def _migrate_set_parameters(self, args: dict) -> dict:
        self.migrate_params.update(args)
        return {}

    def _query_migrate(self, _args: dict) -> dict:
        if self.migration_status == "none":
            return {}
        out: dict[str, Any] = {"status": self.migration_status}
        if self.migration_error:
            out["error-desc"] = self.migration_error
        return out

    def _migrate(self, args: dict) -> dict:
        from agent.tools.sim.mh import check_uri, migrate_out

        check_uri(args["uri"])
        if self.migration_status in ("setup", "active"):
            raise SimQmpError("There's a migration process in progress")
        self.migration_cancelled = False
        self.spawn(migrate_out(self, args["uri"]))
        return {}

    def _migrate_incoming(self, args: dict) -> dict:
        from agent.tools.sim.mh import check_uri, migrate_in

        check_uri(args["uri"])
        if self._incoming is not None:
            raise SimQmpError("The incoming migration has already been started")
        self._incoming = True

        async def listen() -> None:
            try:
                self._incoming = await migrate_in(self, args["uri"])
            except OSError as exc:
                self.set_migration("failed", f"cannot listen: {exc.strerror or exc}")

        self.spawn(listen())
        return {}

    def _migrate_cancel(self, _args: dict) -> dict:
        if self.migration_status in ("setup", "active"):
            self.migration_cancelled = True
            self.set_migration("cancelled")
        return {}

    def set_migration(self, status: str, error: str | None = None) -> None:
        """A MIGRATION status change, as QEMU emits it (a final one only once)."""
        if self.migration_status in ("completed", "failed", "cancelled") and status != "setup":
            return
        self.migration_status = status
        self.migration_error = error
        self._log.info("sim.migration", status=status)
        self._emit("MIGRATION", {"status": status})
        if status in ("completed", "failed", "cancelled") and self._incoming not in (None, True):
            self._incoming.close()
            self._incoming = None

    def migration_done_source(self) -> None:
        """The source after a completed migration: paused in postmigrate, its MH key destroyed."""
        self.status = "postmigrate"
        self.mh.retire()
        self.set_migration("completed")
