"""``keyagent owner measure``: the launch digest the guest owner expects.

The owner computes the digest from images it trusts, never from what the host
reports; ``owner verify`` reuses the same options (``add_measure_options`` +
``digest_from_args``) instead of a precomputed ``--digest``.

The digest models QEMU 7.2 with ``-bios``/pflash unit 0 = ``--firmware`` and,
for ``--kernel``, ``sev-guest,kernel-hashes=on`` (without it QEMU measures the
firmware only; use ``owner measure --firmware`` alone for such a VM).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.common.errors import UsageError
from agent.sev.digest import launch_digest
from agent.sev.vmsa import VmsaOptions, cpu_signature

# Far above any QEMU/KVM vCPU limit; keeps a typo from hashing gigabytes.
MAX_VCPUS = 4096

_MEASURE_DESTS = (
    "firmware",
    "kernel",
    "initrd",
    "append",
    "vcpus",
    "vcpu_sig",
    "vcpu_family",
    "vcpu_model",
    "vcpu_stepping",
    "vmsa_sev_features",
)


def _int(text: str) -> int:
    """A decimal or 0x-prefixed integer (argparse type)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def add_measure_options(parser: argparse.ArgumentParser, *, require_firmware: bool = False) -> None:
    """Add the options that describe the launch (firmware, kernel, SEV-ES vCPUs)."""
    group = parser.add_argument_group("launch (expected digest)")
    group.add_argument(
        "--firmware",
        metavar="F",
        type=Path,
        required=require_firmware,
        help="OVMF image the VM boots (-bios / pflash unit 0)",
    )
    group.add_argument(
        "--kernel", metavar="K", type=Path, help="kernel for direct boot (QEMU sev-guest kernel-hashes=on)"
    )
    group.add_argument("--initrd", metavar="I", type=Path, help="initrd (needs --kernel)")
    group.add_argument("--append", metavar="C", help="kernel command line (needs --kernel)")
    group.add_argument("--sev-es", action="store_true", help="SEV-ES guest: measure the vCPUs' VMSAs")
    group.add_argument("--vcpus", metavar="N", type=_int, help="number of vCPUs (SEV-ES)")
    group.add_argument("--vcpu-sig", metavar="N", type=_int, help="guest CPUID(1).EAX signature (SEV-ES)")
    group.add_argument("--vcpu-family", metavar="N", type=_int, help="guest CPU family (SEV-ES)")
    group.add_argument("--vcpu-model", metavar="N", type=_int, help="guest CPU model (SEV-ES)")
    group.add_argument("--vcpu-stepping", metavar="N", type=_int, help="guest CPU stepping (SEV-ES)")
    group.add_argument(
        "--vmsa-fpu-init",
        action="store_true",
        help="the VMSA holds the reset FPU state (MXCSR 0x1f80, FCW 0x37f): "
        "QEMU 9.1+ SEV-ES guests made with KVM_SEV_INIT2 (no "
        "legacy-vm-type); not QEMU 7.2 (KVM_SEV_ES_INIT, the default)",
    )
    group.add_argument("--vmsa-sev-features", metavar="N", type=_int, help="SEV_FEATURES word in the VMSA (default 0)")


# The name ``agent.cli.owner`` looks for when it builds ``owner verify``.
def add_digest_arguments(parser: argparse.ArgumentParser) -> None:
    """``owner verify``: the launch options, as an alternative to ``--digest``."""
    add_measure_options(parser)


def has_measure_options(args: argparse.Namespace) -> bool:
    """True if any launch option was given (``owner verify`` vs ``--digest``)."""
    return bool(getattr(args, "sev_es", False) or getattr(args, "vmsa_fpu_init", False)) or any(
        getattr(args, dest, None) is not None for dest in _MEASURE_DESTS
    )


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {option} {path}: {exc.strerror or exc}") from None


def vcpu_sig_from_args(
    args: argparse.Namespace,
    missing: str = "--sev-es needs --vcpu-sig or --vcpu-family/--vcpu-model/--vcpu-stepping",
) -> int:
    """CPUID(1).EAX from ``--vcpu-sig`` or ``--vcpu-family/--vcpu-model/--vcpu-stepping``;
    ``missing`` is the error when neither is given."""
    fms = (args.vcpu_family, args.vcpu_model, args.vcpu_stepping)
    if args.vcpu_sig is not None:
        if any(v is not None for v in fms):
            raise UsageError("give either --vcpu-sig or --vcpu-family/--vcpu-model/--vcpu-stepping")
        if not 0 <= args.vcpu_sig <= 0xFFFFFFFF:
            raise UsageError("--vcpu-sig must be a 32-bit value")
        return args.vcpu_sig
    if all(v is not None for v in fms):
        return cpu_signature(*fms)
    if any(v is not None for v in fms):
        raise UsageError("--vcpu-family, --vcpu-model and --vcpu-stepping go together")
    raise UsageError(missing)


