"""SEV-SNP attestation reports: the layout, and the owner's verification.

A guest asks the PSP for a report (SNP_GUEST_REQUEST, MSG_REPORT_REQ) with 64
bytes of its own REPORT_DATA; the PSP fills in what it knows about the guest
(launch MEASUREMENT, POLICY, HOST_DATA, the ID block's digests, the TCB) and
signs bytes 0x000..0x29F with the chip's VCEK (ECDSA P-384, SHA-384, AMD's
little-endian R/S format, :mod:`agent.sev.snp_idblock`).

Layout (AMD SEV-SNP ABI specification, ATTESTATION_REPORT, 0x4A0 bytes;
versions 2, 3 and 5 share it: 3 adds the CPUID bytes, 5 the mitigation
vectors in what 2 reserved)::

    0x000 VERSION u32            0x004 GUEST_SVN u32      0x008 POLICY u64
    0x010 FAMILY_ID[16]          0x020 IMAGE_ID[16]       0x030 VMPL u32
    0x034 SIGNATURE_ALGO u32     0x038 CURRENT_TCB u64    0x040 PLATFORM_INFO u64
    0x048 KEY_INFO u32 (bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY,
          bits 4:2 SIGNING_KEY: 0 VCEK, 1 VLEK, 7 none)   0x04C reserved u32
    0x050 REPORT_DATA[64]        0x090 MEASUREMENT[48]    0x0C0 HOST_DATA[32]
    0x0E0 ID_KEY_DIGEST[48]      0x110 AUTHOR_KEY_DIGEST[48]
    0x140 REPORT_ID[32]          0x160 REPORT_ID_MA[32]   0x180 REPORTED_TCB u64
    0x188 CPUID_FAM_ID u8, CPUID_MOD_ID u8, CPUID_STEP u8 (v3+), reserved[21]
    0x1A0 CHIP_ID[64]            0x1E0 COMMITTED_TCB u64
    0x1E8 CURRENT_BUILD, CURRENT_MINOR, CURRENT_MAJOR u8, reserved u8
    0x1EC COMMITTED_BUILD, COMMITTED_MINOR, COMMITTED_MAJOR u8, reserved u8
    0x1F0 LAUNCH_TCB u64         0x1F8 LAUNCH_MIT_VECTOR u64 (v5)
    0x200 CURRENT_MIT_VECTOR u64 (v5), reserved to 0x2A0
    0x2A0 SIGNATURE[0x200]

A TCB_VERSION u64 is, on Milan and Genoa, BOOT_LOADER, TEE, reserved[4], SNP,
MICROCODE (one byte each); on Turin FMC, BOOT_LOADER, TEE, SNP, reserved[3],
MICROCODE.  The VCEK names the TCB it was derived for and the chip's id in
X.509 extensions (AMD VCEK spec 57230, OIDs under 1.3.6.1.4.1.3704.1); the
report's REPORTED_TCB and CHIP_ID must equal them.

:func:`verify_report` is pure: bytes and roots in, every check out.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.sev.snp_ca import SnpCertError, SnpRoots, load_vcek, vcek_product
from agent.sev.snp_idblock import SIGNATURE, SnpFormatError, verify

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0

# ATTESTATION_REPORT, (name, struct format) in order; offsets as in the spec.
REPORT_FIELDS: tuple[tuple[str, str], ...] = (
    ("version", "I"),  # 0x000
    ("guest_svn", "I"),  # 0x004
    ("policy", "Q"),  # 0x008
    ("family_id", "16s"),  # 0x010
    ("image_id", "16s"),  # 0x020
    ("vmpl", "I"),  # 0x030
    ("signature_algo", "I"),  # 0x034
    ("current_tcb", "8s"),  # 0x038
    ("platform_info", "Q"),  # 0x040
    ("key_info", "I"),  # 0x048
    ("reserved_0x4c", "4s"),  # 0x04c
    ("report_data", "64s"),  # 0x050
    ("measurement", "48s"),  # 0x090
    ("host_data", "32s"),  # 0x0c0
    ("id_key_digest", "48s"),  # 0x0e0
    ("author_key_digest", "48s"),  # 0x110
    ("report_id", "32s"),  # 0x140
    ("report_id_ma", "32s"),  # 0x160
    ("reported_tcb", "8s"),  # 0x180
    ("cpuid_fam_id", "B"),  # 0x188 (v3+)
    ("cpuid_mod_id", "B"),  # 0x189 (v3+)
    ("cpuid_step", "B"),  # 0x18a (v3+)
    ("reserved_0x18b", "21s"),  # 0x18b
    ("chip_id", "64s"),  # 0x1a0
    ("committed_tcb", "8s"),  # 0x1e0
    ("current_build", "B"),  # 0x1e8
    ("current_minor", "B"),  # 0x1e9
    ("current_major", "B"),  # 0x1ea
    ("reserved_0x1eb", "B"),  # 0x1eb
    ("committed_build", "B"),  # 0x1ec
    ("committed_minor", "B"),  # 0x1ed
    ("committed_major", "B"),  # 0x1ee
    ("reserved_0x1ef", "B"),  # 0x1ef
    ("launch_tcb", "8s"),  # 0x1f0
    ("launch_mit_vector", "Q"),  # 0x1f8 (v5)
    ("current_mit_vector", "Q"),  # 0x200 (v5)
    ("reserved_0x208", "152s"),  # 0x208
    ("signature", f"{SIGNATURE.size}s"),  # 0x2a0
)
REPORT = struct.Struct("<" + "".join(fmt for _, fmt in REPORT_FIELDS))
assert REPORT.size == REPORT_SIZE

KNOWN_VERSIONS = (2, 3, 4, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1
# KEY_INFO bits
KEY_INFO_AUTHOR_KEY_EN = 1 << 0
KEY_INFO_MASK_CHIP_KEY = 1 << 1
SIGNING_KEY_VCEK = 0

# VCEK X.509 extensions (AMD VCEK spec 57230, table "VCEK certificate extensions").
_AMD = "1.3.6.1.4.1.3704.1"
OID_PRODUCT_NAME = f"{_AMD}.2"
OID_BL_SPL = f"{_AMD}.3.1"
OID_TEE_SPL = f"{_AMD}.3.2"
OID_SNP_SPL = f"{_AMD}.3.3"
OID_UCODE_SPL = f"{_AMD}.3.8"
OID_FMC_SPL = f"{_AMD}.3.9"
OID_HWID = f"{_AMD}.4"


@dataclass(frozen=True)
class Tcb:
    """A TCB_VERSION, decoded for a product."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, product: str | None) -> Tcb:
        if product == "turin":
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def as_dict(self) -> dict[str, int]:
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out


