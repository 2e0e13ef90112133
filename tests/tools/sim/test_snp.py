"""The simulator's SEV-SNP guest (agent.tools.sim.snp) and the simulated guest's attestation
(agent.tools.sim.snp_guest)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.common.errors import SimQmpError
from agent.io.http import HttpServer
from agent.owner.config import load_owner_config
from agent.owner.service import OwnerService
from agent.sev.guids import resolve_guid
from agent.sev.snp_ca import load_vcek
from agent.sev.snp_idblock import IdBlock, sign_id_block
from agent.sev.snp_report import Expected, verify_report
from agent.tools.sim.qmp_server import Simulator
from agent.tools.sim.snp import DEFAULT_SNP_DIGEST, SnpMachine, SnpSimConfig
from agent.tools.sim.snp_guest import GuestAttestError, guest_attest
from tests.sev.snp_chain import authority

HOST_DATA = b"\x42" * 32
SECRET = b"snp-sim-disk-passphrase-987654"


def signed_block(digest=DEFAULT_SNP_DIGEST, policy=0x30000):
    id_key, author_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    return sign_id_block(IdBlock(digest, policy), id_key, author_key)


def machine(**over) -> SnpMachine:
    over.setdefault("authority", authority())
    return SnpMachine(SnpSimConfig(**over))


def report_for(m: SnpMachine, data: bytes = b"\x07" * 64) -> tuple[bytes, bytes]:
    got = m.execute("x-sim-snp-guest-report", {"report-data": base64.b64encode(data).decode()})
    return base64.b64decode(got["report"]), base64.b64decode(got["vcek"])


def test_query_sev_is_qemu_91s_snp_union():
    m = machine(policy=0x30000)
    assert m.execute("query-sev", {}) == {
        "enabled": True,
        "api-major": 1,
        "api-minor": 55,
        "build-id": 21,
        "state": "launch-update",
        "sev-type": "sev-snp",
        "snp-policy": 0x30000,
    }
    m.execute("cont", {})
    assert m.execute("query-sev", {})["state"] == "running"


def test_no_guest_report_before_launch_finish():
    with pytest.raises(SimQmpError, match="not running"):
        report_for(machine())


def test_guest_report_verifies_under_the_test_roots_with_the_launch_fields():
    block = signed_block()
    m = machine(id_block=block.id_block, id_auth=block.id_auth, host_data=HOST_DATA, author_key_enabled=True)
    m.execute("cont", {})
    report, vcek = report_for(m, b"\x07" * 64)
    verdict = verify_report(
        report,
        load_vcek(vcek),
        [authority().roots],
        expected=Expected(
            measurement=DEFAULT_SNP_DIGEST,
            policy=0x30000,
            report_data=b"\x07" * 64,
            host_data=HOST_DATA,
            id_key_digest=block.id_key_digest,
            author_key_digest=block.author_key_digest,
        ),
    )
    assert verdict.valid, verdict.failed
    assert verdict.report.author_key_en


def test_guest_report_does_not_verify_under_amds_real_roots():
    from agent.sev.snp_ca import builtin_snp_roots

    m = machine()
    m.execute("cont", {})
    report, vcek = report_for(m)
    assert verify_report(report, load_vcek(vcek), builtin_snp_roots()).failed == ("vcek_chain",)


@pytest.mark.parametrize(
    "block_args, why",
    [
        ({"digest": b"\x01" * 48}, "BAD_MEASUREMENT"),
        ({"policy": 0x30001}, "POLICY_FAILURE"),
    ],
)
def test_id_block_for_another_launch_fails_launch_finish_and_quits_1(block_args, why, capsys):
    block = signed_block(**block_args)
    m = machine(id_block=block.id_block, id_auth=block.id_auth)
    m.execute("cont", {})
    assert m.died and m.exit_status == 1 and m.status != "running"


def test_id_block_with_a_broken_signature_fails_launch_finish():
    block = signed_block()
    auth = bytearray(block.id_auth)
    auth[0x40] ^= 1  # ID_BLOCK_SIG.R
    m = machine(id_block=block.id_block, id_auth=bytes(auth))
    m.execute("cont", {})
    assert m.exit_status == 1


def test_report_data_must_be_64_bytes():
    m = machine()
    m.execute("cont", {})
    with pytest.raises(SimQmpError, match="64 bytes"):
        report_for(m, b"short")


def write_owner(root, *, digest=DEFAULT_SNP_DIGEST, policy="0x30000", roots=True):
    (root / "disk.pass").write_bytes(SECRET)
    platform = ""
    if roots:
        (root / "roots").mkdir()
        for name, pem in authority().pems().items():
            (root / "roots" / name).write_bytes(pem)
        platform = '[platform]\namd_roots = "roots"\n'
    (root / "owner.toml").write_text(f"""{platform}
[vm.snp1]
snp = true
policy = "{policy}"
snp_digest = "{digest.hex()}"
host_data = "{HOST_DATA.hex()}"
[[vm.snp1.secret]]
guid = "luks-key"
file = "disk.pass"
""")
    return root / "owner.toml"


@pytest.fixture
async def running_sim(sock_path):
    async with Simulator(SnpSimConfig(authority=authority(), host_data=HOST_DATA), sock_path) as sim:
        sim.machine.execute("cont", {})
        yield sim


async def serve(config):
    server = HttpServer(OwnerService(config).handle)
    host, port = await server.start_tcp("127.0.0.1", 0)
    return server, f"http://{host}:{port}"


async def test_simulated_guest_gets_its_secrets_from_the_owner(tmp_path, running_sim):
    server, url = await serve(load_owner_config(write_owner(tmp_path)))
    try:
        secrets = await guest_attest(running_sim.path, url, "snp1")
    finally:
        await server.close()
    assert secrets == {str(resolve_guid("luks-key")): SECRET}
    assert running_sim.machine.reports == 1


@pytest.mark.parametrize(
    "owner, status, words",
    [
        ({"digest": hashlib.sha384(b"other").digest()}, 403, "measurement"),
        ({"policy": "0x30001"}, 403, "policy"),
        ({"roots": False}, 403, "vcek_chain"),
    ],
)
async def test_simulated_guest_is_refused(tmp_path, running_sim, owner, status, words):
    server, url = await serve(load_owner_config(write_owner(tmp_path, **owner)))
    try:
        with pytest.raises(GuestAttestError, match=words) as info:
            await guest_attest(running_sim.path, url, "snp1")
    finally:
        await server.close()
    assert info.value.status == status


async def test_failed_launch_finish_closes_the_monitor_without_an_answer(sock_path):
    from tests.tools.sim.conftest import RawClient

    block = signed_block(digest=b"\x01" * 48)
    sim = Simulator(SnpSimConfig(authority=authority(), id_block=block.id_block, id_auth=block.id_auth), sock_path)
    async with sim:
        client = await RawClient.connect(sock_path)
        await client.negotiate()
        await client.send_raw(b'{"execute": "cont"}')
        assert await client.reader.read() == b""  # closed, no reply, no SHUTDOWN
        await sim.wait_closed()
        assert sim.machine.exit_status == 1


def test_sev_launch_commands_fail_on_an_snp_guest_as_in_qemu_91():
    m = machine()
    with pytest.raises(SimQmpError, match="SEV launch measurement is not available"):
        m.execute("query-sev-launch-measure", {})
    with pytest.raises(SimQmpError, match=r"Not in correct state. \(LSECRET\) 1"):
        m.execute("sev-inject-launch-secret", {"packet-header": "AAAA", "secret": "AAAA"})
