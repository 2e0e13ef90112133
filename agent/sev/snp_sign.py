"""Make SEV-SNP roots, VCEKs and signed attestation reports: the PSP's side, for tests and the simulator.

Nothing on the owner's or the agent's path imports this module.  It issues
certificates shaped like AMD's (agent.sev.snp_ca): a self-signed ARK, an ASK
signed by it and a VCEK (ECDSA P-384) signed by the ASK, each RSASSA-PSS
SHA-384 with a 48-byte salt, the VCEK carrying the TCB and chip-id
extensions AMD's KDS puts in (agent.sev.snp_report); and it builds reports in
the ATTESTATION_REPORT layout, signed the way the PSP signs them.  An owner
trusts such roots only when told to (``[platform] amd_roots``,
``verify-report --amd-roots``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from agent.sev.snp_ca import SnpRoots
from agent.sev.snp_idblock import sign
from agent.sev.snp_report import (
    OID_BL_SPL,
    OID_FMC_SPL,
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    REPORT,
    REPORT_FIELDS,
    SIGNED_SIZE,
    Tcb,
)

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
# Fixed, so that a test chain is reproducible given its keys.
_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(2049, 1, 1, tzinfo=datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyagent test roots (not AMD)"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _issue(
    subject: x509.Name,
    public_key: Any,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    serial: int,
    *,
    ca: bool,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=_PSS)


@dataclass(frozen=True)
class TestAuthority:
    """A product's test ARK and ASK with their private keys."""

    product: str
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    roots: SnpRoots

    @classmethod
    def make(cls, product: str = "milan", key_size: int = 4096) -> TestAuthority:
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        title = product.capitalize()
        ark_name, ask_name = _name(f"ARK-{title}"), _name(f"SEV-{title}")
        ark = _issue(ark_name, ark_key.public_key(), ark_name, ark_key, 1, ca=True)
        ask = _issue(ask_name, ask_key.public_key(), ark_name, ark_key, 2, ca=True)
        return cls(product, ark_key, ask_key, SnpRoots(product, ark, ask))

    def pems(self) -> dict[str, bytes]:
        """``{"<product>-ark.pem": ..., "<product>-ask.pem": ...}`` for an amd_roots directory."""
        enc = serialization.Encoding.PEM
        return {
            f"{self.product}-ark.pem": self.roots.ark.public_bytes(enc),
            f"{self.product}-ask.pem": self.roots.ask.public_bytes(enc),
        }

    def issue_vcek(
        self, chip_id: bytes, tcb: Tcb, key: ec.EllipticCurvePrivateKey | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A VCEK for ``chip_id`` (64 bytes) at ``tcb``, as AMD's KDS would issue it."""
        if len(chip_id) != 64:
            raise ValueError("a chip id is 64 bytes")
        key = key or ec.generate_private_key(ec.SECP384R1())

        def spl(oid: str, value: int) -> x509.UnrecognizedExtension:
            return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), bytes([0x02, 0x01, value]))

        exts: list[x509.ExtensionType] = [
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier(OID_PRODUCT_NAME),
                b"\x16" + bytes([len(self.product) + 3]) + self.product.capitalize().encode() + b"-B0",
            ),
            spl(OID_BL_SPL, tcb.bootloader),
            spl(OID_TEE_SPL, tcb.tee),
            spl(OID_SNP_SPL, tcb.snp),
            spl(OID_UCODE_SPL, tcb.microcode),
        ]
        if tcb.fmc is not None:
            exts.append(spl(OID_FMC_SPL, tcb.fmc))
        exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_HWID), chip_id))
        cert = _issue(
            _name("SEV-VCEK"), key.public_key(), self.roots.ask.subject, self.ask_key, 3, ca=False, extensions=exts
        )
        return key, cert


def encode_tcb(tcb: Tcb, product: str) -> bytes:
    """A TCB_VERSION's 8 bytes in ``product``'s layout."""
    if product == "turin":
        return bytes([tcb.fmc or 0, tcb.bootloader, tcb.tee, tcb.snp, 0, 0, 0, tcb.microcode])
    return bytes([tcb.bootloader, tcb.tee, 0, 0, 0, 0, tcb.snp, tcb.microcode])


_DEFAULTS: dict[str, Any] = {
    name: (0 if not fmt.endswith("s") else bytes(int(fmt[:-1]))) for name, fmt in REPORT_FIELDS
}


def build_report(vcek_key: ec.EllipticCurvePrivateKey, **fields: Any) -> bytes:
    """An ATTESTATION_REPORT with ``fields`` set (the rest zero; version 2, ECDSA), signed by ``vcek_key``."""
    unknown = set(fields) - set(_DEFAULTS) - {"signature"}
    if unknown:
        raise KeyError(f"unknown report fields: {sorted(unknown)}")
    values = dict(_DEFAULTS, version=2, signature_algo=1)
    values.update(fields)
    unsigned = REPORT.pack(*(values[name] for name, _ in REPORT_FIELDS))[:SIGNED_SIZE]
    return unsigned + sign(vcek_key, unsigned)
