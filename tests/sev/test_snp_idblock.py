"""SNP ID block and ID_AUTH_INFO: sev-snp-measure's public vector and AMD's signature layout."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from sevsnpmeasure.id_block import snp_calc_id_block

from agent.sev.snp_idblock import (
    ID_AUTH,
    ID_BLOCK,
    PUBLIC_KEY,
    SIGNATURE,
    IdBlock,
    SnpFormatError,
    check_id_auth,
    decode_public_key,
    decode_signature,
    encode_public_key,
    key_digest,
    policy_problem,
    sign,
    sign_id_block,
    verify,
)
from tests.sev.snp_vectors import (
    AUTHOR_KEY,
    ID_KEY,
    IDBLOCK_AUTHOR_KEY_DIGEST,
    IDBLOCK_B64,
    IDBLOCK_ID_KEY_DIGEST,
    IDBLOCK_LD,
    IDBLOCK_POLICY,
)


def _key(path) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def test_layout_sizes_are_the_spec_s():
    assert (ID_BLOCK.size, ID_AUTH.size, SIGNATURE.size, PUBLIC_KEY.size) == (0x60, 0x1000, 0x200, 0x404)


def test_sev_snp_measure_public_vector():
    signed = sign_id_block(IdBlock(IDBLOCK_LD, IDBLOCK_POLICY), _key(ID_KEY), _key(AUTHOR_KEY))
    assert base64.b64encode(signed.id_block).decode() == IDBLOCK_B64
    assert signed.id_key_digest == IDBLOCK_ID_KEY_DIGEST
    assert signed.author_key_digest == IDBLOCK_AUTHOR_KEY_DIGEST


def test_id_block_bytes_equal_snp_create_id_block_and_each_auth_verifies_the_other_s():
    ld = bytes(range(48))
    out = snp_calc_id_block(ld, str(ID_KEY), str(AUTHOR_KEY)).splitlines()[0]
    theirs_block, theirs_auth = (base64.b64decode(part.split("=", 1)[1]) for part in out.split(","))
    signed = sign_id_block(IdBlock(ld, 0x30000), _key(ID_KEY), _key(AUTHOR_KEY))
    assert signed.id_block == theirs_block
    # ECDSA is randomised: the auth bytes differ, but each verifies as the PSP checks it
    for auth in (theirs_auth, signed.id_auth):
        check = check_id_auth(signed.id_block, auth)
        assert check.block_signature and check.id_key_signature
        assert check.id_key_digest == signed.id_key_digest
        assert check.author_key_digest == signed.author_key_digest
    # the unsigned parts (algorithms, keys, reserved) are byte-identical
    assert theirs_auth[:0x40] == signed.id_auth[:0x40]
    assert theirs_auth[0x240:0x680] == signed.id_auth[0x240:0x680]
    assert theirs_auth[0x880:] == signed.id_auth[0x880:]


def test_signature_is_little_endian_r_and_s_zero_extended_to_72_bytes():
    key = _key(ID_KEY)
    data = b"some bytes"
    raw = sign(key, data)
    r = int.from_bytes(raw[:72], "little")
    s = int.from_bytes(raw[72:144], "little")
    assert raw[48:72] == bytes(24) and raw[120:144] == bytes(24) and raw[144:] == bytes(368)
    key.public_key().verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA384()))
    assert decode_signature(raw) == encode_dss_signature(r, s)


def test_public_key_structure_is_curve_2_then_little_endian_qx_qy():
    pub = _key(ID_KEY).public_key()
    raw = encode_public_key(pub)
    n = pub.public_numbers()
    assert raw[:4] == (2).to_bytes(4, "little")
    assert int.from_bytes(raw[4:76], "little") == n.x and int.from_bytes(raw[76:148], "little") == n.y
    assert decode_public_key(raw).public_numbers() == n
    assert key_digest(pub) == IDBLOCK_ID_KEY_DIGEST


@settings(max_examples=40, deadline=None)
@given(bit=st.integers(0, 0x200 * 8 - 1))
def test_any_flipped_bit_in_a_signature_fails_verification(bit):
    key = _key(ID_KEY)
    raw = bytearray(sign(key, b"block"))
    raw[bit // 8] ^= 1 << (bit % 8)
    assert not verify(key.public_key(), b"block", bytes(raw))


def test_tampered_id_block_fails_its_id_auth():
    signed = sign_id_block(IdBlock(IDBLOCK_LD, IDBLOCK_POLICY), _key(ID_KEY), _key(AUTHOR_KEY))
    tampered = bytearray(signed.id_block)
    tampered[0x58] ^= 0x08  # policy bit 19: DEBUG
    assert not check_id_auth(bytes(tampered), signed.id_auth).block_signature


def test_other_curves_are_refused():
    with pytest.raises(SnpFormatError, match="P-384"):
        sign(ec.generate_private_key(ec.SECP256R1()), b"x")


@pytest.mark.parametrize(
    "field,value", [("launch_digest", bytes(47)), ("family_id", bytes(15)), ("image_id", bytes(17))]
)
def test_id_block_fields_of_the_wrong_size_are_refused(field, value):
    kwargs = dict(launch_digest=bytes(48), policy=0x30000)
    kwargs[field] = value
    with pytest.raises(SnpFormatError, match="must be"):
        IdBlock(**kwargs)


def test_id_block_round_trips():
    block = IdBlock(bytes(range(48)), 0x30000, b"f" * 16, b"i" * 16, 7)
    assert IdBlock.from_bytes(block.to_bytes()) == block


@pytest.mark.parametrize(
    "policy,problem", [(0x30000, None), (0x10000, "bit 17"), (0x1 << 40 | 0x20000, "63:26"), (0x20000 | 1 << 19, None)]
)
def test_policy_problems(policy, problem):
    got = policy_problem(policy)
    assert (got is None) if problem is None else (problem in got)
