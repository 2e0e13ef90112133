"""The reference guest owner: decides whether a launch gets its secret.

The decision is a pure function, :func:`decide_secret`: the configuration,
the request body, the set of launches already attested and a fresh IV go
in, a :class:`Decision` (HTTP status, response body, audit fields) comes
out.  No sockets, no clock, no randomness inside, so every refusal reason is
a unit test.  :class:`OwnerService` is the thin HTTP shell around it: it
draws the IV, remembers attested launches and writes one audit line per
decision.

Order of checks, and why:

1. request shape (400) and the VM name (404): nothing is known yet;
2. policy, API version, build id (403 "policy mismatch"): cheap, and a
   launch with the wrong policy must not get a secret even if its
   measurement verifies;
3. the measurement against the TIK and every accepted digest, in constant
   time (403 "measurement does not match");
3a. the same blob again (200 "resent"): a measurement blob released before,
   asked again by the same VM with the same api/build/policy, gets the
   byte-identical answer it got the first time (the stored
   :class:`Release`), without a new verification: its session's TIK is gone,
   and a blob whose SHA-256 matches one that verified is that launch.
   Safe: the packet is MACed over that launch's MNONCE and measurement and
   only that PSP launch context can use it, and the host that asks has seen
   it already; it is what lets an agent that died after the release finish
   the launch.  A released blob asked for with other fields or by another
   VM is 409.  Checked before the MAC because no key may be left to check
   it with; a blob altered in any bit has another SHA-256 and goes on to 3.
4. single use (409): the PSP draws a fresh MNONCE for every launch, so a
   verified blob with an MNONCE already released for that VM (but another
   measurement) is not the launch that was released.  Checked only after
   the MAC verified, so a forged request learns nothing about which nonces
   were used.
5. the secret area (403 "no usable secret area" / "secret table does not
   fit"): a secret the guest cannot read is a failed launch, so it is not
   released (:mod:`agent.owner.secret_area`).  Last, because only a
   verified launch should learn about the owner's firmware.

Launch sessions (``POST /v1/session``, VMs with ``session = true``): the
owner makes the GODH and session blob for the platform's PDH
(:func:`decide_session`, the fresh keys come in as :class:`SessionMaterial`),
answers ``{"godh", "session"}`` and keeps the session's TIK/TEK in memory as
*pending* for that VM.  ``POST /v1/secret`` then tries the pending sessions'
TIKs (and the VM's offline tik/tek, if configured) against the measurement;
the session that verifies is used up: its keys are forgotten and wiped
after the packet is built.  A second request for that launch can no longer
be verified (the TIK is gone), so the service also remembers every
release by the SHA-256 of its measurement blob: the same blob again gets
the same answer (3a), anything else that does not verify is 403.  With no pending session and no
offline keys the answer is 409 ("POST /v1/session first"); with pending
sessions none of whose TIKs verifies the measurement, 403 "no launch session
matches this measurement" (the MAC cannot tell a launch made with another
session from one whose digest differs: both fail under every TIK held).

Which platform gets a session (the VM's ``platform``): ``amd`` (default)
wants the whole chain, PDH <- PEK <- (OCA and CEK) <- ASK <- ARK, to verify
to AMD's roots (built in, or ``[platform] amd_roots``): the request's
``cert_chain`` is PEK || OCA || CEK with the CEK as AMD's key server signs
it.  ``pinned`` takes only the PDHs whose SHA-256 owner.toml lists;
``any`` takes every PDH (demos; warned about at start and on every session).
A platform that does not verify gets 403 "platform not verified: ...".

Pending sessions are kept per VM *and platform* (the SHA-256 of the PDH):
at most :data:`MAX_PENDING_SESSIONS` for one platform and
:data:`MAX_PENDING_PER_VM` in all.  When full, the new request gets 429 and
the waiting sessions stay: nobody can push a launch's session out by asking
for more.  Sessions older than :data:`PENDING_SESSION_TTL_S` are dropped by
the service (a launch that never asked for its secret).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.common.errors import OwnerError
from agent.common.logs import get_logger
from agent.common.secret import Secret
from agent.io.http import Request, Response
from agent.owner.config import OwnerConfig, VmPolicy
from agent.owner.store import (
    MH_CHANGED,
    PENDING_SESSION_TTL_S,
    AuditRow,
    MemoryStore,
    SecretView,
    Store,
    StoreUnavailable,
    public_random,
)
from agent.protocol.owner import (
    SECRET_FIELDS,
    ProtocolError,
    SecretAnswer,
    SecretRequest,
    SessionAnswer,
    SessionRequest,
    error_body,
)

__all__ = [
    "Decision",
    "Release",
    "decide_secret",
    "decide_session",
    "make_session",
    "LaunchSession",
    "SessionMaterial",
    "SessionInputError",
    "OwnerService",
    "SECRET_FIELDS",
    "MAX_PENDING_SESSIONS",
    "MAX_PENDING_PER_VM",
    "PlatformCheck",
    "check_platform",
    "secret_area_refusal",
    "PENDING_SESSION_TTL_S",
]

#: Launch sessions that may wait for their /v1/secret, per VM and platform (PDH).
MAX_PENDING_SESSIONS = 4
#: ... and per VM over all platforms (bounds memory with platform = "any").
MAX_PENDING_PER_VM = 64
#: A pending session older than PENDING_SESSION_TTL_S (agent.owner.store) is dropped by the service.

IV_LEN = 16  # the packet's IV (agent.sev.packet)


@dataclass(frozen=True)
class Release:
    """One released launch, as kept: enough to give the same answer again (step 3a).

    ``fields`` are the request's (api_major, api_minor, build_id, policy): a
    resend must name the same ones.  ``answer`` is the packet exactly as sent.
    """

    vm: str
    blob_sha256: bytes
    fields: tuple[int, int, int, int]
    answer: SecretAnswer = field(repr=False)

    def __repr__(self) -> str:
        return f"Release(vm={self.vm!r}, blob_sha256={self.blob_sha256.hex()[:16]})"


@dataclass(frozen=True)
class Decision:
    status: int
    body: dict[str, Any]
    decision: str  # "released" | "resent" | "refused" | "invalid" | "session"
    reason: str
    audit: dict[str, Any] = field(default_factory=dict)
    # (vm, mnonce) to remember as attested; set only on a release.
    attested: tuple[str, bytes] | None = None
    # SHA-256 of the released measurement blob; set on a release and a resend.
    released: bytes | None = None
    # the release to keep (a first release) or the one given again (a resend)
    release: Release | None = None
    # /v1/secret: the pending session this release used up.
    # /v1/session: the new session to keep pending.
    session: LaunchSession | None = None
    # /v1/secret of an mh = true VM: its MH record to keep once released (agent.owner.mh)
    mh: Any = None

    def __repr__(self) -> str:  # the body of a release carries the packet
        return f"Decision({self.status}, {self.decision}, {self.reason!r})"


def _shown(value: str, limit: int = 64) -> str:
    """A client-supplied name, safe for a one-line message."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii")


