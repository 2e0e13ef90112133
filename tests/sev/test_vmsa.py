"""SEV-ES VMSA pages against the APM layout, sevctl's vectors and sev-snp-measure."""

from __future__ import annotations

import hashlib
import struct

import pytest

from agent.common.errors import SevFormatError
from agent.sev.vmsa import (
    BSP_RESET_ADDRESS,
    PAGE_SIZE,
    SAVE_AREA,
    VmsaOptions,
    build_vmsa,
    cpu_signature,
    field_offset,
    vmsa_pages,
)
from tests.sev.vectors import sevctl_file

# sevctl tests/data/vmsa0.bin and vmsa1.bin (virtee/sevctl @ 8b47f3a), made by
# `sevctl vmsa build --cpu 0|1 --family 25 --model 1 --stepping 1
# --userspace qemu --firmware OVMF.amdsev.fd_trimmed...`; that firmware's AP
# reset address is 0x80b004.  SHA-256 of each 4096-byte page:
SEVCTL_VMSA0_SHA256 = "f8b52f775502472e5797d2674d9de21f6abc05dc05e9bc49cbb7b6a13688d5e7"
SEVCTL_VMSA1_SHA256 = "bcee5cb289f72882da17abd8dca5e8a7e9f8e2033e7ad96b4db0ab1a383a6487"
SEVCTL_RESET = 0x80B004
MILAN_SIG = 0x00A00F11  # family 25, model 1, stepping 1


@pytest.mark.parametrize(
    "name, offset",
    [
        ("es", 0x000),
        ("cs", 0x010),
        ("tr", 0x090),
        ("cpl", 0x0CB),
        ("efer", 0x0D0),
        ("xss", 0x140),
        ("cr4", 0x148),
        ("cr0", 0x158),
        ("dr7", 0x160),
        ("dr6", 0x168),
        ("rflags", 0x170),
        ("rip", 0x178),
        ("rsp", 0x1D8),
        ("rax", 0x1F8),
        ("g_pat", 0x268),
        ("pkru", 0x2E8),
        ("rcx", 0x308),
        ("rdx", 0x310),
        ("rbx", 0x318),
        ("r15", 0x378),
        ("sev_features", 0x3B0),
        ("xcr0", 0x3E8),
        ("x87_dp", 0x400),
        ("mxcsr", 0x408),
        ("x87_fcw", 0x410),
        ("fpreg_x87", 0x420),
        ("fpreg_xmm", 0x470),
        ("fpreg_ymm", 0x570),
    ],
)
def test_field_offsets_follow_the_apm_vmsa_table(name, offset):
    assert field_offset(name) == offset


def test_save_area_fits_in_one_page():
    assert SAVE_AREA.size == 0x670
    assert len(build_vmsa(BSP_RESET_ADDRESS, MILAN_SIG)) == PAGE_SIZE


@pytest.mark.parametrize(
    "family, model, stepping, sig",
    [
        (25, 1, 1, 0x00A00F11),  # EPYC-Milan
        (23, 49, 0, 0x00830F10),  # EPYC-Rome
        (23, 1, 2, 0x00800F12),  # EPYC
        (25, 17, 0, 0x00A10F10),  # EPYC-Genoa
        (6, 0x55, 4, 0x00050654),  # family <= 0xf: no extended family
    ],
)
def test_cpu_signature_encodes_like_qemu(family, model, stepping, sig):
    assert cpu_signature(family, model, stepping) == sig


@pytest.mark.parametrize("fms", [(0x10F, 0, 0), (25, 256, 0), (25, 1, 16), (-1, 0, 0)])
def test_cpu_signature_out_of_range_is_a_usage_error(fms):
    with pytest.raises(SevFormatError):
        cpu_signature(*fms)


def test_bsp_and_ap_pages_match_sevctl_vectors():
    bsp, ap = list(vmsa_pages(2, cpu_signature(25, 1, 1), SEVCTL_RESET))
    assert hashlib.sha256(bsp).hexdigest() == SEVCTL_VMSA0_SHA256
    assert hashlib.sha256(ap).hexdigest() == SEVCTL_VMSA1_SHA256