@dataclass(frozen=True)
class AttestationReport:
    """Every field of a report, by the spec's names (lower case); ``raw`` is the input."""

    raw: bytes
    fields: dict[str, Any]

    @classmethod
    def from_bytes(cls, raw: bytes) -> AttestationReport:
        raw = bytes(raw)
        if len(raw) != REPORT_SIZE:
            raise SnpFormatError(f"attestation report is {len(raw)} bytes, not {REPORT_SIZE}")
        values = REPORT.unpack(raw)
        return cls(raw, {name: value for (name, _), value in zip(REPORT_FIELDS, values)})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def signing_key(self) -> int:
        return int((self.key_info >> 2) & 0x7)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.key_info & KEY_INFO_MASK_CHIP_KEY)

    @property
    def author_key_en(self) -> bool:
        return bool(self.key_info & KEY_INFO_AUTHOR_KEY_EN)

    def summary(self, product: str | None = None) -> dict[str, Any]:
        """The fields an owner looks at, JSON-ready (no secret is ever in a report)."""
        f = self.fields
        return {
            "version": f["version"],
            "guest_svn": f["guest_svn"],
            "policy": f"{f['policy']:#x}",
            "family_id": f["family_id"].hex(),
            "image_id": f["image_id"].hex(),
            "vmpl": f["vmpl"],
            "signature_algo": f["signature_algo"],
            "platform_info": f"{f['platform_info']:#x}",
            "author_key_en": self.author_key_en,
            "mask_chip_key": self.mask_chip_key,
            "signing_key": self.signing_key,
            "report_data": f["report_data"].hex(),
            "measurement": f["measurement"].hex(),
            "host_data": f["host_data"].hex(),
            "id_key_digest": f["id_key_digest"].hex(),
            "author_key_digest": f["author_key_digest"].hex(),
            "report_id": f["report_id"].hex(),
            "chip_id": f["chip_id"].hex(),
            "current_tcb": Tcb.decode(f["current_tcb"], product).as_dict(),
            "reported_tcb": Tcb.decode(f["reported_tcb"], product).as_dict(),
            "committed_tcb": Tcb.decode(f["committed_tcb"], product).as_dict(),
            "launch_tcb": Tcb.decode(f["launch_tcb"], product).as_dict(),
            "current_version": f"{f['current_major']}.{f['current_minor']}.{f['current_build']}",
        }


@dataclass(frozen=True)
class Expected:
    """What the owner expects of a report; None means "not checked"."""

    measurement: bytes | None = None
    policy: int | None = None
    report_data: bytes | None = None
    host_data: bytes | None = None
    id_key_digest: bytes | None = None
    author_key_digest: bytes | None = None


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class ReportVerdict:
    """Every check, in order; valid only if each one passed."""

    checks: tuple[Check, ...]
    product: str | None
    report: AttestationReport
    failed: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "failed", tuple(c.name for c in self.checks if not c.ok))

    @property
    def valid(self) -> bool:
        return bool(self.checks) and not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "product": self.product,
            "checks": [c.as_dict() for c in self.checks],
            "report": self.report.summary(self.product),
        }


