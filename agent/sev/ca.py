"""AMD's root of trust for SEV: the ARK and ASK certificates, and the full platform chain.

A platform proves it is a real AMD part with a chain that ends at AMD's keys::

    PDH <- PEK <- (OCA and CEK),   CEK <- ASK <- ARK

The PDH, PEK, OCA and CEK are 2084-byte SEV certificates (:mod:`agent.sev.cert`).
The ASK (AMD SEV Signing Key) and ARK (AMD Root Key) use AMD's *public key
certificate* format (SEV API spec, appendix "AMD Root Key and AMD SEV Signing
Key certificate format"; AMD's key distribution server serves them as
``ask_ark_<product>.cert``, ASK first).  All integers are little-endian, and so
are the big numbers (exponent, modulus, signature)::

    0x00 VERSION u32 (1)
    0x04 KEY_ID[16]             this key's id
    0x14 CERTIFYING_ID[16]      the signer's KEY_ID (the ARK's own id for the ARK)
    0x24 KEY_USAGE u32          0x0000 ARK, 0x0013 ASK
    0x28 RESERVED[16]
    0x38 PUBEXP_SIZE u32        bits
    0x3C MODULUS_SIZE u32       bits: 2048 (Naples) or 4096 (Rome and later)
    0x40 PUBEXP[PUBEXP_SIZE/8]
         MODULUS[MODULUS_SIZE/8]
         SIGNATURE[MODULUS_SIZE/8]

The signature covers VERSION through MODULUS; it is RSASSA-PSS with a salt as
long as the digest, SHA-256 for a 2048-bit key and SHA-384 for a 4096-bit one
(virtee/sev ``src/certs/sev/ca/cert/v1.rs`` and ``crypto.rs``; sevctl).  The
CEK carries the ASK's signature in one of its SEV signature slots: usage ASK
(0x13), algorithm RSA_SHA256 (Naples) or RSA_SHA384, the signature a
little-endian number in the 512-byte field.

Which product a chain belongs to is read from the chain itself: an ASK names
its ARK by CERTIFYING_ID, and the CEK's slot algorithm says which key size and
digest its ASK has; of the trusted ASKs of that kind, the one whose signature
verifies names the product.  Nothing here trusts a product name the platform
reports.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.sev.cert import (
    ALGO_ECDSA_SHA256,
    ALGO_ECDSA_SHA384,
    ALGO_NONE,
    ALGO_RSA_SHA256,
    ALGO_RSA_SHA384,
    USAGE_ARK,
    USAGE_ASK,
    USAGE_CEK,
    USAGE_INVALID,
    USAGE_OCA,
    USAGE_PDH,
    USAGE_PEK,
    Certificate,
    PlatformChain,
    Signature,
    verify_pdh_chain,
)

__all__ = [
    "CaCertificate",
    "AmdRoots",
    "PlatformVerified",
    "USAGE_ARK",
    "PRODUCTS",
    "builtin_roots",
    "load_roots_dir",
    "verify_platform",
    "cek_signed_by_ask",
    "sign_cek",
    "make_ca_certificate",
    "pdh_sha256",
]

#: The products whose ARK/ASK ship in ``agent/sev/roots`` (from virtee/sev, originally AMD's KDS).
PRODUCTS = ("naples", "rome", "milan", "genoa", "turin")

#: VERSION u32, KEY_ID[16], CERTIFYING_ID[16], KEY_USAGE u32, RESERVED[16], PUBEXP_SIZE u32, MODULUS_SIZE u32
_HEAD = struct.Struct("<I16s16sI16sII")
assert _HEAD.size == 0x40

#: modulus bits -> the digest of its RSASSA-PSS signatures
_RSA_HASH: dict[int, type[hashes.HashAlgorithm]] = {2048: hashes.SHA256, 4096: hashes.SHA384}
#: a CEK's ASK-slot algorithm -> the ASK modulus bits it implies
_CEK_SLOT_BITS = {ALGO_RSA_SHA256: 2048, ALGO_RSA_SHA384: 4096}
_ALGO_FOR_BITS = {bits: algo for algo, bits in _CEK_SLOT_BITS.items()}


def _pss(hash_cls: type[hashes.HashAlgorithm]) -> padding.PSS:
    algorithm = hash_cls()
    return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)


@dataclass(frozen=True)
class CaCertificate:
    """An ARK or ASK in AMD's public key certificate format; :meth:`to_bytes` is exact."""

    key_id: bytes
    certifying_id: bytes
    usage: int
    modulus_bits: int
    pubexp: int
    modulus: int
    signature: bytes  # MODULUS_SIZE/8 bytes, little-endian, as stored
    pubexp_bits: int = 0  # 0: the same as modulus_bits
    version: int = 1
    reserved: bytes = bytes(16)

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "AMD certificate") -> CaCertificate:
        """Parse one certificate that fills ``data`` exactly; ValueError (one line) otherwise."""
        data = bytes(data)
        if len(data) < _HEAD.size:
            raise ValueError(f"{what} is {len(data)} bytes, shorter than its {_HEAD.size}-byte header")
        version, key_id, cert_id, usage, reserved, pbits, mbits = _HEAD.unpack_from(data, 0)
        if version != 1:
            raise ValueError(f"{what} has version {version}, not 1")
        if mbits not in _RSA_HASH:
            raise ValueError(f"{what} has a {mbits}-bit modulus, not 2048 or 4096")
        if pbits != mbits:
            raise ValueError(f"{what} has PUBEXP_SIZE {pbits} != MODULUS_SIZE {mbits}")
        n = mbits // 8
        want = _HEAD.size + 3 * n
        if len(data) != want:
            raise ValueError(f"{what} must be {want} bytes for a {mbits}-bit key, got {len(data)}")
        pubexp = int.from_bytes(data[0x40 : 0x40 + n], "little")
        modulus = int.from_bytes(data[0x40 + n : 0x40 + 2 * n], "little")
        signature = data[0x40 + 2 * n :]
        return cls(
            key_id=key_id,
            certifying_id=cert_id,
            usage=usage,
            modulus_bits=mbits,
            pubexp=pubexp,
            modulus=modulus,
            signature=signature,
            pubexp_bits=pbits,
            version=version,
            reserved=reserved,
        )

    def body(self) -> bytes:
        """The signed part: VERSION through MODULUS."""
        n = self.modulus_bits // 8
        return (
            _HEAD.pack(
                self.version,
                self.key_id,
                self.certifying_id,
                self.usage,
                self.reserved,
                self.pubexp_bits or self.modulus_bits,
                self.modulus_bits,
            )
            + self.pubexp.to_bytes(n, "little")
            + self.modulus.to_bytes(n, "little")
        )

    def to_bytes(self) -> bytes:
        return self.body() + self.signature

    @property
    def hash(self) -> type[hashes.HashAlgorithm]:
        return _RSA_HASH[self.modulus_bits]

    def public_key(self) -> rsa.RSAPublicKey:
        try:
            key = rsa.RSAPublicNumbers(self.pubexp, self.modulus).public_key()
        except ValueError:
            raise ValueError("AMD certificate holds no valid RSA public key") from None
        if key.key_size != self.modulus_bits:
            raise ValueError(f"AMD certificate modulus is {key.key_size} bits, not {self.modulus_bits}")
        return key

    def verify_rsa(self, message: bytes, signature_le: bytes, hash_cls: type[hashes.HashAlgorithm]) -> bool:
        """True if ``signature_le`` (little-endian, any zero padding) is this key's PSS signature."""
        n = self.modulus_bits // 8
        if any(signature_le[n:]):
            return False
        value = int.from_bytes(signature_le[:n], "little")
        if value >= self.modulus:
            return False
        try:
            self.public_key().verify(value.to_bytes(n, "big"), message, _pss(hash_cls), hash_cls())
        except InvalidSignature:
            return False
        return True

    def is_signed_by(self, signer: CaCertificate) -> bool:
        """True if ``signer`` certified this key: ids match and the signature verifies."""
        if self.certifying_id != signer.key_id or signer.modulus_bits != self.modulus_bits:
            return False
        return signer.verify_rsa(self.body(), self.signature, signer.hash)


