"""AMD's SEV-SNP roots of trust and the VCEK chain: VCEK <- ASK <- ARK.

Every SNP attestation report is signed by the chip's VCEK (Versioned Chip
Endorsement Key, ECDSA P-384), whose X.509 certificate AMD's key distribution
server issues per chip and TCB.  The VCEK is signed by the product's ASK, the
ASK by the product's self-signed ARK; all three signatures are RSASSA-PSS with
SHA-384 (MGF1-SHA-384, 48-byte salt) by 4096-bit RSA keys (AMD VCEK
certificate and KDS interface specification, 57230).

The ARK/ASK PEMs of Milan, Genoa and Turin ship in ``agent/sev/snp_roots``
(origin in its README).  ``load_snp_roots_dir`` reads ``<product>-ark.pem``
and ``<product>-ask.pem`` from an owner's ``[platform] amd_roots`` directory
instead, e.g. the simulator's test roots.  The product a VCEK belongs to is
the one whose ASK verifies its signature: nothing the host says is trusted.

Certificate validity periods are not checked here (no clock in this layer);
the reports' TCB and chip id are checked against the VCEK in
:mod:`agent.sev.snp_report`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

SNP_PRODUCTS = ("milan", "genoa", "turin")

_PSS_SHA384 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


class SnpCertError(ValueError):
    """A certificate that cannot be parsed or used (one-line reason)."""


@dataclass(frozen=True)
class SnpRoots:
    """One product's ARK and ASK."""

    product: str
    ark: x509.Certificate
    ask: x509.Certificate


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer`` signed ``cert`` with RSASSA-PSS SHA-384 (salt 48) and names it as issuer."""
    if cert.issuer != issuer.subject:
        return False
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return False
    try:
        if not isinstance(cert.signature_hash_algorithm, hashes.SHA384):
            return False
        key = issuer.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return False
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS_SHA384, hashes.SHA384())
    except InvalidSignature:
        return False
    return True


def roots_valid(roots: SnpRoots) -> bool:
    """The ARK signs itself and the ASK."""
    return signed_by(roots.ark, roots.ark) and signed_by(roots.ask, roots.ark)


def load_vcek(data: bytes, what: str = "VCEK") -> x509.Certificate:
    """A VCEK certificate, DER or PEM; SnpCertError if it is neither or not a P-384 key."""
    data = bytes(data)
    try:
        # AMD's KDS issues VCEKs whose serial number DER-encodes as zero or
        # negative (virtee/sev's real Milan VCEK): cryptography parses them
        # with a deprecation warning that would only alarm the operator.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive")
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
    except ValueError:
        raise SnpCertError(f"{what} is not an X.509 certificate (DER or PEM)") from None
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        raise SnpCertError(f"{what} has an unusable public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SnpCertError(f"{what} does not certify an ECDSA P-384 key")
    return cert


def _load_pem(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise SnpCertError(f"{what} is not a PEM X.509 certificate") from None


def builtin_snp_roots() -> tuple[SnpRoots, ...]:
    """AMD's public SNP roots shipped with keyagent (Milan, Genoa, Turin)."""
    base = resources.files("agent.sev") / "snp_roots"
    out = []
    for product in SNP_PRODUCTS:
        ark = _load_pem((base / f"{product}-ark.pem").read_bytes(), f"built-in {product} ARK")
        ask = _load_pem((base / f"{product}-ask.pem").read_bytes(), f"built-in {product} ASK")
        out.append(SnpRoots(product, ark, ask))
    return tuple(out)


def load_snp_roots_dir(path: str | Path) -> tuple[SnpRoots, ...]:
    """``<product>-ark.pem`` + ``<product>-ask.pem`` pairs in ``path`` (ValueError if none or broken)."""
    root = Path(path)
    if not root.is_dir():
        raise SnpCertError(f"{path} is not a directory")
    out = []
    for ark_path in sorted(root.glob("*-ark.pem")):
        product = ark_path.name[: -len("-ark.pem")]
        ask_path = root / f"{product}-ask.pem"
        if not ask_path.is_file():
            raise SnpCertError(f"{ark_path.name} has no {ask_path.name} beside it")
        try:
            ark_data, ask_data = ark_path.read_bytes(), ask_path.read_bytes()
        except OSError as exc:
            raise SnpCertError(f"cannot read {product} roots: {exc.strerror or exc}") from None
        roots = SnpRoots(product, _load_pem(ark_data, ark_path.name), _load_pem(ask_data, ask_path.name))
        if not roots_valid(roots):
            raise SnpCertError(f"{product}: the ARK does not sign itself and the ASK (RSA-PSS SHA-384)")
        out.append(roots)
    if not out:
        raise SnpCertError(f"{path} holds no <product>-ark.pem / <product>-ask.pem pair")
    return tuple(out)


def vcek_product(
    vcek: x509.Certificate, roots: tuple[SnpRoots, ...] | list[SnpRoots], product: str | None = None
) -> str | None:
    """The product whose ARK -> ASK chain signs ``vcek``, or None.

    With ``product`` only that product's roots are tried.
    """
    for r in roots:
        if product is not None and r.product != product:
            continue
        if roots_valid(r) and signed_by(vcek, r.ask):
            return r.product
    return None
