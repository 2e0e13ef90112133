"""The expected SEV-SNP launch digest of a QEMU guest (the report's MEASUREMENT).

Unlike SEV/SEV-ES, SNP does not hash the launch data in one stream: the PSP
extends a 48-byte digest once per page it is handed (SNP_LAUNCH_UPDATE), and
each extension hashes a PAGE_INFO structure that names the previous digest,
the page's contents (SHA-384) or nothing, the page type and its guest-physical
address (AMD SEV-SNP ABI spec, "PAGE_INFO", and SNP_LAUNCH_FINISH).  The final
digest is what the attestation report carries as MEASUREMENT and what an ID
block pins.

What QEMU (9.1 and later, ``-object sev-snp-guest``) + KVM hand the PSP, in
order; sev-snp-measure (``--mode snp``, ``--vmm-type QEMU``) models the same:

1. the firmware image, page by page, as NORMAL pages ending at 4 GiB;
2. each section OVMF lists in its SEV metadata ("ASEV", found through the
   GUIDed table, edk2 OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm), in order:
   SNP_SEC_MEM as ZERO pages, SNP_SECRETS as the SECRETS page, CPUID as the
   CPUID page, SVSM_CAA as ZERO pages, SNP_KERNEL_HASHES as one NORMAL page
   holding the SEV hashes table at the offset OVMF's hashes-table entry names
   (or as ZERO pages without ``-kernel``);
3. one VMSA page per vCPU (BSP first), as VMSA pages at the fixed address
   0xFFFFFFFFF000.  The VMSA is the SEV-ES one (:mod:`agent.sev.vmsa`) with
   the reset FPU state KVM stores for SNP guests and SEV_FEATURES = the guest
   features word.

This module is pure: bytes in, digest out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from agent.common.errors import SevFormatError
from agent.sev.hashes_table import kernel_hashes_table
from agent.sev.ovmf import SEV_METADATA_OFFSET_GUID, FirmwareError, OvmfImage
from agent.sev.vmsa import PAGE_SIZE, VmsaOptions, cpu_signature, vmsa_pages

LD_SIZE = 48  # SHA-384
FOUR_GIB = 1 << 32

# SNP ABI spec, PAGE_INFO: DIGEST_CUR[48], CONTENTS[48], LENGTH u16,
# PAGE_TYPE u8, IMI_PAGE u8, VMPL3_PERMS u8, VMPL2_PERMS u8, VMPL1_PERMS u8,
# reserved u8, GPA u64.
PAGE_INFO = struct.Struct("<48s48sHBBBBBBQ")
assert PAGE_INFO.size == 0x70

# PAGE_TYPE values (SNP ABI spec, SNP_LAUNCH_UPDATE).
PAGE_TYPE_NORMAL = 0x01
PAGE_TYPE_VMSA = 0x02
PAGE_TYPE_ZERO = 0x03
PAGE_TYPE_UNMEASURED = 0x04
PAGE_TYPE_SECRETS = 0x05
PAGE_TYPE_CPUID = 0x06

# KVM records VMSA pages at GPA (u64)-1, page-aligned, bits above 51 clear.
VMSA_GPA = 0xFFFFFFFFF000

# OVMF SEV metadata: header "ASEV" SIGNATURE[4], SIZE u32 (header and
# descriptors), VERSION u32 (1), NUM_ITEMS u32; then NUM_ITEMS descriptors
# GPA u32, SIZE u32, TYPE u32.
METADATA_HEADER = struct.Struct("<4sIII")
METADATA_SIGNATURE = b"ASEV"
METADATA_DESC = struct.Struct("<III")
# Metadata section types (OvmfSevMetadata.asm).
SECTION_SNP_SEC_MEM = 1
SECTION_SNP_SECRETS = 2
SECTION_CPUID = 3
SECTION_SVSM_CAA = 4
SECTION_SNP_KERNEL_HASHES = 0x10
SECTION_NAMES = {
    SECTION_SNP_SEC_MEM: "SNP_SEC_MEM",
    SECTION_SNP_SECRETS: "SNP_SECRETS",
    SECTION_CPUID: "CPUID",
    SECTION_SVSM_CAA: "SVSM_CAA",
    SECTION_SNP_KERNEL_HASHES: "SNP_KERNEL_HASHES",
}

# Guest SEV_FEATURES word: bit 0 SNPActive.  QEMU's default for an SNP guest
# (and sev-snp-measure's default).
DEFAULT_GUEST_FEATURES = 0x1

# QEMU's named AMD CPU models (target/i386/cpu.c builtin_x86_defs) -> the
# CPUID(1).EAX family/model/stepping KVM leaves in RDX; the names
# sev-snp-measure's --vcpu-type takes.
_FMS = {
    "EPYC": (23, 1, 2),
    "EPYC-Rome": (23, 49, 0),
    "EPYC-Milan": (25, 1, 1),
    "EPYC-Genoa": (25, 17, 0),
    "EPYC-Turin": (26, 0, 0),
}
_VERSIONS = {
    "EPYC": ("v1", "v2", "v3", "v4", "IBPB"),
    "EPYC-Rome": ("v1", "v2", "v3"),
    "EPYC-Milan": ("v1", "v2"),
    "EPYC-Genoa": ("v1",),
    "EPYC-Turin": (),
}
VCPU_TYPES: dict[str, int] = {}
for _base, _fms in _FMS.items():
    VCPU_TYPES[_base] = cpu_signature(*_fms)
    for _v in _VERSIONS[_base]:
        VCPU_TYPES[f"{_base}-{_v}"] = cpu_signature(*_fms)


def vcpu_signature(vcpu_type: str) -> int:
    """CPUID signature of a QEMU CPU model name (SevFormatError if unknown)."""
    try:
        return VCPU_TYPES[vcpu_type]
    except KeyError:
        raise SevFormatError(f"unknown vCPU type {vcpu_type!r} (known: {', '.join(VCPU_TYPES)})") from None


def _sha384(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA384())
    h.update(data)
    return h.finalize()


class LaunchDigest:
    """The PSP's running launch digest, extended one PAGE_INFO at a time."""

    def __init__(self, seed: bytes = bytes(LD_SIZE)) -> None:
        if len(seed) != LD_SIZE:
            raise ValueError(f"launch digest seed must be {LD_SIZE} bytes")
        self.digest = bytes(seed)

    def _extend(self, page_type: int, gpa: int, contents: bytes) -> None:
        info = PAGE_INFO.pack(self.digest, contents, PAGE_INFO.size, page_type, 0, 0, 0, 0, 0, gpa)
        self.digest = _sha384(info)

    def normal_pages(self, gpa: int, data: bytes) -> None:
        if len(data) % PAGE_SIZE:
            raise ValueError("normal pages must be whole pages")
        for off in range(0, len(data), PAGE_SIZE):
            self._extend(PAGE_TYPE_NORMAL, gpa + off, _sha384(data[off : off + PAGE_SIZE]))

    def _empty_pages(self, page_type: int, gpa: int, size: int) -> None:
        for off in range(0, size, PAGE_SIZE):
            self._extend(page_type, gpa + off, bytes(LD_SIZE))

    def zero_pages(self, gpa: int, size: int) -> None:
        self._empty_pages(PAGE_TYPE_ZERO, gpa, size)

    def secrets_page(self, gpa: int) -> None:
        self._extend(PAGE_TYPE_SECRETS, gpa, bytes(LD_SIZE))

    def cpuid_page(self, gpa: int) -> None:
        self._extend(PAGE_TYPE_CPUID, gpa, bytes(LD_SIZE))

    def vmsa_page(self, page: bytes) -> None:
        if len(page) != PAGE_SIZE:
            raise ValueError("a VMSA is one page")
        self._extend(PAGE_TYPE_VMSA, VMSA_GPA, _sha384(page))