def make_ca_certificate(
    key: rsa.RSAPublicKey, *, key_id: bytes, usage: int, signer_id: bytes, signer_key: rsa.RSAPrivateKey
) -> CaCertificate:
    """An ARK (self-signed: ``signer_id == key_id``) or ASK, for the simulator's own root."""
    nums = key.public_numbers()
    bits = key.key_size
    if bits not in _RSA_HASH:
        raise ValueError(f"AMD certificates hold 2048- or 4096-bit RSA keys, not {bits}")
    unsigned = CaCertificate(
        key_id=key_id,
        certifying_id=signer_id,
        usage=usage,
        modulus_bits=bits,
        pubexp=nums.e,
        modulus=nums.n,
        signature=b"",
    )
    hash_cls = _RSA_HASH[bits]
    sig = signer_key.sign(unsigned.body(), _pss(hash_cls), hash_cls())
    return CaCertificate(
        key_id=key_id,
        certifying_id=signer_id,
        usage=usage,
        modulus_bits=bits,
        pubexp=nums.e,
        modulus=nums.n,
        signature=sig[::-1],
    )


def cek_signed_by_ask(cek: Certificate, ask: CaCertificate) -> bool:
    """True if one of the CEK's slots holds ``ask``'s signature over the CEK body."""
    return any(_ask_slot_verifies(cek, slot, ask) for slot in (cek.sig1, cek.sig2))


