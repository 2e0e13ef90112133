"""The simulated SNP guest asking the owner for its secrets (tests, demos).

What a real guest's attestation agent does, with the simulator's PSP standing in
for ``/dev/sev-guest``::

    key = X25519 key pair (fresh, in memory)
    POST {owner}/v1/snp/challenge {"vm"}                       -> nonce
    x-sim-snp-guest-report {"report-data": SHA-512(nonce || pubkey)}   (the PSP, via QMP)
    POST {owner}/v1/snp/attest {"vm", "nonce", "report", "vcek", "pubkey"} -> {"enc", "ciphertext"}
    secrets = HPKE open with key, info = vm

``keyagent`` never runs this on the host's side: it stands in for code inside
the guest.  It lives with the simulator (imported by nothing on the agent's path).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = ["GuestAttestError", "guest_attest"]


class GuestAttestError(Exception):
    """The owner refused, or a step failed: ``status`` is the owner's HTTP status (0 if none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


async def guest_attest(
    qmp_path: str, owner_url: str, vm: str, *, timeout: float = 10.0, tamper: Any = None
) -> dict[str, bytes]:
    """Run the guest's side once; ``{guid: secret}`` or GuestAttestError.

    ``tamper(body) -> body`` (tests only) changes the attest request before it is sent.
    """
    from agent.common.errors import MonitorGone, QmpCommandError
    from agent.io.http import HttpError, request_json
    from agent.io.qmp import QmpConnection
    from agent.owner.snp_attest import open_answer

    key = X25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    base = owner_url.rstrip("/")
    try:
        status, answer = await request_json("POST", f"{base}/v1/snp/challenge", {"vm": vm}, timeout=timeout)
    except HttpError as exc:
        raise GuestAttestError(f"challenge: {exc}") from None
    if status != 200 or not isinstance(answer, dict):
        raise GuestAttestError(f"challenge refused: {status} {_error(answer)}", status)
    nonce = base64.b64decode(answer["nonce"])
    report_data = hashlib.sha512(nonce + pub).digest()

    qmp = QmpConnection("snp-guest")
    try:
        await qmp.connect(qmp_path, timeout)
        got = await qmp.execute("x-sim-snp-guest-report", {"report-data": base64.b64encode(report_data).decode()})
    except (QmpCommandError, MonitorGone) as exc:
        raise GuestAttestError(f"guest report: {exc}") from None
    finally:
        await qmp.close()

    body = {
        "vm": vm,
        "nonce": answer["nonce"],
        "report": got["report"],
        "vcek": got["vcek"],
        "pubkey": base64.b64encode(pub).decode(),
    }
    if tamper is not None:
        body = tamper(body)
    try:
        status, answer = await request_json("POST", f"{base}/v1/snp/attest", body, timeout=timeout)
    except HttpError as exc:
        raise GuestAttestError(f"attest: {exc}") from None
    if status != 200 or not isinstance(answer, dict):
        raise GuestAttestError(f"attest refused: {status} {_error(answer)}", status)
    try:
        return open_answer(answer, key, vm)
    except ValueError as exc:
        raise GuestAttestError(str(exc)) from None


def _error(answer: Any) -> str:
    return str(answer.get("error")) if isinstance(answer, dict) else "(no JSON error)"


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.tools.sim.snp_guest --qmp unix:P --owner-url URL --vm NAME --out-dir DIR``.

    The guest's side from a shell (demos): each secret goes to ``DIR/<guid>``
    (new, 0600, O_EXCL|O_NOFOLLOW); stdout gets ``{"secrets": [{"guid", "length"}]}``,
    never the bytes.  Exit 0 on success, 1 refused or failed, 2 bad usage.
    """
    import argparse
    import asyncio
    import json
    import os
    import sys

    from agent.common.errors import UsageError

    p = argparse.ArgumentParser(
        prog="python -m agent.tools.sim.snp_guest",
        description="The simulated SNP guest asks the owner for its secrets.",
    )
    p.add_argument("--qmp", required=True, metavar="unix:PATH", help="the simulator (keyagent simulate --snp)")
    p.add_argument("--owner-url", required=True, metavar="URL")
    p.add_argument("--vm", required=True, metavar="NAME")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="a directory for the secrets (0700)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S")
    args = p.parse_args(argv)
    try:
        if not args.qmp.startswith("unix:") or len(args.qmp) <= 5:
            raise UsageError(f"--qmp must be unix:PATH, got {args.qmp[:80]!r}")
        if not os.path.isdir(args.out_dir):
            raise UsageError(f"--out-dir {args.out_dir} is not a directory")
        if not args.timeout > 0:
            raise UsageError("--timeout must be > 0 seconds")
    except UsageError as exc:
        print(f"snp-guest: {exc}", file=sys.stderr)
        return 2
    try:
        secrets = asyncio.run(guest_attest(args.qmp[5:], args.owner_url, args.vm, timeout=args.timeout))
    except GuestAttestError as exc:
        print(f"snp-guest: {exc}", file=sys.stderr)
        return 1
    from agent.io.rundir import write_new_files

    try:
        write_new_files([(os.path.join(args.out_dir, guid), value) for guid, value in secrets.items()], "--out-dir")
    except UsageError as exc:
        print(f"snp-guest: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"secrets": [{"guid": g, "length": len(v)} for g, v in secrets.items()]}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