def digest_from_args(args: argparse.Namespace) -> bytes | None:
    """Check the launch options and compute the digest (UsageError on bad input).

    None when no launch option was given at all, so ``owner verify`` can fall
    back to its ``--digest``; any launch option without ``--firmware`` is an
    error.
    """
    if not has_measure_options(args):
        return None
    if args.firmware is None:
        raise UsageError("--firmware is required to compute the launch digest")
    if args.kernel is None:
        if args.initrd is not None:
            raise UsageError("--initrd needs --kernel")
        if args.append is not None:
            raise UsageError("--append needs --kernel")
    vcpu_opts = {
        "--vcpus": args.vcpus,
        "--vcpu-sig": args.vcpu_sig,
        "--vcpu-family": args.vcpu_family,
        "--vcpu-model": args.vcpu_model,
        "--vcpu-stepping": args.vcpu_stepping,
        "--vmsa-sev-features": args.vmsa_sev_features,
        "--vmsa-fpu-init": args.vmsa_fpu_init or None,
    }
    vmsa_options = VmsaOptions()
    if args.sev_es:
        if args.vcpus is None:
            raise UsageError("--sev-es needs --vcpus N")
        if not 1 <= args.vcpus <= MAX_VCPUS:
            raise UsageError(f"--vcpus must be between 1 and {MAX_VCPUS}")
        vcpu_sig: int | None = vcpu_sig_from_args(args)
        features = args.vmsa_sev_features or 0
        if not 0 <= features < 1 << 64:
            raise UsageError("--vmsa-sev-features must be a 64-bit value")
        vmsa_options = VmsaOptions(fpu_init=args.vmsa_fpu_init, sev_features=features)
    else:
        given = [name for name, value in vcpu_opts.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} only applies with --sev-es")
        vcpu_sig = None
    firmware = _read(args.firmware, "--firmware")
    if not firmware:
        raise UsageError(f"--firmware {args.firmware} is empty")
    return launch_digest(
        firmware,
        kernel=_read(args.kernel, "--kernel"),
        initrd=_read(args.initrd, "--initrd"),
        append=args.append,
        sev_es=args.sev_es,
        vcpus=args.vcpus or 1,
        vcpu_sig=vcpu_sig,
        vmsa_options=vmsa_options,
    )


def _handle(args: argparse.Namespace) -> int:
    import json
    import sys

    from agent.owner import snp_tools
    from agent.owner.secret_area import area_from_firmware

    if snp_tools.measure_snp_requested(args):
        return snp_tools.cmd_measure_snp(args)
    digest = digest_from_args(args)
    assert digest is not None  # --firmware is required by this parser
    # The firmware was readable a moment ago; the area is where `owner serve`
    # will send the secret for a vm given by this firmware.
    area = area_from_firmware(_read(args.firmware, "--firmware") or b"")
    if args.json:
        print(
            json.dumps(
                {
                    "digest": digest.hex(),
                    "secret_area": {
                        "gpa": area.gpa,
                        "size": area.size,
                        "usable": area.problem is None,
                        "problem": area.problem,
                    },
                }
            )
        )
    else:
        print(digest.hex())
        # stdout stays the digest alone (scripts read it); the area goes beside it
        print(f"keyagent: {area.describe()}", file=sys.stderr)
    return 0


def register(owner_subparsers) -> argparse.ArgumentParser:
    """Add ``measure`` to the ``keyagent owner`` subcommands."""
    parser = owner_subparsers.add_parser(
        "measure",
        help="print the expected SEV/SEV-ES (or, with --snp, SEV-SNP) launch digest (hex)",
        description="Compute the SHA-256 launch digest QEMU 7.2 + KVM produce for this "
        "firmware, kernel and vCPU set-up.",
    )
    add_measure_options(parser, require_firmware=True)
    from agent.owner.snp_tools import add_snp_measure_options

    add_snp_measure_options(parser)
    parser.add_argument(
        "--json", action="store_true", help='print {"digest": hex, "secret_area": {gpa, size, usable, problem}}'
    )
    parser.set_defaults(func=_handle)
    return parser
