"""SEV-SNP end to end with real processes: ``keyagent launch`` with ``[snp]`` -> the simulator
standing in for QEMU 9.1 (tests/e2e/fake_qemu_snp.py) -> the simulated guest's report ->
``owner serve``'s ``/v1/snp/attest`` -> the secret, opened by the guest's key.

The owner trusts the simulator's test root only through ``[platform] amd_roots``.
Every process's output, the event log, the run dir and every argv seen are scanned
for the secret (tests/leakscan.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.io.http import request_json
from agent.sev.guids import resolve_guid
from agent.tools.sim.snp_guest import GuestAttestError, guest_attest
from tests.e2e.harness import World, wait_for
from tests.leakscan import ArgvWatcher, LeakScan

SECRET = b"snp end-to-end disk passphrase \x01\xfe"
DIGEST = hashlib.sha384(b"tests/e2e snp firmware").digest()
POLICY = 0x30000
HOST_DATA = bytes(range(32))
FAKE_QEMU = Path(__file__).parent / "fake_qemu_snp.py"
REPO = Path(__file__).parent.parent.parent


class Snp:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.world = World(root)
        self.run = root / "run"
        (root / "snp.pass").write_bytes(SECRET)
        for name in ("id", "author"):
            key = ec.generate_private_key(ec.SECP384R1())
            (root / f"{name}.pem").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        out = self.world.spawn(
            "idblock",
            [
                "owner",
                "idblock",
                "--digest",
                DIGEST.hex(),
                "--policy",
                hex(POLICY),
                "--id-key",
                "id.pem",
                "--author-key",
                "author.pem",
            ],
        )
        assert out.wait() == 0, out.stderr
        self.idblock = json.loads(out.stdout)

    def agent_config(self, **snp: str) -> Path:
        values = {
            "policy": hex(POLICY),
            "id_block": json.dumps(self.idblock["id_block"]),
            "id_auth": json.dumps(self.idblock["id_auth"]),
            "host_data": json.dumps(HOST_DATA.hex()),
            "author_key_enabled": "true",
            **snp,
        }
        lines = "\n".join(f"{k} = {v}" for k, v in values.items() if v is not None)
        path = self.root / "agent.toml"
        path.write_text(f'[vm]\nname = "vm1"\nrun_dir = "run"\n\n[snp]\n{lines}\n')
        return path

    def launch(self, *qemu_args: str, env: dict | None = None, **snp: str):
        self.agent_config(**snp)
        env = {
            "FAKE_QEMU_SNP_DIGEST": DIGEST.hex(),
            "FAKE_QEMU_AMD_ROOTS_OUT": str(self.root / "roots"),
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        proc = self.world.spawn(
            "launch",
            [
                "launch",
                "--config",
                "agent.toml",
                "--secrets-master-key",
                "file",
                "--launch-shutdown-grace-s",
                "1",
                "--event-log",
                str(self.root / "events.jsonl"),
                "--log-level",
                "debug",
                "--",
                sys.executable,
                str(FAKE_QEMU),
                "-machine",
                "q35",
                *qemu_args,
            ],
            env=env,
        )
        self.world.qmp = str(self.run / "qmp.sock")
        return proc

    def owner(self, *, roots: bool = True, digest: bytes = DIGEST, policy: int = POLICY, name: str = "owner") -> str:
        platform = '[platform]\namd_roots = "roots"\n' if roots else ""
        toml = self.root / f"{name}.toml"
        toml.write_text(f"""{platform}
