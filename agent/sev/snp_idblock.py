"""SEV-SNP ID block and ID authentication structure, and AMD's ECDSA formats.

The guest owner pins a launch with an ID block: the expected launch digest,
the guest's identity and policy, signed with the owner's ID key.  QEMU passes
it to SNP_LAUNCH_FINISH (``sev-snp-guest,id-block=B64,id-auth=B64``); the PSP
refuses to finish a launch whose digest or policy differ, and stamps the
digests of the ID key (and of the author key that signed it) into every
attestation report.  Layouts: AMD SEV-SNP ABI specification, "ID_BLOCK",
"ID_AUTH_INFO", "ECDSA Public Key Format", "ECDSA Signature Format";
sev-snp-measure's ``snp-create-id-block`` builds the same bytes.

AMD writes ECDSA numbers little-endian, zero-extended to 72 bytes (room for
P-521): a public key is CURVE u32 || QX[72] || QY[72] || reserved, a
signature is R[72] || S[72] || reserved.  Only P-384 with SHA-384 is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

# ID_BLOCK: LD[48], FAMILY_ID[16], IMAGE_ID[16], VERSION u32 (1), GUEST_SVN
# u32, POLICY u64.
ID_BLOCK = struct.Struct("<48s16s16sIIQ")
assert ID_BLOCK.size == 0x60
ID_BLOCK_VERSION = 1

# ID_AUTH_INFO: ID_KEY_ALGO u32, AUTH_KEY_ALGO u32, reserved[0x38],
# ID_BLOCK_SIG[0x200], ID_KEY[0x404], reserved[0x3c], ID_KEY_SIG[0x200],
# AUTHOR_KEY[0x404], reserved[0x37c].
ID_AUTH = struct.Struct("<II56s512s1028s60s512s1028s892s")
assert ID_AUTH.size == 0x1000

# ECDSA signature: R[72] (little-endian), S[72], reserved[0x170].
SIGNATURE = struct.Struct("<72s72s368s")
assert SIGNATURE.size == 0x200
# ECDSA public key: CURVE u32, QX[72], QY[72], reserved[0x370].
PUBLIC_KEY = struct.Struct("<I72s72s880s")
assert PUBLIC_KEY.size == 0x404

# Algorithm and curve encodings.
ALGO_ECDSA_P384_SHA384 = 1
CURVE_P384 = 2
COORD_SIZE = 48  # P-384 coordinates and R/S values fit in 48 bytes


# SNP guest policy (ABI spec, "Guest Policy"): 7:0 ABI_MINOR, 15:8 ABI_MAJOR,
# 16 SMT, 17 reserved (must be one), 18 MIGRATE_MA, 19 DEBUG, 20
# SINGLE_SOCKET, 21 CXL_ALLOW, 22 MEM_AES_256_XTS, 23 RAPL_DIS, 24
# CIPHERTEXT_HIDING, 25 PAGE_SWAP_DISABLE, 63:26 reserved (must be zero).
POLICY_RESERVED_ONE = 1 << 17
POLICY_DEBUG = 1 << 19
POLICY_KNOWN_BITS = (1 << 26) - 1


def policy_problem(policy: int) -> str | None:
    """Why the PSP would refuse this SNP guest policy, or None."""
    if not 0 <= policy < 1 << 64:
        return "an SNP policy is a 64-bit value"
    if not policy & POLICY_RESERVED_ONE:
        return f"SNP policy {policy:#x} lacks bit 17, which the SNP ABI requires to be one"
    if policy & ~POLICY_KNOWN_BITS:
        return f"SNP policy {policy:#x} sets reserved bits 63:26"
    return None


class SnpFormatError(ValueError):
    """Bytes that are not a well-formed SNP structure (one-line reason)."""


def _le(n: int, width: int = 72) -> bytes:
    return n.to_bytes(width, "little")


def _int_le(raw: bytes, what: str) -> int:
    """An AMD zero-extended number; the bytes beyond P-384's 48 must be zero."""
    if any(raw[COORD_SIZE:]):
        raise SnpFormatError(f"{what} has non-zero bytes beyond {COORD_SIZE}")
    return int.from_bytes(raw[:COORD_SIZE], "little")


def encode_signature(der: bytes) -> bytes:
    """A DER ECDSA signature (as cryptography returns it) in AMD's 512-byte format."""
    r, s = decode_dss_signature(der)
    return SIGNATURE.pack(_le(r), _le(s), bytes(368))


def decode_signature(raw: bytes) -> bytes:
    """AMD's 512-byte signature as DER (SnpFormatError if malformed)."""
    if len(raw) != SIGNATURE.size:
        raise SnpFormatError(f"signature is {len(raw)} bytes, not {SIGNATURE.size}")
    r_raw, s_raw, reserved = SIGNATURE.unpack(raw)
    if any(reserved):
        raise SnpFormatError("signature reserved bytes are not zero")
    return encode_dss_signature(_int_le(r_raw, "signature R"), _int_le(s_raw, "signature S"))


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-384 / SHA-384 over ``data``, in AMD's format."""
    _check_p384(private_key.curve)
    return encode_signature(private_key.sign(data, ec.ECDSA(hashes.SHA384())))


