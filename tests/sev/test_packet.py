import base64

import pytest

from agent.sev.packet import PACKET_HEADER_LEN, PacketError, build_packet, open_packet, parse_header
from agent.sev.secret_table import build_secret_table, parse_secret_table

from . import vectors as v

TIK, TEK = v.SEVCTL_SECRET_TIK, v.SEVCTL_SECRET_TEK
MEASURE = v.SEVCTL_SECRET_BLOB[:32]
IV = v.SEVCTL_SECRET_IV


@pytest.mark.parametrize(
    "entries,header,payload",
    [
        ([v.SEVCTL_SECRET1], v.SEVCTL_HEADER_ONE, v.SEVCTL_PAYLOAD_ONE),
        ([v.SEVCTL_SECRET1, v.SEVCTL_SECRET2], v.SEVCTL_HEADER_TWO, v.SEVCTL_PAYLOAD_TWO),
    ],
    ids=["one-secret", "two-secrets"],
)
def test_packet_matches_sevctl_secret_build(entries, header, payload):
    got_header, got_payload = build_packet(TIK, TEK, MEASURE, build_secret_table(entries), IV)
    assert base64.b64encode(got_header).decode() == header
    assert base64.b64encode(got_payload).decode() == payload


def test_header_is_flags_iv_mac():
    header, _ = build_packet(TIK, TEK, MEASURE, build_secret_table([v.SEVCTL_SECRET1]), IV, flags=0)
    assert len(header) == PACKET_HEADER_LEN == 52
    flags, iv, mac = parse_header(header)
    assert flags == 0 and iv == IV and len(mac) == 32


def test_psp_side_opens_sevctl_packet():
    header = base64.b64decode(v.SEVCTL_HEADER_TWO)
    payload = base64.b64decode(v.SEVCTL_PAYLOAD_TWO)
    table = open_packet(TIK, TEK, MEASURE, header, payload)
    assert parse_secret_table(table) == [v.SEVCTL_SECRET1, v.SEVCTL_SECRET2]


def test_round_trip():
    table = build_secret_table([v.SEVCTL_SECRET2])
    header, ct = build_packet(TIK, TEK, MEASURE, table, bytes(range(16)))
    assert ct != table
    assert open_packet(TIK, TEK, MEASURE, header, ct) == table


def _packet():
    return build_packet(TIK, TEK, MEASURE, build_secret_table([v.SEVCTL_SECRET1]), IV)


def test_wrong_tik_is_refused():
    header, ct = _packet()
    with pytest.raises(PacketError, match="packet MAC does not match"):
        open_packet(bytes(16), TEK, MEASURE, header, ct)


def test_packet_for_another_measurement_is_refused():
    header, ct = _packet()
    other = bytes([MEASURE[0] ^ 1]) + MEASURE[1:]
    with pytest.raises(PacketError, match="packet MAC does not match"):
        open_packet(TIK, TEK, other, header, ct)


@pytest.mark.parametrize("where", [0, 4, 20, 51], ids=["flags", "iv", "mac", "mac-end"])
def test_tampered_header_is_refused(where):
    header, ct = _packet()
    bad = bytearray(header)
    bad[where] ^= 1
    with pytest.raises(PacketError, match="packet MAC does not match"):
        open_packet(TIK, TEK, MEASURE, bytes(bad), ct)


def test_tampered_ciphertext_is_refused():
    header, ct = _packet()
    bad = bytearray(ct)
    bad[5] ^= 1
    with pytest.raises(PacketError, match="packet MAC does not match"):
        open_packet(TIK, TEK, MEASURE, header, bytes(bad))


def test_truncated_ciphertext_is_refused():
    header, ct = _packet()
    with pytest.raises(PacketError):
        open_packet(TIK, TEK, MEASURE, header, ct[:-16])


def test_nonzero_flags_are_refused_by_the_psp_side():
    header, ct = build_packet(TIK, TEK, MEASURE, build_secret_table([v.SEVCTL_SECRET1]), IV, flags=1)
    with pytest.raises(PacketError, match="flags"):
        open_packet(TIK, TEK, MEASURE, header, ct)


@pytest.mark.parametrize("n", [0, 51, 53])
def test_header_of_wrong_length_is_refused(n):
    _, ct = _packet()
    with pytest.raises(PacketError, match="52 bytes"):
        open_packet(TIK, TEK, MEASURE, bytes(n), ct)


def test_unpadded_table_is_refused():
    with pytest.raises(PacketError, match="multiple of 16"):
        build_packet(TIK, TEK, MEASURE, b"x" * 17, IV)


@pytest.mark.parametrize("arg", ["tik", "tek", "measure", "iv"])
def test_wrong_key_sizes_are_refused(arg):
    args = dict(tik=TIK, tek=TEK, measure=MEASURE, table=bytes(16), iv=IV)
    args[arg] = bytes(48)  # e.g. the whole measurement blob passed as MEASURE
    with pytest.raises(PacketError):
        build_packet(**args)


def test_packet_error_is_a_value_error():
    assert issubclass(PacketError, ValueError)
