import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.sev.cert import ALGO_ECDSA_SHA256, USAGE_PEK
from agent.sev.session import (
    SESSION_LEN,
    Certificate,
    Session,
    SessionError,
    create_session,
    kdf,
    open_session,
    policy_mac,
    session_from_shared_secret,
)

from . import vectors as v

NONCE, IV = bytes(range(16)), bytes(range(16, 32))
TEK, TIK = bytes(range(0x40, 0x50)), bytes(range(0x60, 0x70))


def _reference_kdf(key, label, context, length):
    """SP 800-108 counter mode written out with u32 LE counter and length (test oracle)."""
    out = b""
    for i in range(1, -(-length // 32) + 1):
        out += hmac.new(
            key, struct.pack("<I", i) + label + b"\0" + context + struct.pack("<I", length * 8), hashlib.sha256
        ).digest()
    return out[:length]


def test_kdf_matches_virtee_master_secret_vector():
    assert kdf(bytes(16), b"sev-master-secret", bytes(16), 16) == v.VIRTEE_KDF_MASTER


@pytest.mark.parametrize("length", [1, 16, 32, 33, 48, 100])
def test_kdf_matches_the_formula_for_multi_block_lengths(length):
    key, label, ctx = b"k" * 48, b"sev-kek", b"ctx"
    assert kdf(key, label, ctx, length) == _reference_kdf(key, label, ctx, length)


def test_kdf_refuses_bad_length():
    with pytest.raises(ValueError):
        kdf(bytes(16), b"x", b"", 0)


def test_policy_mac_matches_virtee_vector():
    assert policy_mac(bytes(16), 0) == v.VIRTEE_MAC_ZERO


def test_session_matches_virtee_session_vector():
    blob = session_from_shared_secret(bytes(16), 0, nonce=bytes(16), tek=bytes(16), tik=bytes(16), iv=bytes(16))
    s = Session.from_bytes(blob)
    assert s.nonce == bytes(16) and s.wrap_iv == bytes(16)
    assert s.wrap_tk == v.VIRTEE_SESSION_WRAP_TK
    assert s.wrap_mac == v.VIRTEE_SESSION_WRAP_MAC
    assert s.policy_mac == v.VIRTEE_SESSION_POLICY_MAC


def test_session_blob_layout():
    blob = session_from_shared_secret(b"z" * 48, 7, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    assert len(blob) == SESSION_LEN == 128
    assert blob[0:16] == NONCE and blob[48:64] == IV
    assert blob[96:128] == policy_mac(TIK, 7)


def _pdh():
    key = ec.generate_private_key(ec.SECP384R1())
    return key, Certificate.from_public_key(key.public_key())


def test_create_then_open_gives_back_tek_and_tik():
    pdh_key, pdh = _pdh()
    godh, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    assert len(godh) == 2084 and len(session) == 128
    assert open_session(pdh_key, godh, session, 0x1) == (TEK, TIK)


def test_given_godh_key_is_used_and_deterministic():
    pdh_key, pdh = _pdh()
    godh_key = ec.generate_private_key(ec.SECP384R1())
    a = create_session(pdh, 3, godh_private=godh_key, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    b = create_session(pdh, 3, godh_private=godh_key, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    assert a == b
    assert Certificate.from_bytes(a[0]).public_key().public_numbers() == godh_key.public_key().public_numbers()


def test_other_policy_is_refused():
    pdh_key, pdh = _pdh()
    godh, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    with pytest.raises(SessionError, match="policy MAC"):
        open_session(pdh_key, godh, session, 0x0)


def test_other_pdh_key_is_refused():
    _, pdh = _pdh()
    other_key, _ = _pdh()
    godh, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    with pytest.raises(SessionError, match="wrap MAC"):
        open_session(other_key, godh, session, 0x1)


@pytest.mark.parametrize(
    "where",
    [0, 16, 47, 48, 64, 95, 96, 127],
    ids=["nonce", "wrap_tk", "wrap_tk-end", "wrap_iv", "wrap_mac", "wrap_mac-end", "policy_mac", "policy_mac-end"],
)
def test_tampered_session_is_refused(where):
    pdh_key, pdh = _pdh()
    godh, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    bad = bytearray(session)
    bad[where] ^= 1
    with pytest.raises(SessionError):
        open_session(pdh_key, godh, bytes(bad), 0x1)


def test_swapped_godh_is_refused():
    pdh_key, pdh = _pdh()
    _, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    other_godh, _ = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    with pytest.raises(SessionError, match="wrap MAC"):
        open_session(pdh_key, other_godh, session, 0x1)


def test_godh_with_wrong_usage_is_refused():
    pdh_key, pdh = _pdh()
    godh, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    bad = bytearray(godh)
    bad[8:12] = USAGE_PEK.to_bytes(4, "little")
    with pytest.raises(SessionError, match="usage"):
        open_session(pdh_key, bytes(bad), session, 0x1)


def test_pdh_that_is_not_a_dh_key_is_refused():
    key = ec.generate_private_key(ec.SECP384R1())
    pek = Certificate.from_public_key(key.public_key(), usage=USAGE_PEK, algo=ALGO_ECDSA_SHA256)
    with pytest.raises(SessionError, match="usage"):
        create_session(pek, 0, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)


def test_p256_pdh_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SessionError, match="P-384"):
        create_session(Certificate.from_public_key(key.public_key()), 0, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)


@pytest.mark.parametrize("n", [0, 127, 129])
def test_session_of_wrong_length_is_refused(n):
    pdh_key, pdh = _pdh()
    godh, _ = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    with pytest.raises(SessionError, match="128 bytes"):
        open_session(pdh_key, godh, bytes(n), 0x1)


def test_godh_of_wrong_length_is_refused():
    pdh_key, pdh = _pdh()
    _, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    with pytest.raises(SessionError, match="2084 bytes"):
        open_session(pdh_key, bytes(100), session, 0x1)


@pytest.mark.parametrize("field", ["nonce", "tek", "tik", "iv"])
def test_wrong_sized_inputs_are_refused(field):
    _, pdh = _pdh()
    args = dict(nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    args[field] = bytes(15)
    with pytest.raises(SessionError):
        create_session(pdh, 0, **args)


def test_errors_do_not_echo_key_bytes():
    pdh_key, pdh = _pdh()
    godh, session = create_session(pdh, 0x1, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)
    with pytest.raises(SessionError) as err:
        open_session(pdh_key, godh, session, 0x2)
    msg = str(err.value)
    assert TEK.hex() not in msg and TIK.hex() not in msg and "\n" not in msg


def test_session_error_is_a_value_error():
    assert issubclass(SessionError, ValueError)


def test_whole_launch_flow_owner_and_psp_agree():
    """Owner: session -> PSP: measure -> owner: verify + package -> PSP: inject."""
    from agent.sev.guids import LUKS_KEY_GUID
    from agent.sev.measurement import measurement_blob, split_blob, verify_measurement
    from agent.sev.packet import build_packet, open_packet
    from agent.sev.secret_table import build_secret_table, parse_secret_table

    pdh_key, pdh = _pdh()
    policy, digest, mnonce = 0x1, hashlib.sha256(b"firmware").digest(), bytes(range(100, 116))
    godh, session = create_session(pdh, policy, nonce=NONCE, tek=TEK, tik=TIK, iv=IV)

    psp_tek, psp_tik = open_session(pdh_key, godh, session, policy)
    blob = measurement_blob(psp_tik, 1, 55, 21, policy, digest, mnonce)

    assert verify_measurement(blob, TIK, 1, 55, 21, policy, digest)
    measure, _ = split_blob(blob)
    header, ct = build_packet(TIK, TEK, measure, build_secret_table([(LUKS_KEY_GUID, b"pass")]), bytes(16))

    assert parse_secret_table(open_packet(psp_tik, psp_tek, measure, header, ct)) == [(LUKS_KEY_GUID, b"pass")]


def test_session_errors_say_which_check_failed():
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.sev.cert import ALGO_ECDH_SHA256, USAGE_PDH, Certificate
    from agent.sev.session import SessionError, create_session, open_session

    key = ec.generate_private_key(ec.SECP384R1())
    pdh = Certificate.from_public_key(key.public_key(), usage=USAGE_PDH, algo=ALGO_ECDH_SHA256)
    godh, session = create_session(pdh, 1, nonce=bytes(16), tek=bytes(16), tik=bytes(range(16)), iv=bytes(16))
    cases = {
        "policy": lambda: open_session(key, godh, session, 3),
        "wrap-mac": lambda: open_session(key, godh, session[:-40] + bytes(8) + session[-32:], 1),
        "length": lambda: open_session(key, godh, session[:-1], 1),
        "certificate": lambda: open_session(key, godh[:-1], session, 1),
    }
    for kind, call in cases.items():
        with pytest.raises(SessionError) as info:
            call()
        assert info.value.kind == kind