def _ask_slot_verifies(cek: Certificate, slot: Signature, ask: CaCertificate) -> bool:
    if slot.usage != USAGE_ASK or _CEK_SLOT_BITS.get(slot.algo) != ask.modulus_bits:
        return False
    return ask.verify_rsa(cek.body(), slot.sig, ask.hash)


def sign_cek(cek: Certificate, ask_key: rsa.RSAPrivateKey) -> Certificate:
    """A copy of ``cek`` with the ASK's signature in its first empty slot (the simulator's KDS)."""
    from dataclasses import replace

    bits = ask_key.key_size
    hash_cls = _RSA_HASH[bits]
    sig = ask_key.sign(cek.body(), _pss(hash_cls), hash_cls())
    slot = Signature(USAGE_ASK, _ALGO_FOR_BITS[bits], sig[::-1] + bytes(512 - len(sig)))
    if cek.sig1.is_empty():
        return replace(cek, sig1=slot)
    if cek.sig2.is_empty():
        return replace(cek, sig2=slot)
    raise ValueError("CEK certificate has no empty signature slot")


@dataclass(frozen=True)
class AmdRoots:
    """One product's ARK and ASK, checked against each other when loaded."""

    product: str
    ark: CaCertificate
    ask: CaCertificate

    @classmethod
    def from_bytes(cls, product: str, ark: bytes, ask: bytes) -> AmdRoots:
        ark_cert = CaCertificate.from_bytes(ark, f"{product} ARK")
        ask_cert = CaCertificate.from_bytes(ask, f"{product} ASK")
        if ark_cert.usage != USAGE_ARK:
            raise ValueError(f"{product} ARK has key usage 0x{ark_cert.usage:x}, not ARK (0x0)")
        if ask_cert.usage != USAGE_ASK:
            raise ValueError(f"{product} ASK has key usage 0x{ask_cert.usage:x}, not ASK (0x13)")
        if not ark_cert.is_signed_by(ark_cert):
            raise ValueError(f"{product} ARK is not self-signed")
        if not ask_cert.is_signed_by(ark_cert):
            raise ValueError(f"{product} ASK is not signed by its ARK")
        return cls(product, ark_cert, ask_cert)


def builtin_roots() -> tuple[AmdRoots, ...]:
    """AMD's public ARK/ASK for every product in :data:`PRODUCTS` (package data)."""
    base = resources.files("agent.sev") / "roots"
    return tuple(
        AmdRoots.from_bytes(p, (base / f"{p}-ark.cert").read_bytes(), (base / f"{p}-ask.cert").read_bytes())
        for p in PRODUCTS
    )


def load_roots_dir(path: str | os.PathLike[str]) -> tuple[AmdRoots, ...]:
    """Every ``<product>-ark.cert`` with its ``<product>-ask.cert`` in ``path``; ValueError (one line)."""
    path = Path(path)
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise ValueError(f"cannot read AMD roots directory {path}: {exc.strerror}") from None
    products = [n[: -len("-ark.cert")] for n in names if n.endswith("-ark.cert")]
    if not products:
        raise ValueError(f"AMD roots directory {path} holds no <product>-ark.cert")
    roots = []
    for product in products:
        files = {}
        for kind in ("ark", "ask"):
            file = path / f"{product}-{kind}.cert"
            try:
                with open(file, "rb") as fh:
                    files[kind] = fh.read(1 << 16)
            except FileNotFoundError:
                raise ValueError(f"AMD roots directory {path}: {file.name} is missing") from None
            except OSError as exc:
                raise ValueError(f"cannot read {file}: {exc.strerror}") from None
        roots.append(AmdRoots.from_bytes(product, files["ark"], files["ask"]))
    return tuple(roots)


def pdh_sha256(pdh: bytes) -> str:
    """The pin of a platform: SHA-256 of its PDH certificate as sent, hex."""
    return hashlib.sha256(bytes(pdh)).hexdigest()


