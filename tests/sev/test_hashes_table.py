"""The SEV kernel hashes table, byte for byte."""

from __future__ import annotations

import hashlib
import struct
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common.errors import SevFormatError
from agent.sev.hashes_table import (
    PADDED_SIZE,
    TABLE_SIZE,
    KernelHashes,
    build_hashes_table,
    cmdline_bytes,
    kernel_hashes_table,
)

KERNEL = b"fake vmlinuz\n"  # sevctl tests/data/measurement/vmlinuz-fake
INITRD = b"fake initrd\n"  # sevctl tests/data/measurement/initrd-fake
CMDLINE = "foo bar baz fake kernel=cmdline"


def test_table_layout_follows_qemu_structs():
    table = kernel_hashes_table(KERNEL, INITRD, CMDLINE)
    assert (TABLE_SIZE, PADDED_SIZE, len(table)) == (168, 176, 176)
    # SevHashTable: guid, len
    assert table[0:16] == UUID("9438d606-4f22-4cc9-b479-a793d411fd21").bytes_le
    assert struct.unpack_from("<H", table, 16) == (168,)
    # three SevHashTableEntry: guid, len(50), sha256
    expected = [
        ("97d02dd8-bd20-4c94-aa78-e7714d36ab2a", hashlib.sha256(CMDLINE.encode() + b"\0").digest()),
        ("44baf731-3a2f-4bd7-9af1-41e29169781d", hashlib.sha256(INITRD).digest()),
        ("4de79437-abd2-427f-b835-d5b172d2045b", hashlib.sha256(KERNEL).digest()),
    ]
    for i, (guid, digest) in enumerate(expected):
        off = 18 + 50 * i
        assert table[off : off + 16] == UUID(guid).bytes_le
        assert struct.unpack_from("<H", table, off + 16) == (50,)
        assert table[off + 18 : off + 50] == digest
    assert table[168:] == bytes(8)


def test_missing_initrd_hashes_the_empty_string():
    assert KernelHashes.of(KERNEL).initrd == hashlib.sha256(b"").digest()
    assert kernel_hashes_table(KERNEL) == kernel_hashes_table(KERNEL, b"")


def test_missing_command_line_hashes_a_single_nul():
    assert KernelHashes.of(KERNEL).cmdline == hashlib.sha256(b"\0").digest()
    assert kernel_hashes_table(KERNEL, None, None) == kernel_hashes_table(KERNEL, None, "")


def test_command_line_is_utf8_with_a_terminating_nul():
    assert cmdline_bytes("console=ttyS0 ü") == "console=ttyS0 ü".encode() + b"\0"
    assert cmdline_bytes(b"raw") == b"raw\0"


def test_command_line_with_a_nul_is_refused():
    with pytest.raises(SevFormatError, match="NUL"):
        cmdline_bytes("a\0b")


def test_build_from_given_hashes():
    hashes_ = KernelHashes(cmdline=b"\x01" * 32, initrd=b"\x02" * 32, kernel=b"\x03" * 32)
    table = build_hashes_table(hashes_)
    assert table[36:68] == b"\x01" * 32
    assert table[86:118] == b"\x02" * 32
    assert table[136:168] == b"\x03" * 32


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.binary(min_size=1, max_size=300),
    initrd=st.one_of(st.none(), st.binary(max_size=300)),
    append=st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=40)),
)
def test_table_matches_sev_snp_measure(tmp_path_factory, kernel, initrd, append):
    sev_hashes = pytest.importorskip("sevsnpmeasure.sev_hashes")
    d = tmp_path_factory.mktemp("k")
    (d / "kernel").write_bytes(kernel)
    initrd_path = None
    if initrd is not None:
        (d / "initrd").write_bytes(initrd)
        initrd_path = str(d / "initrd")
    # sev-snp-measure treats an empty --append and an empty --initrd path as absent;
    # for QEMU they hash the same as absent too.
    theirs = sev_hashes.SevHashes(str(d / "kernel"), initrd_path, append).construct_table()
    assert kernel_hashes_table(kernel, initrd, append) == theirs
