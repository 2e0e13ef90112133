"""AMD's ARK/ASK format and the full platform chain, against real AMD data.

fixtures/sev/{naples,rome} are real platform chains and agent/sev/roots AMD's
public roots, both from virtee/sev (see fixtures/sev/README.md).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.sev.ca import (
    PRODUCTS,
    AmdRoots,
    CaCertificate,
    builtin_roots,
    load_roots_dir,
    pdh_sha256,
    verify_platform,
)
from agent.sev.cert import (
    ALGO_ECDH_SHA256,
    ALGO_ECDSA_SHA256,
    CERT_LEN,
    USAGE_OCA,
    USAGE_PDH,
    USAGE_PEK,
    Certificate,
    PlatformChain,
    Signature,
)
from agent.tools.sim.amd import SimAmd, shared_amd
from tests.sev.amd_chains import FIXTURES, NAMES, REAL_PRODUCTS, flip, parse, real_certs

ROOTS = builtin_roots()


def by_product(name: str) -> AmdRoots:
    return next(r for r in ROOTS if r.product == name)


# -- the roots ------------------------------------------------------------------


def test_builtin_roots_are_every_product_each_ask_signed_by_its_ark():
    assert [r.product for r in ROOTS] == list(PRODUCTS)
    for root in ROOTS:
        assert root.ark.key_id == root.ark.certifying_id == root.ask.certifying_id
        assert root.ask.is_signed_by(root.ark) and root.ark.is_signed_by(root.ark)
    assert by_product("naples").ark.modulus_bits == 2048
    assert {by_product(p).ark.modulus_bits for p in PRODUCTS[1:]} == {4096}


@pytest.mark.parametrize("product", PRODUCTS)
def test_ca_certificate_round_trips_byte_for_byte(product):
    from importlib import resources

    for kind in ("ark", "ask"):
        raw = (resources.files("agent.sev") / "roots" / f"{product}-{kind}.cert").read_bytes()
        assert CaCertificate.from_bytes(raw).to_bytes() == raw


def test_the_truncated_naples_ark_amd_once_published_is_refused():
    bad = (FIXTURES / "naples" / "ark.cert.bad").read_bytes()
    with pytest.raises(ValueError, match="must be 832 bytes for a 2048-bit key, got 576"):
        CaCertificate.from_bytes(bad)


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("kind", ["ark", "ask"])
def test_one_flipped_bit_in_a_root_certificate_is_refused(product, kind):
    root = by_product(product)
    raw = {"ark": root.ark.to_bytes(), "ask": root.ask.to_bytes()}
    for bit in range(0, len(raw[kind]) * 8, 61):
        damaged = dict(raw, **{kind: flip(raw[kind], bit)})
        with pytest.raises(ValueError):
            AmdRoots.from_bytes(product, damaged["ark"], damaged["ask"])


def test_an_ask_from_another_product_does_not_load_under_this_ark():
    with pytest.raises(ValueError, match="rome ASK is not signed by its ARK"):
        AmdRoots.from_bytes("rome", by_product("rome").ark.to_bytes(), by_product("milan").ask.to_bytes())


def test_roots_dir_loads_every_product_and_names_a_missing_ask(tmp_path):
    amd = SimAmd(bits=2048, product="lab")
    amd.write_roots(str(tmp_path))
    (roots,) = load_roots_dir(tmp_path)
    assert roots.product == "lab" and roots.ask.to_bytes() == amd.ask.to_bytes()
    (tmp_path / "lab-ask.cert").unlink()
    with pytest.raises(ValueError, match="lab-ask.cert is missing"):
        load_roots_dir(tmp_path)
    with pytest.raises(ValueError, match="holds no <product>-ark.cert"):
        load_roots_dir(tmp_path / "..")  # tmp_path's parent holds directories only
    with pytest.raises(ValueError, match="cannot read AMD roots directory"):
        load_roots_dir(tmp_path / "nope")


# -- real chains ---------------------------------------------------------------


@pytest.mark.parametrize("product", REAL_PRODUCTS)
def test_real_platform_chain_verifies_to_the_builtin_root_of_its_product(product):
    pdh, chain = parse(real_certs(product))
    assert verify_platform(pdh, chain, ROOTS).product == product


@pytest.mark.parametrize("product", REAL_PRODUCTS)
def test_real_chain_is_refused_by_every_other_products_root(product):
    pdh, chain = parse(real_certs(product))
    others = tuple(r for r in ROOTS if r.product != product)
    with pytest.raises(ValueError, match="CEK is"):
        verify_platform(pdh, chain, others)


def _assert_every_flip_refused(product: str, name: str, step: int) -> None:
    certs = real_certs(product)
    for bit in range(0, CERT_LEN * 8, step):
        damaged = dict(certs, **{name: flip(certs[name], bit)})
        try:
            pdh, chain = parse(damaged)
            verify_platform(pdh, chain, ROOTS)
        except ValueError:
            continue
        pytest.fail(f"{product} {name} with bit {bit} (byte 0x{bit // 8:x}) flipped still verifies")


@pytest.mark.parametrize("product", REAL_PRODUCTS)
@pytest.mark.parametrize("name", NAMES)
def test_one_flipped_bit_anywhere_in_a_real_chain_is_refused(product, name):
    # every 89th bit: each field of the layout, quickly; the slow test takes every bit
    _assert_every_flip_refused(product, name, 89)


@pytest.mark.slow
@pytest.mark.parametrize("product", REAL_PRODUCTS)
@pytest.mark.parametrize("name", NAMES)
def test_every_single_bit_flip_in_a_real_chain_is_refused(product, name):
    _assert_every_flip_refused(product, name, 1)


def test_a_nonzero_byte_in_an_unsigned_slot_is_refused():
    certs = real_certs("rome")
    pdh = Certificate.from_bytes(certs["pdh"])
    for damaged in (
        replace(pdh, sig2=Signature(sig=b"\x01" + bytes(511))),
        replace(pdh, sig1=replace(pdh.sig1, sig=pdh.sig1.sig[:500] + b"\x01" + bytes(11))),
    ):
        with pytest.raises(ValueError, match="PDH certificate's .*signature slot"):
            verify_platform(damaged, parse(certs)[1], ROOTS)


def test_chain_without_the_asks_signature_on_the_cek_is_refused():
    certs = real_certs("rome")
    pdh, chain = parse(certs)
    bare = replace(chain, cek=replace(chain.cek, sig1=Signature()))
    with pytest.raises(ValueError, match="CEK certificate carries no ASK signature"):
        verify_platform(pdh, bare, ROOTS)


# -- made-up platforms -------------------------------------------------------------


def _ec(usage: int, algo: int = ALGO_ECDSA_SHA256):
    key = ec.generate_private_key(ec.SECP384R1())
    return key, Certificate.from_public_key(key.public_key(), usage=usage, algo=algo)


def made_up_platform(cek_key, cek: Certificate, *, pek_signers=("oca", "cek")):
    """OCA, PEK and PDH made here around a given CEK."""
    oca_key, oca = _ec(USAGE_OCA)
    oca = oca.signed(oca_key, USAGE_OCA)
    pek_key, pek = _ec(USAGE_PEK)
    if "oca" in pek_signers:
        pek = pek.signed(oca_key, USAGE_OCA)
    if "cek" in pek_signers:
        pek = pek.signed(cek_key, 0x1004)
    _, pdh = _ec(USAGE_PDH, ALGO_ECDH_SHA256)
    return pdh.signed(pek_key, USAGE_PEK), PlatformChain(pek=pek, oca=oca, cek=cek)


def test_a_self_made_chain_is_refused_by_amds_roots_but_verifies_to_its_own():
    amd = shared_amd()
    cek_key, cek = _ec(0x1004)
    pdh, chain = made_up_platform(cek_key, amd.sign_cek(cek))
    with pytest.raises(ValueError, match="CEK is not signed by any trusted AMD ASK"):
        verify_platform(pdh, chain, ROOTS)
    assert verify_platform(pdh, chain, (amd.roots(),)).product == "sim"


def test_a_made_up_cek_without_any_ask_signature_is_refused():
    cek_key, cek = _ec(0x1004)
    pdh, chain = made_up_platform(cek_key, cek.signed(cek_key, 0x1004))
    with pytest.raises(ValueError, match="carries no ASK signature"):
        verify_platform(pdh, chain, ROOTS)


def test_a_pek_signed_by_the_oca_but_not_the_real_cek_is_refused():
    # a real, AMD-signed CEK taken from a Rome chain; the rest made here
    real_cek = parse(real_certs("rome"))[1].cek
    pdh, chain = made_up_platform(None, real_cek, pek_signers=("oca",))
    with pytest.raises(ValueError, match="PEK certificate is not signed by the chain's CEK"):
        verify_platform(pdh, chain, ROOTS)


def test_a_real_pek_with_its_cek_signature_removed_is_refused():
    pdh, chain = parse(real_certs("naples"))
    only_oca = replace(chain, pek=replace(chain.pek, sig2=Signature()))
    with pytest.raises(ValueError, match="PEK certificate is not signed by the chain's CEK"):
        verify_platform(pdh, only_oca, ROOTS)


def test_pdh_pin_is_the_sha256_of_the_certificate_as_sent():
    import hashlib

    raw = real_certs("naples")["pdh"]
    assert pdh_sha256(raw) == hashlib.sha256(raw).hexdigest()


def test_a_second_signature_nobody_asked_for_is_refused():
    certs = real_certs("rome")
    pdh, chain = parse(certs)
    extra = replace(pdh, sig2=Signature(0x1004, ALGO_ECDSA_SHA256, bytes(512)))
    with pytest.raises(ValueError, match="PDH certificate's signature slot 2 has usage 0x1004, which does not sign"):
        verify_platform(extra, chain, ROOTS)
    twice = replace(pdh, sig2=replace(pdh.sig1, sig=bytes(1) + pdh.sig1.sig[1:]))
    with pytest.raises(ValueError, match="slot 2 is not a valid signature by the PEK"):
        verify_platform(twice, chain, ROOTS)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(
    product=st.sampled_from(REAL_PRODUCTS),
    name=st.sampled_from(NAMES),
    at=st.integers(0, CERT_LEN - 1),
    junk=st.binary(min_size=1, max_size=64),
)
def test_any_overwritten_run_of_bytes_in_a_real_chain_is_refused(product, name, at, junk):
    certs = real_certs(product)
    raw = certs[name]
    damaged = raw[:at] + junk[: CERT_LEN - at] + raw[at + len(junk) :]
    if damaged == raw:
        return
    try:
        pdh, chain = parse(dict(certs, **{name: damaged}))
        verify_platform(pdh, chain, ROOTS)
    except ValueError:
        return
    pytest.fail(f"{product} {name} overwritten at 0x{at:x} still verifies")
