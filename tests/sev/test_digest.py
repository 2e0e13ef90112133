"""The launch digest: order of the measured data, refusals, and independent checks."""

from __future__ import annotations

import base64
import hashlib

import pytest

from agent.common.errors import SevFormatError
from agent.sev.digest import launch_data, launch_digest
from agent.sev.hashes_table import kernel_hashes_table
from agent.sev.ovmf import Area, FirmwareError, synthetic_image
from agent.sev.vmsa import VmsaOptions, cpu_signature, vmsa_pages
from tests.sev.vectors import (
    SEVCTL_BLOB_ES,
    SEVCTL_BLOB_FIRMWARE,
    SEVCTL_BLOB_KERNEL,
    SEVCTL_DIGEST_ES,
    SEVCTL_DIGEST_FIRMWARE,
    SEVCTL_DIGEST_KERNEL,
    SEVCTL_ES_API,
    SEVCTL_ES_POLICY,
    SEVCTL_MEASURE_API,
    SEVCTL_MEASURE_NONCE,
    SEVCTL_MEASURE_POLICY,
    SEVCTL_MEASURE_TIK,
    SEVCTL_OVMF_NAME,
    sevctl_file,
)

RESET = 0x80B004
SIG = 0x00A00F11
FIRMWARE = synthetic_image(hashes_area=Area(0x80CC00, 0x400), secret_area=Area(0x80C000, 0xC00), reset_address=RESET)
KERNEL = b"\x4d\x5a" + b"k" * 5000
INITRD = b"initrd" * 700


def test_sev_digest_is_sha256_of_the_firmware():
    assert launch_digest(FIRMWARE) == hashlib.sha256(FIRMWARE).digest()


def test_kernel_hashes_table_is_appended_after_the_firmware():
    # QEMU measures the table as its own LAUNCH_UPDATE_DATA after the flash;
    # the flash bytes themselves are not patched.
    parts = launch_data(FIRMWARE, kernel=KERNEL, initrd=INITRD, append="root=/dev/vda")
    assert parts == [FIRMWARE, kernel_hashes_table(KERNEL, INITRD, "root=/dev/vda")]
    assert launch_digest(FIRMWARE, kernel=KERNEL, initrd=INITRD, append="root=/dev/vda") == (
        hashlib.sha256(b"".join(parts)).digest()
    )


def test_sev_es_appends_one_vmsa_per_vcpu_after_the_kernel_table():
    parts = launch_data(FIRMWARE, kernel=KERNEL, sev_es=True, vcpus=3, vcpu_sig=SIG)
    assert parts[:2] == [FIRMWARE, kernel_hashes_table(KERNEL)]
    assert parts[2:] == list(vmsa_pages(3, SIG, RESET))


def test_digest_changes_with_every_input():
    base = dict(kernel=KERNEL, initrd=INITRD, append="a", sev_es=True, vcpus=2, vcpu_sig=SIG)
    variants = [
        base,
        {**base, "kernel": KERNEL + b"!"},
        {**base, "initrd": None},
        {**base, "append": "b"},
        {**base, "vcpus": 3},
        {**base, "vcpu_sig": SIG + 1},
        {**base, "vmsa_options": VmsaOptions(fpu_init=True)},
        {**base, "sev_es": False},
    ]
    digests = {launch_digest(FIRMWARE, **v) for v in variants}
    assert len(digests) == len(variants)


def test_kernel_with_firmware_lacking_the_hashes_entry_is_refused():
    firmware = synthetic_image(reset_address=RESET)
    with pytest.raises(FirmwareError, match="no SEV hashes-table entry"):
        launch_digest(firmware, kernel=KERNEL)


def test_kernel_with_firmware_lacking_the_footer_is_refused():
    with pytest.raises(FirmwareError, match="footer"):
        launch_digest(synthetic_image(footer=False), kernel=KERNEL)


def test_kernel_with_too_small_hashes_area_is_refused():
    firmware = synthetic_image(hashes_area=Area(0x80CC00, 175))
    with pytest.raises(FirmwareError, match="area is invalid"):
        launch_digest(firmware, kernel=KERNEL)


@pytest.mark.parametrize("vcpus", [1, 4])
def test_sev_es_without_reset_block_is_refused(vcpus):
    firmware = synthetic_image(hashes_area=Area(0x80CC00, 0x400))
    with pytest.raises(FirmwareError, match="no SEV-ES reset block"):
        launch_digest(firmware, sev_es=True, vcpus=vcpus, vcpu_sig=SIG)


def test_sev_es_without_signature_is_refused():
    with pytest.raises(SevFormatError, match="signature"):
        launch_digest(FIRMWARE, sev_es=True, vcpus=1)


@pytest.mark.parametrize("extra", [{"initrd": INITRD}, {"append": "x"}])
def test_initrd_or_append_without_kernel_is_refused(extra):
    with pytest.raises(SevFormatError, match="only measured with a kernel"):
        launch_digest(FIRMWARE, **extra)


