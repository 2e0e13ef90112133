"""Synthetic SNP firmware images for the tests (shared by tests/sev and tests/owner)."""

from agent.sev.snp_measure import (
    SECTION_CPUID,
    SECTION_SNP_KERNEL_HASHES,
    SECTION_SNP_SEC_MEM,
    SECTION_SNP_SECRETS,
    SECTION_SVSM_CAA,
    synthetic_snp_image,
)

RESET = 0x80B004
# Like OVMF's AmdSev build: SEC memory, secrets, CPUID, the kernel hashes page.
SECTIONS = [
    (0x800000, 0x9000, SECTION_SNP_SEC_MEM),
    (0x809000, 0x1000, SECTION_SNP_SECRETS),
    (0x80A000, 0x1000, SECTION_CPUID),
    (0x80C000, 0x1000, SECTION_SNP_KERNEL_HASHES),
    (0x80D000, 0x3000, SECTION_SNP_SEC_MEM),
]
HASHES_AREA = (0x80CC00, 0x400)


def snp_firmware(**over) -> bytes:
    """An image with kernel hashes support (sections and area as above, unless overridden)."""
    kwargs = dict(sections=SECTIONS, hashes_area=HASHES_AREA, reset_address=RESET)
    kwargs.update(over)
    return synthetic_snp_image(**kwargs)


def snp_firmware_without_hashes() -> bytes:
    return synthetic_snp_image(
        sections=[s for s in SECTIONS if s[2] != SECTION_SNP_KERNEL_HASHES] + [(0x810000, 0x1000, SECTION_SVSM_CAA)],
        reset_address=RESET,
    )
