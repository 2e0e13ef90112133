"""``keyagent owner measure`` and the launch options ``owner verify`` shares."""

from __future__ import annotations

import argparse
import base64
import hashlib
from pathlib import Path

import pytest

from agent.cli.main import ArgumentParser, main
from agent.common.errors import UsageError
from agent.owner.measure import add_measure_options, digest_from_args, has_measure_options, register
from agent.sev.digest import launch_digest
from agent.sev.ovmf import Area, synthetic_image
from agent.sev.vmsa import VmsaOptions, cpu_signature

RESET = 0x80B004
SIG = cpu_signature(25, 1, 1)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    files = {
        "fw": synthetic_image(hashes_area=Area(0x80CC00, 0x400), reset_address=RESET),
        "fw-no-hashes": synthetic_image(reset_address=RESET),
        "fw-no-footer": synthetic_image(footer=False),
        "fw-no-reset": synthetic_image(hashes_area=Area(0x80CC00, 0x400)),
        "kernel": b"MZ" + b"k" * 3000,
        "initrd": b"initrd" * 100,
        "empty": b"",
    }
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    out["missing"] = tmp_path / "missing"
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["owner", "measure", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prints_the_sev_digest_in_hex(capsys, images):
    code, out, err = run(capsys, "--firmware", images["fw"])
    assert code == 0, err
    assert out == hashlib.sha256(images["fw"].read_bytes()).hexdigest() + "\n"


def test_prints_the_kernel_boot_digest(capsys, images):
    code, out, _ = run(
        capsys,
        "--firmware",
        images["fw"],
        "--kernel",
        images["kernel"],
        "--initrd",
        images["initrd"],
        "--append",
        "root=/dev/vda1 quiet",
    )
    assert code == 0
    expected = launch_digest(
        images["fw"].read_bytes(),
        kernel=images["kernel"].read_bytes(),
        initrd=images["initrd"].read_bytes(),
        append="root=/dev/vda1 quiet",
    )
    assert out.strip() == expected.hex()


def test_sev_es_family_model_stepping_equals_the_signature(capsys, images):
    _, by_fms, _ = run(
        capsys,
        "--firmware",
        images["fw"],
        "--sev-es",
        "--vcpus",
        "4",
        "--vcpu-family",
        "25",
        "--vcpu-model",
        "1",
        "--vcpu-stepping",
        "1",
    )
    _, by_sig, _ = run(capsys, "--firmware", images["fw"], "--sev-es", "--vcpus", "4", "--vcpu-sig", hex(SIG))
    expected = launch_digest(images["fw"].read_bytes(), sev_es=True, vcpus=4, vcpu_sig=SIG)
    assert by_fms.strip() == by_sig.strip() == expected.hex()


def test_vmsa_host_kernel_options_reach_the_vmsa(capsys, images):
    _, out, _ = run(
        capsys,
        "--firmware",
        images["fw"],
        "--sev-es",
        "--vcpus",
        "2",
        "--vcpu-sig",
        str(SIG),
        "--vmsa-fpu-init",
        "--vmsa-sev-features",
        "0",
    )
    expected = launch_digest(
        images["fw"].read_bytes(), sev_es=True, vcpus=2, vcpu_sig=SIG, vmsa_options=VmsaOptions(fpu_init=True)
    )
    assert out.strip() == expected.hex()


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--firmware", "fw-no-hashes", "--kernel", "kernel"], "no SEV hashes-table entry"),
        (["--firmware", "fw-no-footer", "--kernel", "kernel"], "no OVMF GUID table footer"),
        (["--firmware", "fw-no-reset", "--sev-es", "--vcpus", "1", "--vcpu-sig", "1"], "no SEV-ES reset block"),
        (["--firmware", "fw-no-footer", "--sev-es", "--vcpus", "2", "--vcpu-sig", "1"], "no SEV-ES reset block"),
        (["--firmware", "fw", "--initrd", "initrd"], "--initrd needs --kernel"),
        (["--firmware", "fw", "--append", "quiet"], "--append needs --kernel"),
        (["--firmware", "fw", "--vcpus", "2"], "--vcpus only applies with --sev-es"),
        (["--firmware", "fw", "--vcpu-sig", "1"], "--vcpu-sig only applies with --sev-es"),
        (["--firmware", "fw", "--sev-es", "--vcpu-sig", "1"], "--sev-es needs --vcpus"),
        (["--firmware", "fw", "--sev-es", "--vcpus", "0", "--vcpu-sig", "1"], "--vcpus must be"),
        (["--firmware", "fw", "--sev-es", "--vcpus", "1"], "needs --vcpu-sig"),
        (
            ["--firmware", "fw", "--sev-es", "--vcpus", "1", "--vcpu-sig", "1", "--vcpu-family", "25"],
            "either --vcpu-sig or",
        ),
        (["--firmware", "fw", "--sev-es", "--vcpus", "1", "--vcpu-family", "25"], "go together"),
        (
            [
                "--firmware",
                "fw",
                "--sev-es",
                "--vcpus",
                "1",
                "--vcpu-family",
                "25",
                "--vcpu-model",
                "1",
                "--vcpu-stepping",
                "16",
            ],
            "stepping 16 out of range",
        ),
        (["--firmware", "fw", "--sev-es", "--vcpus", "1", "--vcpu-sig", "0x100000000"], "32-bit"),
        (["--firmware", "fw", "--sev-es", "--vcpus", "two", "--vcpu-sig", "1"], "not an integer"),
        (["--firmware", "missing"], "cannot read --firmware"),
        (["--firmware", "empty"], "is empty"),
        (["--firmware", "fw", "--kernel", "missing"], "cannot read --kernel"),
        ([], "required: --firmware"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(capsys, images, argv, reason):
    argv = [str(images[a]) if a in images else a for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert reason in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_register_adds_measure_to_any_owner_subparsers(images, capsys):
    parser = ArgumentParser(prog="owner")
    sub = parser.add_subparsers(dest="owner_command", parser_class=ArgumentParser)
    register(sub)
    args = parser.parse_args(["measure", "--firmware", str(images["fw"])])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(images["fw"].read_bytes()).hexdigest()


def test_digest_from_args_is_none_without_launch_options():
    # `owner verify --digest HEX` then uses its own digest.
    parser = argparse.ArgumentParser()
    add_measure_options(parser)
    args = parser.parse_args([])
    assert not has_measure_options(args)
    assert digest_from_args(args) is None


def test_launch_options_without_firmware_are_refused(images):
    parser = argparse.ArgumentParser()
    add_measure_options(parser)
    args = parser.parse_args(["--kernel", str(images["kernel"])])
    with pytest.raises(UsageError, match="--firmware is required"):
        digest_from_args(args)


def test_owner_verify_accepts_the_measure_options(capsys, images, tmp_path):
    measurement = pytest.importorskip("agent.sev.measurement")
    tik = bytes(range(16))
    (tmp_path / "tik.bin").write_bytes(tik)
    digest = launch_digest(images["fw"].read_bytes(), kernel=images["kernel"].read_bytes())
    blob = measurement.measurement_blob(tik, 1, 49, 21, 1, digest, b"n" * 16)
    common = [
        "owner",
        "verify",
        "--tik",
        str(tmp_path / "tik.bin"),
        "--measurement",
        base64.b64encode(blob).decode(),
        "--api-major",
        "1",
        "--api-minor",
        "49",
        "--build-id",
        "21",
        "--policy",
        "1",
        "--firmware",
        str(images["fw"]),
    ]
    assert main([*common, "--kernel", str(images["kernel"])]) == 0
    assert main(common) == 1  # the firmware alone is a different launch
    capsys.readouterr()


def test_sev_es_digest_matches_sev_snp_measure_cli_module(capsys, images):
    guest = pytest.importorskip("sevsnpmeasure.guest")
    from sevsnpmeasure.sev_mode import SevMode

    theirs = guest.calc_launch_digest(
        SevMode.SEV_ES, 3, SIG, str(images["fw"]), str(images["kernel"]), str(images["initrd"]), "console=ttyS0", 0
    )
    _, out, _ = run(
        capsys,
        "--firmware",
        images["fw"],
        "--kernel",
        images["kernel"],
        "--initrd",
        images["initrd"],
        "--append",
        "console=ttyS0",
        "--sev-es",
        "--vcpus",
        "3",
        "--vcpu-family",
        "25",
        "--vcpu-model",
        "1",
        "--vcpu-stepping",
        "1",
        "--vmsa-fpu-init",
    )
    assert out.strip() == theirs.hex()


def test_sevctl_sev_es_vector_through_the_cli(capsys):
    from tests.sev.vectors import SEVCTL_DATA, SEVCTL_DIGEST_ES, SEVCTL_OVMF_NAME

    _, out, _ = run(
        capsys,
        "--firmware",
        SEVCTL_DATA / SEVCTL_OVMF_NAME,
        "--sev-es",
        "--vcpus",
        "4",
        "--vcpu-family",
        "25",
        "--vcpu-model",
        "1",
        "--vcpu-stepping",
        "1",
    )
    assert out.strip() == SEVCTL_DIGEST_ES.hex()


def test_prints_the_secret_area_it_found_beside_the_digest(capsys):
    from tests.sev.vectors import SEVCTL_DATA, SEVCTL_DIGEST_FIRMWARE, SEVCTL_OVMF_NAME

    code, out, err = run(capsys, "--firmware", SEVCTL_DATA / SEVCTL_OVMF_NAME)
    assert code == 0 and out == SEVCTL_DIGEST_FIRMWARE.hex() + "\n"
    assert err == "keyagent: SEV secret area gpa 0x80c000 size 0xc00\n"


def test_json_names_the_digest_and_an_unusable_secret_area(capsys, tmp_path):
    import json

    fw = tmp_path / "debian-like.fd"
    fw.write_bytes(synthetic_image(secret_area=Area(0, 0), hashes_area=Area(0, 0)))
    code, out, _ = run(capsys, "--firmware", fw, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["digest"] == hashlib.sha256(fw.read_bytes()).hexdigest()
    area = doc["secret_area"]
    assert (area["gpa"], area["size"], area["usable"]) == (0, 0, False)
    assert "base 0x0 size 0x0" in area["problem"]


@pytest.mark.parametrize(
    "policy, es, words",
    [
        ("1", True, "needs a policy with the SEV-ES bit 0x4; policy 0x1 has none"),
        ("5", False, "policy 0x5 has the SEV-ES bit 0x4, but the digest is an SEV digest"),
    ],
)
def test_owner_verify_refuses_a_policy_that_does_not_fit_the_launch(capsys, images, tmp_path, policy, es, words):
    (tmp_path / "tik.bin").write_bytes(bytes(16))
    argv = [
        "owner",
        "verify",
        "--tik",
        str(tmp_path / "tik.bin"),
        "--measurement",
        base64.b64encode(bytes(48)).decode(),
        "--api-major",
        "1",
        "--api-minor",
        "49",
        "--build-id",
        "21",
        "--policy",
        policy,
        "--firmware",
        str(images["fw"]),
    ]
    if es:
        argv += ["--sev-es", "--vcpus", "1", "--vcpu-sig", str(SIG)]
    assert main(argv) == 2
    assert words in capsys.readouterr().err
