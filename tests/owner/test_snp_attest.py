"""SEV-SNP guest-driven attestation: /v1/snp/challenge and /v1/snp/attest (agent.owner.snp_attest)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.common.errors import UsageError
from agent.io.http import Request
from agent.owner.config import load_owner_config
from agent.owner.service import OwnerService
from agent.owner.snp_attest import (
    MAX_NONCES_PER_VM,
    NONCE_TTL_S,
    NonceEntry,
    decide_attest,
    decide_challenge,
    open_answer,
    report_data_for,
)
from agent.sev.guids import resolve_guid
from tests.sev.snp_chain import authority, signed_report, vcek

DIGEST = b"\x11" * 48
POLICY = 0x30000
HOST_DATA = b"\x33" * 32
SECRET = b"snp-disk-passphrase-0123456789"
NONCE = b"\x5a" * 32


def write_snp_owner(root: Path, *, roots: bool = True, extra: str = "") -> Path:
    (root / "disk.pass").write_bytes(SECRET)
    platform = ""
    if roots:
        (root / "roots").mkdir()
        for name, pem in authority().pems().items():
            (root / "roots" / name).write_bytes(pem)
        platform = '[platform]\namd_roots = "roots"\n'
    toml = root / "owner.toml"
    toml.write_text(f"""{platform}
[vm.snp1]
snp = true
policy = "0x30000"
snp_digest = "{DIGEST.hex()}"
host_data = "{HOST_DATA.hex()}"
{extra}
[[vm.snp1.secret]]
guid = "luks-key"
file = "disk.pass"
""")
    return toml


@pytest.fixture
def config(tmp_path):
    return load_owner_config(write_snp_owner(tmp_path))


class Guest:
    """The guest's side: a key pair and a report for a nonce."""

    def __init__(self) -> None:
        self.key = X25519PrivateKey.generate()
        self.pub = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def body(self, nonce: bytes = NONCE, vm: str = "snp1", **report_fields) -> dict:
        fields = dict(
            report_data=report_data_for(nonce, self.pub), measurement=DIGEST, policy=POLICY, host_data=HOST_DATA
        )
        fields.update(report_fields)
        report = signed_report(**fields)
        return {
            "vm": vm,
            "nonce": base64.b64encode(nonce).decode(),
            "report": base64.b64encode(report).decode(),
            "vcek": base64.b64encode(vcek()[1].public_bytes(serialization.Encoding.DER)).decode(),
            "pubkey": base64.b64encode(self.pub).decode(),
        }


def store(vm="snp1", created=0.0, used=False):
    return {NONCE: NonceEntry(vm, created, used)}


def test_verified_report_gets_the_secrets_sealed_to_the_guest_key(config):
    guest = Guest()
    d = decide_attest(config, guest.body(), now=1.0, nonces=store())
    assert d.status == 200, d.reason
    assert d.use == NONCE
    assert len(base64.b64decode(d.body["enc"])) == 32
    secrets = open_answer(d.body, guest.key, "snp1")
    assert secrets == {str(resolve_guid("luks-key")): SECRET}


def test_answer_does_not_open_with_another_key_or_vm_name(config):
    guest = Guest()
    d = decide_attest(config, guest.body(), now=1.0, nonces=store())
    with pytest.raises(ValueError, match="does not open"):
        open_answer(d.body, X25519PrivateKey.generate(), "snp1")
    with pytest.raises(ValueError, match="does not open"):
        open_answer(d.body, guest.key, "snp2")


def test_challenge_issues_a_nonce_for_an_snp_vm(config):
    d = decide_challenge(config, {"vm": "snp1"}, nonce=NONCE, now=5.0, nonces={})
    assert d.status == 200 and base64.b64decode(d.body["nonce"]) == NONCE
    assert d.issue == (NONCE, NonceEntry("snp1", 5.0))


def test_challenge_for_unknown_vm_is_404(config):
    assert decide_challenge(config, {"vm": "nope"}, nonce=NONCE, now=0, nonces={}).status == 404


def test_too_many_outstanding_challenges_is_429(config):
    nonces = {bytes([i]) * 32: NonceEntry("snp1", 0.0) for i in range(MAX_NONCES_PER_VM)}
    d = decide_challenge(config, {"vm": "snp1"}, nonce=NONCE, now=1.0, nonces=nonces)
    assert d.status == 429 and d.issue is None
    # expired ones do not count
    assert decide_challenge(config, {"vm": "snp1"}, nonce=NONCE, now=NONCE_TTL_S + 1, nonces=nonces).status == 200


