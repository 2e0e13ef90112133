import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sev.guids import LUKS_KEY_GUID, SECRET_TABLE_HEADER_GUID
from agent.sev.secret_table import build_secret_table, parse_secret_table

from . import vectors as v

OTHER = uuid.UUID("23058844-597b-42fb-8259-a0f5d9d495af")


def test_single_entry_layout_matches_sevctl():
    table = build_secret_table([v.SEVCTL_SECRET1])
    data = v.SEVCTL_SECRET1[1]
    assert table[:16] == SECRET_TABLE_HEADER_GUID.bytes_le
    # header length counts header + entries but not the padding (sevctl build_table)
    assert int.from_bytes(table[16:20], "little") == 20 + 20 + len(data)
    assert table[20:36] == LUKS_KEY_GUID.bytes_le
    assert int.from_bytes(table[36:40], "little") == 20 + len(data)
    assert table[40 : 40 + len(data)] == data
    assert len(table) == 64 and not any(table[40 + len(data) :])


def test_sevctl_data_files_match_the_transcribed_vectors():
    assert v.sevctl_file("secret/tik1.bin") == v.SEVCTL_SECRET_TIK
    assert v.sevctl_file("secret/tek1.bin") == v.SEVCTL_SECRET_TEK
    assert v.sevctl_file("measurement/tik1.bin") == v.SEVCTL_MEASURE_TIK
    assert v.sevctl_file("secret/secret1.txt") == v.SEVCTL_SECRET1[1]
    assert v.sevctl_file("secret/secret2.txt") == v.SEVCTL_SECRET2[1]
    assert len(v.sevctl_file("secret/secret3.txt")) == v.SEVCTL_SECRET3_LEN
    assert len(v.sevctl_file("secret/secret4.txt")) == v.SEVCTL_SECRET4_LEN


def test_aligned_table_gets_no_extra_padding():
    table = build_secret_table([(LUKS_KEY_GUID, bytes(24))])  # 20 + 20 + 24 = 64
    assert len(table) == 64


@pytest.mark.parametrize("n", [v.SEVCTL_SECRET3_LEN, v.SEVCTL_SECRET4_LEN])
def test_largest_sevctl_secrets_pad_to_16k(n):
    # sevctl tests/secretbuild.rs: 16343- and 16344-byte secrets both give 16384 bytes
    assert len(build_secret_table([(OTHER, b"x" * n)])) == 16384


def test_table_over_16k_is_refused():
    with pytest.raises(ValueError):
        build_secret_table([(OTHER, b"x" * 16345)])


def test_round_trip_keeps_order_and_bytes():
    entries = [v.SEVCTL_SECRET1, v.SEVCTL_SECRET2, (OTHER, b"")]
    assert parse_secret_table(build_secret_table(entries)) == entries


def test_empty_table_is_refused():
    with pytest.raises(ValueError):
        build_secret_table([])


def test_duplicate_guid_is_refused():
    with pytest.raises(ValueError, match="duplicate"):
        build_secret_table([v.SEVCTL_SECRET1, (LUKS_KEY_GUID, b"again")])


def _libvirt_style(entries):
    """virt-qemu-sev-validate pads with 16 - len % 16 bytes (a whole block when aligned)."""
    body = b"".join(g.bytes_le + (20 + len(d)).to_bytes(4, "little") + d for g, d in entries)
    table = SECRET_TABLE_HEADER_GUID.bytes_le + (20 + len(body)).to_bytes(4, "little") + body
    return table + bytes(16 - len(table) % 16)


def test_parser_accepts_libvirt_padding():
    entries = [(LUKS_KEY_GUID, bytes(24))]
    assert parse_secret_table(_libvirt_style(entries)) == entries


def test_parser_accepts_header_length_that_counts_padding():
    table = bytearray(build_secret_table([v.SEVCTL_SECRET1]))
    table[16:20] = len(table).to_bytes(4, "little")
    assert parse_secret_table(bytes(table)) == [v.SEVCTL_SECRET1]


def test_wrong_header_guid_is_refused():
    table = bytearray(build_secret_table([v.SEVCTL_SECRET1]))
    table[0] ^= 1
    with pytest.raises(ValueError, match="header GUID"):
        parse_secret_table(bytes(table))


@pytest.mark.parametrize("length", [0, 19, 1000])
def test_bad_header_length_is_refused(length):
    table = bytearray(build_secret_table([v.SEVCTL_SECRET1]))
    table[16:20] = length.to_bytes(4, "little")
    with pytest.raises(ValueError):
        parse_secret_table(bytes(table))


@pytest.mark.parametrize("length", [0, 19, 45])
def test_bad_entry_length_is_refused(length):
    table = bytearray(build_secret_table([v.SEVCTL_SECRET1]))
    table[36:40] = length.to_bytes(4, "little")
    with pytest.raises(ValueError):
        parse_secret_table(bytes(table))


def test_garbage_after_last_entry_is_refused():
    table = bytearray(build_secret_table([v.SEVCTL_SECRET1]))
    table[-1] = 0xFF
    with pytest.raises(ValueError, match="non-zero"):
        parse_secret_table(bytes(table))


def test_short_input_is_refused():
    with pytest.raises(ValueError):
        parse_secret_table(bytes(10))


def test_error_messages_do_not_echo_secret_bytes():
    table = bytearray(build_secret_table([(LUKS_KEY_GUID, b"hunter2-hunter2")]))
    table[36:40] = (1000).to_bytes(4, "little")
    with pytest.raises(ValueError) as err:
        parse_secret_table(bytes(table))
    assert "hunter2" not in str(err.value)


@given(
    st.dictionaries(
        st.uuids().filter(lambda g: g != SECRET_TABLE_HEADER_GUID), st.binary(max_size=200), min_size=1, max_size=8
    )
)
def test_any_table_round_trips_and_is_aligned(secrets):
    entries = list(secrets.items())
    table = build_secret_table(entries)
    assert len(table) % 16 == 0
    assert parse_secret_table(table) == entries
