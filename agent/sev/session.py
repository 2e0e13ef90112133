"""The guest owner's SEV launch session (AMD SEV API spec, LAUNCH_START, 6.2).

The owner picks the transport keys (TEK encrypts, TIK authenticates) and hands
them to the PSP through the untrusted host, wrapped under keys only the two of
them can derive:

    Z      = ECDH(GODH private, PDH public)  -- P-384, the 48-byte x-coordinate,
             big-endian (what OpenSSL/cryptography return; AMD's firmware
             reverses its own output to match, ecdh.c)
    master = KDF(Z,      "sev-master-secret", context = NONCE, 16 bytes)
    KEK    = KDF(master, "sev-kek", empty context, 16 bytes)
    KIK    = KDF(master, "sev-kik", empty context, 16 bytes)
    WRAP_TK    = AES-128-CTR(KEK, WRAP_IV, TEK || TIK)
    WRAP_MAC   = HMAC-SHA256(KIK, WRAP_TK)
    POLICY_MAC = HMAC-SHA256(TIK, POLICY u32le)

The session blob (QEMU ``session-file``) is
``NONCE[16] || WRAP_TK[32] || WRAP_IV[16] || WRAP_MAC[32] || POLICY_MAC[32]``
(128 bytes), the GODH certificate (QEMU ``dh-cert-file``) a 2084-byte SEV
certificate (:mod:`agent.sev.cert`). Both are base64 on the QEMU command line.

Sources: virtee/sev ``src/session/mod.rs`` (``Session::session``), ``key.rs``
(``derive``, ``mac``), ``src/launch/sev.rs`` (``Session`` struct); AMD's
firmware ``sev_channel.c`` (``create_session``/``establish_channel``).

The policy MAC is what stops the host from launching the guest with a weaker
policy than the owner asked for: :func:`open_session` (the PSP side, used by
the simulator) refuses a policy the MAC was not made for.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from agent.sev.cert import (
    ALGO_ECDH_SHA256,
    CERT_LEN,
    CURVE_P384,
    USAGE_PDH,
    Certificate,
)

__all__ = [
    "Certificate",
    "SESSION_LEN",
    "Session",
    "SessionError",
    "create_session",
    "kdf",
    "open_session",
    "policy_mac",
]

KEY_LEN = 16
NONCE_LEN = 16
IV_LEN = 16

#: LAUNCH_START session buffer: NONCE[16], WRAP_TK[32], WRAP_IV[16], WRAP_MAC[32], POLICY_MAC[32]
_SESSION = struct.Struct("<16s32s16s32s32s")
SESSION_LEN = _SESSION.size  # 128

LABEL_MASTER = b"sev-master-secret"
LABEL_KEK = b"sev-kek"
LABEL_KIK = b"sev-kik"

_HASH_LEN = 32
#: the counter fits one byte for up to 255 blocks, see kdf()
_MAX_KDF_LEN = 255 * _HASH_LEN


class SessionError(ValueError):
    """A launch session the PSP must refuse (bad sizes, bad wrap or policy MAC).

    ``kind`` says which check failed, so the PSP stand-in can answer with the
    matching firmware status: ``"certificate"`` (GODH/PDH unusable),
    ``"length"`` (a buffer of the wrong size), ``"wrap-mac"`` (the keys were
    not wrapped for this PDH), ``"policy"`` (the policy MAC does not match).
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Session:
    """The fields of a 128-byte session blob."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Session:
        if len(data) != SESSION_LEN:
            raise SessionError(f"launch session must be {SESSION_LEN} bytes, got {len(data)}", "length")
        return cls(*_SESSION.unpack(bytes(data)))

    def to_bytes(self) -> bytes:
        return _SESSION.pack(self.nonce, self.wrap_tk, self.wrap_iv, self.wrap_mac, self.policy_mac)


def kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """NIST SP 800-108 KDF in counter mode with HMAC-SHA256, as SEV uses it.

    Each block is ``HMAC(key, i || label || 0x00 || context || L)`` with the
    counter ``i`` (from 1) and the output length ``L`` in bits both u32
    *little-endian* (virtee/sev ``Key::derive``; AMD firmware ``kdf_derive``).
    cryptography's KBKDFHMAC writes its counter big-endian, so it is asked for
    a one-byte counter and the three zero bytes that complete the
    little-endian u32 lead the fixed input: byte-for-byte the same message for
    any length up to 255 blocks.
    """
    if not 0 < length <= _MAX_KDF_LEN:
        raise ValueError(f"KDF output length must be 1..{_MAX_KDF_LEN} bytes, got {length}")
    fixed = b"\x00\x00\x00" + bytes(label) + b"\x00" + bytes(context) + struct.pack("<I", length * 8)
    return KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=length,
        rlen=1,
        llen=None,
        location=CounterLocation.BeforeFixed,
        label=None,
        context=None,
        fixed=fixed,
    ).derive(bytes(key))


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = crypto_hmac.HMAC(bytes(key), hashes.SHA256())
    mac.update(bytes(data))
    return mac.finalize()


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(iv))).encryptor()
    return ctx.update(bytes(data)) + ctx.finalize()


def _check(what: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise SessionError(f"{what} must be {n} bytes, got {len(value)}", "length")


def _policy_bytes(policy: int) -> bytes:
    if not 0 <= policy <= 0xFFFFFFFF:
        raise SessionError(f"policy must be a 32-bit unsigned value, got {policy}", "policy")
    return struct.pack("<I", policy)


def policy_mac(tik: bytes, policy: int) -> bytes:
    """POLICY_MAC = HMAC-SHA256(TIK, policy u32le)."""
    return _hmac(tik, _policy_bytes(policy))


def _wrap_keys(z: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """(KEK, KIK) from the ECDH shared secret and the session nonce."""
    master = kdf(z, LABEL_MASTER, nonce, KEY_LEN)
    return kdf(master, LABEL_KEK, b"", KEY_LEN), kdf(master, LABEL_KIK, b"", KEY_LEN)


def session_from_shared_secret(z: bytes, policy: int, *, nonce: bytes, tek: bytes, tik: bytes, iv: bytes) -> bytes:
    """The 128-byte session for an already agreed ECDH secret ``z``.

    Split out so the public vector (virtee/sev's ``session`` test, which feeds
    Z = 16 zero bytes) can be checked without an EC key.
    """
    _check("nonce", nonce, NONCE_LEN)
    _check("TEK", tek, KEY_LEN)
    _check("TIK", tik, KEY_LEN)
    _check("wrap IV", iv, IV_LEN)
    kek, kik = _wrap_keys(z, nonce)
    wrap_tk = _ctr(kek, iv, bytes(tek) + bytes(tik))
    return Session(
        nonce=bytes(nonce),
        wrap_tk=wrap_tk,
        wrap_iv=bytes(iv),
        wrap_mac=_hmac(kik, wrap_tk),
        policy_mac=policy_mac(tik, policy),
    ).to_bytes()


def _check_dh_cert(cert: Certificate, who: str) -> ec.EllipticCurvePublicKey:
    # AMD firmware sev_cert_sanity_check(dh_cert, SEV_CERT_USAGE_PDH, SEV_CERT_ALGO_ECDH_SHA256)
    if cert.usage != USAGE_PDH:
        raise SessionError(f"{who} certificate has usage 0x{cert.usage:x}, not PDH (0x{USAGE_PDH:x})", "certificate")
    if cert.algo != ALGO_ECDH_SHA256:
        raise SessionError(f"{who} certificate has algorithm 0x{cert.algo:x}, not ECDH-SHA256", "certificate")
    if cert.curve != CURVE_P384:
        raise SessionError(f"{who} certificate key is not on P-384", "certificate")
    try:
        return cert.public_key()
    except ValueError as exc:
        raise SessionError(f"{who} certificate: {exc}", "certificate") from None


def create_session(
    pdh: Certificate,
    policy: int,
    *,
    godh_private: ec.EllipticCurvePrivateKey | None = None,
    nonce: bytes,
    tek: bytes,
    tik: bytes,
    iv: bytes,
) -> tuple[bytes, bytes]:
    """The guest owner's side: ``(godh_cert_bytes, session_bytes)`` for this PDH.

    The nonce, TEK, TIK and wrap IV come from the caller. ``godh_private`` is
    the owner's ephemeral P-384 key; when omitted a fresh one is generated here
    (its only use is this one agreement, and it is dropped on return).
    """
    if not isinstance(pdh, Certificate):
        raise SessionError("PDH must be a parsed SEV certificate")
    pdh_public = _check_dh_cert(pdh, "PDH")
    if godh_private is None:
        godh_private = ec.generate_private_key(ec.SECP384R1())
    elif godh_private.curve.name != ec.SECP384R1.name:
        raise SessionError("GODH key must be on P-384")
    z = godh_private.exchange(ec.ECDH(), pdh_public)
    session = session_from_shared_secret(z, policy, nonce=nonce, tek=tek, tik=tik, iv=iv)
    godh = Certificate.from_public_key(godh_private.public_key(), usage=USAGE_PDH, algo=ALGO_ECDH_SHA256)
    return godh.to_bytes(), session


def open_session(
    pdh_private_key: ec.EllipticCurvePrivateKey, godh_cert_bytes: bytes, session_bytes: bytes, policy: int
) -> tuple[bytes, bytes]:
    """The PSP's side of LAUNCH_START: ``(tek, tik)``, or SessionError.

    Checks the wrap MAC before unwrapping and the policy MAC after, both in
    constant time, in the firmware's order (``establish_channel``).
    """
    if len(godh_cert_bytes) != CERT_LEN:
        raise SessionError(f"GODH certificate must be {CERT_LEN} bytes, got {len(godh_cert_bytes)}", "certificate")
    try:
        godh = Certificate.from_bytes(godh_cert_bytes)
    except ValueError as exc:
        raise SessionError(str(exc), "certificate") from None
    godh_public = _check_dh_cert(godh, "GODH")
    session = Session.from_bytes(session_bytes)
    policy_bytes = _policy_bytes(policy)
    z = pdh_private_key.exchange(ec.ECDH(), godh_public)
    kek, kik = _wrap_keys(z, session.nonce)
    if not hmac.compare_digest(session.wrap_mac, _hmac(kik, session.wrap_tk)):
        raise SessionError("launch session wrap MAC does not match", "wrap-mac")
    keys = _ctr(kek, session.wrap_iv, session.wrap_tk)
    tek, tik = keys[:KEY_LEN], keys[KEY_LEN:]
    if not hmac.compare_digest(session.policy_mac, _hmac(tik, policy_bytes)):
        raise SessionError("launch session policy MAC does not match the policy", "policy")
    return tek, tik