@pytest.mark.parametrize(
    "fields, failed",
    [
        ({"measurement": b"\x12" * 48}, "measurement"),
        ({"policy": 0x30001}, "policy"),
        ({"host_data": b"\x34" * 32}, "host_data"),
        ({"report_data": b"\x00" * 64}, "report_data"),
    ],
)
def test_report_with_wrong_field_is_403(config, fields, failed):
    d = decide_attest(config, Guest().body(**fields), now=1.0, nonces=store())
    assert d.status == 403 and failed in d.reason and d.use == NONCE
    assert "enc" not in d.body


def test_report_data_binds_the_public_key(config):
    guest, other = Guest(), Guest()
    body = guest.body()
    body["pubkey"] = base64.b64encode(other.pub).decode()  # the host swaps in its own key
    d = decide_attest(config, body, now=1.0, nonces=store())
    assert d.status == 403 and "report_data" in d.reason


def test_flipped_report_bit_is_403(config):
    body = Guest().body()
    raw = bytearray(base64.b64decode(body["report"]))
    raw[0x90] ^= 1  # a measurement bit: the signature no longer verifies
    body["report"] = base64.b64encode(bytes(raw)).decode()
    d = decide_attest(config, body, now=1.0, nonces=store())
    assert d.status == 403 and "signature" in d.reason


def test_unknown_nonce_is_403(config):
    d = decide_attest(config, Guest().body(), now=1.0, nonces={})
    assert d.status == 403 and "unknown nonce" in d.reason and d.use is None


def test_nonce_of_another_vm_is_unknown(config):
    d = decide_attest(config, Guest().body(), now=1.0, nonces=store(vm="other"))
    assert d.status == 403 and "unknown nonce" in d.reason


def test_used_nonce_is_409(config):
    d = decide_attest(config, Guest().body(), now=1.0, nonces=store(used=True))
    assert d.status == 409


def test_expired_nonce_is_403(config):
    d = decide_attest(config, Guest().body(), now=NONCE_TTL_S + 1, nonces=store())
    assert d.status == 403 and "expired" in d.reason


def test_roots_not_configured_refuse_the_test_chain(tmp_path):
    config = load_owner_config(write_snp_owner(tmp_path, roots=False))  # AMD's real roots only
    d = decide_attest(config, Guest().body(), now=1.0, nonces=store())
    assert d.status == 403 and "vcek_chain" in d.reason


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("nonce", "AAAA", "must be 32 bytes"),
        ("report", "!!", "not valid base64"),
        ("pubkey", base64.b64encode(b"x" * 31).decode(), "must be 32 bytes"),
        ("vcek", base64.b64encode(b"not a cert").decode(), "VCEK"),
    ],
)
def test_malformed_fields_are_400(config, field, value, words):
    body = Guest().body()
    body[field] = value
    d = decide_attest(config, body, now=1.0, nonces=store())
    assert d.status == 400 and words in d.reason


def test_sev_vm_is_refused_on_snp_paths_and_snp_vm_on_sev_paths(tmp_path):
    from agent.owner.service import decide_secret
    from tests.owner.conftest import write_owner_dir

    toml = write_owner_dir(tmp_path).toml
    sev = load_owner_config(toml)
    assert decide_challenge(sev, {"vm": "vm1"}, nonce=NONCE, now=0, nonces={}).status == 403
    snp_root = tmp_path / "snp"
    snp_root.mkdir()
    snp = load_owner_config(write_snp_owner(snp_root))
    d = decide_secret(
        snp,
        {
            "vm": "snp1",
            "measurement": base64.b64encode(bytes(48)).decode(),
            "api_major": 1,
            "api_minor": 1,
            "build_id": 1,
            "policy": POLICY,
        },
        attested=(),
        iv=bytes(16),
    )
    assert d.status == 403 and "snp/attest" in d.reason


@pytest.mark.parametrize(
    "extra, words",
    [
        ('tik = "x"', "does not apply to an SNP vm"),
        ('firmware = "fw.fd"', "snp_digest or firmware"),
        ('id_key_digest = "00"', "48 bytes"),
    ],
)
def test_bad_snp_vm_config_is_a_usage_error(tmp_path, extra, words):
    with pytest.raises(UsageError, match=words):
        load_owner_config(write_snp_owner(tmp_path, extra=extra))


def test_snp_policy_without_bit_17_is_a_usage_error(tmp_path):
    toml = write_snp_owner(tmp_path)
    toml.write_text(toml.read_text().replace('policy = "0x30000"', "policy = 0x10000"))
    with pytest.raises(UsageError, match="bit 17"):
        load_owner_config(toml)


def _request(path: str, body: dict) -> Request:
    return Request("POST", path, {"content-type": "application/json"}, json.dumps(body).encode(), ("127.0.0.1", 1))