@dataclass(frozen=True)
class MetadataSection:
    """One OVMF SEV metadata descriptor."""

    gpa: int
    size: int
    kind: int

    @property
    def name(self) -> str:
        return SECTION_NAMES.get(self.kind, f"type {self.kind:#x}")


def metadata_sections(image: OvmfImage) -> list[MetadataSection]:
    """The SEV metadata sections OVMF declares (FirmwareError if it has none or they are corrupt)."""
    entry = image.find(SEV_METADATA_OFFSET_GUID)
    if entry is None:
        why = image.table_problem or "its GUID table has no SEV metadata entry"
        raise FirmwareError(f"firmware cannot launch an SNP guest: {why}")
    if len(entry) < 4:
        raise FirmwareError("firmware SEV metadata entry is shorter than 4 bytes")
    (offset_from_end,) = struct.unpack_from("<I", entry)
    data = image.data
    start = len(data) - offset_from_end
    if offset_from_end < METADATA_HEADER.size or start < 0:
        raise FirmwareError(f"firmware SEV metadata offset {offset_from_end:#x} is outside the image")
    sig, size, version, count = METADATA_HEADER.unpack_from(data, start)
    if sig != METADATA_SIGNATURE:
        raise FirmwareError("firmware SEV metadata has no ASEV signature")
    if version != 1:
        raise FirmwareError(f"firmware SEV metadata version {version} is not 1")
    need = METADATA_HEADER.size + count * METADATA_DESC.size
    if size < need or start + need > len(data):
        raise FirmwareError(f"firmware SEV metadata of {count} sections does not fit its size {size}")
    sections = []
    for i in range(count):
        gpa, length, kind = METADATA_DESC.unpack_from(data, start + METADATA_HEADER.size + i * METADATA_DESC.size)
        if kind not in SECTION_NAMES:
            raise FirmwareError(f"firmware SEV metadata section {i} has unknown type {kind:#x}")
        if gpa % PAGE_SIZE or length % PAGE_SIZE or length == 0:
            raise FirmwareError(f"firmware SEV metadata section {i} is not whole pages (gpa={gpa:#x} size={length:#x})")
        sections.append(MetadataSection(gpa, length, kind))
    return sections


