"""OVMF GUIDed table parsing, on synthetic images and on sevctl's public OVMF."""

from __future__ import annotations

import struct
from uuid import UUID

import pytest

from agent.common.errors import SevFormatError
from agent.sev.ovmf import (
    SEV_ES_RESET_BLOCK_GUID,
    SEV_HASH_TABLE_RV_GUID,
    SEV_SECRET_BLOCK_GUID,
    TABLE_FOOTER_GUID,
    Area,
    FirmwareError,
    OvmfImage,
    build_table,
    synthetic_image,
)
from tests.sev.vectors import SEVCTL_OVMF_NAME, sevctl_file

# The GUIDed table of sevctl's tests/data/OVMF.amdsev.fd_trimmed_edk2-ovmf-
# 20220126gitbb1bba3d77-4.el9 (virtee/sevctl @ 8b47f3a): the 114 bytes that
# end 32 bytes before the end of that 4096-byte image, footer included.
# Transcribed as data, and checked against the copy in fixtures/sevctl.
SEVCTL_OVMF_TABLE = bytes.fromhex(
    "70070000160035657ae44a989847865e4685a7bf8ec2"  # TDX metadata offset 0x770
    "00cc8000000400001a001f3755723b3a044b927b1da6efa8d454"  # hashes area 0x80cc00/0x400
    "00c08000000c00001a0061b32e4c9b7dc34c8081127c90d3d294"  # secret area 0x80c000/0xc00
    "04b080001600de71f7007e1acb4f890e68c77e2fb44e"  # SEV-ES reset 0x0080b004
    "7200de82b596b21ff745baeaa366c55a082d"  # footer: length 0x72
)
TDX_METADATA_GUID = UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")


def _image_with_top(top: bytes, size: int = 4096) -> bytes:
    tail = b"\x90" * 32
    return b"\xff" * (size - len(top) - len(tail)) + top + tail


def test_guids_match_the_edk2_and_qemu_sources():
    # Byte strings as written in OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm.
    assert TABLE_FOOTER_GUID.bytes_le == bytes.fromhex("de82b596b21ff745baeaa366c55a082d")
    assert SEV_HASH_TABLE_RV_GUID.bytes_le == bytes.fromhex("1f3755723b3a044b927b1da6efa8d454")
    assert SEV_SECRET_BLOCK_GUID.bytes_le == bytes.fromhex("61b32e4c9b7dc34c8081127c90d3d294")
    assert SEV_ES_RESET_BLOCK_GUID.bytes_le == bytes.fromhex("de71f7007e1acb4f890e68c77e2fb44e")


def test_sevctl_ovmf_table_gives_its_areas_and_reset_address():
    image = OvmfImage(_image_with_top(SEVCTL_OVMF_TABLE))
    assert image.has_table
    assert image.hashes_table_area() == Area(0x80CC00, 0x400)
    assert image.secret_area() == Area(0x80C000, 0xC00)
    assert image.sev_es_reset_address() == 0x80B004
    assert image.find(TDX_METADATA_GUID) == struct.pack("<I", 0x770)
    assert [guid for guid, _ in image.entries()] == [
        SEV_ES_RESET_BLOCK_GUID,
        SEV_SECRET_BLOCK_GUID,
        SEV_HASH_TABLE_RV_GUID,
        TDX_METADATA_GUID,
    ]


