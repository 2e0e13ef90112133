#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64 with an SEV guest, for ``keyagent launch``.

It reads the arguments the launcher gives QEMU (``-qmp unix:P,...`` and
``-object sev-guest,...,dh-cert-file=F,session-file=S``) and becomes
``keyagent simulate`` with the same QMP socket and session files, as QEMU
would do LAUNCH_START with them.  The platform's PDH key and the firmware
digest come from FAKE_QEMU_PDH_KEY and FAKE_QEMU_DIGEST.
"""

import os
import sys


def main(argv: list[str]) -> None:
    qmp = godh = session = None
    policy = "1"
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "-qmp" and nxt.startswith("unix:"):  # the launcher adds its own last
            qmp = nxt.split(",")[0]
        if arg == "-object" and nxt.startswith("sev-guest,"):
            for part in nxt.split(",")[1:]:
                key, _, value = part.partition("=")
                if key == "dh-cert-file":
                    godh = value
                elif key == "session-file":
                    session = value
                elif key == "policy":
                    policy = str(int(value, 0))
    if not (qmp and godh and session):
        print("fake-qemu: need -qmp unix:... and a sev-guest object with session files", file=sys.stderr)
        sys.exit(1)
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "agent.cli",
            "simulate",
            "--qmp",
            qmp,
            "--sev",
            "--pdh-key",
            os.environ["FAKE_QEMU_PDH_KEY"],
            "--dh-cert-file",
            godh,
            "--session-file",
            session,
            "--policy",
            policy,
            "--digest",
            os.environ["FAKE_QEMU_DIGEST"],
        ],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