def _invalid(reason: str, audit: dict[str, Any], status: int = 400) -> Decision:
    return Decision(status, error_body(reason), "invalid", reason, audit)


def _refused(status: int, reason: str, audit: dict[str, Any]) -> Decision:
    return Decision(status, error_body(reason), "refused", reason, audit)


# -- launch sessions ------------------------------------------------------------


class SessionInputError(OwnerError, ValueError):
    """A PDH or chain the owner will not make a session for (one line, no secrets).

    ``refusal`` is True when the input was well-formed but does not verify
    (a chain signature), False when it is malformed.
    """

    def __init__(self, message: str, refusal: bool = False) -> None:
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True)
class SessionMaterial:
    """The fresh randomness of one launch session: TEK, TIK, nonce, wrap IV, GODH key."""

    tek: Secret
    tik: Secret
    nonce: bytes = field(repr=False)
    iv: bytes = field(repr=False)
    godh_private: Any = field(repr=False)  # ec.EllipticCurvePrivateKey, P-384

    @classmethod
    def fresh(cls) -> SessionMaterial:
        from cryptography.hazmat.primitives.asymmetric import ec

        return cls(
            tek=Secret(os.urandom(16)),
            tik=Secret(os.urandom(16)),
            nonce=os.urandom(16),
            iv=os.urandom(16),
            godh_private=ec.generate_private_key(ec.SECP384R1()),
        )


@dataclass(frozen=True, eq=False)
class LaunchSession:
    """A session made for one launch: what QEMU gets, and the keys the owner keeps."""

    godh: bytes = field(repr=False)  # 2084-byte GODH certificate (public)
    session: bytes = field(repr=False)  # 128-byte session blob (public)
    tik: Secret = field(repr=False)
    tek: Secret = field(repr=False)
    policy: int = 0
    chain_verified: bool = False  # the platform verified (amd chain or pin)
    platform: str = ""  # SHA-256 of the PDH as sent, hex: the pending-session key
    trust: str = ""  # "amd:<product>" | "pinned" | "any" | "chain" (offline tool)

    @property
    def id(self) -> str:
        """A short name for logs, from the public GODH and session only."""
        return hashlib.sha256(self.godh + self.session).hexdigest()[:16]

    def wipe(self) -> None:
        self.tik.wipe()
        self.tek.wipe()

    def __repr__(self) -> str:
        return f"LaunchSession(id={self.id}, policy=0x{self.policy:x})"


@dataclass(frozen=True)
class PlatformCheck:
    """A platform the owner accepted for a session."""

    platform: str  # SHA-256 of the PDH certificate as sent, hex
    trust: str  # "amd:<product>" | "pinned" | "any"

    @property
    def verified(self) -> bool:
        return self.trust != "any"


