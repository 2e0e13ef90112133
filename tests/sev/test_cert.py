import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.sev.cert import (
    ALGO_ECDH_SHA256,
    ALGO_ECDSA_SHA256,
    CERT_LEN,
    CURVE_P384,
    USAGE_INVALID,
    USAGE_OCA,
    USAGE_PDH,
    USAGE_PEK,
    Certificate,
)


def _sparse(runs: dict[int, str]) -> bytes:
    """A 2084-byte certificate from its non-zero runs (offset -> hex)."""
    out = bytearray(CERT_LEN)
    for off, hx in runs.items():
        raw = bytes.fromhex(hx)
        out[off : off + len(raw)] = raw
    return bytes(out)


# virtee/sev tests/naples/pdh.cert and pek.cert (a real AMD Naples chain),
# transcribed as their non-zero byte runs.
NAPLES_PDH = _sparse(
    {
        0x000: "01",
        0x005: "10000003100000030000000200000095522057542425d53ac6e94f8f5f2477e6089e1919f11062ac87b4fe3a3fc1ae9ec352"
        "f6afc9c134a1b6d5d608490236",
        0x05C: "036ff19f20ab2ae9841dd2f63617a450b45be0a126d79d71195c5ec44bf44045f4821911b405586997421b11b29bc83e",
        0x414: "0210000002000000e5b25c29237ad43aa0e2e1bce829b7eca875bca50f02e2fdc51e0a2c224118351790f13ba85169f34d40"
        "9dadd2cd2809",
        0x464: "9eb612d9b6d5f8e7bca7f72c6304a5c6ebe1f1b6ebe8460903d2215b858160a711427fbfcb672f7817ade58175645350",
        0x61D: "10",
    }
)
NAPLES_PEK = _sparse(
    {
        0x000: "01",
        0x005: "1000000210000002000000020000002b5331da2f7add5ffb24f6366c321fb8fb717367fa0ac4d880cb44379333007c162d3c"
        "c270fe2da64f8c35ba54f262b1",
        0x05C: "97ef43e336163153ac92f9289a31e09968641d57d27c66898d4fbd21fd7b72f2e80edfd7373ee7ac65f8e8b7539caea2",
        0x414: "01100000020000005415e535158b6fdaa86d9a93d115660d559e69cfaccddb73cb85ffcfef7856f8d588b0c3fa1ee64754c5"
        "ee96427a9cda",
        0x464: "040ba28ac7d9401463bbf397d259334c52cb6f307062d946fd6075e4b762075e28e56207f4dd69784b238743f471446c",
        0x61C: "0410000002000000846e900295da9e5cc0f0361a33e9411e737c3036d6504283bab26f1be75b2beded3f0151fcc191522a60"
        "4866d438067e",
        0x66C: "2b87bd339de8209ff35a623d70903f41c7a1c4afa927684c3c971c68a999252b17d3be6d1c7559dd1801f5f2cde17d84",
    }
)


def test_naples_pdh_fields_parse():
    pdh = Certificate.from_bytes(NAPLES_PDH)
    assert (pdh.version, pdh.api_major, pdh.api_minor) == (1, 0, 16)
    assert (pdh.usage, pdh.algo, pdh.curve) == (USAGE_PDH, ALGO_ECDH_SHA256, CURVE_P384)
    assert (pdh.sig1.usage, pdh.sig1.algo) == (USAGE_PEK, ALGO_ECDSA_SHA256)
    assert pdh.sig2.usage == USAGE_INVALID and pdh.sig2.is_empty()
    key = pdh.public_key()  # a valid P-384 point, so the coordinates are read right
    assert key.curve.name == "secp384r1"


def test_naples_certificates_round_trip_exactly():
    for raw in (NAPLES_PDH, NAPLES_PEK):
        assert Certificate.from_bytes(raw).to_bytes() == raw


def test_naples_pdh_is_signed_by_its_pek():
    # the same check as virtee/sev tests/naples/pdh.rs `verify`
    pdh, pek = Certificate.from_bytes(NAPLES_PDH), Certificate.from_bytes(NAPLES_PEK)
    assert pdh.is_signed_by(pek)
    assert not pek.is_signed_by(pdh)


def test_tampered_body_breaks_the_signature():
    raw = bytearray(NAPLES_PDH)
    raw[0x05] ^= 1  # api_minor
    assert not Certificate.from_bytes(bytes(raw)).is_signed_by(Certificate.from_bytes(NAPLES_PEK))


@pytest.mark.parametrize("n", [0, 2083, 2085, 4168])
def test_wrong_length_is_a_one_line_value_error(n):
    with pytest.raises(ValueError) as err:
        Certificate.from_bytes(bytes(n))
    assert str(err.value) == f"SEV certificate must be 2084 bytes, got {n}"


def test_unknown_version_is_refused():
    raw = bytearray(NAPLES_PDH)
    raw[0] = 2
    with pytest.raises(ValueError, match="version"):
        Certificate.from_bytes(bytes(raw))


def test_point_off_the_curve_is_refused():
    raw = bytearray(NAPLES_PDH)
    raw[0x14] ^= 1  # first byte of QX
    with pytest.raises(ValueError, match="not a point"):
        Certificate.from_bytes(bytes(raw)).public_key()


def test_from_public_key_round_trips_the_point():
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    cert = Certificate.from_public_key(key)
    raw = cert.to_bytes()
    assert len(raw) == CERT_LEN
    assert raw[:0x10] == bytes.fromhex("01000000000000000310000003000000")
    assert Certificate.from_bytes(raw).public_key().public_numbers() == key.public_numbers()
    # the coordinates are little-endian in 72-byte fields
    assert raw[0x14 : 0x14 + 48] == key.public_numbers().x.to_bytes(48, "little")
    assert raw[0x5C : 0x5C + 48] == key.public_numbers().y.to_bytes(48, "little")


