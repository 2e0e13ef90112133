"""`keyagent owner measure --snp`, `owner idblock`, `owner verify-report` as a user runs them."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cli.main import main
from agent.sev.snp_idblock import IdBlock, check_id_auth
from tests.executable import KEYAGENT
from tests.sev.snp_chain import authority, signed_report, vcek
from tests.sev.snp_firmware import snp_firmware
from tests.sev.snp_oracle import oracle_digest
from tests.sev.snp_vectors import (
    AUTHOR_KEY,
    ID_KEY,
    IDBLOCK_AUTHOR_KEY_DIGEST,
    IDBLOCK_B64,
    IDBLOCK_ID_KEY_DIGEST,
    IDBLOCK_LD,
    MILAN_MEASUREMENT,
    MILAN_REPORT_DATA,
    SNP_DATA,
    milan_report,
)

DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")
needs_debian_ovmf = pytest.mark.skipif(not DEBIAN_OVMF.is_file(), reason="Debian's ovmf package is not installed")
BIN = Path(sys.executable).parent
MILAN_VCEK = str(SNP_DATA / "vcek_milan.der")


def owner(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["owner", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage(capsys, words: str, *args: str) -> None:
    code, out, err = owner(capsys, *args)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyagent: error: "), err
    assert words in lines[0], lines[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, data in {
        "fw": snp_firmware(),
        "kernel": b"MZ" + b"\x01" * 5000,
        "initrd": b"rd" * 999,
        "report.bin": milan_report(),
        "report.hex": milan_report().hex().encode(),
    }.items():
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    return out


# -- measure --snp -------------------------------------------------------------


@needs_debian_ovmf
def test_measure_snp_of_debian_ovmf_equals_sev_snp_measure_s_cli(capsys):
    code, out, _ = owner(
        capsys, "measure", "--snp", "--firmware", str(DEBIAN_OVMF), "--vcpus", "2", "--vcpu-type", "EPYC-Milan"
    )
    assert code == 0
    theirs = subprocess.run(
        [
            str(BIN / "sev-snp-measure"),
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-Milan",
            "--ovmf",
            str(DEBIAN_OVMF),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert theirs.returncode == 0, theirs.stderr
    assert out.strip() == theirs.stdout.strip()
    assert len(bytes.fromhex(out.strip())) == 48


def test_measure_snp_with_kernel_initrd_append_and_guest_features(capsys, files):
    code, out, _ = owner(
        capsys,
        "measure",
        "--snp",
        "--firmware",
        str(files["fw"]),
        "--kernel",
        str(files["kernel"]),
        "--initrd",
        str(files["initrd"]),
        "--append",
        "console=ttyS0",
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-Genoa",
        "--guest-features",
        "0x21",
        "--json",
    )
    assert code == 0
    got = json.loads(out)
    want = oracle_digest(
        files["fw"],
        vcpus=4,
        vcpu_type="EPYC-Genoa",
        kernel=files["kernel"],
        initrd=files["initrd"],
        append="console=ttyS0",
        guest_features=0x21,
    )
    assert got == {"digest": want.hex(), "mode": "snp"}


def test_measure_snp_takes_a_vcpu_signature_instead_of_a_type(capsys, files):
    by_type = owner(
        capsys, "measure", "--snp", "--firmware", str(files["fw"]), "--vcpus", "1", "--vcpu-type", "EPYC-Milan"
    )[1]
    by_fms = owner(
        capsys,
        "measure",
        "--snp",
        "--firmware",
        str(files["fw"]),
        "--vcpus",
        "1",
        "--vcpu-family",
        "25",
        "--vcpu-model",
        "1",
        "--vcpu-stepping",
        "1",
    )[1]
    by_sig = owner(
        capsys, "measure", "--snp", "--firmware", str(files["fw"]), "--vcpus", "1", "--vcpu-sig", "0xa00f11"
    )[1]
    assert by_type == by_fms == by_sig


@pytest.mark.parametrize(
    "args,words",
    [
        (["--vcpu-type", "EPYC"], "--snp needs --vcpus N"),
        (["--vcpus", "1"], "--snp needs --vcpu-type"),
        (["--vcpus", "1", "--vcpu-type", "EPYC-Nope"], "unknown vCPU type 'EPYC-Nope'"),
        (["--vcpus", "0", "--vcpu-type", "EPYC"], "--vcpus must be between 1 and"),
        (["--vcpus", "1", "--vcpu-type", "EPYC", "--vcpu-sig", "1"], "not --vcpu-type and --vcpu-sig"),
        (["--vcpus", "1", "--vcpu-type", "EPYC", "--sev-es"], "--snp and --sev-es"),
        (["--vcpus", "1", "--vcpu-type", "EPYC", "--vmsa-sev-features", "1"], "use --guest-features"),
        (["--vcpus", "1", "--vcpu-type", "EPYC", "--guest-features", "xyz"], "--guest-features is not a hex number"),
        (["--vcpus", "1", "--vcpu-type", "EPYC", "--initrd", "x"], "--initrd needs --kernel"),
        (["--vcpus", "1", "--vcpu-type", "EPYC", "--append", "x"], "--append needs --kernel"),
    ],
)
def test_measure_snp_bad_options_are_one_line_usage_errors(capsys, files, args, words):
    assert_usage(capsys, words, "measure", "--snp", "--firmware", str(files["fw"]), *args)


def test_snp_only_options_without_snp_are_refused(capsys, files):
    assert_usage(
        capsys, "--vcpu-type only applies with --snp", "measure", "--firmware", str(files["fw"]), "--vcpu-type", "EPYC"
    )
    assert_usage(
        capsys,
        "--guest-features only applies with --snp",
        "measure",
        "--firmware",
        str(files["fw"]),
        "--guest-features",
        "1",
    )


def test_measure_snp_of_a_missing_or_unsuitable_firmware_is_a_usage_error(capsys, tmp_path, files):
    assert_usage(
        capsys,
        "does not exist",
        "measure",
        "--snp",
        "--firmware",
        str(tmp_path / "nope"),
        "--vcpus",
        "1",
        "--vcpu-type",
        "EPYC",
    )
    plain = tmp_path / "plain.fd"
    plain.write_bytes(b"\xff" * 8192)
    assert_usage(
        capsys,
        "cannot launch an SNP guest",
        "measure",
        "--snp",
        "--firmware",
        str(plain),
        "--vcpus",
        "1",
        "--vcpu-type",
        "EPYC",
    )


# -- idblock -------------------------------------------------------------------


def test_idblock_public_vector(capsys):
    code, out, _ = owner(
        capsys,
        "idblock",
        "--digest",
        IDBLOCK_LD.hex(),
        "--policy",
        "0x30000",
        "--id-key",
        str(ID_KEY),
        "--author-key",
        str(AUTHOR_KEY),
    )
    assert code == 0
    got = json.loads(out)
    assert sorted(got) == ["author_key_digest", "id_auth", "id_block", "id_key_digest"]
    assert got["id_block"] == IDBLOCK_B64
    assert got["id_key_digest"] == IDBLOCK_ID_KEY_DIGEST.hex()
    assert got["author_key_digest"] == IDBLOCK_AUTHOR_KEY_DIGEST.hex()
    check = check_id_auth(base64.b64decode(got["id_block"]), base64.b64decode(got["id_auth"]))
    assert check.block_signature and check.id_key_signature


def test_idblock_equals_snp_create_id_block_s_cli(capsys):
    ld = bytes(range(100, 148))
    code, out, _ = owner(
        capsys,
        "idblock",
        "--digest",
        ld.hex(),
        "--policy",
        "30000",
        "--id-key",
        str(ID_KEY),
        "--author-key",
        str(AUTHOR_KEY),
    )
    assert code == 0
    theirs = subprocess.run(
        [
            str(BIN / "snp-create-id-block"),
            "--measurement",
            base64.b64encode(ld).decode(),
            "--idkey",
            str(ID_KEY),
            "--authorkey",
            str(AUTHOR_KEY),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert theirs.returncode == 0, theirs.stderr
    first = theirs.stdout.splitlines()[0]
    assert first.split(",")[0] == "id-block=" + json.loads(out)["id_block"]


def test_idblock_family_image_and_svn_land_in_the_block(capsys):
    code, out, _ = owner(
        capsys,
        "idblock",
        "--digest",
        "ab" * 48,
        "--policy",
        "0x30000",
        "--id-key",
        str(ID_KEY),
        "--author-key",
        str(AUTHOR_KEY),
        "--family-id",
        "01" * 16,
        "--image-id",
        "02" * 16,
        "--svn",
        "7",
    )
    assert code == 0
    block = IdBlock.from_bytes(base64.b64decode(json.loads(out)["id_block"]))
    assert block == IdBlock(b"\xab" * 48, 0x30000, b"\x01" * 16, b"\x02" * 16, 7)


@pytest.fixture
def bad_keys(tmp_path: Path) -> dict[str, Path]:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    out = {
        "p256": p256.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "encrypted": p384.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        ),
        "garbage": b"not a key",
    }
    paths = {}
    for name, data in out.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    "over,words",
    [
        ({"--digest": "ab" * 32}, "--digest must be 48 bytes"),
        ({"--digest": "zz"}, "--digest is not valid hex"),
        ({"--policy": "0x10000"}, "lacks bit 17"),
        ({"--policy": "1" + "0" * 17}, "64-bit"),
        ({"--family-id": "01"}, "--family-id must be 16 bytes"),
        ({"--image-id": "01" * 17}, "--image-id must be 16 bytes"),
        ({"--svn": "-1"}, "--svn must be a 32-bit value"),
        ({"--id-key": "p256"}, "is not an ECDSA P-384 key"),
        ({"--author-key": "encrypted"}, "is encrypted"),
        ({"--id-key": "garbage"}, "is not a PEM private key"),
        ({"--author-key": "missing"}, "does not exist"),
    ],
)
def test_idblock_bad_inputs_are_one_line_usage_errors(capsys, bad_keys, tmp_path, over, words):
    args = {"--digest": "ab" * 48, "--policy": "0x30000", "--id-key": str(ID_KEY), "--author-key": str(AUTHOR_KEY)}
    for flag, value in over.items():
        args[flag] = str(bad_keys.get(value, tmp_path / value)) if flag.endswith("-key") else value
    assert_usage(capsys, words, "idblock", *[x for kv in args.items() for x in kv])


def test_idblock_never_prints_private_key_material(capsys):
    code, out, err = owner(
        capsys,
        "idblock",
        "--digest",
        "ab" * 48,
        "--policy",
        "0x30000",
        "--id-key",
        str(ID_KEY),
        "--author-key",
        str(AUTHOR_KEY),
    )
    assert code == 0
    for path in (ID_KEY, AUTHOR_KEY):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        scalar = key.private_numbers().private_value
        for form in (scalar.to_bytes(48, "big"), scalar.to_bytes(48, "little")):
            for text in (form.hex(), base64.b64encode(form).decode()):
                assert text not in out + err
        body = b"".join(path.read_bytes().splitlines()[1:-1]).decode()
        assert body[:40] not in out + err


# -- verify-report -------------------------------------------------------------


@pytest.mark.parametrize("report", ["report.bin", "report.hex"])
def test_verify_report_real_milan_report_is_valid(capsys, files, report):
    code, out, _ = owner(capsys, "verify-report", "--report", str(files[report]), "--vcek", MILAN_VCEK)
    assert code == 0
    got = json.loads(out)
    assert got["valid"] is True and got["product"] == "milan"
    assert all(c["ok"] for c in got["checks"])
    assert got["report"]["measurement"] == MILAN_MEASUREMENT.hex()


def test_verify_report_checks_each_field_asked_for(capsys, files):
    code, out, _ = owner(
        capsys,
        "verify-report",
        "--report",
        str(files["report.bin"]),
        "--vcek",
        MILAN_VCEK,
        "--product",
        "milan",
        "--digest",
        MILAN_MEASUREMENT.hex(),
        "--policy",
        "0x30000",
        "--report-data",
        MILAN_REPORT_DATA.hex(),
        "--host-data",
        "00" * 32,
    )
    assert code == 0
    names = [c["name"] for c in json.loads(out)["checks"]]
    assert {"measurement", "policy", "report_data", "host_data"} <= set(names)


@pytest.mark.parametrize(
    "args,failed",
    [
        (["--digest", "00" * 48], ["measurement"]),
        (["--policy", "0x30001"], ["policy"]),
        (["--report-data", "00" * 64], ["report_data"]),
        (["--host-data", "01" * 32], ["host_data"]),
        (["--product", "genoa"], ["vcek_chain"]),
    ],
)
def test_verify_report_mismatch_exits_1_naming_the_failed_check(capsys, files, args, failed):
    code, out, _ = owner(capsys, "verify-report", "--report", str(files["report.bin"]), "--vcek", MILAN_VCEK, *args)
    assert code == 1
    got = json.loads(out)
    assert got["valid"] is False
    assert [c["name"] for c in got["checks"] if not c["ok"]] == failed


def test_verify_report_flipped_bits_exit_1(capsys, tmp_path):
    report = milan_report()
    for bit in range(0, len(report) * 8, 613):
        flipped = bytearray(report)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path = tmp_path / "r.bin"
        path.write_bytes(bytes(flipped))
        code, out, _ = owner(capsys, "verify-report", "--report", str(path), "--vcek", MILAN_VCEK)
        assert code == 1 and json.loads(out)["valid"] is False, bit


def test_verify_report_with_test_roots_from_amd_roots_dir(capsys, tmp_path):
    roots = tmp_path / "roots"
    roots.mkdir()
    for name, data in authority("turin").pems().items():
        (roots / name).write_bytes(data)
    _, cert = vcek("turin")
    (tmp_path / "vcek.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "r.bin").write_bytes(signed_report("turin"))
    args = ["verify-report", "--report", str(tmp_path / "r.bin"), "--vcek", str(tmp_path / "vcek.pem")]
    code, out, _ = owner(capsys, *args, "--amd-roots", str(roots))
    assert code == 0 and json.loads(out)["product"] == "turin"
    code, out, _ = owner(capsys, *args)  # AMD's roots do not vouch for the test chain
    assert code == 1 and json.loads(out)["checks"][2]["name"] == "vcek_chain"


@pytest.mark.parametrize(
    "args,words",
    [
        (["--report", "short"], "an SNP report is 1184"),
        (["--report", "missing"], "does not exist"),
        (["--vcek", "garbage"], "is not an X.509 certificate"),
        (["--digest", "00" * 32], "--digest must be 48 bytes"),
        (["--report-data", "00" * 48], "--report-data must be 64 bytes"),
        (["--host-data", "0g"], "--host-data is not valid hex"),
        (["--policy", "0x"], "--policy is not a hex number"),
        (["--product", "rome"], "invalid choice"),
        (["--amd-roots", "missing"], "--amd-roots:"),
    ],
)
def test_verify_report_bad_inputs_exit_2(capsys, files, tmp_path, args, words):
    (tmp_path / "short").write_bytes(b"ab" * 100)
    (tmp_path / "garbage").write_bytes(b"\x30\x03abc")
    base = {"--report": str(files["report.bin"]), "--vcek": MILAN_VCEK}
    flag, value = args
    base[flag] = str(tmp_path / value) if flag in ("--report", "--vcek", "--amd-roots") else value
    argv = ["verify-report", *[x for kv in base.items() for x in kv]]
    assert_usage(capsys, words, *argv)


def test_verify_report_product_missing_from_the_roots_dir_is_a_usage_error(capsys, files, tmp_path):
    for name, data in authority("genoa").pems().items():
        (tmp_path / name).write_bytes(data)
    assert_usage(
        capsys,
        "--product milan: no such roots",
        "verify-report",
        "--report",
        str(files["report.bin"]),
        "--vcek",
        MILAN_VCEK,
        "--amd-roots",
        str(tmp_path),
        "--product",
        "milan",
    )


def test_verify_report_exit_codes_through_the_installed_command(files):
    ok = subprocess.run(
        [*KEYAGENT, "owner", "verify-report", "--report", str(files["report.bin"]), "--vcek", MILAN_VCEK],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [
            *KEYAGENT,
            "owner",
            "verify-report",
            "--report",
            str(files["report.bin"]),
            "--vcek",
            MILAN_VCEK,
            "--digest",
            "00" * 48,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and json.loads(bad.stdout)["valid"] is False