def _kernel_hashes_page(image: OvmfImage, section: MetadataSection, table: bytes) -> bytes:
    area = image.hashes_table_area()
    if area is None or area.base == 0:
        raise FirmwareError("firmware has an SNP_KERNEL_HASHES section but no SEV hashes-table area")
    offset = area.base - section.gpa
    if section.size != PAGE_SIZE or not 0 <= offset <= PAGE_SIZE - len(table):
        raise FirmwareError(
            f"firmware hashes-table area {area.base:#x} does not fit its "
            f"SNP_KERNEL_HASHES page {section.gpa:#x}+{section.size:#x}"
        )
    return bytes(offset) + table + bytes(PAGE_SIZE - offset - len(table))


def snp_launch_digest(
    firmware: bytes,
    *,
    vcpus: int,
    vcpu_sig: int,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    append: str | bytes | None = None,
    guest_features: int = DEFAULT_GUEST_FEATURES,
) -> bytes:
    """The 48-byte SNP launch digest of this firmware, kernel and vCPU set-up."""
    if kernel is None and (initrd is not None or append is not None):
        raise SevFormatError("an initrd or a command line is only measured with a kernel")
    if vcpus < 1:
        raise SevFormatError("an SNP guest needs at least one vCPU")
    if not 0 <= guest_features < 1 << 64:
        raise SevFormatError("guest features must be a 64-bit value")
    if not firmware or len(firmware) % PAGE_SIZE or len(firmware) > FOUR_GIB:
        raise FirmwareError(f"firmware is {len(firmware)} bytes, not a whole number of pages below 4 GiB")
    image = OvmfImage(firmware)
    sections = metadata_sections(image)
    reset = image.sev_es_reset_address()
    if reset is None:
        raise FirmwareError("firmware has no SEV-ES reset block: it cannot start an SNP guest")
    table = kernel_hashes_table(kernel, initrd, append) if kernel is not None else None
    if table is not None and not any(s.kind == SECTION_SNP_KERNEL_HASHES for s in sections):
        raise FirmwareError("firmware cannot measure a kernel: its SEV metadata has no SNP_KERNEL_HASHES section")

    ld = LaunchDigest()
    ld.normal_pages(FOUR_GIB - len(firmware), image.data)
    for section in sections:
        _measure_section(ld, image, section, table)
    options = VmsaOptions(fpu_init=True, sev_features=guest_features)
    for page in vmsa_pages(vcpus, vcpu_sig, reset, options):
        ld.vmsa_page(page)
    return ld.digest