def test_table_writer_produces_the_edk2_layout():
    table = build_table(
        [
            (TDX_METADATA_GUID, struct.pack("<I", 0x770)),
            (SEV_HASH_TABLE_RV_GUID, struct.pack("<II", 0x80CC00, 0x400)),
            (SEV_SECRET_BLOCK_GUID, struct.pack("<II", 0x80C000, 0xC00)),
            (SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", 0x80B004)),
        ]
    )
    assert table == SEVCTL_OVMF_TABLE


def test_synthetic_image_puts_the_footer_guid_48_bytes_from_the_end():
    image = synthetic_image(size=0x10000, hashes_area=Area(0x80CC00, 0x400), reset_address=0x80B004)
    assert len(image) == 0x10000
    assert image[-48:-32] == TABLE_FOOTER_GUID.bytes_le
    parsed = OvmfImage(image)
    assert parsed.hashes_table_area() == Area(0x80CC00, 0x400)
    assert parsed.secret_area() is None
    assert parsed.sev_es_reset_address() == 0x80B004


def test_image_without_footer_has_no_table():
    image = OvmfImage(synthetic_image(footer=False))
    assert not image.has_table
    assert image.hashes_table_area() is None
    assert image.sev_es_reset_address() is None
    assert "footer" in image.table_problem


def test_image_smaller_than_a_page_has_no_table():
    # QEMU (pc_system_parse_ovmf_flash) ignores such a flash entirely.
    top = build_table([(SEV_HASH_TABLE_RV_GUID, struct.pack("<II", 0x80CC00, 0x400))])
    image = OvmfImage(_image_with_top(top, size=4095))
    assert not image.has_table
    assert image.hashes_table_area() is None


def test_footer_with_impossible_length_means_no_table_and_says_why():
    footer = struct.pack("<H", 0x7FFF) + TABLE_FOOTER_GUID.bytes_le
    image = OvmfImage(_image_with_top(footer))
    assert not image.has_table
    assert "invalid size" in image.table_problem


def test_lookup_stops_at_a_corrupt_entry_like_qemu():
    good = build_table([(SEV_HASH_TABLE_RV_GUID, struct.pack("<II", 0x80CC00, 0x400))])
    # An entry farther from the footer whose length (3) is shorter than its trailer.
    corrupt = b"\x00" + struct.pack("<H", 3) + SEV_SECRET_BLOCK_GUID.bytes_le
    body = good[:-18]
    footer = struct.pack("<H", len(corrupt) + len(body) + 18) + TABLE_FOOTER_GUID.bytes_le
    image = OvmfImage(_image_with_top(corrupt + body + footer))
    assert image.hashes_table_area() == Area(0x80CC00, 0x400)
    assert image.secret_area() is None


def test_legacy_sev_info_block_gives_the_reset_address_without_a_table():
    # The original layout (before the GUIDed table): data || len || GUID right
    # below the top 0x20 bytes (target/i386/sev.c sev_es_find_reset_vector).
    block = struct.pack("<I", 0x80B004) + struct.pack("<H", 22) + SEV_ES_RESET_BLOCK_GUID.bytes_le
    image = OvmfImage(_image_with_top(block))
    assert not image.has_table
    assert image.sev_es_reset_address() == 0x80B004


def test_zero_reset_address_is_refused():
    image = OvmfImage(synthetic_image(reset_address=0))
    with pytest.raises(FirmwareError, match="reset address is zero"):
        image.sev_es_reset_address()


def test_short_area_entry_is_a_usage_error():
    top = build_table([(SEV_HASH_TABLE_RV_GUID, b"\x00\xcc\x80\x00")])
    with pytest.raises(SevFormatError, match="hashes-table entry is 4 bytes"):
        OvmfImage(_image_with_top(top)).hashes_table_area()


def test_sev_snp_measure_reads_our_synthetic_table_the_same_way(tmp_path):
    ovmf = pytest.importorskip("sevsnpmeasure.ovmf")
    path = tmp_path / "OVMF.fd"
    path.write_bytes(
        synthetic_image(
            hashes_area=Area(0x80CC00, 0x400),
            secret_area=Area(0x80C000, 0xC00),
            reset_address=0x80B004,
        )
    )
    theirs = ovmf.OVMF(str(path))
    assert theirs.is_sev_hashes_table_supported()
    assert theirs.sev_hashes_table_gpa() == 0x80CC00
    assert theirs.sev_es_reset_eip() == 0x80B004


def test_sevctl_firmware_file_matches_the_transcribed_table():
    firmware = sevctl_file(SEVCTL_OVMF_NAME)
    assert firmware[-32 - len(SEVCTL_OVMF_TABLE) : -32] == SEVCTL_OVMF_TABLE
    image = OvmfImage(firmware)
    assert image.sev_es_reset_address() == 0x80B004
    assert image.secret_area() == Area(0x80C000, 0xC00)