def test_signed_fills_slots_and_verifies():
    oca_key = ec.generate_private_key(ec.SECP384R1())
    oca = Certificate.from_public_key(oca_key.public_key(), usage=USAGE_OCA, algo=ALGO_ECDSA_SHA256)
    pek_key = ec.generate_private_key(ec.SECP384R1())
    pek = Certificate.from_public_key(pek_key.public_key(), usage=USAGE_PEK, algo=ALGO_ECDSA_SHA256)
    pek = pek.signed(oca_key, USAGE_OCA)
    assert pek.is_signed_by(oca)
    assert Certificate.from_bytes(pek.to_bytes()).is_signed_by(oca)
    pek2 = pek.signed(pek_key, USAGE_PEK)
    assert not pek2.sig2.is_empty()
    with pytest.raises(ValueError):
        pek2.signed(oca_key, USAGE_OCA)


# -- the platform chain (PEK || OCA || CEK) --------------------------------------

from agent.sev.cert import (  # noqa: E402
    CHAIN_LEN,
    USAGE_CEK,
    PlatformChain,
    verify_pdh_chain,
)


def _key():
    return ec.generate_private_key(ec.SECP384R1())


def build_chain(*, pek_signers=("oca", "cek"), pdh_signer="pek"):
    """A platform chain made here (AMD's ARK/ASK are out of reach)."""
    keys = {name: _key() for name in ("oca", "cek", "pek", "pdh", "other")}
    usage = {"oca": USAGE_OCA, "cek": USAGE_CEK, "pek": USAGE_PEK, "other": USAGE_OCA}
    oca = Certificate.from_public_key(keys["oca"].public_key(), usage=USAGE_OCA, algo=ALGO_ECDSA_SHA256)
    oca = oca.signed(keys["oca"], USAGE_OCA)
    cek = Certificate.from_public_key(keys["cek"].public_key(), usage=USAGE_CEK, algo=ALGO_ECDSA_SHA256)
    pek = Certificate.from_public_key(keys["pek"].public_key(), usage=USAGE_PEK, algo=ALGO_ECDSA_SHA256)
    for signer in pek_signers:
        pek = pek.signed(keys[signer], usage[signer])
    pdh = Certificate.from_public_key(keys["pdh"].public_key(), usage=USAGE_PDH, algo=ALGO_ECDH_SHA256)
    pdh = pdh.signed(keys[pdh_signer], USAGE_PEK)
    return pdh, PlatformChain(pek=pek, oca=oca, cek=cek)


def test_chain_round_trips_in_pek_oca_cek_order():
    pdh, chain = build_chain()
    raw = chain.to_bytes()
    assert len(raw) == CHAIN_LEN == 3 * CERT_LEN
    assert raw[8:12] == USAGE_PEK.to_bytes(4, "little")
    assert raw[CERT_LEN + 8 : CERT_LEN + 12] == USAGE_OCA.to_bytes(4, "little")
    assert raw[2 * CERT_LEN + 8 : 2 * CERT_LEN + 12] == USAGE_CEK.to_bytes(4, "little")
    assert PlatformChain.from_bytes(raw) == chain
    verify_pdh_chain(pdh, PlatformChain.from_bytes(raw))


def test_naples_pdh_verifies_against_its_pek_in_a_chain():
    # the real PEK; OCA/CEK here are stand-ins, so only the PDH link is real
    pek = Certificate.from_bytes(NAPLES_PEK)
    pdh = Certificate.from_bytes(NAPLES_PDH)
    assert pdh.is_signed_by(pek)


@pytest.mark.parametrize("n", [0, CERT_LEN, CHAIN_LEN - 1, CHAIN_LEN + CERT_LEN])
def test_chain_of_wrong_length_is_refused(n):
    with pytest.raises(ValueError, match=f"must be {CHAIN_LEN} bytes"):
        PlatformChain.from_bytes(bytes(n))


def test_chain_in_the_wrong_order_is_refused():
    _, chain = build_chain()
    swapped = chain.oca.to_bytes() + chain.pek.to_bytes() + chain.cek.to_bytes()
    with pytest.raises(ValueError, match="certificate 1 of the chain has usage 0x1001, not PEK"):
        PlatformChain.from_bytes(swapped)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"pdh_signer": "other"}, "PDH certificate is not signed by the chain's PEK"),
        ({"pek_signers": ("cek",)}, "PEK certificate is not signed by the chain's OCA"),
        ({"pek_signers": ("oca",)}, "PEK certificate is not signed by the chain's CEK"),
        ({"pek_signers": ("other", "cek")}, "not signed by the chain's OCA"),
    ],
)
def test_each_broken_link_is_named(kwargs, words):
    pdh, chain = build_chain(**kwargs)
    with pytest.raises(ValueError, match=words):
        verify_pdh_chain(pdh, chain)


def test_a_pdh_from_another_platform_is_refused():
    pdh, _ = build_chain()
    _, chain = build_chain()
    with pytest.raises(ValueError, match="PDH certificate is not signed"):
        verify_pdh_chain(pdh, chain)


def test_chain_check_refuses_a_non_pdh_certificate():
    _, chain = build_chain()
    with pytest.raises(ValueError, match="not PDH"):
        verify_pdh_chain(chain.pek, chain)