def check_platform(
    mode: str,
    pdh: bytes,
    cert_chain: bytes | None,
    *,
    roots: Sequence[Any] = (),
    pins: Collection[bytes] = (),
    chain_name: str = "cert_chain",
) -> PlatformCheck:
    """Does the owner trust this PDH?  SessionInputError (refusal: "platform not verified: ...").

    ``mode`` is the VM's ``platform``; ``roots`` the AMD roots for ``amd``,
    ``pins`` the SHA-256 digests for ``pinned``.  Malformed input (a chain
    that does not parse) is a 400, not a refusal.
    """
    from agent.sev.ca import verify_platform
    from agent.sev.cert import Certificate, PlatformChain

    digest = hashlib.sha256(bytes(pdh)).digest()
    platform = digest.hex()
    if mode == "any":
        return PlatformCheck(platform, "any")
    if mode == "pinned":
        hit = False
        for pin in pins:  # every pin, constant time each
            hit |= hmac.compare_digest(digest, pin)
        if not hit:
            raise SessionInputError(
                f"platform not verified: PDH sha256 {platform} is not pinned for this vm", refusal=True
            )
        return PlatformCheck(platform, "pinned")
    if mode != "amd":
        raise ValueError(f"unknown platform mode {mode!r}")
    if cert_chain is None:
        raise SessionInputError(
            f"platform not verified: no {chain_name} (PEK, OCA and the CEK as AMD signs it) to chain the PDH to AMD",
            refusal=True,
        )
    try:
        pdh_cert = Certificate.from_bytes(pdh)
        chain = PlatformChain.from_bytes(cert_chain)
    except ValueError as exc:
        raise SessionInputError(f"{chain_name}: {exc}") from None
    try:
        verified = verify_platform(pdh_cert, chain, tuple(roots))
    except ValueError as exc:
        raise SessionInputError(f"platform not verified: {exc}", refusal=True) from None
    return PlatformCheck(platform, f"amd:{verified.product}")


def make_session(
    pdh: bytes,
    cert_chain: bytes | None,
    policy: int,
    material: SessionMaterial,
    *,
    names: tuple[str, str] = ("pdh", "cert_chain"),
    platform: PlatformCheck | None = None,
) -> LaunchSession:
    """GODH + session blob for the platform's PDH; SessionInputError on bad input.

    ``pdh`` is the 2084-byte certificate.  Whether the platform is trusted is
    ``platform`` (:func:`check_platform`, done by the caller first); without
    it, ``cert_chain`` (QEMU's PEK || OCA || CEK, 6252 bytes), if given, is
    checked inside the platform only (PDH <- PEK <- OCA and CEK), as the
    offline tool did before AMD's roots were known.  ``names`` are how the
    two inputs are called in error messages.
    """
    from agent.sev.cert import USAGE_PDH, Certificate, PlatformChain, verify_pdh_chain
    from agent.sev.session import SessionError, create_session

    pdh_name, chain_name = names
    try:
        pdh_cert = Certificate.from_bytes(pdh)
    except ValueError as exc:
        raise SessionInputError(f"{pdh_name}: {exc}") from None
    if pdh_cert.usage != USAGE_PDH:
        raise SessionInputError(f"{pdh_name}: certificate has usage 0x{pdh_cert.usage:x}, not PDH (0x{USAGE_PDH:x})")
    verified, trust = False, "any"
    if platform is not None:
        verified, trust = platform.verified, platform.trust
    elif cert_chain is not None:
        try:
            chain = PlatformChain.from_bytes(cert_chain)
        except ValueError as exc:
            raise SessionInputError(f"{chain_name}: {exc}") from None
        try:
            verify_pdh_chain(pdh_cert, chain)
        except ValueError as exc:
            raise SessionInputError(f"{chain_name} does not vouch for the PDH: {exc}", refusal=True) from None
        verified, trust = True, "chain"
    try:
        godh, blob = create_session(
            pdh_cert,
            policy,
            godh_private=material.godh_private,
            nonce=material.nonce,
            tek=material.tek.reveal(),
            tik=material.tik.reveal(),
            iv=material.iv,
        )
    except SessionError as exc:
        raise SessionInputError(f"{pdh_name}: {exc}") from None
    return LaunchSession(
        godh=godh,
        session=blob,
        tik=material.tik,
        tek=material.tek,
        policy=policy,
        chain_verified=verified,
        platform=hashlib.sha256(bytes(pdh)).hexdigest(),
        trust=trust,
    )


def _request_vm(body: Any, audit: dict[str, Any]) -> str | Decision:
    """The VM a request names, or the 400 for a body that names none."""
    if not isinstance(body, dict):
        return _invalid("request body must be a JSON object", audit)
    vm = body.get("vm")
    if not isinstance(vm, str) or not vm:
        return _invalid("field 'vm' must be a non-empty string", audit)
    audit["vm"] = _shown(vm)
    return vm