def verify(public_key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` (AMD's format) is ``public_key``'s over ``data``."""
    try:
        der = decode_signature(signature)
        public_key.verify(der, data, ec.ECDSA(hashes.SHA384()))
    except (SnpFormatError, InvalidSignature, ValueError):
        return False
    return True


def _check_p384(curve: ec.EllipticCurve) -> None:
    if not isinstance(curve, ec.SECP384R1):
        raise SnpFormatError(f"SNP keys are ECDSA P-384, not {curve.name}")


def encode_public_key(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 0x404-byte ECDSA public key structure."""
    _check_p384(public_key.curve)
    numbers = public_key.public_numbers()
    return PUBLIC_KEY.pack(CURVE_P384, _le(numbers.x), _le(numbers.y), bytes(880))


def decode_public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    """The public key a 0x404-byte structure holds (SnpFormatError if malformed)."""
    if len(raw) != PUBLIC_KEY.size:
        raise SnpFormatError(f"public key is {len(raw)} bytes, not {PUBLIC_KEY.size}")
    curve, qx, qy, reserved = PUBLIC_KEY.unpack(raw)
    if curve != CURVE_P384:
        raise SnpFormatError(f"public key curve {curve} is not P-384 ({CURVE_P384})")
    if any(reserved):
        raise SnpFormatError("public key reserved bytes are not zero")
    try:
        return ec.EllipticCurvePublicNumbers(_int_le(qx, "QX"), _int_le(qy, "QY"), ec.SECP384R1()).public_key()
    except ValueError:
        raise SnpFormatError("public key is not a point on P-384") from None


def key_digest(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-384 of the public key structure: the report's ID_KEY_DIGEST / AUTHOR_KEY_DIGEST."""
    h = hashes.Hash(hashes.SHA384())
    h.update(encode_public_key(public_key))
    return h.finalize()


@dataclass(frozen=True)
class IdBlock:
    """The fields of an ID block."""

    launch_digest: bytes
    policy: int
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    version: int = ID_BLOCK_VERSION

    def __post_init__(self) -> None:
        for name, value, size in (
            ("launch digest", self.launch_digest, 48),
            ("family id", self.family_id, 16),
            ("image id", self.image_id, 16),
        ):
            if len(value) != size:
                raise SnpFormatError(f"{name} must be {size} bytes, got {len(value)}")
        if not 0 <= self.guest_svn < 1 << 32:
            raise SnpFormatError("guest SVN must be a 32-bit value")
        if not 0 <= self.policy < 1 << 64:
            raise SnpFormatError("policy must be a 64-bit value")

    def to_bytes(self) -> bytes:
        return ID_BLOCK.pack(
            self.launch_digest, self.family_id, self.image_id, self.version, self.guest_svn, self.policy
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> IdBlock:
        if len(raw) != ID_BLOCK.size:
            raise SnpFormatError(f"ID block is {len(raw)} bytes, not {ID_BLOCK.size}")
        ld, family, image, version, svn, policy = ID_BLOCK.unpack(raw)
        return cls(ld, policy, family, image, svn, version)


@dataclass(frozen=True)
class SignedIdBlock:
    """What ``owner idblock`` hands QEMU, and the digests a report will carry."""

    id_block: bytes
    id_auth: bytes
    id_key_digest: bytes
    author_key_digest: bytes


def make_id_auth(id_block: bytes, id_key: ec.EllipticCurvePrivateKey, author_key: ec.EllipticCurvePrivateKey) -> bytes:
    """ID_AUTH_INFO: the ID key signs the block, the author key signs the ID key."""
    id_pub = encode_public_key(id_key.public_key())
    return ID_AUTH.pack(
        ALGO_ECDSA_P384_SHA384,
        ALGO_ECDSA_P384_SHA384,
        bytes(56),
        sign(id_key, id_block),
        id_pub,
        bytes(60),
        sign(author_key, id_pub),
        encode_public_key(author_key.public_key()),
        bytes(892),
    )


def sign_id_block(
    block: IdBlock, id_key: ec.EllipticCurvePrivateKey, author_key: ec.EllipticCurvePrivateKey
) -> SignedIdBlock:
    raw = block.to_bytes()
    return SignedIdBlock(
        id_block=raw,
        id_auth=make_id_auth(raw, id_key, author_key),
        id_key_digest=key_digest(id_key.public_key()),
        author_key_digest=key_digest(author_key.public_key()),
    )


@dataclass(frozen=True)
class IdAuthCheck:
    """The outcome of checking an ID_AUTH_INFO against its ID block (as the PSP does)."""

    block_signature: bool
    id_key_signature: bool
    id_key_digest: bytes | None
    author_key_digest: bytes | None


def check_id_auth(id_block: bytes, id_auth: bytes) -> IdAuthCheck:
    """Verify both signatures of an ID_AUTH_INFO; SnpFormatError if it is malformed."""
    if len(id_auth) != ID_AUTH.size:
        raise SnpFormatError(f"ID auth is {len(id_auth)} bytes, not {ID_AUTH.size}")
    id_algo, auth_algo, _r1, block_sig, id_key_raw, _r2, id_key_sig, author_raw, _r3 = ID_AUTH.unpack(id_auth)
    if id_algo != ALGO_ECDSA_P384_SHA384:
        raise SnpFormatError(f"ID key algorithm {id_algo} is not ECDSA P-384 SHA-384")
    id_pub = decode_public_key(id_key_raw)
    block_ok = verify(id_pub, id_block, block_sig)
    author_ok = False
    author_digest = None
    if auth_algo == ALGO_ECDSA_P384_SHA384:
        author_pub = decode_public_key(author_raw)
        author_ok = verify(author_pub, id_key_raw, id_key_sig)
        author_digest = key_digest(author_pub)
    return IdAuthCheck(block_ok, author_ok, key_digest(id_pub), author_digest)
