"""The PSP stand-in: LAUNCH_MEASURE, LAUNCH_SECRET, LAUNCH_FINISH."""

from __future__ import annotations

import os
import struct

import pytest

from agent.common.secret import Secret
from agent.sev.guids import LUKS_KEY_GUID
from agent.sev.measurement import compute_measure, split_blob
from agent.sev.packet import build_packet
from agent.sev.secret_table import build_secret_table, parse_secret_table
from agent.tools.sim.psp import FW_ERROR_TEXT, FwError, Psp, SevRet
from tests.tools.sim.conftest import DIGEST, TEK, TIK

NONCE = bytes(range(32, 48))


def make_psp(policy: int = 1) -> Psp:
    return Psp(
        Secret(TIK), Secret(TEK), digest=DIGEST, policy=policy, api_major=1, api_minor=55, build_id=21, mnonce=NONCE
    )


def packet(psp: Psp, data: bytes = b"pw", **kw) -> tuple[bytes, bytes]:
    measure, _ = split_blob(psp.measurement)
    table = build_secret_table([(LUKS_KEY_GUID, data)])
    return build_packet(
        kw.get("tik", TIK), kw.get("tek", TEK), measure, table, os.urandom(16), flags=kw.get("flags", 0)
    )


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


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda h, c: (h[:-1], c), SevRet.INVALID_LEN),
        (lambda h, c: (h, c[:-1]), SevRet.INVALID_LEN),
        (lambda h, c: (h[:-1] + bytes([h[-1] ^ 1]), c), SevRet.BAD_MEASUREMENT),
        (lambda h, c: (h, bytes([c[0] ^ 1]) + c[1:]), SevRet.BAD_MEASUREMENT),
        (lambda h, c: (struct.pack("<I", 1) + h[4:], c), SevRet.INVALID_PARAM),
    ],
)
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


# -- the platform: PDH, its chain, LAUNCH_START with an owner's session -------

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.sev.cert import USAGE_PDH, Certificate, verify_pdh_chain  # noqa: E402
from agent.sev.session import create_session  # noqa: E402
from agent.tools.sim.psp import Platform  # noqa: E402


def owner_session(platform: Platform, policy: int = 1, tik: bytes = TIK, tek: bytes = TEK) -> tuple[bytes, bytes]:
    return create_session(platform.pdh_cert, policy, nonce=os.urandom(16), tek=tek, tik=tik, iv=os.urandom(16))


def test_platform_pdh_is_vouched_for_by_its_own_chain():
    platform = Platform(api_major=1, api_minor=55)
    assert platform.pdh_cert.usage == USAGE_PDH
    assert (platform.pdh_cert.api_major, platform.pdh_cert.api_minor) == (1, 55)
    verify_pdh_chain(platform.pdh_cert, platform.chain)
    assert platform.chain.oca.is_signed_by(platform.chain.oca)  # an unadopted platform's OCA
    assert "Platform(<PDH key pair>)" == repr(platform)


def test_a_given_pdh_key_is_kept_across_platforms():
    key = ec.generate_private_key(ec.SECP384R1())
    one, two = Platform(key), Platform(key)
    assert one.pdh_cert.public_key().public_numbers() == two.pdh_cert.public_key().public_numbers()
    godh, session = owner_session(one)
    tik, tek = two.launch_start(godh, session, 1)  # a restarted simulator still opens it
    assert (tik.reveal(), tek.reveal()) == (TIK, TEK)


def test_launch_start_unwraps_the_owners_keys():
    platform = Platform()
    godh, session = owner_session(platform, policy=5)
    tik, tek = platform.launch_start(godh, session, 5)
    assert isinstance(tik, Secret) and (tik.reveal(), tek.reveal()) == (TIK, TEK)


@pytest.mark.parametrize(
    "damage, code",
    [
        (lambda g, s: (g, s, 3), SevRet.POLICY_FAILURE),
        (lambda g, s: (g, s[:16] + bytes(32) + s[48:], 1), SevRet.BAD_MEASUREMENT),
        (lambda g, s: (g, s[:-1], 1), SevRet.INVALID_LEN),
        (lambda g, s: (g[:100], s, 1), SevRet.INVALID_CERTIFICATE),
        (lambda g, s: (bytes(2084), s, 1), SevRet.INVALID_CERTIFICATE),
    ],
)
def test_a_session_that_does_not_open_is_refused_with_a_firmware_status(damage, code):
    platform = Platform()
    godh, session = owner_session(platform)
    with pytest.raises(FwError) as info:
        platform.launch_start(*damage(godh, session))
    assert info.value.code == code
    for key in (TIK, TEK):
        assert key.hex() not in str(info.value) and key.hex() not in info.value.why


def test_a_session_for_another_platform_is_refused():
    godh, session = owner_session(Platform())
    with pytest.raises(FwError) as info:
        Platform().launch_start(godh, session, 1)
    assert info.value.code == SevRet.BAD_MEASUREMENT


def test_the_pdh_key_must_be_p384():
    with pytest.raises(ValueError, match="P-384"):
        Platform(ec.generate_private_key(ec.SECP256R1()))


def test_godh_certificate_parses():
    godh, _ = owner_session(Platform())
    assert Certificate.from_bytes(godh).usage == USAGE_PDH