def decide_session(
    config: OwnerConfig,
    body: Any,
    *,
    material: SessionMaterial,
    pending: Mapping[str, Sequence[LaunchSession]] | None = None,
) -> Decision:
    """Decide one ``POST /v1/session`` request.  Pure: the randomness is ``material``.

    ``{"vm", "pdh": b64, "cert_chain": b64, "policy": int}`` -> 200
    ``{"godh": b64, "session": b64}`` with ``Decision.session`` to keep
    pending, or 400 (malformed), 403 (not for this VM, platform not
    verified), 404 (unknown VM), 429 (this VM's pending sessions for this
    platform are full; ``pending`` holds them per VM).
    """
    from agent.sev.cert import USAGE_PDH, Certificate

    audit: dict[str, Any] = {"request": "session"}
    try:
        request = SessionRequest.parse(body)
    except ProtocolError as exc:
        return _invalid(exc.reason, _audit_fields(audit, exc.partial))
    _audit_fields(audit, {"vm": request.vm, "policy": request.policy})
    vm, policy, pdh, chain = request.vm, request.policy, request.pdh, request.cert_chain

    vm_policy = config.vms.get(vm)
    if vm_policy is None:
        return _refused(404, f"unknown vm '{_shown(vm)}'", audit)
    if not vm_policy.session:
        return _refused(403, "this vm does not take launch sessions (no session = true)", audit)
    if policy != vm_policy.policy:
        return _refused(403, f"policy mismatch: policy 0x{policy:x} is not accepted for this vm", audit)
    try:
        pdh_cert = Certificate.from_bytes(pdh)
    except ValueError as exc:
        return _invalid(f"pdh: {exc}", audit)
    if pdh_cert.usage != USAGE_PDH:
        return _invalid(f"pdh: certificate has usage 0x{pdh_cert.usage:x}, not PDH (0x{USAGE_PDH:x})", audit)
    audit["pdh"] = hashlib.sha256(pdh).hexdigest()
    try:
        checked = check_platform(vm_policy.platform, pdh, chain, roots=config.amd_roots, pins=vm_policy.pdh_pins)
    except SessionInputError as exc:
        return _refused(403, str(exc), audit) if exc.refusal else _invalid(str(exc), audit)
    audit["platform"] = checked.trust

    waiting = list((pending or {}).get(vm, ()))
    if sum(1 for s in waiting if s.platform == checked.platform) >= MAX_PENDING_SESSIONS:
        return _refused(
            429,
            f"too many launch sessions pending for this vm and platform "
            f"(at most {MAX_PENDING_SESSIONS}); retry when one is used or expired",
            audit,
        )
    if len(waiting) >= MAX_PENDING_PER_VM:
        return _refused(429, f"too many launch sessions pending for this vm (at most {MAX_PENDING_PER_VM})", audit)
    try:
        made = make_session(pdh, chain, policy, material, platform=checked)
    except SessionInputError as exc:
        if exc.refusal:
            return _refused(403, str(exc), audit)
        return _invalid(str(exc), audit)
    audit.update(session=made.id, chain_verified=made.chain_verified)
    out = SessionAnswer(godh=made.godh, session=made.session).encode()
    return Decision(200, out, "session", "launch session made", audit, session=made)


# -- secrets ----------------------------------------------------------------------


def decide_secret(
    config: OwnerConfig,
    body: Any,
    *,
    attested: Collection[tuple[str, bytes]],
    iv: bytes,
    sessions: Mapping[str, Sequence[LaunchSession]] | None = None,
    released: Mapping[bytes, Release] | Collection[bytes] = (),
    mh_record: Any = None,
    mh_private: bytes | None = None,
) -> Decision:
    """Decide one ``POST /v1/secret`` request.  Pure: no I/O.

    For a VM with ``mh = true``, ``mh_record`` is its MH record and
    ``mh_private`` a fresh 32-byte X25519 private key (:func:`_mh_release`).

    ``attested`` holds the (vm, mnonce) pairs already released; ``iv`` is
    the packet's fresh 16-byte IV (the service draws it from os.urandom through
    :class:`agent.owner.store.PublicRandom`: an IV is sent in clear).
    ``sessions`` are the pending launch sessions per VM, ``released`` the
    releases so far by the SHA-256 of their measurement blob (a mapping to
    :class:`Release`; a bare collection of digests refuses every repeat with
    409).  The steps, in the order of the module's docstring, each return
    a refusal or pass on.
    """
    from agent.sev.measurement import split_blob

    audit: dict[str, Any] = {}
    try:
        # The service parses once to know what to read, and hands the result on.
        request = body if isinstance(body, SecretRequest) else SecretRequest.parse(body)
    except ProtocolError as exc:
        return _invalid(exc.reason, _audit_fields(audit, exc.partial))
    _audit_fields(audit, _request_fields(request))
    audit["mnonce"] = split_blob(request.measurement)[1].hex()

    vm_policy = _secret_vm(config, request.vm, audit)
    if isinstance(vm_policy, Decision):
        return vm_policy
    refusal = _platform_refusal(request, vm_policy, audit)
    if refusal is not None:
        return refusal
    blob_id = hashlib.sha256(request.measurement).digest()
    audit["measurement_sha256"] = blob_id.hex()
    if blob_id in released:  # 3a. the same blob again: the same answer, or 409
        return _resend(request, blob_id, released, audit)
    chosen = _verified_keys(request, vm_policy, sessions, audit)
    if isinstance(chosen, Decision):
        return chosen
    key = (request.vm, split_blob(request.measurement)[1])
    if key in attested:  # 4. single use
        return _refused(409, "launch already attested", audit)
    area = secret_area_refusal(vm_policy)  # 5. where the measured firmware will look
    if area is not None:
        return _refused(403, area, audit)
    mh = _mh_release(request, vm_policy, mh_record, mh_private, audit)  # 6. SEV fast migration keys
    if isinstance(mh, Decision):
        return mh
    answer = _wrap_secrets(request, vm_policy, chosen, iv, mh.entries if mh is not None else ())
    audit["secrets"] = [s.name for s in vm_policy.secrets]
    release = Release(request.vm, blob_id, _fields(request), answer)
    return Decision(
        200,
        answer.encode(),
        "released",
        "measurement verified",
        audit,
        attested=key,
        released=blob_id,
        release=release,
        session=chosen[2],
        mh=mh.record if mh is not None else None,
    )