def _der_small_int(raw: bytes) -> int | None:
    """A DER INTEGER 0..255 as AMD encodes an SPL extension (02 01 NN), else None."""
    if len(raw) >= 3 and raw[0] == 0x02 and raw[1] == len(raw) - 2 and raw[1] <= 2:
        value = int.from_bytes(raw[2:], "big", signed=True)
        return value if 0 <= value <= 0xFF else None
    return None


def _extension(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except (x509.ExtensionNotFound, ValueError):
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def vcek_tcb(cert: x509.Certificate) -> dict[str, int | None]:
    """The SPLs a VCEK names (None where an extension is missing or malformed)."""
    out: dict[str, int | None] = {}
    for name, oid in (
        ("bootloader", OID_BL_SPL),
        ("tee", OID_TEE_SPL),
        ("snp", OID_SNP_SPL),
        ("microcode", OID_UCODE_SPL),
        ("fmc", OID_FMC_SPL),
    ):
        raw = _extension(cert, oid)
        out[name] = None if raw is None else _der_small_int(raw)
    return out


def vcek_hwid(cert: x509.Certificate) -> bytes | None:
    """The chip id a VCEK is issued to (raw 64 bytes, or a DER OCTET STRING of them)."""
    raw = _extension(cert, OID_HWID)
    if raw is None:
        return None
    if len(raw) == 66 and raw[:2] == b"\x04\x40":
        return raw[2:]
    return raw


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def verify_report(
    report: bytes,
    vcek: bytes | x509.Certificate,
    roots: Sequence[SnpRoots],
    *,
    product: str | None = None,
    expected: Expected = Expected(),
) -> ReportVerdict:
    """Check a report against its VCEK, AMD's roots and what the owner expects.

    SnpFormatError / SnpCertError (ValueError) when the report is not 0x4A0
    bytes or the VCEK is not a P-384 certificate: bad input, not a verdict.
    Otherwise a verdict whose checks each say what was compared.
    """
    rep = AttestationReport.from_bytes(report)
    cert = vcek if isinstance(vcek, x509.Certificate) else load_vcek(vcek)
    checks: list[Check] = []

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append(Check(name, ok, detail))

    add("version", rep.version in KNOWN_VERSIONS, f"report version {rep.version}")
    add(
        "signature_algo",
        rep.signature_algo == SIG_ALGO_ECDSA_P384_SHA384,
        f"signature algorithm {rep.signature_algo} (1 = ECDSA P-384 SHA-384)",
    )

    found = vcek_product(cert, tuple(roots), product)
    if found is None:
        where = f"the {product} roots" if product else "any trusted AMD root"
        add("vcek_chain", False, f"VCEK does not chain to {where} (VCEK <- ASK <- ARK, RSA-PSS SHA-384)")
    else:
        add("vcek_chain", True, f"VCEK <- {found} ASK <- {found} ARK")

    add("signing_key", rep.signing_key == SIGNING_KEY_VCEK, f"report signed by key kind {rep.signing_key} (0 = VCEK)")
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # load_vcek made sure
    sig_ok = verify(key, rep.signed_bytes, rep.signature)
    add("signature", sig_ok, "report signature " + ("verifies" if sig_ok else "does not verify") + " under the VCEK")

    tcb = Tcb.decode(rep.reported_tcb, found or product)
    named = vcek_tcb(cert)
    want = {k: v for k, v in tcb.as_dict().items()}
    mismatched = [k for k, v in want.items() if named.get(k) != v]
    add(
        "reported_tcb",
        not mismatched,
        "reported TCB equals the VCEK's"
        if not mismatched
        else "reported TCB differs from the VCEK's in " + ", ".join(mismatched),
    )

    hwid = vcek_hwid(cert)
    if rep.mask_chip_key:
        add("chip_id", not any(rep.chip_id), "chip id masked (MASK_CHIP_KEY): must be zero")
    else:
        ok = hwid is not None and len(hwid) == 64 and _eq(hwid, rep.chip_id)
        add("chip_id", ok, "chip id equals the VCEK's hwID" if ok else "chip id differs from the VCEK's hwID")

    for name, want_bytes in (
        ("measurement", expected.measurement),
        ("report_data", expected.report_data),
        ("host_data", expected.host_data),
        ("id_key_digest", expected.id_key_digest),
        ("author_key_digest", expected.author_key_digest),
    ):
        if want_bytes is None:
            continue
        got = rep.fields[name]
        ok = len(want_bytes) == len(got) and _eq(want_bytes, got)
        add(name, ok, f"{name} " + ("equals" if ok else "differs from") + " the expected value")
    if expected.policy is not None:
        ok = rep.policy == expected.policy
        add("policy", ok, f"policy {rep.policy:#x}" + ("" if ok else f", expected {expected.policy:#x}"))
    return ReportVerdict(tuple(checks), found, rep)


__all__ = [
    "AttestationReport",
    "Check",
    "Expected",
    "ReportVerdict",
    "Tcb",
    "REPORT",
    "REPORT_FIELDS",
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SnpCertError",
    "SnpFormatError",
    "verify_report",
    "vcek_tcb",
    "vcek_hwid",
]