async def test_service_challenge_then_attest_then_replay(config):
    nonces = iter([NONCE])
    service = OwnerService(config, random_bytes=lambda n: next(nonces) if n == 32 else bytes(n), clock=lambda: 10.0)
    r = await service.handle(_request("/v1/snp/challenge", {"vm": "snp1"}))
    assert r.status == 200
    guest = Guest()
    r = await service.handle(_request("/v1/snp/attest", guest.body()))
    assert r.status == 200
    assert open_answer(json.loads(r.body), guest.key, "snp1") == {str(resolve_guid("luks-key")): SECRET}
    r = await service.handle(_request("/v1/snp/attest", guest.body()))
    assert r.status == 409


async def test_service_forgets_nonces_after_their_ttl(config):
    now = [0.0]
    service = OwnerService(config, random_bytes=lambda n: NONCE if n == 32 else bytes(n), clock=lambda: now[0])
    await service.handle(_request("/v1/snp/challenge", {"vm": "snp1"}))
    assert service.snp_nonces
    now[0] = NONCE_TTL_S + 1
    r = await service.handle(_request("/v1/snp/attest", Guest().body()))
    assert r.status == 403 and not service.snp_nonces


def test_amd_roots_dir_may_hold_both_sev_and_snp_roots(tmp_path):
    from agent.tools.sim.amd import SimAmd

    toml = write_snp_owner(tmp_path)
    SimAmd(bits=2048).write_roots(str(tmp_path / "roots"))
    config = load_owner_config(toml)
    assert [r.product for r in config.amd_roots] == ["sim"]
    assert [r.product for r in config.snp_roots] == ["milan"]


def test_sev_roots_only_leave_snp_with_no_root(tmp_path):
    from agent.tools.sim.amd import SimAmd

    toml = write_snp_owner(tmp_path, roots=False)
    SimAmd(bits=2048).write_roots(str(tmp_path / "sevroots"))
    toml.write_text('[platform]\namd_roots = "sevroots"\n' + toml.read_text())
    config = load_owner_config(toml)
    assert config.snp_roots == ()
    d = decide_attest(config, Guest().body(), now=1.0, nonces=store())
    assert d.status == 403 and "vcek_chain" in d.reason


def test_snp_digest_computed_from_firmware_like_owner_measure(tmp_path):
    from agent.sev.snp_measure import snp_launch_digest, vcpu_signature
    from tests.sev.snp_firmware import snp_firmware

    firmware = snp_firmware()
    (tmp_path / "fw.fd").write_bytes(firmware)
    toml = write_snp_owner(tmp_path)
    toml.write_text(
        toml.read_text().replace(
            f'snp_digest = "{DIGEST.hex()}"', 'firmware = "fw.fd"\nvcpus = 2\nvcpu_type = "EPYC-Milan"'
        )
    )
    vm = load_owner_config(toml).vms["snp1"]
    assert vm.snp_digest == snp_launch_digest(firmware, vcpus=2, vcpu_sig=vcpu_signature("EPYC-Milan"))


def test_firmware_without_vcpu_type_is_a_usage_error(tmp_path):
    from tests.sev.snp_firmware import snp_firmware

    (tmp_path / "fw.fd").write_bytes(snp_firmware())
    toml = write_snp_owner(tmp_path)
    toml.write_text(toml.read_text().replace(f'snp_digest = "{DIGEST.hex()}"', 'firmware = "fw.fd"\nvcpus = 2'))
    with pytest.raises(UsageError, match="needs 'vcpu_type'"):
        load_owner_config(toml)


@pytest.mark.parametrize("path", ["/v1/snp/challenge", "/v1/snp/attest"])
async def test_snp_paths_take_only_application_json(config, path):
    service = OwnerService(config)
    r = await service.handle(Request("POST", path, {"content-type": "text/plain"}, b'{"vm": "snp1"}', None))
    assert r.status == 415 and not service.snp_nonces
    r = await service.handle(Request("GET", path, {}, b"", None))
    assert r.status == 405


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        _json,
        st.fixed_dictionaries(
            {"vm": st.sampled_from(["snp1", "vm9", ""])},
            optional={k: _json | st.text(max_size=40) for k in ("nonce", "report", "vcek", "pubkey")},
        ),
    )
)
def test_any_body_is_a_4xx_never_an_exception(config, body):
    for decide in (
        lambda: decide_attest(config, body, now=1.0, nonces=store()),
        lambda: decide_challenge(config, body, nonce=NONCE, now=1.0, nonces={}),
    ):
        d = decide()
        assert 200 <= d.status < 500
        if d.status == 200:
            assert d.issue is not None  # only a challenge can succeed without a signed report


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bit=st.integers(0, 0x2A0 * 8 - 1))
def test_any_flipped_bit_of_the_signed_part_is_refused(config, bit):
    body = Guest().body()
    raw = bytearray(base64.b64decode(body["report"]))
    raw[bit // 8] ^= 1 << (bit % 8)
    body["report"] = base64.b64encode(bytes(raw)).decode()
    assert decide_attest(config, body, now=1.0, nonces=store()).status == 403
