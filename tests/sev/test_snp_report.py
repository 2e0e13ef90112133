"""SNP attestation report verification: virtee/sev's real Milan report, and test chains made here."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sev.snp_ca import (
    SnpCertError,
    builtin_snp_roots,
    load_snp_roots_dir,
    load_vcek,
    roots_valid,
    signed_by,
    vcek_product,
)
from agent.sev.snp_report import (
    REPORT_SIZE,
    SIGNED_SIZE,
    AttestationReport,
    Expected,
    SnpFormatError,
    Tcb,
    verify_report,
)
from agent.sev.snp_sign import encode_tcb
from tests.sev.snp_chain import CHIP_ID, TCB, authority, signed_report, vcek
from tests.sev.snp_vectors import (
    MILAN_CHIP_ID_PREFIX,
    MILAN_MEASUREMENT,
    MILAN_POLICY,
    MILAN_REPORT_DATA,
    SNP_DATA,
    milan_report,
    milan_vcek,
)

ROOTS = builtin_snp_roots()


def test_builtin_roots_are_amd_s_self_consistent_chains():
    assert [r.product for r in ROOTS] == ["milan", "genoa", "turin"]
    assert all(roots_valid(r) for r in ROOTS)
    assert {r.ark.subject.rfc4514_string().split(",")[0] for r in ROOTS} == {
        "CN=ARK-Milan",
        "CN=ARK-Genoa",
        "CN=ARK-Turin",
    }


def test_real_milan_report_verifies_against_amd_s_milan_roots():
    verdict = verify_report(milan_report(), milan_vcek(), ROOTS)
    assert verdict.valid, verdict.as_dict()["checks"]
    assert verdict.product == "milan"
    names = [c.name for c in verdict.checks]
    assert names == ["version", "signature_algo", "vcek_chain", "signing_key", "signature", "reported_tcb", "chip_id"]


def test_real_milan_report_fields_are_read_at_the_spec_s_offsets():
    rep = AttestationReport.from_bytes(milan_report())
    assert rep.version == 2 and rep.policy == MILAN_POLICY and rep.vmpl == 0
    assert rep.measurement == MILAN_MEASUREMENT and rep.report_data == MILAN_REPORT_DATA
    assert rep.chip_id.startswith(MILAN_CHIP_ID_PREFIX)
    assert Tcb.decode(rep.reported_tcb, "milan") == Tcb(bootloader=3, tee=0, snp=8, microcode=115)


def test_real_milan_report_with_every_expected_field():
    expected = Expected(
        measurement=MILAN_MEASUREMENT,
        policy=MILAN_POLICY,
        report_data=MILAN_REPORT_DATA,
        host_data=bytes(32),
        id_key_digest=bytes(48),
        author_key_digest=bytes(48),
    )
    verdict = verify_report(milan_report(), milan_vcek(), ROOTS, product="milan", expected=expected)
    assert verdict.valid
    assert [c.name for c in verdict.checks][-6:] == [
        "measurement",
        "report_data",
        "host_data",
        "id_key_digest",
        "author_key_digest",
        "policy",
    ]


@pytest.mark.parametrize(
    "expected,failed",
    [
        (Expected(measurement=bytes(48)), ("measurement",)),
        (Expected(policy=0x30001), ("policy",)),
        (Expected(report_data=bytes(64)), ("report_data",)),
        (Expected(host_data=b"\x01" * 32), ("host_data",)),
        (Expected(id_key_digest=b"\x01" * 48), ("id_key_digest",)),
        (Expected(measurement=MILAN_MEASUREMENT[:47]), ("measurement",)),
    ],
)
def test_real_milan_report_with_a_wrong_expectation_fails_only_that_check(expected, failed):
    verdict = verify_report(milan_report(), milan_vcek(), ROOTS, expected=expected)
    assert not verdict.valid and verdict.failed == failed


def test_real_milan_vcek_does_not_chain_to_genoa_or_turin():
    for product in ("genoa", "turin"):
        verdict = verify_report(milan_report(), milan_vcek(), ROOTS, product=product)
        assert "vcek_chain" in verdict.failed and verdict.product is None


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_7th_flipped_bit_of_the_real_report_fails():
    report, cert = milan_report(), load_vcek(milan_vcek())
    passed = [bit for bit in range(0, REPORT_SIZE * 8, 7) if verify_report(_flip(report, bit), cert, ROOTS).valid]
    assert passed == []


@settings(max_examples=300, deadline=None)
@given(bit=st.integers(0, REPORT_SIZE * 8 - 1))
def test_any_flipped_bit_of_the_real_report_fails(bit):
    assert not verify_report(_flip(milan_report(), bit), milan_vcek(), ROOTS).valid


@pytest.mark.slow
def test_each_flipped_bit_of_the_real_report_fails():
    report, cert = milan_report(), load_vcek(milan_vcek())
    assert not any(verify_report(_flip(report, bit), cert, ROOTS).valid for bit in range(REPORT_SIZE * 8))


def test_flipped_bits_in_the_vcek_signature_break_the_chain():
    der = milan_vcek()
    cert = load_vcek(der)
    sig_at = der.rindex(cert.signature)
    for bit in range(0, len(cert.signature) * 8, 61):
        flipped = load_vcek(_flip(der, sig_at * 8 + bit))
        assert vcek_product(flipped, ROOTS) is None


def test_a_report_of_the_wrong_size_is_bad_input():
    with pytest.raises(SnpFormatError, match="not 1184"):
        verify_report(milan_report()[:-1], milan_vcek(), ROOTS)


def test_a_vcek_that_is_not_a_p384_certificate_is_bad_input():
    with pytest.raises(SnpCertError, match="not an X.509"):
        verify_report(milan_report(), b"garbage", ROOTS)
    ark_der = ROOTS[0].ark.public_bytes(serialization.Encoding.DER)
    with pytest.raises(SnpCertError, match="P-384"):
        load_vcek(ark_der)


def test_pem_vcek_is_accepted():
    pem = load_vcek(milan_vcek()).public_bytes(serialization.Encoding.PEM)
    assert verify_report(milan_report(), pem, ROOTS).valid


# -- test chains ---------------------------------------------------------------


@pytest.mark.parametrize("product", ["milan", "genoa", "turin"])
def test_test_chain_reports_verify_only_against_their_own_roots(product):
    _, cert = vcek(product)
    report = signed_report(product)
    assert verify_report(report, cert, [authority(product).roots]).valid
    assert verify_report(report, cert, ROOTS).failed[:1] == ("vcek_chain",)


def test_turin_tcb_layout_puts_fmc_first():
    raw = encode_tcb(TCB["turin"], "turin")
    assert raw[0] == 2 and raw[1] == TCB["turin"].bootloader and raw[3] == TCB["turin"].snp
    assert Tcb.decode(raw, "turin") == TCB["turin"]


def test_reported_tcb_other_than_the_vcek_s_fails():
    _, cert = vcek()
    older = Tcb(bootloader=2, tee=0, snp=8, microcode=115)
    verdict = verify_report(signed_report(reported_tcb=encode_tcb(older, "milan")), cert, [authority().roots])
    assert verdict.failed == ("reported_tcb",)


def test_chip_id_other_than_the_vcek_s_fails_and_a_masked_one_must_be_zero():
    _, cert = vcek()
    roots = [authority().roots]
    assert verify_report(signed_report(chip_id=b"\x01" * 64), cert, roots).failed == ("chip_id",)
    assert verify_report(signed_report(chip_id=bytes(64), key_info=0b10), cert, roots).valid
    assert verify_report(signed_report(chip_id=CHIP_ID, key_info=0b10), cert, roots).failed == ("chip_id",)


def test_a_report_signed_by_a_vlek_is_not_accepted_under_a_vcek():
    _, cert = vcek()
    verdict = verify_report(signed_report(key_info=1 << 2), cert, [authority().roots])
    assert verdict.failed == ("signing_key",)


def test_unknown_version_and_signature_algorithm_fail():
    _, cert = vcek()
    roots = [authority().roots]
    assert verify_report(signed_report(version=1), cert, roots).failed == ("version",)
    assert verify_report(signed_report(signature_algo=2), cert, roots).failed == ("signature_algo",)


def test_a_report_signed_by_another_chip_fails_the_signature_check():
    other_key = ec.generate_private_key(ec.SECP384R1())
    _, cert = vcek()
    from agent.sev.snp_sign import build_report

    report = build_report(other_key, reported_tcb=encode_tcb(TCB["milan"], "milan"), chip_id=CHIP_ID)
    assert verify_report(report, cert, [authority().roots]).failed == ("signature",)


def test_a_vcek_signed_with_pkcs1v15_instead_of_pss_does_not_chain():
    auth = authority()
    key = ec.generate_private_key(ec.SECP384R1())
    _, good = vcek()
    builder = (
        x509.CertificateBuilder()
        .subject_name(good.subject)
        .issuer_name(good.issuer)
        .public_key(key.public_key())
        .serial_number(9)
        .not_valid_before(good.not_valid_before_utc)
        .not_valid_after(good.not_valid_after_utc)
    )
    for ext in good.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(auth.ask_key, hashes.SHA384(), rsa_padding=padding.PKCS1v15())
    assert not signed_by(cert, auth.roots.ask)
    assert signed_by(good, auth.roots.ask)


def test_roots_dir_holds_product_pem_pairs(tmp_path: Path):
    for name, data in authority("genoa").pems().items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "genoa-ark.cert").write_bytes(b"an SEV root beside it is ignored")
    roots = load_snp_roots_dir(tmp_path)
    assert [r.product for r in roots] == ["genoa"]
    _, cert = vcek("genoa")
    assert verify_report(signed_report("genoa"), cert, roots).valid


def test_roots_dir_problems_are_one_line_errors(tmp_path: Path):
    with pytest.raises(SnpCertError, match="holds no"):
        load_snp_roots_dir(tmp_path)
    pems = authority("milan").pems()
    (tmp_path / "milan-ark.pem").write_bytes(pems["milan-ark.pem"])
    with pytest.raises(SnpCertError, match="no milan-ask.pem beside it"):
        load_snp_roots_dir(tmp_path)
    (tmp_path / "milan-ask.pem").write_bytes(authority("genoa").pems()["genoa-ask.pem"])
    with pytest.raises(SnpCertError, match="does not sign"):
        load_snp_roots_dir(tmp_path)


def test_signed_part_is_everything_before_the_signature():
    assert SIGNED_SIZE == 0x2A0 and REPORT_SIZE - SIGNED_SIZE == 0x200


def test_builtin_milan_roots_are_the_chain_amd_s_kds_served_with_the_real_report():
    served = x509.load_pem_x509_certificates((SNP_DATA / "cert_chain_milan").read_bytes())
    milan = next(r for r in ROOTS if r.product == "milan")
    assert [c.fingerprint(hashes.SHA256()) for c in served] == [
        milan.ask.fingerprint(hashes.SHA256()),
        milan.ark.fingerprint(hashes.SHA256()),
    ]


@pytest.mark.parametrize("directory", [SNP_DATA, Path(__file__).resolve().parents[2] / "agent" / "sev" / "snp_roots"])
def test_snp_data_is_in_the_tree_with_its_origin_and_licence(directory):
    readme = (directory / "README.md").read_text()
    assert "github.com/virtee/" in readme and "Apache-2.0" in readme
    for path in directory.iterdir():
        if path.name != "README.md":
            assert path.name in readme or path.name.split("-")[0] in readme, path.name
