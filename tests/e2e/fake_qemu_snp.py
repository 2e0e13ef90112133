#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 >= 9.1 with an SEV-SNP guest, for ``keyagent launch``.

It reads what the launcher gives QEMU (``-qmp unix:P,...`` and ``-object
sev-snp-guest,id=...,policy=...,id-block=...,id-auth=...,author-key-enabled=on,
host-data=...``) and becomes ``keyagent simulate --snp`` with the same socket and
properties.  The firmware's launch digest comes from FAKE_QEMU_SNP_DIGEST, the
directory the simulated AMD roots are written to from FAKE_QEMU_AMD_ROOTS_OUT.
FAKE_QEMU_SNP_POLICY makes it start the guest with another policy than it was
given (a QEMU that does not do what it was told); FAKE_QEMU_AS_SEV=1 makes it a
QEMU 7.2 with an SEV guest (no ``sev-type``), as an old QEMU that never made the
SNP guest.
"""

import os
import sys


def main(argv: list[str]) -> None:
    qmp = None
    snp: dict[str, str] | None = None
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "-qmp" and nxt.startswith("unix:"):
            qmp = nxt.split(",")[0]
        if arg == "-object" and nxt.startswith("sev-snp-guest,"):
            snp = dict(part.partition("=")[::2] for part in nxt.split(",")[1:])
    if qmp is None:
        print("fake-qemu: need -qmp unix:...", file=sys.stderr)
        sys.exit(1)
    cmd = [sys.executable, "-m", "agent.cli", "simulate", "--qmp", qmp]
    if snp is None or os.environ.get("FAKE_QEMU_AS_SEV") == "1":
        os.execv(sys.executable, cmd + ["--sev"])
    cmd += [
        "--snp",
        "--policy",
        os.environ.get("FAKE_QEMU_SNP_POLICY", snp.get("policy", "0x30000")),
        "--snp-digest",
        os.environ["FAKE_QEMU_SNP_DIGEST"],
        "--amd-roots-out",
        os.environ["FAKE_QEMU_AMD_ROOTS_OUT"],
    ]
    for prop in ("id-block", "id-auth", "host-data"):
        if prop in snp:
            cmd += [f"--{prop}", snp[prop]]
    if snp.get("author-key-enabled") in ("on", "true", "yes"):
        cmd.append("--author-key-enabled")
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
