"""SEV fast migration end to end (docs/mh.md): two simulated VMs with MHs, two agents, one owner.

boot (the table holds the identity key and an empty source key) -> the
target launches with ``migrating_from`` (its table holds its own key and the
source's public key) -> ``ctl migrate mh-target`` (the source learns the
target's public key) -> migrate (pages cross encrypted and arrive intact)
-> completion (the source key is retired; a replayed ``migrating_from``
releases nothing new) -> the leak scan finds no MH private key, transport key
or PSK in anything the agents, the owner, QMP or the event logs wrote.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.e2e.harness import (
    DIGEST,
    KEYAGENT,
    World,
    ctl,
    ctl_json,
    free_port,
    leak_checked,
    qmp_once,
    scan_launch_secrets,
    wait_for,
)

MH_PRIVATE = "e1d17176-1244-40d6-a793-71c9344c786e"
MH_SOURCE = "6109108f-0824-4106-b59e-46a19b275b0d"


def qmp(path, command: str, args: dict | None = None):
    """One command on a simulator's QMP socket (it serves several clients); an error as ExecuteError."""
    return qmp_once(path, command, args or {}, client="e2e-mh-probe")


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Side:
    """One host: a simulated SEV VM with an MH, and its agent."""

    def __init__(self, world: World, name: str) -> None:
        self.world, self.name = world, name
        self.qmp = world.tmp / f"{name}-qmp.sock"
        self.run_dir = world.tmp / f"{name}-run"
        self.control = self.run_dir / "control.sock"
        self.secrets_out = world.tmp / f"{name}-mh-keys.json"
        self.sim = world.spawn(
            f"{name}-sim",
            [
                "simulate",
                "--qmp",
                f"unix:{self.qmp}",
                "--sev",
                "--tik",
                str(world.tmp / "tik.bin"),
                "--tek",
                str(world.tmp / "tek.bin"),
                "--digest",
                DIGEST.hex(),
                "--mh",
                "--mh-secrets-out",
                str(self.secrets_out),
            ],
        )
        wait_for(lambda: self.qmp.exists() or self.sim.popen.poll() is not None, what=f"{name} simulator")
        assert self.sim.popen.poll() is None, self.sim.stderr

    def start_agent(self, owner_url: str, *extra: str) -> None:
        self.agent = self.world.spawn(
            f"{self.name}-agent",
            [
                "run",
                "--qmp",
                f"unix:{self.qmp}",
                "--owner-url",
                owner_url,
                "--vm-name",
                "vm1",
                "--vm-run-dir",
                str(self.run_dir),
                "--sev-mh",
                "true",
                "--event-log",
                str(self.world.tmp / f"{self.name}-events.jsonl"),
                "--log-level",
                "debug",
                *extra,
            ],
        )
        wait_for(
            lambda: self.q("x-sim-query-state")["status"] == "running" or self.agent.popen.poll() is not None,
            timeout=30,
            what=f"{self.name} launch",
        )
        assert self.agent.popen.poll() is None, self.agent.stderr
        wait_for(lambda: ctl(self.control, "status").returncode == 0, what=f"{self.name} agent ready")

    def q(self, command: str, args: dict | None = None):
        return qmp(self.qmp, command, args)

    def entries(self) -> dict[str, dict]:
        return {e["guid"]: e for e in self.q("x-sim-query-secrets")["entries"]}

    def mh_keys(self) -> dict:
        return json.loads(self.secrets_out.read_text())


def owner(world: World) -> tuple[str, object]:
    toml = world.tmp / "owner.toml"
    toml.write_text(f"""
[vm.vm1]
tik = "tik.bin"
tek = "tek.bin"
policy = 1
digest = "{DIGEST.hex()}"
secret_gpa = 0x80c000
secret_size = 0xc00
mh = true
[[vm.vm1.secret]]
guid = "luks-key"
file = "disk.pass"
""")
    proc = world.spawn("owner", ["owner", "serve", "--config", str(toml), "--listen", "127.0.0.1:0"])
    return proc.listening(what="owner"), proc


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    runs = ("src-run", "dst-run", "next-run")
    events = ("src-events.jsonl", "dst-events.jsonl", "next-events.jsonl", "owner.toml")
    with leak_checked(w, dirs=runs, files=events) as scan:
        scan_launch_secrets(scan, w)
        yield w
        # registered at the end: the simulators wrote them while the test ran
        for path in sorted(tmp_path.glob("*-mh-keys.json")):
            for name, value in json.loads(path.read_text()).items():
                if value:
                    scan.secret(f"{path.name}: MH {name} key", bytes.fromhex(value))


