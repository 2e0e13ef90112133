"""The SEV-SNP launch digest, against sev-snp-measure (--mode snp) as an oracle."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common.errors import SevFormatError
from agent.sev.ovmf import FirmwareError, OvmfImage
from agent.sev.snp_measure import (
    PAGE_INFO,
    PAGE_TYPE_NORMAL,
    VCPU_TYPES,
    LaunchDigest,
    metadata_sections,
    snp_launch_digest,
    synthetic_snp_image,
    vcpu_signature,
)
from tests.sev.snp_firmware import RESET, SECTIONS, snp_firmware, snp_firmware_without_hashes
from tests.sev.snp_oracle import oracle_digest

DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")
needs_debian_ovmf = pytest.mark.skipif(not DEBIAN_OVMF.is_file(), reason="Debian's ovmf package is not installed")

KERNEL = b"MZ" + bytes(range(256)) * 40
INITRD = b"initrd\0" * 300


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, data in {
        "fw": snp_firmware(),
        "fw-no-hashes": snp_firmware_without_hashes(),
        "kernel": KERNEL,
        "initrd": INITRD,
    }.items():
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    return out


def test_page_info_is_the_spec_s_0x70_bytes():
    assert PAGE_INFO.size == 0x70


def test_one_normal_page_extends_the_digest_with_its_page_info():
    ld = LaunchDigest()
    page = b"\xaa" * 4096
    ld.normal_pages(0x1000, page)
    info = (
        bytes(48)
        + hashlib.sha384(page).digest()
        + (0x70).to_bytes(2, "little")
        + bytes([PAGE_TYPE_NORMAL])
        + bytes(5)
        + (0x1000).to_bytes(8, "little")
    )
    assert ld.digest == hashlib.sha384(info).digest()


@needs_debian_ovmf
@pytest.mark.parametrize("vcpus,vcpu_type", [(1, "EPYC-v4"), (2, "EPYC-Milan"), (4, "EPYC-Genoa")])
def test_debian_ovmf_digest_equals_sev_snp_measure(vcpus, vcpu_type):
    mine = snp_launch_digest(DEBIAN_OVMF.read_bytes(), vcpus=vcpus, vcpu_sig=vcpu_signature(vcpu_type))
    assert mine == oracle_digest(DEBIAN_OVMF, vcpus=vcpus, vcpu_type=vcpu_type)


@needs_debian_ovmf
def test_debian_ovmf_has_no_kernel_hashes_section_so_a_kernel_is_refused():
    with pytest.raises(FirmwareError, match="SNP_KERNEL_HASHES"):
        snp_launch_digest(DEBIAN_OVMF.read_bytes(), vcpus=1, vcpu_sig=VCPU_TYPES["EPYC"], kernel=b"k")


@pytest.mark.parametrize(
    "kernel,initrd,append",
    [
        (True, True, "console=ttyS0 root=/dev/vda"),
        (True, False, None),
        (True, True, None),
        (True, False, "ro"),
        (False, False, None),
    ],
)
@pytest.mark.parametrize(
    "vcpus,vcpu_type,features", [(1, "EPYC", 0x1), (3, "EPYC-Rome-v2", 0x1), (2, "EPYC-Turin", 0x21)]
)
def test_synthetic_firmware_with_kernel_hashes_equals_sev_snp_measure(
    files, kernel, initrd, append, vcpus, vcpu_type, features
):
    mine = snp_launch_digest(
        files["fw"].read_bytes(),
        vcpus=vcpus,
        vcpu_sig=vcpu_signature(vcpu_type),
        kernel=KERNEL if kernel else None,
        initrd=INITRD if initrd else None,
        append=append,
        guest_features=features,
    )
    theirs = oracle_digest(
        files["fw"],
        vcpus=vcpus,
        vcpu_type=vcpu_type,
        kernel=files["kernel"] if kernel else None,
        initrd=files["initrd"] if initrd else None,
        append=append,
        guest_features=features,
    )
    assert mine == theirs


def test_svsm_caa_section_is_measured_as_zero_pages_like_sev_snp_measure(files):
    mine = snp_launch_digest(files["fw-no-hashes"].read_bytes(), vcpus=2, vcpu_sig=VCPU_TYPES["EPYC-Milan"])
    assert mine == oracle_digest(files["fw-no-hashes"], vcpus=2, vcpu_type="EPYC-Milan")


@settings(max_examples=15, deadline=None)
@given(
    vcpus=st.integers(1, 6),
    features=st.integers(0, 2**64 - 1),
    vcpu_type=st.sampled_from(sorted(VCPU_TYPES)),
    append=st.none() | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)
def test_any_vcpu_set_up_equals_sev_snp_measure(tmp_path_factory, vcpus, features, vcpu_type, append):
    d = tmp_path_factory.mktemp("fw")
    (d / "fw").write_bytes(snp_firmware())
    (d / "k").write_bytes(KERNEL)
    mine = snp_launch_digest(
        snp_firmware(),
        vcpus=vcpus,
        vcpu_sig=VCPU_TYPES[vcpu_type],
        kernel=KERNEL,
        append=append,
        guest_features=features,
    )
    assert mine == oracle_digest(
        d / "fw", vcpus=vcpus, vcpu_type=vcpu_type, kernel=d / "k", append=append, guest_features=features
    )


def test_every_input_changes_the_digest():
    base = dict(vcpus=2, vcpu_sig=VCPU_TYPES["EPYC-Milan"], kernel=KERNEL, initrd=INITRD, append="a")
    seen = {snp_launch_digest(snp_firmware(), **base)}
    for over in (
        dict(vcpus=3),
        dict(vcpu_sig=VCPU_TYPES["EPYC-Genoa"]),
        dict(kernel=KERNEL + b"x"),
        dict(initrd=INITRD + b"x"),
        dict(append="b"),
        dict(guest_features=0x3),
    ):
        seen.add(snp_launch_digest(snp_firmware(), **{**base, **over}))
    seen.add(snp_launch_digest(snp_firmware(filler=b"\xfe"), **base))
    assert len(seen) == 8


def test_vcpu_type_names_are_qemu_s_models_with_their_signatures():
    assert VCPU_TYPES["EPYC-Milan"] == 0xA00F11
    assert VCPU_TYPES["EPYC-Genoa-v1"] == 0xA10F10
    assert VCPU_TYPES["EPYC-v4"] == 0x800F12
    with pytest.raises(SevFormatError, match="unknown vCPU type 'EPYC-Nope'"):
        vcpu_signature("EPYC-Nope")


def test_metadata_sections_are_read_in_order():
    sections = metadata_sections(OvmfImage(snp_firmware()))
    assert [(s.gpa, s.size, s.kind) for s in sections] == SECTIONS


@pytest.mark.parametrize(
    "image,why",
    [
        (b"\xff" * 0x10000, "no OVMF GUID table footer"),
        (synthetic_snp_image(sections=[(0x800000, 0x1800, 1)]), "not whole pages"),
        (synthetic_snp_image(sections=[(0x800000, 0x1000, 9)]), "unknown type 0x9"),
    ],
)
def test_firmware_without_usable_snp_metadata_is_refused_with_the_reason(image, why):
    with pytest.raises(FirmwareError, match=why):
        snp_launch_digest(image, vcpus=1, vcpu_sig=1)


def test_hashes_area_outside_its_page_is_refused():
    image = snp_firmware(hashes_area=(0x80DF80, 0x400))
    with pytest.raises(FirmwareError, match="does not fit its SNP_KERNEL_HASHES page"):
        snp_launch_digest(image, vcpus=1, vcpu_sig=1, kernel=b"k")


def test_firmware_not_in_whole_pages_is_refused():
    with pytest.raises(FirmwareError, match="whole number of pages"):
        snp_launch_digest(snp_firmware() + b"x", vcpus=1, vcpu_sig=1)


def test_initrd_without_kernel_is_a_usage_error():
    with pytest.raises(SevFormatError, match="only measured with a kernel"):
        snp_launch_digest(snp_firmware(), vcpus=1, vcpu_sig=1, initrd=b"i")


def test_ap_vmsas_start_at_the_firmware_s_reset_address():
    one = snp_firmware(reset_address=RESET)
    other = snp_firmware(reset_address=RESET + 0x10)
    # the same firmware bytes but for the table entry: compare APs through the oracle-checked path
    assert snp_launch_digest(one, vcpus=2, vcpu_sig=1) != snp_launch_digest(other, vcpus=2, vcpu_sig=1)
