"""The firmware's secret area: the owner answers its gpa, or refuses a secret the guest could not read."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import pytest

from agent.common.errors import UsageError
from agent.common.logs import setup_logging
from agent.owner.config import load_owner_config
from agent.owner.secret_area import SecretArea, area_from_firmware, area_refusal, table_length
from agent.owner.service import OwnerService, decide_secret
from agent.sev.ovmf import Area, synthetic_image
from agent.sev.secret_table import build_secret_table

from .conftest import PASSPHRASE, firmware_blob, write_firmware_owner_dir, write_owner_dir

IV = bytes(range(100, 116))
AMDSEV_AREA = Area(0x80C000, 0xC00)  # OvmfPkg/AmdSev, as in sevctl's OVMF.amdsev.fd
# Debian's stock OVMF.fd (2022.11): the secret-block entry is there, base 0 size 0.
DEBIAN_LIKE = synthetic_image(secret_area=Area(0, 0), hashes_area=Area(0, 0), reset_address=0x80B004)
DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")


def release_for(d):
    config = load_owner_config(d.toml)
    blob = firmware_blob(d)
    body = d.request(measurement=base64.b64encode(blob).decode())
    return config, decide_secret(config, body, attested=set(), iv=IV)


def test_table_length_is_what_the_table_builder_makes():
    for lengths in ([1], [31], [24], [100, 3], [16343]):
        table = build_secret_table([(uuid.uuid4(), b"x" * n) for n in lengths])
        assert table_length(lengths) == len(table)


def test_firmware_with_a_secret_area_answers_its_gpa(tmp_path):
    d = write_firmware_owner_dir(tmp_path, synthetic_image(secret_area=AMDSEV_AREA))
    config, decision = release_for(d)
    assert config.vms["vm1"].secret_area == SecretArea("firmware", 0x80C000, 0xC00)
    assert decision.status == 200, decision.body
    assert decision.body["gpa"] == 0x80C000


def test_debian_like_firmware_area_base_0_size_0_is_refused_403(tmp_path):
    d = write_firmware_owner_dir(tmp_path, DEBIAN_LIKE)
    config, decision = release_for(d)
    assert config.vms["vm1"].gpa is None
    assert (decision.status, decision.decision) == (403, "refused")
    assert decision.body["error"].startswith("no usable secret area: ")
    assert "base 0x0 size 0x0" in decision.body["error"]
    assert decision.reason == decision.body["error"]


def test_firmware_without_a_secret_area_entry_is_refused_403(tmp_path):
    d = write_firmware_owner_dir(tmp_path, synthetic_image(hashes_area=Area(0x80CC00, 0x400)))
    _, decision = release_for(d)
    assert decision.status == 403
    assert "no usable secret area: firmware has no SEV secret area" in decision.body["error"]


def test_firmware_without_any_guid_table_is_refused_403(tmp_path):
    d = write_firmware_owner_dir(tmp_path, b"\x90" * 4096)
    _, decision = release_for(d)
    assert decision.status == 403 and "no OVMF GUID table footer" in decision.body["error"]


def test_secret_table_larger_than_the_firmware_area_is_refused_403(tmp_path):
    # 20 + 20 + 31-byte passphrase = 71, padded to 80 > a 64-byte area
    d = write_firmware_owner_dir(tmp_path, synthetic_image(secret_area=Area(0x80C000, 64)))
    _, decision = release_for(d)
    assert decision.status == 403
    assert decision.body["error"] == ("secret table does not fit: 80 bytes, the secret area at 0x80c000 holds 64")


def test_table_that_just_fits_is_released(tmp_path):
    d = write_firmware_owner_dir(tmp_path, synthetic_image(secret_area=Area(0x80C000, 80)))
    assert release_for(d)[1].status == 200


def test_refusal_is_in_the_audit_line(tmp_path):
    d = write_firmware_owner_dir(tmp_path, DEBIAN_LIKE)
    config, decision = release_for(d)
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        OwnerService(config).audit(decision)
    finally:
        setup_logging("info")
    (line,) = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert line["decision"] == "refused" and line["status"] == 403
    assert line["reason"].startswith("no usable secret area") and PASSPHRASE.decode() not in buf.getvalue()


def test_digest_vm_with_secret_gpa_and_size_is_checked(tmp_path):
    d = write_owner_dir(tmp_path)
    d.toml.write_text(d.toml.read_text().replace("gpa = 8192\n", "secret_gpa = 0x80c000\nsecret_size = 64\n"))
    config = load_owner_config(d.toml)
    assert config.vms["vm1"].secret_area == SecretArea("config", 0x80C000, 64)
    decision = decide_secret(config, d.request(), attested=set(), iv=IV)
    assert decision.status == 403 and "does not fit: 80 bytes" in decision.body["error"]
    d.toml.write_text(d.toml.read_text().replace("secret_size = 64", "secret_size = 0x1000"))
    decision = decide_secret(load_owner_config(d.toml), d.request(), attested=set(), iv=IV)
    assert decision.status == 200 and decision.body["gpa"] == 0x80C000


def test_digest_vm_alone_keeps_todays_answer_and_is_logged_once_as_unchecked(tmp_path):
    d = write_owner_dir(tmp_path)
    d.toml.write_text(d.toml.read_text().replace("gpa = 8192\n", ""))
    config = load_owner_config(d.toml)
    decision = decide_secret(config, d.request(), attested=set(), iv=IV)
    assert decision.status == 200 and "gpa" not in decision.body
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        OwnerService(config).log_secret_areas()
    finally:
        setup_logging("info")
    (line,) = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert line["event"] == "owner secret area unchecked" and line["vm"] == "vm1"
    assert "cannot check its secret area" in line["detail"]


def test_unusable_firmware_area_is_logged_at_start(tmp_path):
    config = load_owner_config(write_firmware_owner_dir(tmp_path, DEBIAN_LIKE).toml)
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        OwnerService(config).log_secret_areas()
    finally:
        setup_logging("info")
    (line,) = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert line["level"] == "warning" and "launches will be refused" in line["event"]


@pytest.mark.parametrize(
    "lines, words",
    [
        ("secret_gpa = 0x80c000\ngpa = 0x80c000", "gpa is the older name of secret_gpa"),
        ("secret_size = 0x1000", "secret_size needs secret_gpa"),
        ("secret_gpa = 0", "guest address 0 is no firmware's secret area"),
        ("secret_gpa = 0x80c000\nsecret_size = 0", "secret_size must be in 1..4294967295"),
        ("secret_gpa = -1", "secret_gpa must be in"),
    ],
)
def test_bad_secret_area_keys(tmp_path, lines, words):
    d = write_owner_dir(tmp_path)
    d.toml.write_text(d.toml.read_text().replace("gpa = 8192\n", lines + "\n"))
    with pytest.raises(UsageError, match=words):
        load_owner_config(d.toml)


def test_firmware_vm_may_not_name_its_own_area(tmp_path):
    d = write_firmware_owner_dir(tmp_path, synthetic_image(secret_area=AMDSEV_AREA), "secret_gpa = 0x80c000")
    with pytest.raises(UsageError, match="the firmware gives the secret area"):
        load_owner_config(d.toml)


def test_area_refusal_of_an_unknown_area_is_none():
    assert area_refusal(SecretArea(), 16384) is None
    assert area_refusal(SecretArea("config", 0x1000, None), 16384) is None


@pytest.mark.skipif(not DEBIAN_OVMF.is_file(), reason="Debian's ovmf package is not installed")
def test_debians_stock_ovmf_has_no_usable_secret_area():
    area = area_from_firmware(DEBIAN_OVMF.read_bytes())
    assert (area.gpa, area.size) == (0, 0) and area.problem is not None