def _mh_release(
    request: SecretRequest, vm_policy: VmPolicy, record: Any, private: bytes | None, audit: dict[str, Any]
) -> Any:
    """6. An mh = true VM's MH keys (agent.owner.mh): an MhRelease, a refusal, or None.

    Last, after every other check: only a verified launch changes MH state.
    ``migrating_from`` for a VM without ``mh`` is ignored (noted in the audit).
    """
    from agent.owner.mh import MhRecord, MhRefusal, MhRelease, mh_for_boot, mh_for_migration

    if not vm_policy.mh:
        if request.migrating_from is not None:
            audit["migrating_from"] = "ignored: no mh = true"
        return None
    if private is None:
        raise ValueError("an mh = true vm needs a fresh MH private key")
    record = record if record is not None else MhRecord()
    out: MhRelease | MhRefusal
    if request.migrating_from is None:
        out = mh_for_boot(record, private)
    else:
        out = mh_for_migration(request.vm, request.migrating_from, record, private)
    if isinstance(out, MhRefusal):
        return _refused(out.status, out.reason, audit)
    audit.update(out.audit)
    return out


def _fields(request: SecretRequest) -> tuple[int, int, int, int]:
    return (request.api_major, request.api_minor, request.build_id, request.policy)


def _resend(
    request: SecretRequest,
    blob_id: bytes,
    released: Mapping[bytes, Release] | Collection[bytes],
    audit: dict[str, Any],
) -> Decision:
    """3a. A blob released before: its answer again if the request is the same one, else 409."""
    before = released.get(blob_id) if isinstance(released, Mapping) else None
    if before is None or before.vm != request.vm or before.fields != _fields(request):
        return _refused(409, "launch already attested", audit)
    return Decision(
        200,
        before.answer.encode(),
        "resent",
        "same measurement released before: same answer",
        audit,
        released=blob_id,
        release=before,
    )


def _peek_secret(body: Any) -> tuple[SecretRequest, tuple[str, bytes, bytes]] | None:
    """A well-formed /v1/secret body parsed, and (vm, SHA-256 of the blob, MNONCE): what to read from the store."""
    from agent.sev.measurement import split_blob

    try:
        request = SecretRequest.parse(body)
    except ProtocolError:
        return None
    return request, (request.vm, hashlib.sha256(request.measurement).digest(), split_blob(request.measurement)[1])


def _after_race(decision: Decision, winner: Release | None) -> Decision:
    """A release the store did not take: another request's answer for this blob, or 409.

    Pure.  ``winner`` is the release another request (at this replica or
    another) recorded first for the same blob with the same fields: its
    bytes are the answer.  None: the launch's session or its (VM, MNONCE)
    went to another release.
    """
    if winner is None:
        return _refused(409, "launch already attested", decision.audit)
    return Decision(
        200,
        winner.answer.encode(),
        "resent",
        "released by another request for the same measurement: same answer",
        decision.audit,
        released=winner.blob_sha256,
        release=winner,
    )


#: a TIK, its TEK, and the pending session they came from (None: the VM's offline keys)
_Keys = tuple[Secret, Secret, "LaunchSession | None"]


def _request_fields(request: SecretRequest) -> dict[str, Any]:
    return {
        "vm": request.vm,
        "api_major": request.api_major,
        "api_minor": request.api_minor,
        "build_id": request.build_id,
        "policy": request.policy,
    }


