"""The guest owner's SEV-SNP tools: ``owner measure --snp``, ``owner idblock``, ``owner verify-report``.

    owner measure --snp --firmware F [--kernel K [--initrd I] [--append C]]
                  --vcpus N (--vcpu-type T | --vcpu-sig N | --vcpu-family N --vcpu-model N
                  --vcpu-stepping N) [--guest-features HEX] [--json]
          -> the 48-byte SNP launch digest, hex
    owner idblock --digest HEX --policy HEX --id-key ID.pem --author-key AUTHOR.pem
                  [--family-id HEX] [--image-id HEX] [--svn N]
          -> {"id_block": b64, "id_auth": b64, "id_key_digest": hex, "author_key_digest": hex}
    owner verify-report --report R --vcek V [--product milan|genoa|turin] [--amd-roots DIR]
                  [--digest HEX] [--policy HEX] [--report-data HEX] [--host-data HEX]
                  [--id-key-digest HEX] [--author-key-digest HEX]
          -> {"valid", "product", "checks": [...], "report": {...}}; exit 0 valid, 1 not

Every input is checked here, before any computation, and a bad one is a
UsageError (exit 2) naming the option; the formats and the crypto live in
``agent.sev.snp_*``.  Only argparse is imported at the top: ``keyagent``
builds this parser for every command.  The ID and author keys are private:
they are read from files, used, and never printed or logged.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any

from agent.common.errors import UsageError

__all__ = ["register", "add_snp_measure_options", "measure_snp_requested", "cmd_measure_snp"]

# Far above any QEMU/KVM vCPU limit; keeps a typo from hashing for minutes.
MAX_VCPUS = 4096
REPORT_HEX_LIMIT = 4 * 0x4A0
CERT_LIMIT = 64 * 1024
KEY_LIMIT = 64 * 1024
# agent.sev.snp_ca.SNP_PRODUCTS, without importing cryptography to build a parser
SNP_PRODUCTS = ("milan", "genoa", "turin")


def _read_file(path: str, option: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except FileNotFoundError:
        raise UsageError(f"{option} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{option} {path} is a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {option} {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise UsageError(f"{option} {path} is larger than {limit} bytes")
    return raw


def _hex_bytes(text: str, option: str, length: int) -> bytes:
    clean = text.strip()
    if clean[:2].lower() == "0x":
        clean = clean[2:]
    try:
        raw = bytes.fromhex(clean)
    except ValueError:
        raise UsageError(f"{option} is not valid hex") from None
    if len(raw) != length:
        raise UsageError(f"{option} must be {length} bytes ({2 * length} hex digits), got {len(raw)}")
    return raw


def _hex_int(text: str, option: str, bits: int) -> int:
    try:
        value = int(text.strip(), 16)
    except ValueError:
        raise UsageError(f"{option} is not a hex number: {text!r}") from None
    if not 0 <= value < 1 << bits:
        raise UsageError(f"{option} must be a {bits}-bit value")
    return value


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- owner measure --snp -------------------------------------------------------


def add_snp_measure_options(parser: argparse.ArgumentParser) -> None:
    """``--snp``, ``--vcpu-type``, ``--guest-features`` for ``owner measure``."""
    group = parser.add_argument_group("SEV-SNP (with --snp)")
    group.add_argument(
        "--snp", action="store_true", help="print the 48-byte SEV-SNP launch digest (QEMU 9.1+ sev-snp-guest) instead"
    )
    group.add_argument(
        "--vcpu-type",
        metavar="TYPE",
        help="QEMU CPU model of the vCPUs (EPYC, EPYC-Milan, EPYC-Genoa, ...; or --vcpu-sig)",
    )
    group.add_argument("--guest-features", metavar="HEX", help="the guest's SEV_FEATURES word (default 0x1, SNPActive)")


def measure_snp_requested(args: argparse.Namespace) -> bool:
    """True for ``--snp``; a UsageError for an SNP-only option without it."""
    if getattr(args, "snp", False):
        return True
    for dest, flag in (("vcpu_type", "--vcpu-type"), ("guest_features", "--guest-features")):
        if getattr(args, dest, None) is not None:
            raise UsageError(f"{flag} only applies with --snp")
    return False


def _snp_vcpu_sig(args: argparse.Namespace) -> int:
    from agent.owner.measure import vcpu_sig_from_args
    from agent.sev.snp_measure import vcpu_signature

    fms = (args.vcpu_family, args.vcpu_model, args.vcpu_stepping)
    given = [
        name
        for name, value in (
            ("--vcpu-type", args.vcpu_type),
            ("--vcpu-sig", args.vcpu_sig),
            ("--vcpu-family", args.vcpu_family),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise UsageError(
            f"give one of --vcpu-type, --vcpu-sig, --vcpu-family/--vcpu-model/--vcpu-stepping, "
            f"not {' and '.join(given)}"
        )
    if args.vcpu_type is not None:
        if any(v is not None for v in fms):
            raise UsageError("--vcpu-model/--vcpu-stepping go with --vcpu-family, not --vcpu-type")
        return vcpu_signature(args.vcpu_type)
    return vcpu_sig_from_args(
        args, "--snp needs --vcpu-type (or --vcpu-sig, or --vcpu-family/--vcpu-model/--vcpu-stepping)"
    )


def snp_digest_from_args(args: argparse.Namespace) -> bytes:
    """Check the ``--snp`` measure options, then compute the digest (UsageError on bad input)."""
    from agent.sev.snp_measure import DEFAULT_GUEST_FEATURES, snp_launch_digest

    if getattr(args, "sev_es", False):
        raise UsageError("--snp and --sev-es are different launches: give one")
    if getattr(args, "vmsa_fpu_init", False):
        raise UsageError("--vmsa-fpu-init does not apply with --snp (SNP VMSAs always hold the FPU reset state)")
    if getattr(args, "vmsa_sev_features", None) is not None:
        raise UsageError("--vmsa-sev-features does not apply with --snp: use --guest-features")
    if args.firmware is None:
        raise UsageError("--snp needs --firmware")
    if args.kernel is None:
        if args.initrd is not None:
            raise UsageError("--initrd needs --kernel")
        if args.append is not None:
            raise UsageError("--append needs --kernel")
    if args.vcpus is None:
        raise UsageError("--snp needs --vcpus N")
    if not 1 <= args.vcpus <= MAX_VCPUS:
        raise UsageError(f"--vcpus must be between 1 and {MAX_VCPUS}")
    vcpu_sig = _snp_vcpu_sig(args)
    features = (
        DEFAULT_GUEST_FEATURES if args.guest_features is None else _hex_int(args.guest_features, "--guest-features", 64)
    )

    def read(path: Any, option: str) -> bytes | None:
        if path is None:
            return None
        return _read_file(os.fspath(path), option, limit=1 << 32)

    firmware = read(args.firmware, "--firmware")
    if not firmware:
        raise UsageError(f"--firmware {args.firmware} is empty")
    return snp_launch_digest(
        firmware,
        vcpus=args.vcpus,
        vcpu_sig=vcpu_sig,
        kernel=read(args.kernel, "--kernel"),
        initrd=read(args.initrd, "--initrd"),
        append=args.append,
        guest_features=features,
    )


def cmd_measure_snp(args: argparse.Namespace) -> int:
    digest = snp_digest_from_args(args)
    if getattr(args, "json", False):
        _print_json({"digest": digest.hex(), "mode": "snp"})
    else:
        sys.stdout.write(digest.hex() + "\n")
    return 0


# -- owner idblock -------------------------------------------------------------


def _load_signing_key(path: str, option: str) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    raw = _read_file(path, option, KEY_LIMIT)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise UsageError(f"{option} {path} is encrypted: give an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError(f"{option} {path} is not a PEM private key") from None
    finally:
        del raw
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise UsageError(f"{option} {path} is not an ECDSA P-384 key (SNP ID and author keys are P-384)")
    return key


def parse_snp_policy(text: str, option: str = "--policy") -> int:
    from agent.sev.snp_idblock import policy_problem

    policy = _hex_int(text, option, 64)
    problem = policy_problem(policy)
    if problem:
        raise UsageError(f"{option}: {problem}")
    return policy


def cmd_idblock(args: argparse.Namespace) -> int:
    from agent.sev.snp_idblock import IdBlock, sign_id_block

    digest = _hex_bytes(args.digest, "--digest", 48)
    policy = parse_snp_policy(args.policy)
    family = _hex_bytes(args.family_id, "--family-id", 16) if args.family_id is not None else bytes(16)
    image = _hex_bytes(args.image_id, "--image-id", 16) if args.image_id is not None else bytes(16)
    if not 0 <= args.svn <= 0xFFFFFFFF:
        raise UsageError("--svn must be a 32-bit value")
    id_key = _load_signing_key(args.id_key, "--id-key")
    author_key = _load_signing_key(args.author_key, "--author-key")
    signed = sign_id_block(IdBlock(digest, policy, family, image, args.svn), id_key, author_key)
    _print_json(
        {
            "id_block": base64.b64encode(signed.id_block).decode(),
            "id_auth": base64.b64encode(signed.id_auth).decode(),
            "id_key_digest": signed.id_key_digest.hex(),
            "author_key_digest": signed.author_key_digest.hex(),
        }
    )
    return 0


# -- owner verify-report -------------------------------------------------------


def _read_report(path: str) -> bytes:
    from agent.sev.snp_report import REPORT_SIZE

    raw = _read_file(path, "--report", REPORT_HEX_LIMIT)
    if len(raw) == REPORT_SIZE:
        return raw
    try:
        data = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"--report {path}: neither {REPORT_SIZE} raw bytes nor hex of them") from None
    if len(data) != REPORT_SIZE:
        raise UsageError(f"--report {path}: holds {len(data)} bytes (hex), an SNP report is {REPORT_SIZE}")
    return data


def _snp_roots(path: str | None) -> tuple:
    from agent.sev.snp_ca import SnpCertError, builtin_snp_roots, load_snp_roots_dir

    if path is None:
        return builtin_snp_roots()
    try:
        return load_snp_roots_dir(path)
    except SnpCertError as exc:
        raise UsageError(f"--amd-roots: {exc}") from None


def cmd_verify_report(args: argparse.Namespace) -> int:
    from agent.sev.snp_ca import SnpCertError, load_vcek
    from agent.sev.snp_report import Expected, verify_report

    expected = Expected(
        measurement=_hex_bytes(args.digest, "--digest", 48) if args.digest is not None else None,
        policy=_hex_int(args.policy, "--policy", 64) if args.policy is not None else None,
        report_data=_hex_bytes(args.report_data, "--report-data", 64) if args.report_data is not None else None,
        host_data=_hex_bytes(args.host_data, "--host-data", 32) if args.host_data is not None else None,
        id_key_digest=(
            _hex_bytes(args.id_key_digest, "--id-key-digest", 48) if args.id_key_digest is not None else None
        ),
        author_key_digest=(
            _hex_bytes(args.author_key_digest, "--author-key-digest", 48)
            if args.author_key_digest is not None
            else None
        ),
    )
    roots = _snp_roots(args.amd_roots)
    if args.product is not None and args.product not in {r.product for r in roots}:
        raise UsageError(f"--product {args.product}: no such roots in {args.amd_roots or 'the built-in AMD roots'}")
    report = _read_report(args.report)
    try:
        vcek = load_vcek(_read_file(args.vcek, "--vcek", CERT_LIMIT), f"--vcek {args.vcek}")
    except SnpCertError as exc:
        raise UsageError(str(exc)) from None
    verdict = verify_report(report, vcek, roots, product=args.product, expected=expected)
    _print_json(verdict.as_dict())
    return 0 if verdict.valid else 1


# -- wiring --------------------------------------------------------------------


def register(owner_subparsers: Any) -> None:
    """Add ``idblock`` and ``verify-report`` to the ``keyagent owner`` subcommands."""
    i = owner_subparsers.add_parser(
        "idblock",
        help="sign an SEV-SNP ID block for QEMU's sev-snp-guest id-block/id-auth",
        description="Build the ID block that pins an SNP launch to --digest and --policy, and its "
        "ID_AUTH_INFO signed with the ID key (ECDSA P-384), the ID key signed with the author key.",
    )
    i.add_argument("--digest", required=True, metavar="HEX", help="the 48-byte SNP launch digest (owner measure --snp)")
    i.add_argument("--policy", required=True, metavar="HEX", help="the SNP guest policy, e.g. 0x30000")
    i.add_argument("--id-key", required=True, metavar="ID.pem", help="ECDSA P-384 private key, PEM")
    i.add_argument("--author-key", required=True, metavar="AUTHOR.pem", help="ECDSA P-384 private key, PEM")
    i.add_argument("--family-id", metavar="HEX", help="16 bytes (default zero)")
    i.add_argument("--image-id", metavar="HEX", help="16 bytes (default zero)")
    i.add_argument("--svn", type=_dec_int, default=0, metavar="N", help="guest SVN (default 0)")
    i.set_defaults(func=cmd_idblock)

    v = owner_subparsers.add_parser(
        "verify-report",
        help="verify an SEV-SNP attestation report: exit 0 valid, 1 not",
        description="Verify VCEK <- ASK <- ARK against AMD's SNP roots, the report's signature under the "
        "VCEK, its TCB and chip id against the VCEK, and each field asked for; print every check.",
    )
    v.add_argument("--report", required=True, metavar="R", help="the report: 0x4A0 raw bytes, or their hex")
    v.add_argument("--vcek", required=True, metavar="VCEK.der", help="the chip's VCEK certificate, DER or PEM")
    v.add_argument("--product", choices=SNP_PRODUCTS, help="only trust this product's roots")
    v.add_argument(
        "--amd-roots", metavar="DIR", help="<product>-ark.pem/<product>-ask.pem here instead of the built-in AMD roots"
    )
    v.add_argument("--digest", metavar="HEX", help="expected MEASUREMENT (48 bytes)")
    v.add_argument("--policy", metavar="HEX", help="expected POLICY")
    v.add_argument("--report-data", metavar="HEX", help="expected REPORT_DATA (64 bytes)")
    v.add_argument("--host-data", metavar="HEX", help="expected HOST_DATA (32 bytes)")
    v.add_argument("--id-key-digest", metavar="HEX", help="expected ID_KEY_DIGEST (48 bytes)")
    v.add_argument("--author-key-digest", metavar="HEX", help="expected AUTHOR_KEY_DIGEST (48 bytes)")
    v.set_defaults(func=cmd_verify_report)


def _dec_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
