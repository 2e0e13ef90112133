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


async def guest_attest(qmp_path: str, owner_url: str, vm: str, *, timeout: float = 10.0,
                       tamper: Any = None) -> dict[str, bytes]:
    """Run the guest's side once; ``{guid: secret}`` or GuestAttestError.

    ``tamper(body) -> body`` (tests only) changes the attest request before it is sent.
    """
    from agent.io.http import HttpError, request_json
    from agent.io.qmp import QmpConnection, QmpDisconnectedError, QmpError
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
        got = await qmp.execute("x-sim-snp-guest-report",
                                {"report-data": base64.b64encode(report_data).decode()})
    except (QmpError, QmpDisconnectedError) as exc:
        raise GuestAttestError(f"guest report: {exc}") from None
    finally:
        await qmp.close()

    body = {"vm": vm, "nonce": answer["nonce"], "report": got["report"], "vcek": got["vcek"],
            "pubkey": base64.b64encode(pub).decode()}
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