def test_sev_without_table_is_just_the_firmware_hash():
    plain = synthetic_image(footer=False)
    assert launch_digest(plain) == hashlib.sha256(plain).digest()


# -- sev-snp-measure as an oracle ---------------------------------------------


@pytest.mark.parametrize("sev_es", [False, True], ids=["sev", "seves"])
@pytest.mark.parametrize("vcpus", [1, 2, 8])
@pytest.mark.parametrize(
    "boot",
    [{}, {"kernel": KERNEL}, {"kernel": KERNEL, "initrd": INITRD, "append": "console=ttyS0 quiet"}],
    ids=["firmware", "kernel", "kernel+initrd+append"],
)
def test_digest_matches_sev_snp_measure(tmp_path, sev_es, vcpus, boot):
    guest = pytest.importorskip("sevsnpmeasure.guest")
    from sevsnpmeasure.sev_mode import SevMode

    paths = {}
    for name, data in [("ovmf", FIRMWARE), ("kernel", boot.get("kernel")), ("initrd", boot.get("initrd"))]:
        if data is not None:
            (tmp_path / name).write_bytes(data)
            paths[name] = str(tmp_path / name)
    theirs = guest.calc_launch_digest(
        SevMode.SEV_ES if sev_es else SevMode.SEV,
        vcpus,
        SIG,
        paths["ovmf"],
        paths.get("kernel"),
        paths.get("initrd"),
        boot.get("append"),
        0,
    )
    # sev-snp-measure's SEV-ES VMSA carries the FPU reset state (newer kernels).
    ours = launch_digest(
        FIRMWARE,
        **boot,
        sev_es=sev_es,
        vcpus=vcpus,
        vcpu_sig=SIG,
        vmsa_options=VmsaOptions(fpu_init=True),
    )
    assert ours == theirs


def test_sev_snp_measure_refuses_the_same_firmware_we_refuse(tmp_path):
    guest = pytest.importorskip("sevsnpmeasure.guest")
    from sevsnpmeasure.sev_mode import SevMode

    (tmp_path / "ovmf").write_bytes(synthetic_image(reset_address=RESET))
    (tmp_path / "kernel").write_bytes(KERNEL)
    with pytest.raises(RuntimeError):
        guest.calc_launch_digest(SevMode.SEV, 1, 0, str(tmp_path / "ovmf"), str(tmp_path / "kernel"), None, None, 0)


# -- sevctl's public vectors ----------------------------------------------------


def _measurement_b64(digest: bytes, api: tuple[int, int, int], policy: int, nonce: bytes) -> str:
    # MEASURE = HMAC-SHA256(TIK, 0x04 || major || minor || build || policy || digest || nonce)
    from cryptography.hazmat.primitives import hashes, hmac

    mac = hmac.HMAC(SEVCTL_MEASURE_TIK, hashes.SHA256())
    mac.update(bytes([0x04, *api]) + policy.to_bytes(4, "little") + digest + nonce)
    return base64.b64encode(mac.finalize() + nonce).decode()


def _sevctl_firmware() -> bytes:
    # The last 4 KiB of a CentOS Stream 9 OVMF.amdsev.fd, from virtee/sevctl's
    # tests/data (fixtures/sevctl/README.md).
    return sevctl_file(SEVCTL_OVMF_NAME)


def test_transcribed_sevctl_digests_give_the_published_measurements():
    nonce = SEVCTL_MEASURE_NONCE
    api, policy = SEVCTL_MEASURE_API, SEVCTL_MEASURE_POLICY
    assert _measurement_b64(SEVCTL_DIGEST_FIRMWARE, api, policy, nonce) == SEVCTL_BLOB_FIRMWARE
    assert _measurement_b64(SEVCTL_DIGEST_KERNEL, api, policy, nonce) == SEVCTL_BLOB_KERNEL
    es_nonce = base64.b64decode(SEVCTL_BLOB_ES)[32:]
    assert _measurement_b64(SEVCTL_DIGEST_ES, SEVCTL_ES_API, SEVCTL_ES_POLICY, es_nonce) == SEVCTL_BLOB_ES


def test_sevctl_firmware_vector():
    assert launch_digest(_sevctl_firmware()) == SEVCTL_DIGEST_FIRMWARE


def test_sevctl_kernel_vector():
    digest = launch_digest(
        _sevctl_firmware(),
        kernel=sevctl_file("measurement/vmlinuz-fake"),
        initrd=sevctl_file("measurement/initrd-fake"),
        append="foo bar baz fake kernel=cmdline",
    )
    assert digest == SEVCTL_DIGEST_KERNEL


def test_sevctl_sev_es_vector():
    # 4 vCPUs, VMSAs built by sevctl for family 25 / model 1 / stepping 1 (QEMU).
    digest = launch_digest(_sevctl_firmware(), sev_es=True, vcpus=4, vcpu_sig=cpu_signature(25, 1, 1))
    assert digest == SEVCTL_DIGEST_ES
