"""``keyagent owner``: the reference guest owner and its offline tools.

    owner serve   --config owner.toml --listen HOST:PORT [--db URL]
                  --db sqlite:///PATH (default: owner.db next to owner.toml)
                  or postgresql://... (replicas share it; needs [owner] state_key)
    owner audit   --db URL [--vm NAME] [--since ISO8601]
                  the decisions as JSON lines: time, vm, decision, reason, ...
    owner verify  --tik F --measurement B64 --api-major N --api-minor N
                  --build-id N --policy N --digest HEX           exit 0 valid, 1 not
    owner package --tik F --tek F --measurement B64 --secret GUID=FILE [...] [--iv B64]
    owner session --pdh F --policy N --out-dir D (--cert-chain F [--amd-roots DIR] | --unverified-platform)
                  writes godh.b64, session.b64 (QEMU sev-guest dh-cert-file,
                  session-file) and tik.bin, tek.bin (16 raw bytes) into D,
                  once the chain verified to AMD's roots
    owner platform --pdh F [--cert-chain F] [--amd-roots DIR]
                  prints {"pdh_sha256", "verified", "reason"}: exit 0 verified
                  to AMD's roots, 1 not (the pin is printed either way)
    owner measure ...        (registered by agent.owner.measure when present)
    owner idblock ... / owner verify-report ...   (SEV-SNP, agent.owner.snp_tools)

This module is imported every time ``keyagent`` builds its parser, the
sidecar's commands included, so it imports only argparse-level modules at
the top; the service, HTTP and crypto modules load inside the handlers.
Keys and secrets are always named by file, never given on the command line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import importlib
import json
import sys
from typing import Any

from agent.cli.run import seconds
from agent.common.errors import FlowFailed, UsageError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("owner", help="reference guest owner: serve, measure, verify, package, session")
    sub = p.add_subparsers(dest="owner_command", metavar="OWNER_COMMAND")
    sub.required = True

    s = sub.add_parser("serve", help="serve the guest owner protocol over HTTP")
    s.add_argument("--config", required=True, metavar="FILE", help="owner.toml")
    s.add_argument("--listen", required=True, metavar="HOST:PORT", help="port 0 picks a free port")
    s.add_argument("--log-level", default="info", metavar="LEVEL")
    s.add_argument(
        "--max-connections",
        type=_count,
        default=100,
        metavar="N",
        help="connections served at once; more wait in the listen backlog (default 100)",
    )
    s.add_argument(
        "--request-timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="time for a request's headers and body, however slowly sent (default 10)",
    )
    s.add_argument(
        "--db",
        metavar="URL",
        help="the owner's state: sqlite:///PATH (default: owner.db next to owner.toml) or postgresql://...",
    )
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("audit", help="print the owner's decisions from its database as JSON lines")
    a.add_argument("--db", required=True, metavar="URL", help="sqlite:///PATH or postgresql://...")
    a.add_argument("--vm", metavar="NAME", help="only this VM's decisions")
    a.add_argument("--since", metavar="ISO8601", help="only decisions at or after this time (UTC if no zone)")
    a.set_defaults(func=cmd_audit)

    v = sub.add_parser("verify", help="check a launch measurement against an expected digest")
    _add_measurement_args(v)
    v.add_argument("--digest", action="append", metavar="HEX", help="expected launch digest (repeat to accept several)")
    measure = _measure_module()
    if measure is not None and hasattr(measure, "add_measure_options"):
        measure.add_measure_options(v)  # --firmware/--kernel/... instead of --digest
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("package", help="build a launch secret packet")
    k.add_argument("--tik", required=True, metavar="FILE")
    k.add_argument("--tek", required=True, metavar="FILE")
    k.add_argument("--measurement", required=True, metavar="B64")
    k.add_argument(
        "--secret",
        required=True,
        action="append",
        metavar="GUID=FILE",
        help="a secret table entry; GUID may be an alias like luks-key",
    )
    k.add_argument("--iv", metavar="B64", help="16-byte IV (default: fresh random)")
    k.set_defaults(func=cmd_package)

    x = sub.add_parser("session", help="make a launch session for a platform's PDH")
    x.add_argument(
        "--pdh",
        required=True,
        metavar="FILE",
        help="the platform's PDH certificate (2084 bytes, raw or base64 as QEMU reports it)",
    )
    x.add_argument(
        "--cert-chain",
        metavar="FILE",
        help="PEK || OCA || CEK (raw or base64, QEMU's cert-chain, the CEK as AMD's key server signs "
        "it): must chain the PDH to AMD's ARK",
    )
    x.add_argument(
        "--amd-roots",
        metavar="DIR",
        help="trust the <product>-ark.cert/<product>-ask.cert here instead of the built-in AMD roots",
    )
    x.add_argument(
        "--unverified-platform",
        action="store_true",
        help="make the session without checking the platform at all (demos only)",
    )
    x.add_argument("--policy", required=True, type=_policy_int, metavar="N", help="the guest policy")
    x.add_argument(
        "--out-dir",
        required=True,
        metavar="DIR",
        help="where godh.b64, session.b64, tik.bin, tek.bin go (created 0700 if missing)",
    )
    x.set_defaults(func=cmd_session)

    q = sub.add_parser("platform", help="check a platform's PDH and chain; print its pdh_sha256 pin")
    q.add_argument("--pdh", required=True, metavar="FILE", help="the PDH certificate (raw or base64)")
    q.add_argument("--cert-chain", metavar="FILE", help="PEK || OCA || CEK (raw or base64), the CEK AMD-signed")
    q.add_argument("--amd-roots", metavar="DIR", help="instead of the built-in AMD roots")
    q.set_defaults(func=cmd_platform)

    if measure is not None and hasattr(measure, "register"):
        measure.register(sub)

    from agent.owner import snp_tools  # SEV-SNP: owner idblock, owner verify-report

    snp_tools.register(sub)


def _measure_module() -> Any:
    try:
        return importlib.import_module("agent.owner.measure")
    except ModuleNotFoundError as exc:
        if exc.name == "agent.owner.measure":
            return None
        raise


def _add_measurement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tik", required=True, metavar="FILE")
    p.add_argument("--measurement", required=True, metavar="B64")
    p.add_argument("--api-major", required=True, type=int, metavar="N")
    p.add_argument("--api-minor", required=True, type=int, metavar="N")
    p.add_argument("--build-id", required=True, type=int, metavar="N")
    p.add_argument("--policy", required=True, type=_policy_int, metavar="N")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be in 1..1000000, got {value}")
    return value


def _policy_int(text: str) -> int:
    # Policies are usually written in hex (0x1, 0x5).
    return int(text, 0)


def _b64(text: str, what: str, length: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise UsageError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- verify -------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.owner.config import parse_digest, read_key_file
    from agent.sev.measurement import verify_measurement

    for name in ("api_major", "api_minor", "build_id"):
        value = getattr(args, name)
        if not 0 <= value <= 255:
            raise UsageError(f"--{name.replace('_', '-')} must be in 0..255, got {value}")
    if not 0 <= args.policy <= 0xFFFFFFFF:
        raise UsageError(f"--policy must be a 32-bit value, got {args.policy}")
    blob = _b64(args.measurement, "--measurement", 48)
    tik = read_key_file(args.tik, "TIK")

    digests = [parse_digest(d, "--digest") for d in (args.digest or [])]
    measure = _measure_module()
    if measure is not None and hasattr(measure, "has_measure_options") and measure.has_measure_options(args):
        if digests:
            raise UsageError("owner verify takes --digest or the measure options, not both")
        from agent.sev.policy import es_mismatch

        mismatch = es_mismatch(bool(args.sev_es), args.policy)
        if mismatch is not None:
            raise UsageError(f"--policy does not fit the launch: {mismatch}")
        digests.append(measure.digest_from_args(args))
    if not digests:
        raise UsageError("owner verify needs --digest HEX (or --firmware and the other measure options)")

    ok = False
    for digest in digests:
        ok |= verify_measurement(blob, tik.reveal(), args.api_major, args.api_minor, args.build_id, args.policy, digest)
    if not ok:
        raise FlowFailed("measurement does not match")
    _print_json({"valid": True, "mnonce": blob[32:].hex()})
    return 0


# -- package ------------------------------------------------------------------


def cmd_package(args: argparse.Namespace) -> int:
    import os

    from agent.owner.config import read_key_file, read_secret_file, resolve_guid_or_usage
    from agent.sev.packet import build_packet
    from agent.sev.secret_table import build_secret_table

    blob = _b64(args.measurement, "--measurement", 48)
    iv = _b64(args.iv, "--iv", 16) if args.iv is not None else os.urandom(16)
    tik = read_key_file(args.tik, "TIK")
    tek = read_key_file(args.tek, "TEK")

    entries = []
    seen = set()
    for spec in args.secret:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--secret must be GUID=FILE, got {spec.split('=', 1)[0]!r}=...")
        guid = resolve_guid_or_usage(name, "--secret")
        if guid in seen:
            raise UsageError(f"--secret {guid} is given twice")
        seen.add(guid)
        entries.append((guid, read_secret_file(path, f"--secret {name}")))

    try:
        table = build_secret_table([(g, s.reveal()) for g, s in entries])
    except ValueError as exc:
        raise UsageError(f"cannot build the secret table: {exc}") from None
    header, ciphertext = build_packet(tik.reveal(), tek.reveal(), blob[:32], table, iv)
    _print_json({"packet_header": base64.b64encode(header).decode(), "secret": base64.b64encode(ciphertext).decode()})
    return 0


# -- session ------------------------------------------------------------------

SESSION_FILES = ("godh.b64", "session.b64", "tik.bin", "tek.bin")


def _read_cert_input(path: str, flag: str, length: int) -> bytes:
    """A certificate file: ``length`` raw bytes, or their base64 (whitespace allowed)."""
    from agent.owner.config import _read_file

    raw = _read_file(path, flag, limit=4 * length)
    if len(raw) == length:
        return raw
    text = b"".join(raw.split())
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{flag} {path}: neither {length} raw bytes nor valid base64") from None
    if len(data) != length:
        raise UsageError(f"{flag} {path}: must hold {length} bytes (raw or base64), holds {len(data)}")
    return data


def _roots(path: str | None) -> tuple:
    from agent.sev.ca import builtin_roots, load_roots_dir

    if not path:
        return builtin_roots()
    try:
        return load_roots_dir(path)
    except ValueError as exc:
        raise UsageError(f"--amd-roots: {exc}") from None


def cmd_platform(args: argparse.Namespace) -> int:
    """What an operator runs to enroll a host: the pin, and whether AMD vouches for it."""
    from agent.owner.service import SessionInputError, check_platform
    from agent.sev.cert import CERT_LEN, CHAIN_LEN

    roots = _roots(args.amd_roots)
    pdh = _read_cert_input(args.pdh, "--pdh", CERT_LEN)
    chain = _read_cert_input(args.cert_chain, "--cert-chain", CHAIN_LEN) if args.cert_chain else None
    try:
        _check_pdh(pdh)
    except SessionInputError as exc:
        raise UsageError(str(exc)) from None
    out: dict[str, Any] = {"pdh_sha256": hashlib.sha256(pdh).hexdigest()}
    try:
        checked = check_platform("amd", pdh, chain, roots=roots, chain_name="--cert-chain")
    except SessionInputError as exc:
        if not exc.refusal:
            raise UsageError(str(exc)) from None
        _print_json({**out, "verified": None, "reason": str(exc)})
        return 1
    _print_json({**out, "verified": checked.trust, "reason": "chain verified to a trusted AMD root"})
    return 0


def _check_pdh(pdh: bytes) -> None:
    from agent.owner.service import SessionInputError
    from agent.sev.cert import USAGE_PDH, Certificate

    try:
        cert = Certificate.from_bytes(pdh)
    except ValueError as exc:
        raise SessionInputError(f"--pdh: {exc}") from None
    if cert.usage != USAGE_PDH:
        raise SessionInputError(f"--pdh: certificate has usage 0x{cert.usage:x}, not PDH (0x{USAGE_PDH:x})")


def cmd_session(args: argparse.Namespace) -> int:
    """The owner's side of LAUNCH_START, offline.

    The keys are drawn here (os.urandom; the GODH key from cryptography),
    written once, 0600, never over an existing file, and printed nowhere:
    stdout names the files.
    """
    import os

    from agent.owner.service import SessionInputError, SessionMaterial, check_platform, make_session
    from agent.sev.cert import CERT_LEN, CHAIN_LEN

    if not 0 <= args.policy <= 0xFFFFFFFF:
        raise UsageError(f"--policy must be a 32-bit value, got {args.policy}")
    if args.unverified_platform and (args.cert_chain or args.amd_roots):
        raise UsageError("--unverified-platform checks nothing: leave out --cert-chain/--amd-roots")
    if not args.unverified_platform and not args.cert_chain:
        raise UsageError(
            "--cert-chain is needed to verify the platform to AMD (or --unverified-platform, for demos only)"
        )
    roots = _roots(args.amd_roots)
    pdh = _read_cert_input(args.pdh, "--pdh", CERT_LEN)
    chain = _read_cert_input(args.cert_chain, "--cert-chain", CHAIN_LEN) if args.cert_chain else None
    out_dir = args.out_dir
    targets = [os.path.join(out_dir, name) for name in SESSION_FILES]
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} exists and is not a directory")
    for target in targets:
        if os.path.lexists(target):
            raise UsageError(f"--out-dir: {target} already exists; not overwriting it")

    try:
        _check_pdh(pdh)
        checked = check_platform(
            "any" if args.unverified_platform else "amd", pdh, chain, roots=roots, chain_name="--cert-chain"
        )
    except SessionInputError as exc:
        raise UsageError(str(exc)) from None
    material = SessionMaterial.fresh()
    try:
        made = make_session(pdh, chain, args.policy, material, names=("--pdh", "--cert-chain"), platform=checked)
    except SessionInputError as exc:
        raise UsageError(str(exc)) from None
    if not checked.verified:
        from agent.common.logs import get_logger

        get_logger("keyagent.owner").warning(
            "owner platform unchecked", why="--unverified-platform: this session may go to a platform nobody verified"
        )

    try:
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out-dir: cannot create {out_dir}: {exc.strerror}") from None
    contents = (
        base64.b64encode(made.godh) + b"\n",
        base64.b64encode(made.session) + b"\n",
        made.tik.reveal(),
        made.tek.reveal(),
    )
    _write_new_files(list(zip(targets, contents)))
    made.wipe()
    _print_json(
        {
            "godh": targets[0],
            "session": targets[1],
            "tik": targets[2],
            "tek": targets[3],
            "policy": args.policy,
            "chain_verified": made.chain_verified,
            "platform": made.trust,
        }
    )
    return 0


def _write_new_files(files: list[tuple[str, bytes]]) -> None:
    from agent.io.rundir import write_new_files

    write_new_files(files, "--out-dir")


# -- serve --------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--listen must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    value = int(port)
    if value > 65535:
        raise UsageError(f"--listen port must be 0..65535, got {value}")
    return host, value


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from agent.common.logs import setup_logging
    from agent.owner.config import load_owner_config

    try:
        setup_logging(args.log_level)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    host, port = parse_listen(args.listen)
    config = load_owner_config(args.config)
    from agent.owner.store import default_db_url, open_store, parse_db_url

    url = parse_db_url(args.db) if args.db else default_db_url(config.path)
    from agent.app.hardening import harden_process

    harden_process()  # the owner holds every VM's TIK/TEK and secrets: no core dump
    from agent.common.logs import get_logger

    store = open_store(url, config.state_key, log=get_logger("keyagent.owner"))  # schema, state key: exit 2
    return asyncio.run(
        _serve(
            config,
            host,
            port,
            max_connections=args.max_connections,
            request_timeout=args.request_timeout,
            store=store,
        )
    )


async def _serve(
    config: Any,
    host: str,
    port: int,
    *,
    max_connections: int = 100,
    request_timeout: float = 10.0,
    store: Any = None,
) -> int:
    import asyncio
    import signal

    from agent.common.logs import get_logger
    from agent.io.http import HttpServer
    from agent.owner.service import OwnerService

    log = get_logger("keyagent.owner")
    service = OwnerService(config, store=store)
    server = HttpServer(service.handle, max_connections=max_connections, request_timeout=request_timeout)
    try:
        bound_host, bound_port = await server.start_tcp(host, port)
    except OSError as exc:
        await service.store.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}"
    log.info(
        "owner listening",
        url=url,
        vms=sorted(config.vms),
        max_connections=max_connections,
        request_timeout_s=request_timeout,
    )
    shown_db = store.url.shown() if hasattr(store, "url") else "memory"
    log.info("owner state", db=shown_db, kind=service.store.kind, replica=getattr(service.store, "replica", ""))
    if any(vm.session and vm.platform == "amd" for vm in config.vms.values()):
        log.info("owner platform roots", source=config.amd_roots_source, products=[r.product for r in config.amd_roots])
    if any(vm.snp for vm in config.vms.values()):  # /v1/snp/attest: VCEK <- ASK <- ARK
        log.info("owner SNP roots", source=config.snp_roots_source, products=[r.product for r in config.snp_roots])
    service.log_secret_areas()
    _print_json({"listening": url})
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.close()
        await service.store.close()
    log.info("owner stopped")
    return 0


# -- audit --------------------------------------------------------------------


def parse_since(text: str) -> float:
    """ISO 8601 (``2026-12-02T16:00:00Z``, ``2026-12-02``): seconds since the epoch; UTC if no zone."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since must be an ISO 8601 time like 2026-12-02T16:00:00Z, got {text[:40]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def cmd_audit(args: argparse.Namespace) -> int:
    from agent.owner.store import parse_db_url
    from agent.owner.store_sql import read_audit_rows

    url = parse_db_url(args.db)
    since = parse_since(args.since) if args.since is not None else None
    for row in read_audit_rows(url, args.vm, since):
        sys.stdout.write(json.dumps(row.as_json()) + "\n")
    sys.stdout.flush()
    return 0