[vm.vm1]
snp = true
policy = "{policy:#x}"
snp_digest = "{digest.hex()}"
host_data = "{HOST_DATA.hex()}"
id_key_digest = "{self.idblock["id_key_digest"]}"
author_key_digest = "{self.idblock["author_key_digest"]}"
[[vm.vm1.secret]]
guid = "luks-key"
file = "snp.pass"
""")
        proc = self.world.spawn(name, ["owner", "serve", "--config", toml.name, "--listen", "127.0.0.1:0"])
        return proc.listening()

    def attest(self, url: str, **kw) -> dict[str, bytes]:
        return asyncio.run(guest_attest(self.world.qmp, url, "vm1", **kw))

    def decisions(self, name: str = "owner") -> list[dict]:
        proc = [p for p in self.world.procs if p.name == name][0]
        return [json.loads(ln) for ln in proc.stderr.splitlines() if "owner decision" in ln]


@pytest.fixture
def snp(tmp_path):
    short = None
    root = tmp_path
    if len(str(tmp_path / "run" / "qmp.sock")) > 100:
        short = Path(tempfile.mkdtemp(prefix="snp"))  # the default temp dir: short enough for sun_path
        root = short
    s = Snp(root)
    scan = LeakScan()
    scan.secret("SNP disk passphrase", SECRET)
    try:
        with ArgvWatcher() as argv:
            scan.argv = argv
            try:
                yield s
            finally:
                s.world.close()
        for proc in s.world.procs:
            scan.text(f"{proc.name} stderr", proc.stderr)
            scan.text(f"{proc.name} stdout", proc.stdout)
        scan.text("guest helper output", getattr(s, "scan_extra", ""))
        if (root / "events.jsonl").exists():
            scan.file(str(root / "events.jsonl"))
        scan.dirs.append(str(root / "run"))
        scan.check()
    finally:
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


def launched(snp: Snp, proc) -> None:
    wait_for(
        lambda: "launched: SNP guest checked" in proc.stderr or proc.popen.poll() is not None,
        timeout=60,
        what="the SNP launch check",
    )
    assert proc.popen.poll() is None, proc.stderr
    wait_for(lambda: (snp.root / "roots" / "milan-ask.pem").exists(), what="the simulator's roots")


def flip(field: str, index: int = 0):
    def tamper(body: dict) -> dict:
        raw = bytearray(base64.b64decode(body[field]))
        raw[index] ^= 1
        return {**body, field: base64.b64encode(bytes(raw)).decode()}

    return tamper


def test_snp_launch_with_id_block_then_guest_attests_and_opens_its_secret(snp):
    proc = snp.launch()
    launched(snp, proc)
    state = snp.world.sim_query("query-sev")
    assert state["sev-type"] == "sev-snp" and state["snp-policy"] == POLICY and state["state"] == "running"

    url = snp.owner()
    assert snp.attest(url) == {str(resolve_guid("luks-key")): SECRET}

    # a flipped bit in the report: refused, one audit line
    with pytest.raises(GuestAttestError, match="signature") as info:
        snp.attest(url, tamper=flip("report", 0x90))
    assert info.value.status == 403

    # the same request again: its nonce is used up
    sent: list[dict] = []
    snp.attest(url, tamper=lambda body: sent.append(body) or body)
    status, answer = asyncio.run(request_json("POST", url + "/v1/snp/attest", sent[0], timeout=10))
    assert status == 409 and "nonce already used" in answer["error"]

    # a nonce the owner never gave out
    with pytest.raises(GuestAttestError, match="unknown nonce") as info:
        snp.attest(url, tamper=lambda body: {**body, "nonce": base64.b64encode(os.urandom(32)).decode()})
    assert info.value.status == 403

    decisions = snp.decisions()
    assert [(d["request"], d["status"]) for d in decisions] == [
        ("snp-challenge", 200),
        ("snp-attest", 200),
        ("snp-challenge", 200),
        ("snp-attest", 403),
        ("snp-challenge", 200),
        ("snp-attest", 200),
        ("snp-attest", 409),
        ("snp-challenge", 200),
        ("snp-attest", 403),
    ]
    assert decisions[1]["product"] == "milan"

    # the launch is recorded; replay rebuilds the SNP check from it
    proc.popen.send_signal(__import__("signal").SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr
    check = snp.world.replay_check()
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    "owner, words",
    [
        ({"digest": hashlib.sha384(b"another image").digest()}, "measurement"),
        ({"policy": 0x30001}, "policy"),
        ({"roots": False}, "vcek_chain"),
    ],
)
def test_owner_refuses_a_report_it_does_not_expect(snp, owner, words):
    launched(snp, snp.launch())
    url = snp.owner(**owner)
    with pytest.raises(GuestAttestError, match=words) as info:
        snp.attest(url)
    assert info.value.status == 403
    assert [d["status"] for d in snp.decisions()] == [200, 403]


def assert_quit_never_ran(proc, words: str) -> None:
    assert proc.wait(timeout=60) == 1, proc.stderr
    assert words in proc.stderr
    assert "VM resumed" not in proc.stderr


def test_qemu_that_started_another_policy_is_quit(snp):
    proc = snp.launch(env={"FAKE_QEMU_SNP_POLICY": "0x30001"})
    assert_quit_never_ran(proc, "SNP policy 0x30001 differs from the configured 0x30000")


def test_qemu_without_snp_is_quit(snp):
    proc = snp.launch(env={"FAKE_QEMU_AS_SEV": "1"})  # a QEMU 7.2 that made an SEV guest
    assert_quit_never_ran(proc, "no sev-type (SEV-SNP needs QEMU 9.1 or later)")


def test_id_block_for_another_launch_fails_at_launch_finish(snp):
    out = snp.world.spawn(
        "idblock2",
        [
            "owner",
            "idblock",
            "--digest",
            hashlib.sha384(b"x").hexdigest(),
            "--policy",
            hex(POLICY),
            "--id-key",
            "id.pem",
            "--author-key",
            "author.pem",
        ],
    )
    assert out.wait() == 0
    other = json.loads(out.stdout)
    proc = snp.launch(id_block=json.dumps(other["id_block"]), id_auth=json.dumps(other["id_auth"]))
    assert proc.wait(timeout=60) == 1, proc.stderr
    assert "QEMU went away at cont" in proc.stderr and "BAD_MEASUREMENT" in proc.stderr
    assert "VM resumed" not in proc.stderr


def test_id_block_with_another_policy_is_a_usage_error_before_qemu(snp):
    proc = snp.launch(policy="0x30001")  # the ID block pins 0x30000
    assert proc.wait(timeout=30) == 2
    assert "the ID block pins policy 0x30000" in proc.stderr
    assert not (snp.root / "roots").exists()  # QEMU never started


@pytest.mark.parametrize("policy, code", [("0x30000", 0), ("0x70000", 1)])
def test_run_checks_an_snp_guest_someone_else_started(snp, policy, code):
    sim = snp.world.spawn("sim", ["simulate", "--snp", "--qmp", f"unix:{snp.world.qmp}", "--snp-digest", DIGEST.hex()])
    wait_for(lambda: sim.stdout_path.stat().st_size > 0 or sim.popen.poll() is not None, what="simulator")
    agent = snp.world.spawn("agent", ["run", "--qmp", f"unix:{snp.world.qmp}", "--snp-policy", policy])
    assert agent.wait() == code, agent.stderr
    if code == 0:
        assert snp.world.sim_query("query-status")["status"] == "running"
    else:
        assert "differs from the configured 0x70000" in agent.stderr
        assert sim.wait() == 0  # quit, never ran


def test_the_guest_helper_from_a_shell_writes_its_secret_0600_and_prints_no_secret(snp):
    import stat
    import subprocess

    launched(snp, snp.launch())
    url = snp.owner()
    out = snp.root / "guest"
    out.mkdir(mode=0o700)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.tools.sim.snp_guest",
            "--qmp",
            f"unix:{snp.world.qmp}",
            "--owner-url",
            url,
            "--vm",
            "vm1",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    guid = str(resolve_guid("luks-key"))
    assert json.loads(proc.stdout) == {"secrets": [{"guid": guid, "length": len(SECRET)}]}
    assert (out / guid).read_bytes() == SECRET
    assert stat.S_IMODE((out / guid).stat().st_mode) == 0o600
    snp.scan_extra = proc.stdout + proc.stderr
    (out / guid).unlink()
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.tools.sim.snp_guest",
            "--qmp",
            f"unix:{snp.world.qmp}",
            "--owner-url",
            url,
            "--vm",
            "vm9",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert again.returncode == 1 and "challenge refused: 404" in again.stderr
