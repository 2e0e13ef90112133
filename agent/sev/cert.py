"""The 2084-byte SEV certificate (AMD SEV API spec, Appendix C.1).

PDH, PEK, OCA, CEK and the guest owner's Diffie-Hellman key (GODH) all travel
in this one fixed layout. All integers are little-endian, and so are the big
numbers: the P-384 coordinates and the ECDSA r/s are stored least significant
byte first, zero-extended to 72 bytes (virtee/sev
``src/certs/sev/sev/cert/v1/``; AMD firmware ``sev_cert.h``):

    0x000 VERSION u32 (1)       0x004 API_MAJOR u8   0x005 API_MINOR u8
    0x006 RESERVED u16          0x008 PUBKEY_USAGE u32   0x00C PUBKEY_ALGO u32
    0x010 PUBKEY[1028]          ECC: CURVE u32, QX[72], QY[72], RESERVED[880]
    0x414 SIG1_USAGE u32, SIG1_ALGO u32, SIG1[512]   ECDSA: R[72], S[72], RESERVED[368]
    0x61C SIG2_USAGE u32, SIG2_ALGO u32, SIG2[512]

The signatures cover bytes 0x000..0x413 (VERSION through PUBKEY). An unused
signature slot has usage 0x1000 (invalid) and algorithm 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

# --- key usages (SEV API Table "Key Usage") ---
USAGE_ARK = 0x0000
USAGE_ASK = 0x0013
USAGE_INVALID = 0x1000
USAGE_OCA = 0x1001
USAGE_PEK = 0x1002
USAGE_PDH = 0x1003
USAGE_CEK = 0x1004

# --- algorithms (SEV API Table "Algorithms") ---
ALGO_NONE = 0x0000
ALGO_RSA_SHA256 = 0x0001
ALGO_ECDSA_SHA256 = 0x0002
ALGO_ECDH_SHA256 = 0x0003
ALGO_RSA_SHA384 = 0x0101
ALGO_ECDSA_SHA384 = 0x0102
ALGO_ECDH_SHA384 = 0x0103

_ECDSA_HASH = {ALGO_ECDSA_SHA256: hashes.SHA256, ALGO_ECDSA_SHA384: hashes.SHA384}
_SIGNING_ALGOS = {ALGO_RSA_SHA256, ALGO_RSA_SHA384, ALGO_ECDSA_SHA256, ALGO_ECDSA_SHA384}
_SIGNING_USAGES = {USAGE_ARK, USAGE_ASK, USAGE_OCA, USAGE_PEK, USAGE_CEK, USAGE_PDH}

# --- ECC curves ---
CURVE_P256 = 1
CURVE_P384 = 2
_CURVES = {CURVE_P256: (ec.SECP256R1, 32), CURVE_P384: (ec.SECP384R1, 48)}

#: VERSION u32, API_MAJOR u8, API_MINOR u8, RESERVED u16, PUBKEY_USAGE u32, PUBKEY_ALGO u32, PUBKEY[1028]
_BODY = struct.Struct("<IBBHII1028s")
#: SIGn_USAGE u32, SIGn_ALGO u32, SIGn[512]
_SIG = struct.Struct("<II512s")
#: CURVE u32, QX[72], QY[72], RESERVED[880]
_ECC_PUBKEY = struct.Struct("<I72s72s880s")
#: R[72], S[72], RESERVED[368]
_ECDSA_SIG = struct.Struct("<72s72s368s")

BODY_LEN = _BODY.size  # 0x414 = 1044
CERT_LEN = BODY_LEN + 2 * _SIG.size  # 2084
assert CERT_LEN == 2084 and _ECC_PUBKEY.size == 1028 and _ECDSA_SIG.size == 512

_FIELD = 72


def _le(n: int) -> bytes:
    return n.to_bytes(_FIELD, "little")


@dataclass(frozen=True)
class Signature:
    """One signature slot of a certificate."""

    usage: int = USAGE_INVALID
    algo: int = ALGO_NONE
    sig: bytes = bytes(512)

    def is_empty(self) -> bool:
        return self.usage not in _SIGNING_USAGES or self.algo not in _SIGNING_ALGOS


@dataclass(frozen=True)
class Certificate:
    """A parsed SEV certificate; :meth:`to_bytes` gives back the exact 2084 bytes."""

    version: int
    api_major: int
    api_minor: int
    usage: int
    algo: int
    pubkey: bytes  # the raw 1028-byte PUBKEY field
    sig1: Signature = Signature()
    sig2: Signature = Signature()
    reserved: int = 0

    # -- wire form ----------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        if len(data) != CERT_LEN:
            raise ValueError(f"SEV certificate must be {CERT_LEN} bytes, got {len(data)}")
        data = bytes(data)
        version, major, minor, reserved, usage, algo, pubkey = _BODY.unpack_from(data, 0)
        if version != 1:
            raise ValueError(f"unsupported SEV certificate version {version}")
        sigs = [Signature(*_SIG.unpack_from(data, BODY_LEN + i * _SIG.size)) for i in range(2)]
        return cls(version, major, minor, usage, algo, pubkey, sigs[0], sigs[1], reserved)

    def body(self) -> bytes:
        """The signed part: VERSION through PUBKEY (0x414 bytes)."""
        return _BODY.pack(
            self.version, self.api_major, self.api_minor, self.reserved, self.usage, self.algo, self.pubkey
        )

    def to_bytes(self) -> bytes:
        return (
            self.body()
            + _SIG.pack(self.sig1.usage, self.sig1.algo, self.sig1.sig)
            + _SIG.pack(self.sig2.usage, self.sig2.algo, self.sig2.sig)
        )

    # -- keys ---------------------------------------------------------------
    @classmethod
    def from_public_key(
        cls,
        key: ec.EllipticCurvePublicKey,
        usage: int = USAGE_PDH,
        algo: int = ALGO_ECDH_SHA256,
        api_major: int = 0,
        api_minor: int = 0,
    ) -> Certificate:
        """An unsigned certificate for an EC public key (how the GODH is made)."""
        curve = {ec.SECP256R1.name: CURVE_P256, ec.SECP384R1.name: CURVE_P384}.get(key.curve.name)
        if curve is None:
            raise ValueError(f"SEV certificates hold P-256 or P-384 keys, not {key.curve.name}")
        nums = key.public_numbers()
        pubkey = _ECC_PUBKEY.pack(curve, _le(nums.x), _le(nums.y), bytes(880))
        return cls(1, api_major, api_minor, usage, algo, pubkey)

    @property
    def curve(self) -> int:
        curve: int = _ECC_PUBKEY.unpack(self.pubkey)[0]
        return curve

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The EC public key; ValueError if the certificate holds no valid EC point."""
        if self.algo not in (ALGO_ECDSA_SHA256, ALGO_ECDSA_SHA384, ALGO_ECDH_SHA256, ALGO_ECDH_SHA384):
            raise ValueError(f"SEV certificate key algorithm 0x{self.algo:x} is not an EC algorithm")
        curve_id, qx, qy, _ = _ECC_PUBKEY.unpack(self.pubkey)
        if curve_id not in _CURVES:
            raise ValueError(f"SEV certificate has unknown curve {curve_id}")
        curve_cls, size = _CURVES[curve_id]
        if any(qx[size:]) or any(qy[size:]):
            raise ValueError("SEV certificate key coordinate does not fit its curve")
        x = int.from_bytes(qx[:size], "little")
        y = int.from_bytes(qy[:size], "little")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve_cls()).public_key()
        except ValueError:
            raise ValueError("SEV certificate key is not a point on its curve") from None

    # -- signatures ---------------------------------------------------------
    def is_signed_by(self, signer: Certificate) -> bool:
        """True if one of this certificate's ECDSA slots is a valid signature by ``signer``.

        Only the signature is checked (as virtee's ``(&pek, &pdh).verify()``); which
        usage may sign which is the caller's chain policy.
        """
        key = signer.public_key()
        return any(self._slot_verifies(slot, signer, key) for slot in (self.sig1, self.sig2))

    def slot_signed_by(self, slot: Signature, signer: Certificate) -> bool:
        """True if this one slot is a valid ECDSA signature by ``signer``."""
        return self._slot_verifies(slot, signer, signer.public_key())

    def _slot_verifies(self, slot: Signature, signer: Certificate, key: ec.EllipticCurvePublicKey) -> bool:
        if slot.is_empty() or slot.usage != signer.usage or slot.algo not in _ECDSA_HASH:
            return False
        r, s, _ = _ECDSA_SIG.unpack(slot.sig)
        der = encode_dss_signature(int.from_bytes(r, "little"), int.from_bytes(s, "little"))
        try:
            key.verify(der, self.body(), ec.ECDSA(_ECDSA_HASH[slot.algo]()))
        except InvalidSignature:
            return False
        return True

    def signed(
        self, signer: ec.EllipticCurvePrivateKey, signer_usage: int, algo: int = ALGO_ECDSA_SHA256
    ) -> Certificate:
        """A copy with the first empty signature slot filled by ``signer`` (for test chains)."""
        if algo not in _ECDSA_HASH:
            raise ValueError(f"cannot sign with algorithm 0x{algo:x}")
        r, s = decode_dss_signature(signer.sign(self.body(), ec.ECDSA(_ECDSA_HASH[algo]())))
        slot = Signature(signer_usage, algo, _ECDSA_SIG.pack(_le(r), _le(s), bytes(368)))
        if self.sig1.is_empty():
            return replace(self, sig1=slot)
        if self.sig2.is_empty():
            return replace(self, sig2=slot)
        raise ValueError("SEV certificate has no empty signature slot")