def _audit_fields(audit: dict[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """What a (maybe partly) parsed request said, for the audit line: vm, policy, api, build."""
    if "vm" in fields:
        audit["vm"] = _shown(fields["vm"])
    if "policy" in fields:
        audit["policy"] = fields["policy"]
    if "api_major" in fields:
        audit["api"] = f"{fields['api_major']}.{fields['api_minor']}"
        audit["build"] = fields["build_id"]
    return audit


def _secret_vm(config: OwnerConfig, vm: str, audit: dict[str, Any]) -> VmPolicy | Decision:
    """1. The VM must be known, and be one that takes a launch secret."""
    vm_policy: VmPolicy | None = config.vms.get(vm)
    if vm_policy is None:
        return _refused(404, f"unknown vm '{_shown(vm)}'", audit)
    if vm_policy.snp:
        return _refused(403, "an SNP vm: its guest attests itself through /v1/snp/attest", audit)
    return vm_policy


def _platform_refusal(request: SecretRequest, vm_policy: VmPolicy, audit: dict[str, Any]) -> Decision | None:
    """2. What the platform reported must be what the owner accepts."""
    if request.policy != vm_policy.policy:
        return _refused(403, f"policy mismatch: policy 0x{request.policy:x} is not accepted for this vm", audit)
    if vm_policy.min_api is not None and (request.api_major, request.api_minor) < vm_policy.min_api:
        need = "%d.%d" % vm_policy.min_api
        return _refused(403, f"policy mismatch: api {audit['api']} is older than {need}", audit)
    if vm_policy.build_ids is not None and request.build_id not in vm_policy.build_ids:
        return _refused(403, f"policy mismatch: build id {request.build_id} is not accepted", audit)
    return None


def _verified_keys(
    request: SecretRequest,
    vm_policy: VmPolicy,
    sessions: Mapping[str, Sequence[LaunchSession]] | None,
    audit: dict[str, Any],
) -> _Keys | Decision:
    """3. The measurement, against every candidate TIK and accepted digest.

    The VM's pending launch sessions, then its offline keys, every one tried
    (no early exit), each compare in constant time.
    """
    from agent.sev.measurement import verify_measurement

    blob = request.measurement
    candidates: list[_Keys] = []
    if vm_policy.session and sessions:
        candidates += [(s.tik, s.tek, s) for s in sessions.get(request.vm, ())]
    if vm_policy.tik is not None and vm_policy.tek is not None:
        candidates.append((vm_policy.tik, vm_policy.tek, None))
    if not candidates:
        return _refused(409, "no launch session for this vm: POST /v1/session first", audit)
    chosen: _Keys | None = None
    for cand in candidates:
        ok = False
        for digest in vm_policy.digests:
            ok |= verify_measurement(
                blob, cand[0].reveal(), request.api_major, request.api_minor, request.build_id, request.policy, digest
            )
        if ok and chosen is None:
            chosen = cand
    if chosen is None:
        if all(c[2] is not None for c in candidates):
            # only pending sessions were tried: none of them is this launch's
            audit["pending"] = len(candidates)
            return _refused(403, "no launch session matches this measurement", audit)
        return _refused(403, "measurement does not match", audit)
    used = chosen[2]
    audit["keys"] = f"session {used.id}" if used is not None else "offline"
    return chosen


def _wrap_secrets(
    request: SecretRequest, vm_policy: VmPolicy, keys: _Keys, iv: bytes, extra: Sequence[tuple[Any, bytes]] = ()
) -> SecretAnswer:
    """The secret table, encrypted under the TEK and MACed with the TIK, for the guest."""
    from agent.sev.measurement import split_blob
    from agent.sev.packet import build_packet
    from agent.sev.secret_table import build_secret_table

    if len(iv) != IV_LEN:
        raise ValueError(f"packet IV must be {IV_LEN} bytes")
    tik_secret, tek_secret, _ = keys
    measure = split_blob(request.measurement)[0]
    table = bytearray(build_secret_table([(s.guid, s.value.reveal()) for s in vm_policy.secrets] + list(extra)))
    try:
        header, ciphertext = build_packet(tik_secret.reveal(), tek_secret.reveal(), measure, bytes(table), iv)
    finally:
        table[:] = bytes(len(table))
    return SecretAnswer(packet_header=header, secret=Secret(ciphertext), gpa=vm_policy.gpa)


def secret_area_refusal(vm_policy: VmPolicy) -> str | None:
    """Why this VM's secret table cannot go into its firmware's secret area, or None.

    See :mod:`agent.owner.secret_area`: no usable area (Debian's stock
    OVMF.fd: base 0, size 0) or a table larger than the area is a refusal;
    an area the owner does not know (a VM given by digest alone) is not.
    """
    from agent.owner.secret_area import area_refusal, table_length

    lengths = [len(s.value) for s in vm_policy.secrets]
    if vm_policy.mh:  # the two MH entries (agent.owner.mh)
        lengths += [32, 32]
    return area_refusal(vm_policy.secret_area, table_length(lengths))


class OwnerService:
    """The HTTP face of the guest owner.

    ``POST /v1/secret`` -> :func:`decide_secret`; ``POST /v1/session`` ->
    :func:`decide_session`; ``GET /healthz`` -> 200.  The state the pure
    functions are given (releases, attested launches, pending launch
    sessions) and the audit rows live in ``store``
    (:mod:`agent.owner.store`): in memory by default, or in SQLite or
    PostgreSQL (``owner serve --db``).  For each request the service reads
    what the decision needs, decides, and writes what changed; a first
    release is written with a unique key, and a request that lost the race
    to another (at this replica or another) answers the winner's bytes.  A
    store that fails or does not answer in time gets 503 and nothing is
    released.
    """

    def __init__(
        self,
        config: OwnerConfig,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        session_material: Callable[[], SessionMaterial] = SessionMaterial.fresh,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
        mh_store: Any = None,
    ) -> None:
        self.config = config
        self._log = get_logger("keyagent.owner")
        self._level = logging.getLogger("keyagent.owner")
        self.store: Store = store if store is not None else MemoryStore(log=self._log)
        self._random = random_bytes
        # The packet IV is sent in clear: from the pool, unless a test chose the bytes.
        self._iv = public_random if random_bytes is os.urandom else random_bytes
        self._material = session_material
        self._clock = clock
        self.snp_nonces: dict[bytes, Any] = {}  # SEV-SNP challenges (agent.owner.snp_attest), in memory
        from agent.owner.mh import MhStore, mh_store_for

        # SEV fast migration keys (agent.owner.mh): a table of the owner database, or memory
        self.mh_store: MhStore = mh_store if mh_store is not None else mh_store_for(self.store)
        self._routes: dict[str, tuple[str, Callable[[Request], Awaitable[Response]]]] = {
            "/v1/secret": ("POST", self._secret),
            "/v1/session": ("POST", self._session),
            "/v1/snp/challenge": ("POST", self._snp_challenge),
            "/v1/snp/attest": ("POST", self._snp_attest),
            "/v1/mh/target": ("POST", self._mh_target),
            "/v1/mh/complete": ("POST", self._mh_complete),
            "/healthz": ("GET", self._healthz),
        }  # built once: per request it was a dict and seven bound methods
        for vm in config.vms.values():
            if vm.session and vm.platform == "any":
                self._log.warning(
                    "owner platform unchecked",
                    vm=vm.name,
                    why='platform = "any": any PDH gets a launch session (demos only)',
                )

    @property
    def sessions(self) -> dict[str, list[LaunchSession]]:
        """The pending sessions of an in-memory store (tests look at them)."""
        if not isinstance(self.store, MemoryStore):
            raise AttributeError("pending sessions are in the database")
        return self.store.sessions

    def log_secret_areas(self) -> None:
        """Once at start: the VMs whose secret area the owner cannot check, or cannot use."""
        for name, vm in self.config.vms.items():
            if vm.snp:  # the guest fetches its secrets itself: no secret area
                continue
            area = vm.secret_area
            refusal = secret_area_refusal(vm)
            if refusal is not None:
                self._log.warning(
                    "owner secret area unusable: launches will be refused", vm=_shown(name), reason=refusal
                )
            elif not area.checked:
                what = (
                    "gpa answered, size unknown: cannot check that the secret table fits"
                    if area.gpa is not None
                    else "vm given by digest alone: cannot check its secret area (QEMU takes it from "
                    "the firmware it loads)"
                )
                self._log.warning("owner secret area unchecked", vm=_shown(name), detail=what)

    async def handle(self, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        route = self._routes.get(path)
        if route is None:
            return Response.json(404, {"error": f"no such path {_shown(path)}"})
        method, func = route
        if request.method != method:
            return Response.json(405, {"error": f"{path} takes {method}"})
        if method == "POST":
            media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                decision = _invalid("request body must be application/json", {"request": path}, status=415)
                return await self._answer(decision, request.peer)
        try:
            return await func(request)
        except StoreUnavailable as exc:
            self._log.error("owner state unavailable", path=path, error=str(exc))
            return Response.json(503, error_body("owner state unavailable: try again"))

    async def _healthz(self, _request: Request) -> Response:
        return Response.json(200, {"status": "ok", "vms": len(self.config.vms), "state": self.store.kind})

    async def _session(self, request: Request) -> Response:
        now = self._clock()
        try:
            body = request.json()
        except ValueError:
            return await self._answer(_invalid("request body is not valid JSON", {"request": "session"}), request.peer)
        vm = body.get("vm") if isinstance(body, dict) else None
        pending = await self.store.pending_sessions(vm, now) if isinstance(vm, str) and vm in self.config.vms else {}
        material = self._material()
        try:
            decision = decide_session(self.config, body, material=material, pending=pending)
        finally:
            if pending is not getattr(self.store, "sessions", None):  # copies from a database
                for waiting in pending.values():
                    for s in waiting:
                        s.wipe()
        if decision.session is None:  # refused: the keys drawn for it are never used
            material.tik.wipe()
            material.tek.wipe()
        if decision.status == 200 and decision.session is not None:
            # kept until used or expired; decide_session refused (429) rather than push one out
            try:
                await self.store.add_session(body["vm"], decision.session, now)
            except BaseException:
                decision.session.wipe()
                raise
            if not isinstance(self.store, MemoryStore):
                decision.session.wipe()  # the database holds it now (sealed)
            if decision.session.trust == "any":
                self._log.warning(
                    "owner platform unchecked",
                    vm=decision.audit.get("vm"),
                    session=decision.session.id,
                    why='platform = "any": this session went to a platform nobody verified',
                )
        return await self._answer(decision, request.peer, now=now)

    async def _secret(self, request: Request) -> Response:
        now = self._clock()
        try:
            body = request.json()
        except ValueError:
            return await self._answer(_invalid("request body is not valid JSON", {}), request.peer)
        view = SecretView()
        try:
            parsed = _peek_secret(body)
            peek = parsed[1] if parsed is not None else None
            if peek is not None and peek[0] in self.config.vms:
                view = await self.store.secret_view(*peek, now)
            mh_inputs = await self._mh_inputs(peek[0] if peek is not None else None)
            decision = decide_secret(
                self.config,
                parsed[0] if parsed is not None else body,
                attested=view.attested,
                iv=self._iv(IV_LEN),
                sessions=view.sessions,
                released=view.released,
                **mh_inputs,
            )
            if decision.decision == "released" and decision.release is not None and peek is not None:
                # A database MH store writes the record in the release's own
                # transaction; the memory one swaps first and swaps back if
                # the release does not happen.
                joint = getattr(self.mh_store, "swap_statement", None)
                also = None
                if decision.mh is not None and joint is not None and not isinstance(self.store, MemoryStore):
                    also = joint(peek[0], mh_inputs["mh_record"], decision.mh)
                elif decision.mh is not None and not await self._mh_swap(peek[0], mh_inputs, decision.mh):
                    changed = _refused(503, "owner state changed meanwhile: try again", decision.audit)
                    return await self._answer(changed, request.peer, now=now)
                row = self._audit_row(decision, request.peer, now)
                won = await self.store.commit_release(decision.release, peek[2], decision.session, now, row, also)
                if won is MH_CHANGED:
                    changed = _refused(503, "owner state changed meanwhile: try again", decision.audit)
                    return await self._answer(changed, request.peer, now=now)
                if won is decision.release:
                    self._log_decision(decision, request.peer)
                    return Response.json(decision.status, decision.body)
                if decision.mh is not None and also is None:  # not released after all: the MH record goes back
                    await self._mh_swap(peek[0], {"mh_record": decision.mh}, mh_inputs["mh_record"])
                decision = _after_race(decision, won)
        finally:
            view.done()
        return await self._answer(decision, request.peer, now=now)

    async def _answer(self, decision: Decision, peer: object, now: float | None = None) -> Response:
        """Audit the decision (a row in the store, a log line), then answer it."""
        await self.store.audit(self._audit_row(decision, peer, self._clock() if now is None else now))
        self._log_decision(decision, peer)
        return Response.json(decision.status, decision.body)

    def _audit_row(self, decision: Decision, peer: object, now: float) -> AuditRow:
        detail = {k: v for k, v in decision.audit.items() if k not in ("vm", "measurement_sha256")}
        if isinstance(peer, tuple) and len(peer) == 2:
            detail["peer"] = f"{peer[0]}:{peer[1]}"
        return AuditRow(
            time=now,
            vm=decision.audit.get("vm"),
            decision=decision.decision,
            status=decision.status,
            reason=decision.reason,
            measurement_sha256=decision.audit.get("measurement_sha256"),
            replica=getattr(self.store, "replica", "memory"),
            detail=detail,
        )

    # -- SEV fast migration (agent.owner.mh, docs/mh.md) ---------------------------------
    async def _mh_inputs(self, vm: str | None) -> dict[str, Any]:
        """decide_secret's MH inputs: the VM's record and a fresh private key (mh = true only)."""
        policy = self.config.vms.get(vm) if isinstance(vm, str) else None
        if policy is None or not policy.mh:
            return {}
        return {"mh_record": await self.mh_store.get(policy.name), "mh_private": self._random(32)}

    async def _mh_swap(self, vm: str, inputs: dict[str, Any], new: Any) -> bool:
        """Keep ``new`` as the VM's MH record if nobody changed it since it was read (another replica)."""
        return bool(await self.mh_store.swap(vm, inputs["mh_record"], new))

    async def _mh(self, request: Request, decide: Callable[..., Any]) -> Response:
        from agent.owner.mh import MhRecord

        try:
            body = request.json()
        except ValueError:
            bad = _invalid("request body is not valid JSON", {"request": request.path})
            return await self._answer(bad, request.peer)
        vm = body.get("vm") if isinstance(body, dict) else None
        policy = self.config.vms.get(vm) if isinstance(vm, str) else None
        record = await self.mh_store.get(vm) if policy is not None and isinstance(vm, str) else MhRecord()
        answer = decide(body, known=policy is not None, mh=policy is not None and policy.mh, record=record)
        audit = dict(answer.audit)
        if "vm" in audit:
            audit["vm"] = _shown(str(audit["vm"]))
        kind = "mh" if answer.status == 200 else ("invalid" if answer.status == 400 else "refused")
        decision = Decision(answer.status, answer.body, kind, answer.reason, audit)
        if (
            answer.record is not None
            and isinstance(vm, str)
            and not await self.mh_store.swap(vm, record, answer.record)
        ):
            decision = _refused(503, "owner state changed meanwhile: try again", audit)
        return await self._answer(decision, request.peer)

    async def _mh_target(self, request: Request) -> Response:
        from agent.owner.mh import decide_mh_target

        return await self._mh(request, decide_mh_target)

    async def _mh_complete(self, request: Request) -> Response:
        from agent.owner.mh import decide_mh_complete

        return await self._mh(request, decide_mh_complete)

    async def _snp(self, request: Request, decide: Callable[..., Any], **kwargs: Any) -> Response:
        """/v1/snp/*: the pure decision (agent.owner.snp_attest), then its change to the nonce store."""
        from agent.owner.snp_attest import NonceEntry, prune_nonces

        now = self._clock()
        self.snp_nonces = prune_nonces(self.snp_nonces, now)
        try:
            body = request.json()
        except ValueError:
            decision = _invalid("request body is not valid JSON", {"request": request.path})
        else:
            decision = decide(self.config, body, now=now, nonces=self.snp_nonces, **kwargs)
            if decision.issue is not None:
                nonce, entry = decision.issue
                self.snp_nonces[nonce] = entry
            if decision.use is not None and decision.use in self.snp_nonces:
                old = self.snp_nonces[decision.use]
                self.snp_nonces[decision.use] = NonceEntry(old.vm, old.created, used=True)
        return await self._answer(decision, request.peer, now=now)

    async def _snp_challenge(self, request: Request) -> Response:
        from agent.owner.snp_attest import NONCE_LEN, decide_challenge

        return await self._snp(request, decide_challenge, nonce=self._random(NONCE_LEN))

    async def _snp_attest(self, request: Request) -> Response:
        from agent.owner.snp_attest import decide_attest

        return await self._snp(request, decide_attest)

    def audit(self, decision: Decision, peer: object = None) -> None:
        """The log line of a decision (``_answer`` also writes its row to the store)."""
        self._log_decision(decision, peer)

    def _log_decision(self, decision: Decision, peer: object = None) -> None:
        """One line per decision; never the keys, the table or the packet."""
        level = logging.INFO if decision.status == 200 else logging.WARNING
        if not self._level.isEnabledFor(level):  # structlog would time-stamp it before the level check
            return
        fields = {"decision": decision.decision, "status": decision.status, "reason": decision.reason, **decision.audit}
        if isinstance(peer, tuple) and len(peer) == 2:
            fields["peer"] = f"{peer[0]}:{peer[1]}"
        log = self._log.info if decision.status == 200 else self._log.warning
        log("owner decision", **fields)
