"""SEV-SNP guest-driven attestation: the owner's decisions for ``/v1/snp/*``.

With SNP the host injects nothing: the guest itself asks for its secrets.

    guest                                              guest owner
      |-- POST /v1/snp/challenge {"vm"} ------------------>|  nonce: 32 fresh bytes, kept with
      |<- {"nonce": b64, "expires_in_s"} ------------------|  its VM and creation time
      |   X25519 key pair; MSG_REPORT_REQ with
      |   REPORT_DATA = SHA-512(nonce || pubkey)
      |-- POST /v1/snp/attest {"vm", "nonce", "report",  ->|  verify_report(): VCEK <- ASK <- ARK,
      |        "vcek", "pubkey"}                           |  signature, TCB, chip id, measurement,
      |                                                    |  policy, host_data, id_key_digest,
      |                                                    |  report_data
      |<- {"enc": b64, "ciphertext": b64} -----------------|  HPKE to pubkey, info = the VM name
      |   plaintext {"secrets": {"<guid>": "<b64>"}}

Why each piece:

* the nonce makes a report fresh: a report recorded from an earlier launch (or
  another guest of the same image) carries another REPORT_DATA.  It is single use
  (the first ``/v1/snp/attest`` naming it uses it up, whatever the outcome, so a
  nonce cannot be used to try reports one after another) and short-lived
  (:data:`NONCE_TTL_S`); at most :data:`MAX_NONCES_PER_VM` wait per VM (429).
* REPORT_DATA binds the guest's public key: the host, which carries the
  requests, cannot swap in a key of its own without breaking the PSP's signature.
* HPKE (RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
  AES-256-GCM, ``cryptography``'s implementation) with ``info`` = the VM name:
  only the key whose hash the PSP signed opens the answer.  ``enc`` is the
  32-byte encapsulated key; ``cryptography`` returns ``enc || ct`` in one string
  and it is split there.

The functions are pure in the sense of :mod:`agent.owner.service`: the nonce
store and the clock value come in, a decision with the store's changes comes
out.  The only randomness inside is HPKE's ephemeral key (drawn by
``cryptography``); the nonce itself is drawn by the caller.

Refusals: 400 malformed, 404 unknown VM, 403 not an SNP VM / unknown or expired
nonce / report not verified, 409 nonce already used, 429 too many nonces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.owner.config import OwnerConfig, VmPolicy
from agent.owner.service import Decision, _invalid, _refused, _request_vm, _shown

__all__ = [
    "NonceEntry",
    "SnpDecision",
    "decide_challenge",
    "decide_attest",
    "prune_nonces",
    "report_data_for",
    "open_answer",
    "NONCE_LEN",
    "NONCE_TTL_S",
    "MAX_NONCES_PER_VM",
    "HPKE_ENC_LEN",
]

NONCE_LEN = 32
#: A challenge not answered within this many seconds is refused ("nonce expired").
NONCE_TTL_S = 120.0
#: Nonces waiting per VM; a used nonce is remembered until its TTL ends (for the 409).
MAX_NONCES_PER_VM = 16
PUBKEY_LEN = 32  # raw X25519
HPKE_ENC_LEN = 32  # DHKEM(X25519) encapsulated key
MAX_VCEK = 8192  # a VCEK is ~1.4 KB DER
REPORT_LEN = 0x4A0


@dataclass(frozen=True)
class NonceEntry:
    """A challenge handed out: for which VM, when (the service's monotonic clock), used yet."""

    vm: str
    created: float
    used: bool = False


@dataclass(frozen=True)
class SnpDecision(Decision):
    """A :class:`Decision` plus the change to the nonce store."""

    issue: tuple[bytes, NonceEntry] | None = None  # remember this new nonce
    use: bytes | None = None  # mark this nonce used


def _suite():
    from cryptography.hazmat.primitives import hpke

    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def report_data_for(nonce: bytes, pubkey: bytes) -> bytes:
    """REPORT_DATA the guest must have asked the PSP for: SHA-512(nonce || pubkey), 64 bytes."""
    return hashlib.sha512(bytes(nonce) + bytes(pubkey)).digest()


def prune_nonces(nonces: Mapping[bytes, NonceEntry], now: float) -> dict[bytes, NonceEntry]:
    """The store without the nonces older than NONCE_TTL_S (used or not)."""
    return {n: e for n, e in nonces.items() if now - e.created <= NONCE_TTL_S}


def _snp_vm(config: OwnerConfig, vm: str, audit: dict[str, Any]) -> VmPolicy | Decision:
    policy = config.vms.get(vm)
    if policy is None:
        return _refused(404, f"unknown vm '{_shown(vm)}'", audit)
    if not policy.snp:
        return _refused(403, "not an SNP vm: this vm's secrets go through /v1/secret", audit)
    return policy


def _as_snp(d: Decision, **extra: Any) -> SnpDecision:
    return SnpDecision(d.status, d.body, d.decision, d.reason, d.audit, **extra)


def decide_challenge(
    config: OwnerConfig, body: Any, *, nonce: bytes, now: float, nonces: Mapping[bytes, NonceEntry]
) -> SnpDecision:
    """``POST /v1/snp/challenge {"vm"}`` -> 200 ``{"nonce", "expires_in_s"}`` (``nonce`` drawn by the caller)."""
    audit: dict[str, Any] = {"request": "snp-challenge"}
    vm = _request_vm(body, audit)
    if isinstance(vm, Decision):
        return _as_snp(vm)
    policy = _snp_vm(config, vm, audit)
    if isinstance(policy, Decision):
        return _as_snp(policy)
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"an SNP challenge nonce is {NONCE_LEN} bytes")
    waiting = sum(1 for e in prune_nonces(nonces, now).values() if e.vm == vm)
    if waiting >= MAX_NONCES_PER_VM:
        return _as_snp(
            _refused(
                429,
                f"too many SNP challenges outstanding for this vm (at most "
                f"{MAX_NONCES_PER_VM}); retry in {NONCE_TTL_S:g}s",
                audit,
            )
        )
    audit["nonce"] = nonce.hex()
    out = {"nonce": base64.b64encode(nonce).decode(), "expires_in_s": NONCE_TTL_S}
    return SnpDecision(200, out, "challenge", "nonce issued", audit, issue=(bytes(nonce), NonceEntry(vm, now)))


