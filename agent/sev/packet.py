"""The LAUNCH_SECRET packet (AMD SEV API spec, section 6.6, Table 55).

The guest owner encrypts the secret table with the TEK and binds it, with the
TIK, to the measurement it just verified, so the host can only inject this
payload into this very launch:

    header     = FLAGS u32le || IV[16] || MAC[32]                 (52 bytes)
    ciphertext = AES-128-CTR(TEK, IV, table)
    MAC        = HMAC-SHA256(TIK, 0x01 || FLAGS u32le || IV ||
                                  GUEST_LENGTH u32le || TRANS_LENGTH u32le ||
                                  ciphertext || MEASURE)

GUEST_LENGTH (plaintext) and TRANS_LENGTH (ciphertext) are equal with CTR.
Matches sevctl ``src/secret.rs``, virtee/sev ``Session::secret`` and libvirt
``virt-qemu-sev-validate``. QEMU's ``sev-inject-launch-secret`` takes
``packet-header`` = base64(header) and ``secret`` = base64(ciphertext).

Sans-IO: the caller supplies the random IV.
"""

from __future__ import annotations

import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.sev.sizes import MEASURE_LEN, PACKET_HEADER_LEN
from agent.sev.sizes import PACKET_HEADER as _HEADER  # Table 55: FLAGS u32, IV[16], MAC[32]

assert PACKET_HEADER_LEN == 52

#: the MAC'd prefix: domain separator 0x01, FLAGS u32, IV[16], GUEST_LENGTH u32, TRANS_LENGTH u32
_MAC_PREFIX = struct.Struct("<BI16sII")
_MAC_DOMAIN = 0x01

KEY_LEN = 16
IV_LEN = 16
MAC_LEN = 32
ALIGN = 16

#: Table 55 FLAGS bit 0 (COMPRESSED). Neither sevctl, virtee nor libvirt ever
#: set it; the PSP stand-in here refuses any flag.
FLAG_COMPRESSED = 0x1


class PacketError(ValueError):
    """A packet that must not be injected (bad sizes, bad MAC)."""


def _check(what: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise PacketError(f"{what} must be {n} bytes, got {len(value)}")


def _ctr(tek: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(bytes(tek)), modes.CTR(bytes(iv))).encryptor()
    return ctx.update(bytes(data)) + ctx.finalize()


def _mac(tik: bytes, flags: int, iv: bytes, guest_len: int, ciphertext: bytes, measure: bytes) -> bytes:
    mac = crypto_hmac.HMAC(bytes(tik), hashes.SHA256())
    mac.update(_MAC_PREFIX.pack(_MAC_DOMAIN, flags, bytes(iv), guest_len, len(ciphertext)))
    mac.update(bytes(ciphertext))
    mac.update(bytes(measure))
    return mac.finalize()


def build_packet(
    tik: bytes, tek: bytes, measure: bytes, table: bytes, iv: bytes, flags: int = 0
) -> tuple[bytes, bytes]:
    """``(header, ciphertext)`` carrying ``table`` into the launch measured as ``measure``.

    ``measure`` is the 32-byte MEASURE (not the 48-byte blob: use
    :func:`agent.sev.measurement.split_blob`). ``table`` must already be padded
    to 16 bytes (:func:`agent.sev.secret_table.build_secret_table` does).
    """
    _check("TIK", tik, KEY_LEN)
    _check("TEK", tek, KEY_LEN)
    _check("MEASURE", measure, MEASURE_LEN)
    _check("IV", iv, IV_LEN)
    if not 0 <= flags <= 0xFFFFFFFF:
        raise PacketError(f"packet flags must be a 32-bit unsigned value, got {flags}")
    if not table or len(table) % ALIGN:
        raise PacketError(f"secret payload length {len(table)} is not a positive multiple of {ALIGN}")
    ciphertext = _ctr(tek, iv, table)
    mac = _mac(tik, flags, iv, len(table), ciphertext, measure)
    return _HEADER.pack(flags, bytes(iv), mac), ciphertext


def parse_header(header: bytes) -> tuple[int, bytes, bytes]:
    """``(flags, iv, mac)`` of a 52-byte packet header."""
    _check("packet header", header, PACKET_HEADER_LEN)
    flags, iv, mac = _HEADER.unpack(bytes(header))
    return flags, iv, mac


def open_packet(tik: bytes, tek: bytes, measure: bytes, header: bytes, ciphertext: bytes) -> bytes:
    """What the PSP does on LAUNCH_SECRET: check the MAC in constant time, then decrypt.

    Returns the plaintext table. Raises :class:`PacketError` with a one-line
    reason; the reason never contains key or payload bytes.
    """
    _check("TIK", tik, KEY_LEN)
    _check("TEK", tek, KEY_LEN)
    _check("MEASURE", measure, MEASURE_LEN)
    flags, iv, mac = parse_header(header)
    if not ciphertext or len(ciphertext) % ALIGN:
        raise PacketError(f"secret payload length {len(ciphertext)} is not a positive multiple of {ALIGN}")
    expected = _mac(tik, flags, iv, len(ciphertext), ciphertext, measure)
    if not hmac.compare_digest(mac, expected):
        raise PacketError("packet MAC does not match")
    if flags != 0:
        raise PacketError(f"unsupported packet flags 0x{flags:x}")
    return _ctr(tek, iv, ciphertext)