def _measure_section(ld: LaunchDigest, image: OvmfImage, section: MetadataSection, table: bytes | None) -> None:
    if section.kind in (SECTION_SNP_SEC_MEM, SECTION_SVSM_CAA):
        ld.zero_pages(section.gpa, section.size)
    elif section.kind == SECTION_SNP_SECRETS:
        ld.secrets_page(section.gpa)
    elif section.kind == SECTION_CPUID:
        ld.cpuid_page(section.gpa)
    elif section.kind == SECTION_SNP_KERNEL_HASHES:
        if table is None:
            ld.zero_pages(section.gpa, section.size)
        else:
            ld.normal_pages(section.gpa, _kernel_hashes_page(image, section, table))


# -- writing (synthetic firmware for tests and the simulator) -----------------


def build_metadata(sections: Iterable[tuple[int, int, int]]) -> bytes:
    """An "ASEV" metadata blob of (gpa, size, type) sections."""
    items = [METADATA_DESC.pack(*s) for s in sections]
    size = METADATA_HEADER.size + METADATA_DESC.size * len(items)
    return METADATA_HEADER.pack(METADATA_SIGNATURE, size, 1, len(items)) + b"".join(items)


def synthetic_snp_image(
    *,
    sections: Iterable[tuple[int, int, int]],
    size: int = 0x10000,
    hashes_area: tuple[int, int] | None = None,
    reset_address: int = 0x80B004,
    filler: bytes = b"\xff",
) -> bytes:
    """A firmware-shaped blob with SEV metadata and an OVMF table at its top.

    Not a bootable firmware: only the bytes QEMU and the owner read.  The
    metadata sits right below the table, its offset named by the table's
    SEV metadata entry.
    """
    from agent.sev.ovmf import (
        AREA,
        RESET_BLOCK,
        SEV_ES_RESET_BLOCK_GUID,
        SEV_HASH_TABLE_RV_GUID,
        TAIL_SIZE,
        build_table,
    )

    metadata = build_metadata(sections)
    entries = []
    if hashes_area is not None:
        entries.append((SEV_HASH_TABLE_RV_GUID, AREA.pack(*hashes_area)))
    entries.append((SEV_ES_RESET_BLOCK_GUID, RESET_BLOCK.pack(reset_address)))
    # The offset is counted from the end of the image; the table's length does
    # not depend on the offset's value, so build it once to learn its size.
    probe = build_table(entries + [(SEV_METADATA_OFFSET_GUID, struct.pack("<I", 0))])
    top_len = len(metadata) + len(probe) + TAIL_SIZE
    table = build_table(entries + [(SEV_METADATA_OFFSET_GUID, struct.pack("<I", top_len))])
    top = metadata + table + b"\x90" * TAIL_SIZE
    if len(top) > size or size % PAGE_SIZE:
        raise ValueError("image too small for its table, or not whole pages")
    body = (filler * (size // max(len(filler), 1) + 1))[: size - len(top)]
    return body + top
