"""The whole guest-owner chain with real processes, as a user runs it.

platform (``keyagent simulate`` with a PDH) -> ``owner session`` against its
PDH and chain (or ``owner serve``'s ``POST /v1/session``) -> the simulator
started with that session (``--dh-cert-file`` / ``--session-file``, like
QEMU's ``sev-guest``) -> ``owner measure`` of a synthetic OVMF image -> the
agent (``keyagent run``) asks ``owner serve`` -> secret injected, VM runs.
Then one refusal per reason of the owner: the VM never runs.

Every process's stdout/stderr, the event log, the run dir and the argv of
every process seen while the test ran are scanned for TEK, TIK and the
secret in raw, hex and base64 (tests/leakscan.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.io.http import request_json
from agent.sev.ovmf import Area, synthetic_image
from agent.sev.session import open_session
from tests.e2e.harness import KEYAGENT, World, wait_for
from tests.leakscan import ArgvWatcher, LeakScan

DISK_PASS = b"full-chain disk passphrase \x00\x7f tail"
LUKS_GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"
POLICY = 1
SIM_API = (1, 55, 21)  # what `keyagent simulate` reports by default


def keyagent(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*KEYAGENT, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


class Chain:
    """One test's processes and files under a short directory (unix socket paths)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.world = World(root)  # spawn/sim_query; its own tik/tek files stay unused
        self.qmp = self.world.qmp
        self.cli_outputs: list[tuple[str, str]] = []
        (root / "disk.pass").write_bytes(DISK_PASS)
        self.pdh_key = ec.generate_private_key(ec.SECP384R1())
        fd = os.open(root / "pdh.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                self.pdh_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        proc = keyagent(*args, cwd=self.root)
        self.cli_outputs.append((" ".join(args[:2]), proc.stdout + proc.stderr))
        assert proc.returncode == 0, proc.stderr
        return proc

    # -- the platform -------------------------------------------------------
    def wait_ready(self, proc) -> None:
        wait_for(
            lambda: proc.stdout_path.stat().st_size > 0 or proc.popen.poll() is not None, what="simulator ready line"
        )
        assert proc.popen.poll() is None, proc.stderr
        assert json.loads(proc.stdout.splitlines()[0])["ready"] is True

    def platform_run(self) -> None:
        """A first start: the platform hands out its PDH and chain, then goes."""
        sim = self.world.spawn(
            "platform",
            [
                "simulate",
                "--qmp",
                f"unix:{self.qmp}",
                "--pdh-key",
                "pdh.pem",
                "--pdh-out",
                "pdh.b64",
                "--cert-chain-out",
                "chain.b64",
                "--amd-roots-out",
                "roots",
                "--cek-out",
                "cek.b64",
            ],
        )
        self.wait_ready(sim)
        caps = self.world.sim_query("query-sev-capabilities")
        assert base64.b64decode((self.root / "pdh.b64").read_text()) == base64.b64decode(caps["pdh"])
        assert base64.b64decode((self.root / "chain.b64").read_text()) == base64.b64decode(caps["cert-chain"])
        self.world.sim_query("quit")
        assert sim.wait(timeout=10) == 0

    def launch(self, godh: str, session: str, digest: bytes, *extra: str):
        """QEMU started with the owner's session, held at -S."""
        sim = self.world.spawn(
            "sim",
            [
                "simulate",
                "--qmp",
                f"unix:{self.qmp}",
                "--sev",
                "--pdh-key",
                "pdh.pem",
                "--dh-cert-file",
                godh,
                "--session-file",
                session,
                "--policy",
                str(POLICY),
                "--digest",
                digest.hex(),
                *extra,
            ],
        )
        self.wait_ready(sim)
        return sim

    # -- the owner ----------------------------------------------------------
    def firmware_digest(
        self, name: str = "OVMF.fd", filler: bytes = b"\xff", secret_area: Area = Area(0x80C000, 0x1000)
    ) -> bytes:
        image = synthetic_image(
            hashes_area=Area(0x80CC00, 0x400), secret_area=secret_area, reset_address=0x80B004, filler=filler
        )
        (self.root / name).write_bytes(image)
        return bytes.fromhex(self.cli("owner", "measure", "--firmware", name).stdout.strip())

    def owner(self, vm_table: str) -> str:
        # the owner trusts the simulator's own AMD root, written by platform_run
        (self.root / "owner.toml").write_text(f"""
[platform]
amd_roots = "roots"

[vm.vm1]
{vm_table}
[[vm.vm1.secret]]
guid = "luks-key"
file = "disk.pass"
""")
        proc = self.world.spawn("owner", ["owner", "serve", "--config", "owner.toml", "--listen", "127.0.0.1:0"])
        return proc.listening()

    # -- the agent ----------------------------------------------------------
    def agent(self, owner_url: str, *extra: str, vm: str = "vm1"):
        return self.world.spawn(
            "agent",
            [
                "run",
                "--qmp",
                f"unix:{self.qmp}",
                "--owner-url",
                owner_url,
                "--vm-name",
                vm,
                "--event-log",
                str(self.root / "events.jsonl"),
                *extra,
            ],
        )

    def assert_launched(self) -> None:
        state = self.world.sim_query("x-sim-query-state")
        assert state["status"] == "running" and state["cont-before-secret"] is False
        secrets = self.world.sim_query("x-sim-query-secrets")
        assert secrets["injected"] is True and secrets["table-valid"] is True
        assert secrets["secret-visible"] is True  # where the guest's firmware publishes it
        assert secrets["entries"] == [
            {"guid": LUKS_GUID, "length": len(DISK_PASS), "sha256": hashlib.sha256(DISK_PASS).hexdigest()}
        ]

    def assert_never_ran(self) -> None:
        state = self.world.sim_query("x-sim-query-state")
        assert state["status"] != "running" and state["cont"] is False
        assert self.world.sim_query("x-sim-query-secrets")["injected"] is False

    def measurement(self) -> str:
        return self.world.sim_query("query-sev-launch-measure")["data"]


@pytest.fixture
def chain(tmp_path):
    # sun_path is 108 bytes: use a short directory when tmp_path is long.
    short = None
    root = tmp_path
    if len(str(tmp_path / "qmp.sock")) > 100:
        short = Path(tempfile.mkdtemp(prefix="chain", dir="/tmp"))
        root = short
    c = Chain(root)
    scan = LeakScan()
    scan.secret("disk passphrase", DISK_PASS)
    c.scan = scan
    try:
        with ArgvWatcher() as argv:
            scan.argv = argv
            try:
                yield c
            finally:
                c.world.close()
        for proc in c.world.procs:
            scan.text(f"{proc.name} stderr", proc.stderr)
            scan.text(f"{proc.name} stdout", proc.stdout)
        for name, text in c.cli_outputs:
            scan.text(name, text)
        if (root / "events.jsonl").exists():
            scan.file(str(root / "events.jsonl"))
        scan.dirs.append(str(root / "run"))
        for name in ("godh.b64", "session.b64", "pdh.b64", "chain.b64", "owner.toml"):
            for path in root.rglob(name):
                scan.file(str(path))
        scan.check()
    finally:
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


def offline_session(c: Chain) -> tuple[str, str]:
    """`owner session` against the platform's PDH and chain; returns (godh, session) paths."""
    c.platform_run()
    out = json.loads(
        c.cli(
            "owner",
            "session",
            "--pdh",
            "pdh.b64",
            "--cert-chain",
            "chain.b64",
            "--amd-roots",
            "roots",
            "--policy",
            str(POLICY),
            "--out-dir",
            "owner",
        ).stdout
    )
    assert out["chain_verified"] is True and out["platform"] == "amd:sim"
    c.scan.secret("TIK", (c.root / "owner" / "tik.bin").read_bytes())
    c.scan.secret("TEK", (c.root / "owner" / "tek.bin").read_bytes())
    return "owner/godh.b64", "owner/session.b64"


def offline_owner_table(digest: bytes, policy: int = POLICY, extra: str = "") -> str:
    return f'tik = "owner/tik.bin"\ntek = "owner/tek.bin"\npolicy = {policy}\ndigest = "{digest.hex()}"\n{extra}'


# -- the good paths -----------------------------------------------------------------


def test_offline_session_measure_verify_package_inject(chain):
    godh, session = offline_session(chain)
    digest = chain.firmware_digest()
    chain.launch(godh, session, digest)
    url = chain.owner(offline_owner_table(digest, extra='min_api = "1.55"\nbuild_ids = [21]'))
    agent = chain.agent(url)
    assert agent.wait() == 0, agent.stderr
    chain.assert_launched()
    check = chain.world.replay_check()
    assert check.returncode == 0, check.stdout + check.stderr


def test_session_from_owner_serve_then_launch(chain):
    chain.platform_run()
    digest = chain.firmware_digest()
    url = chain.owner(f'session = true\npolicy = {POLICY}\ndigest = "{digest.hex()}"')
    request = {
        "vm": "vm1",
        "pdh": (chain.root / "pdh.b64").read_text().strip(),
        "cert_chain": (chain.root / "chain.b64").read_text().strip(),
        "policy": POLICY,
    }
    status, body = asyncio.run(request_json("POST", url + "/v1/session", request, timeout=10))
    assert status == 200, body
    godh, session = base64.b64decode(body["godh"]), base64.b64decode(body["session"])
    # the test holds the platform's PDH key, so it can see the keys the owner drew: scan for them
    tek, tik = open_session(chain.pdh_key, godh, session, POLICY)
    chain.scan.secret("TIK", tik)
    chain.scan.secret("TEK", tek)
    (chain.root / "godh.b64").write_text(body["godh"])
    (chain.root / "session.b64").write_text(body["session"])

    chain.launch("godh.b64", "session.b64", digest)
    agent = chain.agent(url)
    assert agent.wait() == 0, agent.stderr
    chain.assert_launched()

    # the session's keys are gone; the same launch asked again gets the same answer
    again = {
        "vm": "vm1",
        "measurement": chain.measurement(),
        "api_major": SIM_API[0],
        "api_minor": SIM_API[1],
        "build_id": SIM_API[2],
        "policy": POLICY,
    }
    status, body = asyncio.run(request_json("POST", url + "/v1/secret", again, timeout=10))
    assert status == 200 and set(body) >= {"packet_header", "secret"}
    other = dict(again, build_id=(SIM_API[2] + 1) % 256)  # the same blob, other fields: not that launch
    assert asyncio.run(request_json("POST", url + "/v1/secret", other, timeout=10))[0] in (403, 409)
    owner = [p for p in chain.world.procs if p.name == "owner"][0]
    owner_log = [json.loads(ln) for ln in owner.stderr.splitlines() if "owner decision" in ln]
    assert [rec["decision"] for rec in owner_log] == ["session", "released", "resent", "refused"]
    assert owner_log[0]["chain_verified"] is True and owner_log[0]["platform"] == "amd:sim"


# -- the firmware's secret area ---------------------------------------------------------
# Debian's stock OVMF.fd has a secret-block entry of base 0, size 0: QEMU 7.2
# injects at gpa 0, says "ok", and the guest never sees its secret.

FIRMWARE_VM = 'tik = "owner/tik.bin"\ntek = "owner/tek.bin"\npolicy = 1\nfirmware = "OVMF.fd"\n'


def owner_decisions(chain: Chain) -> list[dict]:
    owner = [p for p in chain.world.procs if p.name == "owner"][0]
    return [json.loads(ln) for ln in owner.stderr.splitlines() if "owner decision" in ln]


def test_owner_who_knows_the_firmware_sends_the_secret_to_its_area(chain):
    godh, session = offline_session(chain)
    digest = chain.firmware_digest()
    chain.launch(godh, session, digest, "--firmware", "OVMF.fd")
    agent = chain.agent(chain.owner(FIRMWARE_VM))
    assert agent.wait() == 0, agent.stderr
    chain.assert_launched()
    sends = [
        rec["action"]
        for rec in map(json.loads, (chain.root / "events.jsonl").read_text().splitlines())
        if rec.get("action", {}).get("command") == "sev-inject-launch-secret"
    ]
    assert [a["args"]["gpa"] for a in sends] == [0x80C000]


def test_debian_stock_firmware_is_refused_by_an_owner_who_knows_it(chain):
    godh, session = offline_session(chain)
    digest = chain.firmware_digest(secret_area=Area(0, 0))
    chain.launch(godh, session, digest, "--firmware", "OVMF.fd")
    agent = chain.agent(chain.owner(FIRMWARE_VM), "--sev-on-refusal", "pause")
    assert agent.wait() == 1, agent.stderr
    assert "no usable secret area" in agent.stderr
    chain.assert_never_ran()
    (decision,) = owner_decisions(chain)
    assert decision["status"] == 403 and "base 0x0 size 0x0" in decision["reason"]


def test_debian_stock_firmware_behind_a_bare_digest_runs_without_its_secret(chain):
    # What the owner cannot check: QEMU finds the empty area, injects at gpa 0,
    # the VM runs, and its guest has no secret.  The owner said so at start.
    godh, session = offline_session(chain)
    digest = chain.firmware_digest(secret_area=Area(0, 0))
    chain.launch(godh, session, digest, "--firmware", "OVMF.fd")
    agent = chain.agent(chain.owner(offline_owner_table(digest)))
    assert agent.wait() == 0, agent.stderr
    secrets = chain.world.sim_query("x-sim-query-secrets")
    assert secrets["injected"] is True and secrets["secret-visible"] is False
    owner = [p for p in chain.world.procs if p.name == "owner"][0]
    assert "owner secret area unchecked" in owner.stderr


# -- one refusal per reason: the VM never runs ---------------------------------

REFUSALS = {
    "policy mismatch": ({"policy": 3}, {}, "policy mismatch: policy 0x1 is not accepted"),
    "api too old": ({"extra": 'min_api = "1.56"'}, {}, "api 1.55 is older than 1.56"),
    "build id not accepted": ({"extra": "build_ids = [20, 22]"}, {}, "build id 21 is not accepted"),
    "digest mismatch": ({"other_firmware": True}, {}, "measurement does not match"),
    "unknown vm": ({}, {"vm": "vm9"}, "unknown vm 'vm9'"),
}


@pytest.mark.parametrize("reason", list(REFUSALS))
def test_each_owner_refusal_keeps_the_vm_from_running(chain, reason):
    table_args, agent_args, words = REFUSALS[reason]
    godh, session = offline_session(chain)
    digest = chain.firmware_digest()
    expected = digest
    if table_args.pop("other_firmware", False):
        expected = chain.firmware_digest("OTHER.fd", filler=b"\x00")
        assert expected != digest
    chain.launch(godh, session, digest)
    url = chain.owner(offline_owner_table(expected, **table_args))
    agent = chain.agent(url, "--sev-on-refusal", "pause", **agent_args)
    assert agent.wait() == 1, agent.stderr
    assert words in agent.stderr
    chain.assert_never_ran()
    owner = [p for p in chain.world.procs if p.name == "owner"][0]
    decisions = [json.loads(ln) for ln in owner.stderr.splitlines() if "owner decision" in ln]
    assert len(decisions) == 1 and decisions[0]["decision"] == "refused" and words in decisions[0]["reason"]


def test_a_launch_whose_packet_was_taken_first_gets_the_same_packet_and_runs(chain):
    godh, session = offline_session(chain)
    digest = chain.firmware_digest()
    chain.launch(godh, session, digest)
    url = chain.owner(offline_owner_table(digest))
    # someone else (the host, a dead agent) took this launch's packet first: it is bound
    # to this launch's MNONCE, so giving it again is safe and lets the launch finish
    first = {
        "vm": "vm1",
        "measurement": chain.measurement(),
        "api_major": SIM_API[0],
        "api_minor": SIM_API[1],
        "build_id": SIM_API[2],
        "policy": POLICY,
    }
    assert asyncio.run(request_json("POST", url + "/v1/secret", first, timeout=10))[0] == 200
    agent = chain.agent(url, "--sev-on-refusal", "pause")
    assert agent.wait() == 0, agent.stderr
    chain.assert_launched()


# -- keyagent launch: the session comes from the owner, files gone after start ------


def test_launch_gets_the_session_from_the_owner_and_attests(chain, monkeypatch):
    chain.platform_run()
    digest = chain.firmware_digest()
    url = chain.owner(f'session = true\npolicy = {POLICY}\ndigest = "{digest.hex()}"')
    # the chain as PDH_CERT_EXPORT gives it: the CEK without AMD's signature; [sev] cek
    # (what AMD's key server hands out) takes its place in the request
    from dataclasses import replace

    from agent.sev.cert import PlatformChain, Signature

    signed = PlatformChain.from_bytes(base64.b64decode((chain.root / "chain.b64").read_text()))
    bare = replace(signed, cek=replace(signed.cek, sig1=Signature()))
    (chain.root / "qemu-chain.b64").write_text(base64.b64encode(bare.to_bytes()).decode())
    assert base64.b64decode((chain.root / "cek.b64").read_text()) == signed.cek.to_bytes()
    fake_qemu = Path(__file__).parent.parent / "e2e" / "fake_qemu_sev.py"
    run = chain.root / "run"
    env = {
        "FAKE_QEMU_PDH_KEY": str(chain.root / "pdh.pem"),
        "FAKE_QEMU_DIGEST": digest.hex(),
        "PYTHONPATH": str(Path(__file__).parent.parent.parent),
    }
    proc = chain.world.spawn(
        "launch",
        [
            "launch",
            "--vm-name",
            "vm1",
            "--vm-run-dir",
            str(run),
            "--owner-url",
            url,
            "--sev-pdh",
            str(chain.root / "pdh.b64"),
            "--sev-cert-chain",
            str(chain.root / "qemu-chain.b64"),
            "--sev-cek",
            str(chain.root / "cek.b64"),
            "--secrets-master-key",
            "file",
            "--launch-shutdown-grace-s",
            "1",
            "--event-log",
            str(chain.root / "events.jsonl"),
            "--log-level",
            "debug",
            "--",
            sys.executable,
            str(fake_qemu),
            "-machine",
            "q35,confidential-guest-support=sev0",
            "-object",
            f"sev-guest,id=sev0,policy={POLICY},cbitpos=51,reduced-phys-bits=1",
        ],
        env=env,
    )
    chain.qmp = str(run / "qmp.sock")
    chain.world.qmp = chain.qmp
    wait_for(
        lambda: "launched: secret injected" in proc.stderr or proc.popen.poll() is not None,
        timeout=30,
        what="the launch to finish",
    )
    assert proc.popen.poll() is None, proc.stderr
    chain.assert_launched()
    # QEMU (the simulator) read the session files at start; they are gone.
    assert not list(run.glob("key-*")), list(run.iterdir())
    proc.popen.send_signal(__import__("signal").SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == []


# -- platform trust and session floods, with real processes -------------------------


def test_session_flood_does_not_displace_the_waiting_launch(chain):
    from agent.owner.service import MAX_PENDING_SESSIONS
    from agent.tools.sim.psp import Platform
    from tests.sev.amd_chains import real_certs

    chain.platform_run()
    digest = chain.firmware_digest()
    url = chain.owner(f'session = true\npolicy = {POLICY}\ndigest = "{digest.hex()}"')
    good = {
        "vm": "vm1",
        "pdh": (chain.root / "pdh.b64").read_text().strip(),
        "cert_chain": (chain.root / "chain.b64").read_text().strip(),
        "policy": POLICY,
    }
    status, body = asyncio.run(request_json("POST", url + "/v1/session", good, timeout=10))
    assert status == 200, body
    (chain.root / "godh.b64").write_text(body["godh"])
    (chain.root / "session.b64").write_text(body["session"])
    tek, tik = open_session(chain.pdh_key, base64.b64decode(body["godh"]), base64.b64decode(body["session"]), POLICY)
    chain.scan.secret("TIK", tik)
    chain.scan.secret("TEK", tek)

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    made_up = Platform()  # signed by this test process's own "AMD", which the owner does not trust
    rome = real_certs("rome")
    flood = (
        [good] * (MAX_PENDING_SESSIONS + 3)
        + [{**good, "pdh": b64(made_up.pdh_cert.to_bytes()), "cert_chain": b64(made_up.chain.to_bytes())}] * 3
        + [{**good, "pdh": b64(made_up.pdh_cert.to_bytes()), "cert_chain": None}] * 3
        + [{**good, "pdh": b64(rome["pdh"]), "cert_chain": b64(rome["pek"] + rome["oca"] + rome["cek"])}]
    )

    async def send_all():
        return [await request_json("POST", url + "/v1/session", f, timeout=10) for f in flood]

    answers = asyncio.run(send_all())
    statuses = [a[0] for a in answers]
    assert statuses == [200] * (MAX_PENDING_SESSIONS - 1) + [429] * 4 + [403] * 7, answers
    assert all(a[1]["error"].startswith("platform not verified: ") for a in answers[-7:])

    chain.launch("godh.b64", "session.b64", digest)
    agent = chain.agent(url)
    assert agent.wait() == 0, agent.stderr
    chain.assert_launched()
    owner = [p for p in chain.world.procs if p.name == "owner"][0]
    decisions = [json.loads(ln) for ln in owner.stderr.splitlines() if "owner decision" in ln]
    assert [d["status"] for d in decisions] == [200] + statuses + [200]


def test_launch_for_a_platform_the_owner_cannot_verify_never_starts_qemu(chain):
    chain.platform_run()
    digest = chain.firmware_digest()
    url = chain.owner(f'session = true\npolicy = {POLICY}\ndigest = "{digest.hex()}"')
    marker = chain.root / "qemu-started"  # what "QEMU" would do if it ever ran
    run = chain.root / "run"
    # no cert_chain: a host that only shows a PDH (any P-384 key it likes)
    proc = chain.world.spawn(
        "launch",
        [
            "launch",
            "--vm-name",
            "vm1",
            "--vm-run-dir",
            str(run),
            "--owner-url",
            url,
            "--sev-pdh",
            str(chain.root / "pdh.b64"),
            "--secrets-master-key",
            "file",
            "--",
            sys.executable,
            "-c",
            f"open({str(marker)!r}, 'w')",
            "-object",
            f"sev-guest,id=sev0,policy={POLICY},cbitpos=51,reduced-phys-bits=1",
        ],
    )
    assert proc.wait(timeout=30) == 1, proc.stderr
    assert "guest owner refused the launch session: platform not verified: no cert_chain" in proc.stderr
    assert "(HTTP 403)" in proc.stderr and not marker.exists()
    assert not list(run.glob("key-*"))
