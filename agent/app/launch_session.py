"""``keyagent launch`` with SEV: the launch session comes from the guest owner.

QEMU reads ``dh-cert-file`` (the owner's GODH certificate) and
``session-file`` (the wrapped TEK/TIK) at LAUNCH_START, when it creates the
``sev-guest`` object.  The launcher asks the owner (``POST /v1/session``
with the platform's PDH and chain, the chain's CEK replaced by ``[sev]
cek`` when set: the owner wants it signed by AMD's ASK), writes both files into a fresh 0700
key directory, points the ``sev-guest`` object at them, and deletes them
once QEMU's monitor answers.  Neither file is secret to the host (the keys
inside are wrapped for the PSP), but they are single-use launch material
and do not outlive the start.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence

from agent.common.errors import FlowFailed, UsageError

POLICY_RE = re.compile(r"(?:^|,)policy=(0x[0-9a-fA-F]+|[0-9]+)(?:,|\Z)")


def find_sev_object(argv: list[str]) -> int | None:
    """Index of the ``-object sev-guest,...`` value in argv, if any."""
    for i in range(1, len(argv) - 1):
        if argv[i] in ("-object", "--object") and argv[i + 1].startswith("sev-guest,"):
            return i + 1
    return None


def sev_policy(spec: str) -> int:
    match = POLICY_RE.search(spec)
    return int(match.group(1), 0) if match else 0x1  # QEMU's default policy


def with_session_files(spec: str, godh_path: str, session_path: str) -> str:
    if "dh-cert-file=" in spec or "session-file=" in spec:
        raise UsageError(
            "the sev-guest object already names dh-cert-file/session-file: "
            "remove them, or remove [sev] pdh to use your own files"
        )
    return f"{spec},dh-cert-file={godh_path},session-file={session_path}"


def read_cert(path: str, what: str) -> str:
    """Base64 text of a certificate file given raw or as base64."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = data
    return base64.b64encode(raw).decode()


CERT_LEN = 2084  # one SEV certificate
CHAIN_LEN = 3 * CERT_LEN  # PEK || OCA || CEK


def chain_with_cek(chain_b64: str, cek_b64: str) -> str:
    """PEK || OCA || the signed CEK: the CEK QEMU reports carries no ASK signature
    (PDH_CERT_EXPORT), so the one AMD's key server signed takes its place."""
    chain = base64.b64decode(chain_b64)
    cek = base64.b64decode(cek_b64)
    if len(chain) != CHAIN_LEN:
        raise UsageError(f"[sev] cert_chain must hold {CHAIN_LEN} bytes (PEK, OCA, CEK), holds {len(chain)}")
    if len(cek) != CERT_LEN:
        raise UsageError(f"[sev] cek must hold one {CERT_LEN}-byte certificate, holds {len(cek)} bytes")
    return base64.b64encode(chain[: 2 * CERT_LEN] + cek).decode()


async def fetch_session(
    owner_url: str | Sequence[str],
    vm: str,
    pdh_path: str,
    chain_path: str | None,
    policy: int,
    timeout: float,
    cek_path: str | None = None,
) -> tuple[bytes, bytes]:
    """-> (godh.b64 file content, session.b64 file content)."""
    from agent.io.http import HttpError
    from agent.io.owner_client import post_owner_retrying
    from agent.protocol.owner import SESSION_PATH, ProtocolError, SessionAnswer, SessionRequest, one_line

    chain = None
    if chain_path:
        chain = read_cert(chain_path, "[sev] cert_chain")
        if cek_path:
            chain = chain_with_cek(chain, read_cert(cek_path, "[sev] cek"))
    request = SessionRequest(
        vm=vm,
        pdh=base64.b64decode(read_cert(pdh_path, "[sev] pdh")),
        policy=policy,
        cert_chain=base64.b64decode(chain) if chain is not None else None,
    )
    try:  # across every [sev] owner_url, 5xx/429/no answer retried until the timeout
        reply = await post_owner_retrying(owner_url, SESSION_PATH, request.encode(), timeout)
        status, answer = reply.status, reply.body
    except HttpError as exc:
        raise FlowFailed(f"guest owner unreachable for the launch session: {exc}") from None
    if status != 200 or not isinstance(answer, dict):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise FlowFailed(
            f"guest owner refused the launch session: {one_line(error or f'HTTP {status}')} (HTTP {status})"
        )
    try:
        session = SessionAnswer.parse(answer)
    except ProtocolError as exc:
        raise FlowFailed(f"malformed launch session from the owner: {exc.reason}") from None
    return base64.b64encode(session.godh) + b"\n", base64.b64encode(session.session) + b"\n"
