"""``keyagent demo``: an SEV launch on the embedded simulator, then two refusals.

Everything is real except the SEV hardware: the simulator is a QMP server
on a unix socket with the PSP's crypto, the guest owner is the reference
service over HTTP on loopback, and the agent is the same sidecar ``keyagent
run`` starts, writing an event log that is printed as a timeline and
re-checked with replay.  The launch session comes from the owner
(``POST /v1/session``) for the simulated platform's PDH, whose chain ends
at the simulator's own AMD root: the owner trusts that root because its
``owner.toml`` says so (``[platform] amd_roots``), as a real owner trusts
AMD's.  Exit 0 when the good launch ran, the launch with other firmware was
refused with the VM never resumed, and a platform that forged its own AMD
got no session.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
from pathlib import Path

DEMO_SECRET = b"demo disk passphrase (never printed)"


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


async def _owner(d: Path, name: str, owner_digest: bytes):
    """The owner for one VM: sessions only, trusting the simulator's AMD root."""
    from agent.io.http import HttpServer
    from agent.owner.config import load_owner_config
    from agent.owner.service import OwnerService
    from agent.tools.sim.amd import shared_amd

    _write(d / "disk.pass", DEMO_SECRET)
    shared_amd().write_roots(str(d / "roots"))
    (d / "owner.toml").write_text(
        f'[platform]\namd_roots = "roots"\n\n'
        f"[vm.{name}]\nsession = true\npolicy = 1\n"
        f'digest = "{owner_digest.hex()}"\n'
        f'[[vm.{name}.secret]]\nguid = "luks-key"\nfile = "disk.pass"\n'
    )
    owner = HttpServer(OwnerService(load_owner_config(d / "owner.toml")).handle)
    host, port = await owner.start_tcp("127.0.0.1", 0)
    return owner, f"http://{host}:{port}"


async def _ask_session(url: str, name: str, platform) -> tuple[int, dict]:
    """What the management layer (or ``keyagent launch``) does before QEMU starts."""
    import base64

    from agent.io.http import request_json
    from agent.protocol.owner import SESSION_PATH

    body = {
        "vm": name,
        "policy": 1,
        "pdh": base64.b64encode(platform.pdh_cert.to_bytes()).decode(),
        "cert_chain": base64.b64encode(platform.chain.to_bytes()).decode(),
    }
    return await request_json("POST", url + SESSION_PATH, body, timeout=10)


async def _launch(work: Path, name: str, owner_digest: bytes, firmware_digest: bytes) -> tuple[int, str, dict]:
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.app.config import load_config
    from agent.app.sidecar import Sidecar, SidecarOptions
    from agent.tools.sim.machine import SimConfig
    from agent.tools.sim.psp import Platform
    from agent.tools.sim.qmp_server import Simulator

    d = work / name
    d.mkdir(mode=0o700)
    owner, url = await _owner(d, name, owner_digest)
    try:
        pdh_key = ec.generate_private_key(ec.SECP384R1())
        status, answer = await _ask_session(url, name, Platform(pdh_key))
        if status != 200:
            raise RuntimeError(f"the owner refused the launch session: {answer.get('error')}")
        session = (base64.b64decode(answer["godh"]), base64.b64decode(answer["session"]))
        qmp_path = str(d / "qmp.sock")
        sim_cfg = SimConfig(pdh_private_key=pdh_key, session=session, digest=firmware_digest, policy=1)
        async with Simulator(sim_cfg, qmp_path) as sim:
            cfg = load_config(None, {"vm_name": name, "sev_owner_url": url, "sev_timeout_s": "10"})
            events = str(d / "events.jsonl")
            sidecar = Sidecar(cfg, SidecarOptions(qmp_path=qmp_path, control_path=None, event_log=events))
            code = await sidecar.run()
            state = {
                "status": sim.status,
                "secret_entries": len(sim.injected_entries),
                "resumed_without_secret": sim.cont_before_secret,
            }
    finally:
        await owner.close()
    return code, events, state


async def _forged_platform(work: Path, name: str) -> tuple[int, dict]:
    """A host that plays AMD itself: its own ARK and ASK sign its CEK."""
    from agent.tools.sim.amd import SimAmd
    from agent.tools.sim.psp import Platform

    d = work / name
    d.mkdir(mode=0o700)
    owner, url = await _owner(d, name, bytes(32))
    try:
        forger = SimAmd(product="forged")
        return await _ask_session(url, name, Platform(amd=forger))
    finally:
        await owner.close()


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)))


def _show(result: tuple[int, str, dict]) -> tuple[int, dict]:
    """Print one launch: its event log as a timeline, the outcome, the replay check."""
    from agent.app.eventlog import read_records
    from agent.app.replay import check, print_timeline

    code, events, state = result
    records = list(read_records(events))
    print_timeline(records, sys.stdout)
    entries = state["secret_entries"]
    print(
        f"agent exit status {code}; VM {state['status']}"
        f"{'' if state['status'] == 'running' else ' (never resumed)'}, "
        f"{entries} secret entr{'y' if entries == 1 else 'ies'} injected"
    )
    print(check(records))
    return code, state


def run(args) -> int:
    from agent.common.logs import setup_logging

    setup_logging(args.log_level)
    firmware = hashlib.sha256(b"keyagent demo firmware").digest()
    ok = True
    with tempfile.TemporaryDirectory(prefix="keyagent-demo-") as tmp:
        work = Path(tmp)

        _section("1. the guest owner expects this firmware: secret released, VM runs")
        code, state = _show(asyncio.run(_launch(work, "demo-good", firmware, firmware)))
        ok &= code == 0 and state["status"] == "running" and not state["resumed_without_secret"]

        _section("2. the firmware differs from what the owner expects: no session matches, refused")
        other = hashlib.sha256(b"tampered firmware").digest()
        code, state = _show(asyncio.run(_launch(work, "demo-bad", firmware, other)))
        ok &= code == 1 and state["status"] != "running" and state["secret_entries"] == 0

        _section("3. a platform whose CEK is signed by a self-made AMD root: no session")
        status, answer = asyncio.run(_forged_platform(work, "demo-forged"))
        print(f"POST /v1/session -> HTTP {status}: {answer.get('error', answer)}")
        ok &= status == 403 and str(answer.get("error", "")).startswith("platform not verified")

    _section("result")
    print("demo passed: the VM ran only with a released secret, on a verified platform" if ok else "demo FAILED")
    return 0 if ok else 1