def test_bsp_and_ap_pages_equal_sevctl_files_byte_for_byte():
    bsp, ap = list(vmsa_pages(2, cpu_signature(25, 1, 1), SEVCTL_RESET))
    assert bytes(bsp) == sevctl_file("vmsa0.bin")
    assert bytes(ap) == sevctl_file("vmsa1.bin")


def test_bsp_starts_at_the_reset_vector_and_aps_at_the_ovmf_address():
    bsp, ap = list(vmsa_pages(2, MILAN_SIG, SEVCTL_RESET))
    # cs = selector, attrib, limit, base
    assert struct.unpack_from("<HHIQ", bsp, 0x10) == (0xF000, 0x9B, 0xFFFF, 0xFFFF0000)
    assert struct.unpack_from("<Q", bsp, 0x178) == (0xFFF0,)
    assert struct.unpack_from("<HHIQ", ap, 0x10) == (0xF000, 0x9B, 0xFFFF, 0x00800000)
    assert struct.unpack_from("<Q", ap, 0x178) == (0xB004,)
    assert struct.unpack_from("<Q", ap, 0x310) == (MILAN_SIG,)


def test_pages_come_bsp_first_then_one_per_ap():
    pages = list(vmsa_pages(4, MILAN_SIG, SEVCTL_RESET))
    assert len(pages) == 4
    assert pages[0] != pages[1]
    assert pages[1] == pages[2] == pages[3]
    assert list(vmsa_pages(1, MILAN_SIG, SEVCTL_RESET)) == pages[:1]


def test_fpu_init_sets_only_mxcsr_and_fcw():
    plain = build_vmsa(BSP_RESET_ADDRESS, MILAN_SIG)
    fpu = build_vmsa(BSP_RESET_ADDRESS, MILAN_SIG, VmsaOptions(fpu_init=True))
    changed = {i for i in range(PAGE_SIZE) if plain[i] != fpu[i]}
    assert changed <= set(range(0x408, 0x40C)) | set(range(0x410, 0x412))
    assert struct.unpack_from("<I", fpu, 0x408) == (0x1F80,)
    assert struct.unpack_from("<H", fpu, 0x410) == (0x37F,)


def test_sev_features_lands_in_its_field():
    page = build_vmsa(BSP_RESET_ADDRESS, MILAN_SIG, VmsaOptions(sev_features=0x20))
    assert struct.unpack_from("<Q", page, 0x3B0) == (0x20,)


def test_zero_vcpus_is_a_usage_error():
    with pytest.raises(SevFormatError):
        list(vmsa_pages(0, MILAN_SIG, SEVCTL_RESET))


def test_signature_wider_than_32_bits_is_a_usage_error():
    with pytest.raises(SevFormatError):
        build_vmsa(BSP_RESET_ADDRESS, 1 << 32)


@pytest.mark.parametrize("eip", [BSP_RESET_ADDRESS, SEVCTL_RESET])
@pytest.mark.parametrize("sig", [MILAN_SIG, 0x00830F10])
def test_pages_match_sev_snp_measure_with_fpu_init(eip, sig):
    # sev-snp-measure 0.0.13 models a host kernel that initialises the FPU
    # state in the VMSA (MXCSR/FCW); with fpu_init our pages are identical.
    vmsa = pytest.importorskip("sevsnpmeasure.vmsa")
    theirs = bytes(vmsa.VMSA.build_save_area(eip, 0, sig))
    assert build_vmsa(eip, sig, VmsaOptions(fpu_init=True)) == theirs


def test_fpu_init_is_described_by_vm_type_not_kernel_version():
    # KVM fills MXCSR/FCW only for a VM made with KVM_SEV_INIT2 (QEMU 9.1+);
    # QEMU 7.2's KVM_SEV_ES_INIT leaves them zero on any kernel.
    import argparse

    import agent.sev.vmsa as vmsa
    from agent.owner.measure import add_measure_options

    parser = argparse.ArgumentParser()
    add_measure_options(parser)
    (action,) = [a for a in parser._actions if a.dest == "vmsa_fpu_init"]
    for text in (vmsa.__doc__, action.help):
        assert "KVM_SEV_INIT2" in text and "KVM_SEV_ES_INIT" in text
        assert "6.8" not in text
    assert VmsaOptions().fpu_init is False  # the QEMU 7.2 case