def _b64(body: dict, name: str, *, size: int | None = None, limit: int = 1 << 16) -> bytes | str:
    """The decoded field, or the one-line reason it is not acceptable."""
    text = body.get(name)
    if not isinstance(text, str) or not text:
        return f"field {name!r} must be a non-empty base64 string"
    if len(text) > limit * 4 // 3 + 4:
        return f"field {name!r} is too long"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return f"field {name!r} is not valid base64"
    if size is not None and len(raw) != size:
        return f"field {name!r} must be {size} bytes, got {len(raw)}"
    return raw


def decide_attest(config: OwnerConfig, body: Any, *, now: float, nonces: Mapping[bytes, NonceEntry]) -> SnpDecision:
    """``POST /v1/snp/attest`` -> 200 ``{"enc", "ciphertext"}`` or a refusal (see the module text)."""
    from agent.sev.snp_ca import SnpCertError, load_vcek
    from agent.sev.snp_report import Expected, SnpFormatError, verify_report

    audit: dict[str, Any] = {"request": "snp-attest"}
    vm = _request_vm(body, audit)
    if isinstance(vm, Decision):
        return _as_snp(vm)
    fields: dict[str, bytes] = {}
    for name, size, limit in (
        ("nonce", NONCE_LEN, 64),
        ("report", REPORT_LEN, REPORT_LEN),
        ("vcek", None, MAX_VCEK),
        ("pubkey", PUBKEY_LEN, 64),
    ):
        value = _b64(body, name, size=size, limit=limit)
        if isinstance(value, str):
            return _as_snp(_invalid(value, audit))
        fields[name] = value
    nonce = fields["nonce"]
    audit["nonce"] = nonce.hex()
    policy = _snp_vm(config, vm, audit)
    if isinstance(policy, Decision):
        return _as_snp(policy)

    # -- the nonce: ours, for this VM, fresh, unused
    entry = nonces.get(nonce)
    if entry is None or entry.vm != vm:
        return _as_snp(_refused(403, "unknown nonce: POST /v1/snp/challenge first", audit))
    if entry.used:
        return _as_snp(_refused(409, "nonce already used: a challenge answers one attestation", audit))
    if now - entry.created > NONCE_TTL_S:
        return _as_snp(_refused(403, f"nonce expired (older than {NONCE_TTL_S:g}s)", audit), use=nonce)

    # from here on the nonce is used up, whatever the outcome
    try:
        vcek = load_vcek(fields["vcek"])
    except SnpCertError as exc:
        return _as_snp(_invalid(str(exc), audit), use=nonce)
    expected = Expected(
        measurement=policy.snp_digest,
        policy=policy.policy,
        report_data=report_data_for(nonce, fields["pubkey"]),
        host_data=policy.snp_host_data,
        id_key_digest=policy.snp_id_key_digest,
        author_key_digest=policy.snp_author_key_digest,
    )
    try:
        verdict = verify_report(fields["report"], vcek, config.snp_roots, expected=expected)
    except SnpFormatError as exc:
        return _as_snp(_invalid(str(exc), audit), use=nonce)
    audit.update(
        product=verdict.product,
        measurement=verdict.report.measurement.hex(),
        policy=f"{verdict.report.policy:#x}",
        chip_id=verdict.report.chip_id.hex()[:16],
    )
    if not verdict.valid:
        audit["failed"] = list(verdict.failed)
        first = next(c for c in verdict.checks if not c.ok)
        return _as_snp(
            _refused(403, f"report not verified: {', '.join(verdict.failed)} ({first.detail})", audit), use=nonce
        )

    # -- release: the secrets, sealed to the key the PSP vouched for
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    try:
        public = X25519PublicKey.from_public_bytes(fields["pubkey"])
    except ValueError:
        return _as_snp(_invalid("field 'pubkey' is not an X25519 public key", audit), use=nonce)
    plaintext = bytearray(
        json.dumps(
            {"secrets": {str(s.guid): base64.b64encode(s.value.reveal()).decode() for s in policy.secrets}}
        ).encode()
    )
    try:
        sealed = _suite().encrypt(bytes(plaintext), public, info=vm.encode())
    except ValueError:  # a low-order point: no shared secret
        return _as_snp(_invalid("field 'pubkey' is not a usable X25519 public key", audit), use=nonce)
    finally:
        plaintext[:] = bytes(len(plaintext))
    audit["secrets"] = [s.name for s in policy.secrets]
    out = {
        "enc": base64.b64encode(sealed[:HPKE_ENC_LEN]).decode(),
        "ciphertext": base64.b64encode(sealed[HPKE_ENC_LEN:]).decode(),
    }
    return SnpDecision(200, out, "released", "SNP report verified", audit, use=nonce)


def open_answer(answer: Mapping[str, Any], private_key: Any, vm: str) -> dict[str, bytes]:
    """The guest's side: ``{"enc", "ciphertext"}`` -> ``{guid: secret bytes}`` (ValueError if it does not open)."""
    from cryptography.exceptions import InvalidTag

    try:
        enc = base64.b64decode(answer["enc"], validate=True)
        ct = base64.b64decode(answer["ciphertext"], validate=True)
        plain = _suite().decrypt(enc + ct, private_key, info=vm.encode())
        doc = json.loads(plain)
        return {guid: base64.b64decode(value, validate=True) for guid, value in doc["secrets"].items()}
    except InvalidTag:
        raise ValueError("the owner's answer does not open with this key and vm name") from None
    except (KeyError, TypeError, AttributeError, binascii.Error, json.JSONDecodeError) as exc:
        raise ValueError(f"the owner's answer is malformed ({type(exc).__name__})") from None
