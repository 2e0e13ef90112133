"""The SEV launch measurement (AMD SEV API spec, LAUNCH_MEASURE, section 6.5).

The PSP proves what it launched by an HMAC keyed with the TIK, a key only the
guest owner and the PSP share; the host can relay it but never forge it:

    MEASURE = HMAC-SHA256(TIK, 0x04 || API_MAJOR || API_MINOR || BUILD ||
                               GCTX.POLICY || GCTX.LD || MNONCE)

where GCTX.LD is the SHA-256 of all launch data (firmware, hashes table, VMSAs)
and MNONCE a fresh 16-byte nonce from the PSP. QEMU's ``query-sev-launch-measure``
returns ``base64(MEASURE || MNONCE)`` (48 bytes). Same layout in sevctl
``src/measurement.rs``, virtee/sev ``Session::verify`` and libvirt
``virt-qemu-sev-validate``.
"""

from __future__ import annotations

import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from agent.sev.sizes import MEASURE_LEN, MNONCE_LEN
from agent.sev.sizes import MEASUREMENT_LEN as BLOB_LEN

DIGEST_LEN = 32
TIK_LEN = 16

#: the measured message before the digest and nonce:
#: domain separator 0x04, API_MAJOR u8, API_MINOR u8, BUILD u8, POLICY u32 LE
_MEASURE_PREFIX = struct.Struct("<BBBBI")
_MEASURE_DOMAIN = 0x04


def _check_len(what: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ValueError(f"{what} must be {n} bytes, got {len(value)}")


def _check_u8(what: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{what} must fit in one byte (0..255), got {value}")


def measure_message(api_major: int, api_minor: int, build_id: int, policy: int, digest: bytes, mnonce: bytes) -> bytes:
    """The bytes the PSP MACs: ``0x04 || major || minor || build || policy(u32le) || digest || mnonce``."""
    _check_u8("api_major", api_major)
    _check_u8("api_minor", api_minor)
    _check_u8("build_id", build_id)
    if not 0 <= policy <= 0xFFFFFFFF:
        raise ValueError(f"policy must be a 32-bit unsigned value, got {policy}")
    _check_len("launch digest", digest, DIGEST_LEN)
    _check_len("mnonce", mnonce, MNONCE_LEN)
    return _MEASURE_PREFIX.pack(_MEASURE_DOMAIN, api_major, api_minor, build_id, policy) + bytes(digest) + bytes(mnonce)


def compute_measure(
    tik: bytes, api_major: int, api_minor: int, build_id: int, policy: int, digest: bytes, mnonce: bytes
) -> bytes:
    """MEASURE (32 bytes) for the given platform version, policy, digest and nonce."""
    _check_len("TIK", tik, TIK_LEN)
    mac = crypto_hmac.HMAC(bytes(tik), hashes.SHA256())
    mac.update(measure_message(api_major, api_minor, build_id, policy, digest, mnonce))
    return mac.finalize()


def measurement_blob(
    tik: bytes, api_major: int, api_minor: int, build_id: int, policy: int, digest: bytes, mnonce: bytes
) -> bytes:
    """What LAUNCH_MEASURE hands back: ``MEASURE[32] || MNONCE[16]`` (48 bytes)."""
    return compute_measure(tik, api_major, api_minor, build_id, policy, digest, mnonce) + bytes(mnonce)


def split_blob(blob: bytes) -> tuple[bytes, bytes]:
    """``(measure, mnonce)`` from a 48-byte measurement blob."""
    if len(blob) != BLOB_LEN:
        raise ValueError(f"measurement blob must be {BLOB_LEN} bytes, got {len(blob)}")
    return bytes(blob[:MEASURE_LEN]), bytes(blob[MEASURE_LEN:])


def verify_measurement(
    blob: bytes, tik: bytes, api_major: int, api_minor: int, build_id: int, policy: int, digest: bytes
) -> bool:
    """True when ``blob`` is the PSP's measurement of exactly this launch.

    The nonce is taken from the blob itself (the PSP chose it); the MAC is
    recomputed and compared in constant time. Malformed arguments raise
    ValueError; a well-formed but wrong measurement returns False.
    """
    measure, mnonce = split_blob(blob)
    expected = compute_measure(tik, api_major, api_minor, build_id, policy, digest, mnonce)
    return hmac.compare_digest(measure, expected)