def test_mh_keys_boot_migrate_complete_and_never_leak(world):
    url, owner_proc = owner(world)
    psk = os.urandom(32)
    (world.tmp / "psk.bin").write_bytes(psk)
    os.chmod(world.tmp / "psk.bin", 0o600)
    world.scan.secret("migration PSK", psk)

    # -- boot: the identity key and an empty source key ---------------------------------------
    src = Side(world, "src")
    src.start_agent(url)
    table = src.entries()
    assert table[MH_PRIVATE]["length"] == 32 and table[MH_SOURCE]["length"] == 0
    src_mh = src.q("x-mh-query")
    assert src_mh["role"] == "boot" and src_mh["key-digest"] is None
    src_public = base64.b64decode(src_mh["public-key"])

    # nothing to hand over before a target is attested
    refused = ctl(src.control, "migrate", "mh-target")
    assert refused.returncode == 1 and "no migration of this vm is in flight" in refused.stderr

    # -- the target launches as a migration target ------------------------------------------------
    dst = Side(world, "dst")
    dst.start_agent(url, "--incoming")
    table = dst.entries()
    assert table[MH_PRIVATE]["length"] == 32
    assert table[MH_SOURCE]["sha256"] == hashlib.sha256(src_public).hexdigest()
    assert table[MH_PRIVATE]["sha256"] != src.entries()[MH_PRIVATE]["sha256"]  # a key of its own
    dst_mh = dst.q("x-mh-query")
    assert dst_mh["role"] == "target" and dst_mh["source-public-key"] == src_mh["public-key"]
    assert dst_mh["key-digest"]

    # a key the hypervisor makes up is refused by the source MH (no owner tag)
    from qemu.qmp import ExecuteError

    forged = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(ExecuteError, match="tag does not verify"):
        src.q("x-mh-set-peer-key", {"public-key": forged, "tag": forged})

    # -- the source learns the target's public key, both derive the same transport key ----------
    answer = ctl_json(src.control, "migrate", "mh-target")
    assert answer["status"] == "peer key set"
    src_mh = src.q("x-mh-query")
    assert src_mh["role"] == "source" and src_mh["peer-public-key"] == dst_mh["public-key"]
    assert src_mh["key-digest"] == dst_mh["key-digest"]

    # -- migrate: pages cross encrypted and arrive intact -------------------------------------------
    uri = f"tcp:127.0.0.1:{free_port()}"
    assert ctl_json(dst.control, "migrate", "accept", "--psk-file", str(world.tmp / "psk.bin"), "--uri", uri)
    assert ctl_json(src.control, "migrate", "start", "--psk-file", str(world.tmp / "psk.bin"), "--uri", uri)
    done = ctl(src.control, "migrate", "wait", "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr + src.agent.stderr
    assert json.loads(ctl(dst.control, "migrate", "wait", "--timeout", "30").stdout)["status"] == "completed"
    src_mh, dst_mh = src.q("x-mh-query"), dst.q("x-mh-query")
    assert src_mh["pages-sent"] == dst_mh["pages-received"] == 8
    assert src_mh["sent-digest"] == dst_mh["received-digest"]
    assert src_mh["role"] == "retired"  # the source MH's key is destroyed after success
    assert dst_mh["role"] == "boot"  # the target keeps its identity: the next migration's source

    # -- completion: the source key is retired at the owner ---------------------------------------
    assert "guest owner retired an MH key" in src.agent.stderr
    owner_lines = [json.loads(line) for line in owner_proc.stderr.splitlines() if line.startswith("{")]
    complete = [r for r in owner_lines if r.get("request") == "mh complete" and r.get("status") == 200]
    assert len(complete) == 1 and complete[0]["mh_retired"] == hashlib.sha256(src_public).hexdigest()[:16]
    assert post(url, "/v1/mh/complete", {"vm": "vm1", "status": "completed"})[0] == 409
    assert post(url, "/v1/mh/target", {"vm": "vm1"})[0] == 409

    # a replayed migrating_from request releases nothing new
    sev = dst.q("query-sev")
    blob = dst.q("query-sev-launch-measure")["data"]
    body = {
        "vm": "vm1",
        "measurement": blob,
        "api_major": sev["api-major"],
        "api_minor": sev["api-minor"],
        "build_id": sev["build-id"],
        "policy": sev["policy"],
        "migrating_from": "vm1",
    }
    status, answer = post(url, "/v1/secret", body)
    if status == 200:  # an owner that resends a released blob's answer: the same packet, nothing new
        released = [
            rec["event"]["packet_header"]
            for rec in map(json.loads, (world.tmp / "dst-events.jsonl").read_text().splitlines())
            if rec.get("kind") == "event" and rec["event"].get("type") == "OwnerReleased"
        ]
        assert released == [answer["packet_header"]]
    else:
        assert status == 409, answer
    made = [r for r in owner_lines if r.get("mh") in ("boot", "migration target")]
    assert len(made) == 2  # one identity at boot, one target key: no more

    # the next migration starts from the VM's new live key: the retired source key is not released again
    nxt = Side(world, "next")
    nxt.start_agent(url, "--incoming")
    dst_public = base64.b64decode(dst.q("x-mh-query")["public-key"])
    assert nxt.entries()[MH_SOURCE]["sha256"] == hashlib.sha256(dst_public).hexdigest()
    assert nxt.q("x-mh-query")["source-public-key"] == base64.b64encode(dst_public).decode()
    owner_lines = [json.loads(line) for line in owner_proc.stderr.splitlines() if line.startswith("{")]
    sources = [r["mh_source"] for r in owner_lines if r.get("mh") == "migration target"]
    assert sources == [hashlib.sha256(k).hexdigest()[:16] for k in (src_public, dst_public)]

    for side in ("src", "dst"):  # every flow, the MH steps too, replays from its event log
        check = subprocess.run(
            [*KEYAGENT, "replay", "--check", str(world.tmp / f"{side}-events.jsonl")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    for side in (src, dst):  # what the leak scan looks for: both private keys and both transport keys
        assert len(side.mh_keys()["private"]) == len(side.mh_keys()["transport"]) == 64
        # control.sock, and launch.json: the public measurement a restarted agent compares (docs/crash-only.md)
        leftovers = [p.name for p in side.run_dir.rglob("*") if p.name not in ("control.sock", "launch.json")]
        assert leftovers == [], leftovers


def test_a_migration_without_the_peer_key_fails_and_the_owner_retires_the_targets_key(world):
    url, owner_proc = owner(world)
    (world.tmp / "psk.bin").write_bytes(os.urandom(32))
    src, dst = Side(world, "src"), Side(world, "dst")
    src.start_agent(url)
    dst.start_agent(url, "--incoming")
    target_key = base64.b64decode(dst.q("x-mh-query")["public-key"])

    # no 'ctl migrate mh-target': the source MH has no transport key and sends nothing
    uri = f"tcp:127.0.0.1:{free_port()}"
    ctl_json(dst.control, "migrate", "accept", "--psk-file", str(world.tmp / "psk.bin"), "--uri", uri)
    ctl_json(src.control, "migrate", "start", "--psk-file", str(world.tmp / "psk.bin"), "--uri", uri)
    done = ctl(src.control, "migrate", "wait", "--timeout", "60")
    assert done.returncode == 1 and json.loads(done.stdout)["status"] == "failed"
    assert "no transport key" in json.loads(done.stdout)["error"]
    ctl(dst.control, "migrate", "cancel")  # the destination would wait for its deadline
    assert src.q("x-mh-query")["pages-sent"] == 0 and dst.q("x-mh-query")["pages-received"] == 0

    wait_for(lambda: "guest owner retired an MH key" in src.agent.stderr, what="the report")
    owner_lines = [json.loads(line) for line in owner_proc.stderr.splitlines() if line.startswith("{")]
    (complete,) = [r for r in owner_lines if r.get("request") == "mh complete"]
    assert complete["migration"] == "failed" and complete["mh_retired"] == hashlib.sha256(target_key).hexdigest()[:16]
    # the source's key stays live: there is nothing in flight to hand over
    assert post(url, "/v1/mh/target", {"vm": "vm1"})[0] == 409
    assert src.q("x-mh-query")["role"] == "boot"
