"""``keyagent simulate``: run the SEV-capable QEMU stand-in on a unix socket.

The simulator needs the launch session keys (TIK, TEK) the guest owner
holds: pass them as files (16 raw bytes each) or let the simulator make
fresh ones and write them, mode 0600, to ``--keys-out DIR`` for the owner
tools to read.  Key bytes never go to stdout, stderr, the logs or argv.

The simulator is also the platform a guest owner makes a launch session
for.  It holds a PDH private key (``--pdh-key FILE``, PEM, P-384; fresh at
every start without it), signs its own PEK / OCA / CEK chain at start and
shows both in ``query-sev-capabilities``; ``--pdh-out`` / ``--cert-chain-out``
write them (base64, as QEMU reports them) for ``keyagent owner session``.
The CEK is signed by the simulator's own AMD root (an ARK and ASK it makes
at start, RSA-4096 in AMD's format): ``--amd-roots-out DIR`` writes
``sim-ark.cert`` / ``sim-ask.cert`` for the owner's ``[platform] amd_roots``,
``--cek-out`` the signed CEK alone (what AMD's key server hands out).
Started with ``--dh-cert-file`` / ``--session-file`` (the owner's base64
files, as QEMU's ``sev-guest`` takes them) it unwraps TIK and TEK at
LAUNCH_START instead of reading ``--tik`` / ``--tek``; a session that does
not open for its PDH and policy stops it, exit 2, as QEMU fails to start::

    openssl ecparam -name secp384r1 -genkey -noout -out pdh.pem
    keyagent simulate --qmp unix:q.sock --pdh-key pdh.pem --pdh-out pdh.b64 --cert-chain-out chain.b64 \
        --amd-roots-out roots/
    keyagent owner session --pdh pdh.b64 --cert-chain chain.b64 --amd-roots roots/ --policy 1 --out-dir owner/
    keyagent simulate --qmp unix:q.sock --pdh-key pdh.pem \
        --dh-cert-file owner/godh.b64 --session-file owner/session.b64

``--snp`` is a QEMU 9.1 holding an SEV-SNP guest instead (agent.tools.sim.snp):
``--policy``, ``--id-block``, ``--id-auth``, ``--host-data``,
``--author-key-enabled`` are the ``sev-snp-guest`` object's properties,
``--snp-digest`` what the firmware measures to; ``--amd-roots-out DIR`` then
writes ``milan-ark.pem`` / ``milan-ask.pem``, the test roots its VCEK chains to.

``--vms N --qmp-dir DIR`` serves N independent VMs from this one process
(one asyncio loop; agent.tools.sim.multi), so that measuring many VMs does not
measure many simulators: VM i listens on ``DIR/vm-000.sock``, ``DIR/vm-001.sock``,
... (three digits, more past 1000 VMs) and, with ``--keys-out KDIR``, its fresh
TIK/TEK go to ``KDIR/vm-000/tik.bin`` and ``tek.bin``.  The VMs share one
platform (PDH, chain: ``--pdh-key`` and the ``--*-out`` flags apply to it); a
VM that gets ``quit`` closes its socket alone, and the process exits 0 when
every VM has quit.  Its ready line lists ``qmp_sockets``.

On start it prints one JSON line to stdout (``{"ready": true, "qmp": ...}``)
so a script can wait for it.  It exits 0 after ``quit`` or on SIGTERM /
SIGINT, removing its socket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Iterator

from agent.common.errors import UsageError

__all__ = ["register", "run"]

_KEY_LEN = 16
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the NUL


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="serve a simulated QEMU 7.2 with an SEV guest (--snp: QEMU 9.1, SEV-SNP) on a QMP socket",
        description="A QMP server that behaves like QEMU 7.2 holding an SEV / SEV-ES guest "
        "at -S, with a simulated PSP doing the real launch cryptography.",
    )
    p.add_argument("--qmp", metavar="unix:PATH", help="where to listen (required unless --vms)")
    p.add_argument(
        "--vms",
        metavar="N",
        help="serve N independent VMs from this one process, one QMP socket each in --qmp-dir: "
        "DIR/vm-000.sock, DIR/vm-001.sock, ... (keys in --keys-out DIR/vm-000/, ...)",
    )
    p.add_argument("--qmp-dir", metavar="DIR", help="with --vms: the directory the VMs' sockets go in")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--sev", action="store_true", help="an SEV guest (the default)")
    kind.add_argument("--sev-es", action="store_true", help="an SEV-ES guest (sets policy bit 0x4)")
    kind.add_argument(
        "--snp",
        action="store_true",
        help="a QEMU 9.1 with an SEV-SNP guest (agent.tools.sim.snp): query-sev says sev-snp, "
        "x-sim-snp-guest-report gives the guest's VCEK-signed reports",
    )
    p.add_argument("--tik", metavar="FILE", help="TIK, 16 raw bytes (with --tek)")
    p.add_argument("--tek", metavar="FILE", help="TEK, 16 raw bytes (with --tik)")
    p.add_argument(
        "--keys-out", metavar="DIR", help="without --tik/--tek: write the generated tik.bin, tek.bin here (0600)"
    )
    p.add_argument(
        "--pdh-key", metavar="FILE", help="the platform's PDH private key, PEM, P-384 (default: a fresh one)"
    )
    p.add_argument("--pdh-out", metavar="FILE", help="write the platform's PDH certificate here (base64)")
    p.add_argument("--cert-chain-out", metavar="FILE", help="write the PEK || OCA || CEK chain here (base64)")
    p.add_argument(
        "--cek-out",
        metavar="FILE",
        help="write the CEK signed by the simulated AMD's ASK here (base64), as AMD's key server serves it",
    )
    p.add_argument(
        "--amd-roots-out",
        metavar="DIR",
        help="write the simulated AMD's root (sim-ark.cert, sim-ask.cert) here, for the owner's [platform] amd_roots",
    )
    p.add_argument("--dh-cert-file", metavar="FILE", help="the owner's GODH certificate, base64 (with --session-file)")
    p.add_argument("--session-file", metavar="FILE", help="the owner's launch session, base64 (instead of --tik/--tek)")
    p.add_argument(
        "--digest", metavar="HEX", help="launch digest, 64 hex digits (default: SHA-256 of a fixed test firmware)"
    )
    p.add_argument(
        "--policy",
        metavar="N",
        default=None,
        help="guest policy (default 0x1; with --snp the 64-bit SNP policy, default 0x30000)",
    )
    snp = p.add_argument_group("SEV-SNP (with --snp; the sev-snp-guest object's properties, as QEMU takes them)")
    snp.add_argument("--snp-digest", metavar="HEX", help="the launch digest the firmware measures to (48 bytes hex)")
    snp.add_argument("--id-block", metavar="B64", help="the ID block, base64 (with --id-auth)")
    snp.add_argument("--id-auth", metavar="B64", help="the ID authentication information, base64")
    snp.add_argument("--host-data", metavar="B64", help="32 bytes of host data, base64")
    snp.add_argument("--author-key-enabled", action="store_true", help="the ID auth carries an author key")
    p.add_argument("--api-major", metavar="N", default="1", help="PSP API major version (default 1)")
    p.add_argument("--api-minor", metavar="N", default="55", help="PSP API minor version (default 55)")
    p.add_argument("--build-id", metavar="N", default="21", help="PSP firmware build (default 21)")
    p.add_argument("--running", action="store_true", help="model a VM already launched and running")
    p.add_argument("--measure-delay", metavar="S", default="0", help="seconds before the measurement is available")
    area = p.add_mutually_exclusive_group()
    area.add_argument(
        "--no-secret-area",
        action="store_true",
        help="firmware without an SEV secret-block entry (QEMU then needs a gpa)",
    )
    area.add_argument(
        "--secret-area",
        metavar="GPA,SIZE",
        help="the firmware's SEV secret-block entry (default 0x80c000,0xc00); 0,0 is "
        "Debian's stock OVMF.fd: QEMU injects at gpa 0 and the guest never sees it",
    )
    area.add_argument(
        "--firmware",
        metavar="F",
        help="read the SEV secret-block entry from this OVMF image, as QEMU does "
        "(the digest still comes from --digest)",
    )
    mh = p.add_argument_group("SEV fast migration (docs/mh.md)")
    mh.add_argument(
        "--mh",
        action="store_true",
        help="model the guest's migration handler: MH keys from the secret table, x-mh-set-peer-key, "
        "x-mh-query, and migrate / migrate-incoming that carry encrypted guest pages",
    )
    mh.add_argument("--mh-vm", metavar="NAME", default="vm1", help="the VM name the MH binds its keys to (default vm1)")
    mh.add_argument(
        "--mh-secrets-out", metavar="FILE", help="(tests only) write the MH's private and transport keys here, 0600"
    )
    p.add_argument(
        "--x-test-hold",
        metavar="COMMAND",
        action="append",
        default=[],
        help="(tests only, not QEMU) the first COMMAND request is never executed or answered: "
        "its client hangs until it disconnects (kill an agent at an exact step)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.common.logs import setup_logging
    from agent.tools.sim.machine import DEFAULT_DIGEST, SimConfig

    setup_logging(args.log_level)
    from agent.app.hardening import harden_process

    harden_process()  # the simulated PSP holds TIK/TEK: no core dump
    if args.vms is not None or args.qmp_dir is not None:
        return _run_many(args)
    if args.qmp is None:
        raise UsageError("--qmp unix:PATH is required (or --vms N --qmp-dir DIR)")
    path = _socket_path(args.qmp)
    if args.snp:
        return _run_snp(args, path)
    for flag in ("snp_digest", "id_block", "id_auth", "host_data"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} only applies with --snp")
    if args.author_key_enabled:
        raise UsageError("--author-key-enabled only applies with --snp")
    mh_vm = _mh_vm(args)
    policy = _number("--policy", args.policy if args.policy is not None else "0x1", 0xFFFFFFFF)
    api_major = _number("--api-major", args.api_major, 0xFF)
    api_minor = _number("--api-minor", args.api_minor, 0xFF)
    build_id = _number("--build-id", args.build_id, 0xFF)
    delay = _seconds("--measure-delay", args.measure_delay)
    digest = _digest(args.digest) if args.digest is not None else DEFAULT_DIGEST
    pdh_key = _read_pdh_key(args.pdh_key) if args.pdh_key is not None else None
    secret_gpa, secret_size = _secret_area(args)
    session = _launch_session(args)
    if session is not None:
        tik = tek = keys_out = None
    else:
        tik, tek, keys_out = _session_keys(args)
    try:
        config = SimConfig(
            tik=tik,
            tek=tek,
            pdh_private_key=pdh_key,
            session=session,
            digest=digest,
            policy=policy,
            api_major=api_major,
            api_minor=api_minor,
            build_id=build_id,
            sev_es=args.sev_es,
            state="running" if args.running else "prelaunch",
            measure_delay_s=delay,
            secret_gpa=secret_gpa,
            secret_size=secret_size,
            mh_vm=mh_vm,
            mh_secrets_out=args.mh_secrets_out if mh_vm is not None else None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    outputs = {
        "--pdh-out": args.pdh_out,
        "--cert-chain-out": args.cert_chain_out,
        "--cek-out": args.cek_out,
        "--amd-roots-out": args.amd_roots_out,
    }
    ephemeral = keys_out is None and args.tik is None and session is None
    return asyncio.run(_serve(config, path, keys_out, outputs, warn_ephemeral=ephemeral, hold=args.x_test_hold))


def _mh_vm(args: argparse.Namespace) -> str | None:
    """--mh: the VM name the MH binds its keys to; --mh-secrets-out only with --mh, never over a file."""
    if not args.mh:
        if args.mh_secrets_out is not None:
            raise UsageError("--mh-secrets-out only applies with --mh")
        return None
    name = args.mh_vm
    if not 1 <= len(name.encode()) <= 255:
        raise UsageError("--mh-vm must be 1..255 bytes")
    out = args.mh_secrets_out
    if out is not None:
        if os.path.lexists(out):
            raise UsageError(f"--mh-secrets-out {out} exists")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise UsageError(f"--mh-secrets-out: the directory of {out} does not exist")
    return name


def _run_snp(args: argparse.Namespace, path: str) -> int:
    """``--snp``: QEMU 9.1 with a sev-snp-guest object (agent.tools.sim.snp)."""
    from agent.tools.sim.snp import DEFAULT_SNP_DIGEST, DEFAULT_SNP_POLICY, SnpSimConfig

    sev_only = {
        "--tik": args.tik,
        "--tek": args.tek,
        "--keys-out": args.keys_out,
        "--pdh-key": args.pdh_key,
        "--pdh-out": args.pdh_out,
        "--cert-chain-out": args.cert_chain_out,
        "--cek-out": args.cek_out,
        "--dh-cert-file": args.dh_cert_file,
        "--session-file": args.session_file,
        "--digest": args.digest,
        "--secret-area": args.secret_area,
        "--firmware": args.firmware,
    }
    for flag, value in sev_only.items():
        if value is not None:
            raise UsageError(f"{flag} does not apply to --snp")
    if args.running or args.no_secret_area:
        raise UsageError("--running/--no-secret-area do not apply to --snp")
    if args.mh:
        raise UsageError("--mh does not apply to --snp: an SNP guest takes no launch secret table")
    policy = _number("--policy", args.policy, (1 << 64) - 1) if args.policy is not None else DEFAULT_SNP_POLICY
    digest = DEFAULT_SNP_DIGEST
    if args.snp_digest is not None:
        try:
            digest = bytes.fromhex(args.snp_digest)
        except ValueError:
            raise UsageError("--snp-digest must be hex") from None
        if len(digest) != 48:
            raise UsageError(f"--snp-digest must be 48 bytes (96 hex digits), got {len(digest)} bytes")
    blobs = {}
    for flag, value, size in (
        ("--id-block", args.id_block, 0x60),
        ("--id-auth", args.id_auth, 0x1000),
        ("--host-data", args.host_data, 32),
    ):
        if value is None:
            continue
        try:
            blobs[flag] = base64.b64decode(value, validate=True)
        except ValueError:
            raise UsageError(f"{flag} is not valid base64") from None
        if len(blobs[flag]) != size:
            raise UsageError(f"{flag} must be {size} bytes, got {len(blobs[flag])}")
    try:
        config = SnpSimConfig(
            policy=policy,
            digest=digest,
            id_block=blobs.get("--id-block"),
            id_auth=blobs.get("--id-auth"),
            host_data=blobs.get("--host-data", bytes(32)),
            author_key_enabled=args.author_key_enabled,
            api_major=_number("--api-major", args.api_major, 0xFF),
            api_minor=_number("--api-minor", args.api_minor, 0xFF),
            build_id=_number("--build-id", args.build_id, 0xFF),
        )
    except ValueError as exc:
        raise UsageError(f"sev-snp-guest: {exc}") from None
    return asyncio.run(_serve(config, path, None, {"--amd-roots-out": args.amd_roots_out}))


async def _serve(
    config,
    path: str,
    keys_out: str | None,
    outputs: dict[str, str | None] | None = None,
    *,
    warn_ephemeral: bool = False,
    hold: list[str] | None = None,
) -> int:
    from agent.common.logs import get_logger
    from agent.tools.sim.psp import FwError
    from agent.tools.sim.qmp_server import Simulator

    with _stop_on_signals() as stop:
        try:
            sim = Simulator(config, path)
            sim.hold_once = set(hold or ())
        except FwError as exc:
            # QEMU: "sev_launch_start: LAUNCH_START ret=-5 fw_error=N 'text'", then exit.
            raise UsageError(
                f"--session-file: LAUNCH_START failed: fw_error={int(exc.code)} '{exc.text}' ({exc.why})"
            ) from None
        try:
            if getattr(config, "snp", False) is True:
                _write_snp_roots(sim.machine, (outputs or {}).get("--amd-roots-out"))
            else:
                _write_platform_certs(sim.machine.platform, outputs or {})
        except BaseException:
            sim.machine.shutdown()
            raise
        if warn_ephemeral:
            get_logger("keyagent.sim").warning(
                "sim.keys_ephemeral", why="no --tik/--tek, no session and no --keys-out: no owner can build a packet"
            )
        try:
            await sim.start()
        except OSError as exc:
            await sim.close()
            raise UsageError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        try:
            ready = {
                "ready": True,
                "qmp": f"unix:{path}",
                "policy": config.effective_policy,
                "sev_es": bool(config.effective_policy & 0x4),
                "keys_out": keys_out,
                "session": getattr(config, "session", None) is not None,
            }
            if getattr(config, "snp", False) is True:
                ready.update(snp=True, sev_es=False)
            await _announce_and_wait(ready, sim.wait_closed(), stop)
        finally:
            await sim.close()
    return getattr(sim.machine, "exit_status", 0)  # SNP: a failed SNP_LAUNCH_FINISH exits 1, as QEMU


def _run_many(args: argparse.Namespace) -> int:
    """``--vms N --qmp-dir DIR``: N VMs in this process (agent.tools.sim.multi).

    Every VM is the single-VM simulator with keys of its own; the platform
    (PDH and chain, so ``--pdh-key`` and the ``--*-out`` certificates) is the
    host's one PSP, shared.  What is one VM's alone has no meaning here."""
    from agent.tools.sim.machine import DEFAULT_DIGEST, SimConfig
    from agent.tools.sim.multi import MAX_VMS, MultiSimulator, socket_name, vm_name

    if args.vms is None or args.qmp_dir is None:
        raise UsageError("--vms N and --qmp-dir DIR go together")
    if args.qmp is not None:
        raise UsageError("--qmp is one VM's socket: with --vms the sockets are DIR/vm-000.sock, ... in --qmp-dir")
    one_vm = {
        "--snp": args.snp or None,
        "--tik": args.tik,
        "--tek": args.tek,
        "--dh-cert-file": args.dh_cert_file,
        "--session-file": args.session_file,
        "--snp-digest": args.snp_digest,
        "--id-block": args.id_block,
        "--id-auth": args.id_auth,
        "--host-data": args.host_data,
        "--author-key-enabled": args.author_key_enabled or None,
    }
    for flag, value in one_vm.items():
        if value is not None:
            raise UsageError(f"{flag} does not apply to --vms (every VM gets fresh keys: --keys-out DIR)")
    count = _number("--vms", args.vms, MAX_VMS)
    if count < 1:
        raise UsageError("--vms must be at least 1")
    qmp_dir = args.qmp_dir
    if not os.path.isdir(qmp_dir):
        raise UsageError(f"--qmp-dir {qmp_dir} is not a directory")
    for i in range(count):
        path = os.path.join(qmp_dir, socket_name(i, count))
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise UsageError(f"--qmp-dir: {path[:80]}... is longer than {_MAX_UNIX_PATH} bytes")
        if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise UsageError(f"--qmp-dir: {path} exists and is not a socket")
    _enough_files(2 * count + 64)
    policy = _number("--policy", args.policy if args.policy is not None else "0x1", 0xFFFFFFFF)
    secret_gpa, secret_size = _secret_area(args)
    keys = [(os.urandom(_KEY_LEN), os.urandom(_KEY_LEN)) for _ in range(count)]
    try:
        base = SimConfig(
            tik=keys[0][0],
            tek=keys[0][1],
            pdh_private_key=_read_pdh_key(args.pdh_key) if args.pdh_key is not None else None,
            digest=_digest(args.digest) if args.digest is not None else DEFAULT_DIGEST,
            policy=policy,
            api_major=_number("--api-major", args.api_major, 0xFF),
            api_minor=_number("--api-minor", args.api_minor, 0xFF),
            build_id=_number("--build-id", args.build_id, 0xFF),
            sev_es=args.sev_es,
            state="running" if args.running else "prelaunch",
            measure_delay_s=_seconds("--measure-delay", args.measure_delay),
            secret_gpa=secret_gpa,
            secret_size=secret_size,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.keys_out is not None:
        for i in range(count):
            for name in ("tik.bin", "tek.bin"):
                existing = os.path.join(args.keys_out, vm_name(i, count), name)
                if os.path.lexists(existing):
                    raise UsageError(f"--keys-out: {existing} already exists; not overwriting it")
        _write_keys(args.keys_out, {})
        for i, (tik, tek) in enumerate(keys):
            _write_keys(os.path.join(args.keys_out, vm_name(i, count)), {"tik.bin": tik, "tek.bin": tek})
    outputs = {
        "--pdh-out": args.pdh_out,
        "--cert-chain-out": args.cert_chain_out,
        "--cek-out": args.cek_out,
        "--amd-roots-out": args.amd_roots_out,
    }
    sims = MultiSimulator.with_keys(base, keys, qmp_dir)
    del keys
    return asyncio.run(_serve_many(sims, base, qmp_dir, args.keys_out, outputs))


async def _serve_many(sims, config, qmp_dir: str, keys_out: str | None, outputs: dict[str, str | None]) -> int:
    from agent.common.logs import get_logger

    with _stop_on_signals() as stop:
        try:
            _write_platform_certs(sims.platform, outputs)
            if keys_out is None:
                get_logger("keyagent.sim").warning(
                    "sim.keys_ephemeral", why="no --keys-out: no owner can build a packet", vms=len(sims.vms)
                )
            try:
                await sims.start()
            except OSError as exc:
                raise UsageError(f"cannot listen in {qmp_dir}: {exc.strerror or exc}") from None
            ready = {
                "ready": True,
                "vms": len(sims.vms),
                "qmp_dir": qmp_dir,
                "qmp_sockets": [f"unix:{path}" for path in sims.paths],
                "policy": config.effective_policy,
                "sev_es": bool(config.effective_policy & 0x4),
                "keys_out": keys_out,
                "session": False,
            }
            await _announce_and_wait(ready, sims.wait_closed(), stop)
        finally:
            await sims.close()
    return 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[asyncio.Event]:
    """SIGTERM / SIGINT set the event this yields (the polite stop both serve
    loops wait for) for as long as the block runs; the handlers go after."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _announce_and_wait(ready: dict[str, object], closed: Awaitable[object], stop: asyncio.Event) -> None:
    """Print the ready line a script waits for, then wait until the
    simulator is closed (every VM got ``quit``) or a signal asks to stop."""
    print(json.dumps(ready), flush=True)
    quit_wait = asyncio.ensure_future(closed)
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait({quit_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    for fut in (quit_wait, stop_wait):
        fut.cancel()


def _enough_files(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``needed`` when the hard limit allows it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise UsageError(f"--vms needs {needed} open files; the hard limit (ulimit -Hn) is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _write_snp_roots(machine, roots_dir: str | None) -> None:
    """--amd-roots-out with --snp: the simulated chip's test ARK and ASK, <product>-ark.pem / -ask.pem."""
    if roots_dir is None:
        return
    if os.path.lexists(roots_dir) and not os.path.isdir(roots_dir):
        raise UsageError(f"--amd-roots-out {roots_dir} exists and is not a directory")
    try:
        os.makedirs(roots_dir, exist_ok=True)
        for name, pem in machine.roots_pems().items():
            target = os.path.join(roots_dir, name)
            tmp = target + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.replace(tmp, target)  # a reader never sees half a PEM
    except OSError as exc:
        raise UsageError(f"--amd-roots-out: cannot write into {roots_dir}: {exc.strerror}") from None


# -- argument checks: each bad value is a one-line UsageError -------------


def _socket_path(spec: str) -> str:
    if not spec.startswith("unix:") or len(spec) == len("unix:"):
        raise UsageError(f"--qmp must be unix:PATH, got {spec[:80]!r}")
    path = spec[len("unix:") :]
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise UsageError(f"--qmp path is longer than {_MAX_UNIX_PATH} bytes: {path[:80]}...")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"--qmp directory {parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"--qmp {path} exists and is not a socket")
    return path


def _secret_area(args: argparse.Namespace) -> tuple[int | None, int]:
    """The firmware's SEV secret-block entry (base, size); base None when it has none."""
    from agent.tools.sim.machine import DEFAULT_SECRET_GPA, DEFAULT_SECRET_SIZE

    if args.no_secret_area:
        return None, 0
    if args.secret_area is not None:
        gpa, comma, size = args.secret_area.partition(",")
        if not comma:
            raise UsageError(f"--secret-area must be GPA,SIZE, got {args.secret_area[:80]!r}")
        return _number("--secret-area GPA", gpa, 0xFFFFFFFF), _number("--secret-area SIZE", size, 0xFFFFFFFF)
    if args.firmware is not None:
        from agent.sev.ovmf import OvmfImage

        try:
            with open(args.firmware, "rb") as fh:
                image = OvmfImage(fh.read(256 << 20))
        except OSError as exc:
            raise UsageError(f"cannot read --firmware {args.firmware}: {exc.strerror or exc}") from None
        area = image.secret_area()  # FirmwareError is a UsageError
        return (None, 0) if area is None else (area.base, area.size)
    return DEFAULT_SECRET_GPA, DEFAULT_SECRET_SIZE


def _number(flag: str, text: str, maximum: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError(f"{flag} must be an integer (decimal or 0x hex), got {text[:40]!r}") from None
    if not 0 <= value <= maximum:
        raise UsageError(f"{flag} must be 0..{maximum}, got {value}")
    return value


def _seconds(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag} must be a number of seconds, got {text[:40]!r}") from None
    if not 0 <= value < float("inf"):
        raise UsageError(f"{flag} must be >= 0 seconds, got {text[:40]}")
    return value


def _digest(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise UsageError("--digest must be hex") from None
    if len(value) != 32:
        raise UsageError(f"--digest must be 32 bytes (64 hex digits), got {len(value)} bytes")
    return value


def _session_keys(args: argparse.Namespace) -> tuple[bytes, bytes, str | None]:
    if (args.tik is None) != (args.tek is None):
        raise UsageError("--tik and --tek go together")
    if args.tik is not None:
        if args.keys_out is not None:
            raise UsageError("--keys-out only applies when the keys are generated (no --tik/--tek)")
        return _read_key("--tik", args.tik), _read_key("--tek", args.tek), None
    tik, tek = os.urandom(_KEY_LEN), os.urandom(_KEY_LEN)
    if args.keys_out is None:
        return tik, tek, None
    _write_keys(args.keys_out, {"tik.bin": tik, "tek.bin": tek})
    return tik, tek, args.keys_out


def _read_upto(flag: str, path: str, size: int) -> bytes:
    """At most ``size`` bytes of a file that is not a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(size)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def _read_file(flag: str, path: str, limit: int) -> bytes:
    data = _read_upto(flag, path, limit + 1)
    if len(data) > limit:
        raise UsageError(f"{flag}: {path} is larger than {limit} bytes")
    return data


def _read_pdh_key(path: str):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = _read_file("--pdh-key", path, 65536)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never the parser's text: it may quote the file.
        raise UsageError(f"--pdh-key: {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != ec.SECP384R1.name:
        raise UsageError(f"--pdh-key: {path} is not an EC key on P-384 (secp384r1)")
    return key


def _read_b64_file(flag: str, path: str) -> bytes:
    import binascii

    text = _read_file(flag, path, 65536)
    try:
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{flag}: {path} is not valid base64") from None


def _launch_session(args: argparse.Namespace) -> tuple[bytes, bytes] | None:
    if (args.dh_cert_file is None) != (args.session_file is None):
        raise UsageError("--dh-cert-file and --session-file go together")
    if args.session_file is None:
        return None
    if args.tik is not None or args.tek is not None or args.keys_out is not None:
        raise UsageError("--session-file replaces --tik/--tek/--keys-out: the keys come from the session")
    if args.pdh_key is None:
        raise UsageError("--session-file needs --pdh-key: a session opens only with the PDH it was made for")
    return _read_b64_file("--dh-cert-file", args.dh_cert_file), _read_b64_file("--session-file", args.session_file)


def _write_platform_certs(platform, outputs: dict[str, str | None]) -> None:
    """--pdh-out / --cert-chain-out / --cek-out: public certificates, base64 like QEMU's
    answer; --amd-roots-out: the simulated AMD's ARK and ASK, in AMD's binary format."""
    roots_dir = outputs.get("--amd-roots-out")
    if roots_dir is not None:
        if os.path.lexists(roots_dir) and not os.path.isdir(roots_dir):
            raise UsageError(f"--amd-roots-out {roots_dir} exists and is not a directory")
        try:
            platform.amd.write_roots(roots_dir)
        except OSError as exc:
            raise UsageError(f"--amd-roots-out: cannot write into {roots_dir}: {exc.strerror}") from None
    blobs = {
        "--pdh-out": lambda: platform.pdh_cert.to_bytes(),
        "--cert-chain-out": lambda: platform.chain.to_bytes(),
        "--cek-out": lambda: platform.chain.cek.to_bytes(),
    }
    for flag, make in blobs.items():
        target = outputs.get(flag)
        if target is None:
            continue
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UsageError(f"{flag}: cannot write {target}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(make()) + b"\n")


def _read_key(flag: str, path: str) -> bytes:
    data = _read_upto(flag, path, _KEY_LEN + 1)
    if len(data) != _KEY_LEN:
        shown = f"{len(data)}" if len(data) <= _KEY_LEN else f"more than {_KEY_LEN}"
        raise UsageError(f"{flag}: {path} must hold exactly {_KEY_LEN} raw bytes, found {shown}")
    return data


def _write_keys(directory: str, files: dict[str, bytes]) -> None:
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise UsageError(f"--keys-out {directory} exists and is not a directory") from None
    except OSError as exc:
        raise UsageError(f"--keys-out: cannot create {directory}: {exc.strerror}") from None
    from agent.io.rundir import write_new_files

    write_new_files([(os.path.join(directory, name), data) for name, data in files.items()], "--keys-out")


if __name__ == "__main__":  # pragma: no cover
    from agent.cli.main import main

    sys.exit(main(["simulate", *sys.argv[1:]]))