# -- the platform's certificate chain ------------------------------------------
#
# PDH_CERT_EXPORT (SEV API 5.10) hands out the PDH and, in a second buffer,
# the chain that vouches for it: PEK || OCA || CEK, 2084 bytes each.  That
# second buffer is what QEMU's ``query-sev-capabilities`` reports as
# ``cert-chain`` (base64) and what virtee/sev's ``pdh_cert_export`` reads as
# ``chain[0..3]`` (src/firmware/host/mod.rs).  The CEK is signed by AMD's ASK
# and the ASK by the ARK, which are not in this buffer (sevctl fetches them):
# only the links inside the platform are checked here, as virtee's
# ``certs/sev/chain.rs`` does after the CA part:
#   PDH <- PEK,  PEK <- OCA,  PEK <- CEK.

CHAIN_LEN = 3 * CERT_LEN  # 6252
_CHAIN_ORDER = ((USAGE_PEK, "PEK"), (USAGE_OCA, "OCA"), (USAGE_CEK, "CEK"))


@dataclass(frozen=True)
class PlatformChain:
    """The PEK, OCA and CEK of a platform, in PDH_CERT_EXPORT order."""

    pek: Certificate
    oca: Certificate
    cek: Certificate

    @classmethod
    def from_bytes(cls, data: bytes) -> PlatformChain:
        """Parse the 6252-byte chain; ValueError (one line) if it is not PEK || OCA || CEK."""
        if len(data) != CHAIN_LEN:
            raise ValueError(f"SEV certificate chain must be {CHAIN_LEN} bytes (PEK, OCA, CEK), got {len(data)}")
        certs = []
        for i, (usage, name) in enumerate(_CHAIN_ORDER):
            cert = Certificate.from_bytes(data[i * CERT_LEN : (i + 1) * CERT_LEN])
            if cert.usage != usage:
                raise ValueError(
                    f"certificate {i + 1} of the chain has usage 0x{cert.usage:x}, not {name} (0x{usage:x})"
                )
            certs.append(cert)
        return cls(*certs)

    def to_bytes(self) -> bytes:
        return self.pek.to_bytes() + self.oca.to_bytes() + self.cek.to_bytes()


def verify_pdh_chain(pdh: Certificate, chain: PlatformChain) -> None:
    """Check PDH <- PEK <- (OCA and CEK); ValueError naming the first broken link.

    The PEK carries two signatures, one by the owner's OCA and one by AMD's
    CEK: both must verify.  Checking the CEK itself needs AMD's ASK.
    """
    if pdh.usage != USAGE_PDH:
        raise ValueError(f"PDH certificate has usage 0x{pdh.usage:x}, not PDH (0x{USAGE_PDH:x})")
    links = ((pdh, "PDH", chain.pek, "PEK"), (chain.pek, "PEK", chain.oca, "OCA"), (chain.pek, "PEK", chain.cek, "CEK"))
    for subject, sname, signer, iname in links:
        try:
            ok = subject.is_signed_by(signer)
        except ValueError as exc:
            raise ValueError(f"{iname} certificate cannot verify signatures: {exc}") from None
        if not ok:
            raise ValueError(f"{sname} certificate is not signed by the chain's {iname}")