#: bytes of a 512-byte signature field an algorithm uses; the rest must be zero
_SLOT_USED = {ALGO_ECDSA_SHA256: 144, ALGO_ECDSA_SHA384: 144, ALGO_RSA_SHA256: 512, ALGO_RSA_SHA384: 512}
_USAGE_NAMES = {USAGE_ASK: "ASK", USAGE_OCA: "OCA", USAGE_PEK: "PEK", USAGE_CEK: "CEK"}


def _check_slots(cert: Certificate, name: str, signers: dict[int, Callable[[Signature], bool]]) -> None:
    """Every byte of both signature slots is either checked by a signature or zero.

    The signatures cover only VERSION..PUBKEY: an unused slot, the tail of a
    used one, or a second signature nobody checks could otherwise be changed
    without anything noticing.  ``signers`` maps each usage allowed to sign
    ``cert`` to the check of one slot.
    """
    for i, slot in enumerate((cert.sig1, cert.sig2), 1):
        if slot.usage == USAGE_INVALID and slot.algo == ALGO_NONE:
            if any(slot.sig):
                raise ValueError(f"{name} certificate's empty signature slot {i} is not zero")
            continue
        used = _SLOT_USED.get(slot.algo)
        if used is None:
            raise ValueError(f"{name} certificate's signature slot {i} has unknown algorithm 0x{slot.algo:x}")
        if any(slot.sig[used:]):
            raise ValueError(f"{name} certificate's signature slot {i} has non-zero reserved bytes")
        check = signers.get(slot.usage)
        if check is None:
            raise ValueError(
                f"{name} certificate's signature slot {i} has usage 0x{slot.usage:x}, which does not sign a {name}"
            )
        try:
            ok = check(slot)
        except ValueError as exc:
            raise ValueError(f"{name} certificate's slot {i}: {exc}") from None
        if not ok:
            signer = _USAGE_NAMES.get(slot.usage, f"0x{slot.usage:x}")
            raise ValueError(f"{name} certificate's signature slot {i} is not a valid signature by the {signer}")


@dataclass(frozen=True)
class PlatformVerified:
    """A chain that verified to a trusted root: which product."""

    product: str


def verify_platform(pdh: Certificate, chain: PlatformChain, roots: tuple[AmdRoots, ...]) -> PlatformVerified:
    """The whole chain, PDH up to an ARK; ValueError naming the first link that fails.

    The roots were checked when loaded (ARK self-signed, ASK by the ARK), so
    what remains is the platform's part and the CEK's ASK signature.
    """
    for cert, usage, name in (
        (pdh, USAGE_PDH, "PDH"),
        (chain.pek, USAGE_PEK, "PEK"),
        (chain.oca, USAGE_OCA, "OCA"),
        (chain.cek, USAGE_CEK, "CEK"),
    ):
        if cert.usage != usage:
            raise ValueError(f"{name} certificate has usage 0x{cert.usage:x}")
    try:
        oca_self = chain.oca.is_signed_by(chain.oca)
    except ValueError as exc:
        raise ValueError(f"OCA certificate cannot verify signatures: {exc}") from None
    if not oca_self:
        raise ValueError("OCA certificate is not self-signed")
    verify_pdh_chain(pdh, chain)
    kinds = {
        _CEK_SLOT_BITS[s.algo]
        for s in (chain.cek.sig1, chain.cek.sig2)
        if s.usage == USAGE_ASK and s.algo in _CEK_SLOT_BITS
    }
    if not kinds:
        raise ValueError("CEK certificate carries no ASK signature (send the CEK as AMD's key server signs it)")
    candidates = [r for r in roots if r.ask.modulus_bits in kinds]
    if not candidates:
        raise ValueError("CEK is signed by an ASK of a kind no trusted root has")
    for root in candidates:
        if cek_signed_by_ask(chain.cek, root.ask):
            break
    else:
        raise ValueError("CEK is not signed by any trusted AMD ASK")
    # every signature slot of every certificate is a signature that verified, or zero
    ask_slot = lambda slot: _ask_slot_verifies(chain.cek, slot, root.ask)  # noqa: E731
    _check_slots(pdh, "PDH", {USAGE_PEK: lambda slot: pdh.slot_signed_by(slot, chain.pek)})
    _check_slots(
        chain.pek,
        "PEK",
        {
            USAGE_OCA: lambda slot: chain.pek.slot_signed_by(slot, chain.oca),
            USAGE_CEK: lambda slot: chain.pek.slot_signed_by(slot, chain.cek),
        },
    )
    _check_slots(chain.oca, "OCA", {USAGE_OCA: lambda slot: chain.oca.slot_signed_by(slot, chain.oca)})
    _check_slots(chain.cek, "CEK", {USAGE_ASK: ask_slot})
    return PlatformVerified(root.product)
