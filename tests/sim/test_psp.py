"""The PSP stand-in: LAUNCH_MEASURE, LAUNCH_SECRET, LAUNCH_FINISH."""

from __future__ import annotations

import os
import struct

import pytest

from agent.core.secret import Secret
from agent.sev.measurement import compute_measure, split_blob
from agent.sev.packet import build_packet
from agent.sev.secret_table import build_secret_table, parse_secret_table
from agent.sev.guids import LUKS_KEY_GUID
from agent.sim.psp import FW_ERROR_TEXT, FwError, Psp, SevRet
from tests.sim.conftest import DIGEST, TEK, TIK

NONCE = bytes(range(32, 48))


def make_psp(policy: int = 1) -> Psp:
    return Psp(Secret(TIK), Secret(TEK), digest=DIGEST, policy=policy, api_major=1, api_minor=55,
               build_id=21, mnonce=NONCE)


def packet(psp: Psp, data: bytes = b"pw", **kw) -> tuple[bytes, bytes]:
    measure, _ = split_blob(psp.measurement)
    table = build_secret_table([(LUKS_KEY_GUID, data)])
    return build_packet(kw.get("tik", TIK), kw.get("tek", TEK), measure, table, os.urandom(16),
                        flags=kw.get("flags", 0))


def test_launch_measure_is_the_hmac_of_the_launch_with_the_tik():
    psp = make_psp(policy=0x5)
    assert psp.measurement is None and psp.state == "launch-update"
    blob = psp.launch_measure()
    assert blob == compute_measure(TIK, 1, 55, 21, 0x5, DIGEST, NONCE) + NONCE
    assert psp.state == "launch-secret" and psp.measurement == blob
    with pytest.raises(FwError) as again:
        psp.launch_measure()
    assert again.value.code == SevRet.INVALID_GUEST_STATE


def test_launch_secret_returns_the_decrypted_table():
    psp = make_psp()
    psp.launch_measure()
    plaintext = psp.launch_secret(*packet(psp, b"disk key"))
    assert parse_secret_table(plaintext.reveal()) == [(LUKS_KEY_GUID, b"disk key")]
    assert psp.state == "launch-secret"  # more secrets may follow until LAUNCH_FINISH


def test_launch_secret_before_the_measurement_is_refused():
    psp = make_psp()
    with pytest.raises(FwError) as refused:
        psp.launch_secret(bytes(52), bytes(16))
    assert refused.value.code == SevRet.INVALID_GUEST_STATE


@pytest.mark.parametrize("mutate, code", [
    (lambda h, c: (h[:-1], c), SevRet.INVALID_LEN),
    (lambda h, c: (h, c[:-1]), SevRet.INVALID_LEN),
    (lambda h, c: (h[:-1] + bytes([h[-1] ^ 1]), c), SevRet.BAD_MEASUREMENT),
    (lambda h, c: (h, bytes([c[0] ^ 1]) + c[1:]), SevRet.BAD_MEASUREMENT),
    (lambda h, c: (struct.pack("<I", 1) + h[4:], c), SevRet.INVALID_PARAM),
])
def test_a_damaged_packet_is_refused(mutate, code):
    psp = make_psp()
    psp.launch_measure()
    header, ciphertext = mutate(*packet(psp))
    with pytest.raises(FwError) as refused:
        psp.launch_secret(header, ciphertext)
    assert refused.value.code == code
    assert refused.value.text == FW_ERROR_TEXT[code]
    assert psp.state == "launch-secret"


def test_a_packet_for_another_tik_is_refused():
    psp = make_psp()
    psp.launch_measure()
    with pytest.raises(FwError) as refused:
        psp.launch_secret(*packet(psp, tik=os.urandom(16)))
    assert refused.value.code == SevRet.BAD_MEASUREMENT
    assert TIK.hex() not in str(refused.value) and TEK.hex() not in str(refused.value)


def test_launch_finish_closes_the_launch():
    psp = make_psp()
    psp.launch_measure()
    header, ciphertext = packet(psp)
    psp.launch_finish()
    assert psp.state == "running" and psp.state_index == 3
    with pytest.raises(FwError):
        psp.launch_secret(header, ciphertext)
    with pytest.raises(FwError):
        psp.launch_finish()


def test_repr_of_the_psp_shows_no_keys():
    psp = make_psp()
    assert TIK.hex() not in repr(vars(psp)) and repr(TIK) not in repr(vars(psp))
