"""``keyagent demo``: an SEV launch on the embedded simulator, then a refusal.

Everything is real except the SEV hardware: the simulator is a QMP server
on a unix socket with the PSP's crypto, the guest owner is the reference
service over HTTP on loopback, and the agent is the same sidecar ``keyagent
run`` starts, writing an event log that is printed as a timeline and
re-checked with replay.  Exit 0 when the good launch ran and the bad one
was refused with the VM never resumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
from pathlib import Path

DEMO_SECRET = b"demo disk passphrase (never printed)"


def register(sub) -> None:
    p = sub.add_parser("demo", help="launch a simulated SEV VM with a local guest owner")
    p.add_argument("--log-level", default="critical", metavar="LEVEL",
                   help="agent log lines on stderr (default: none)")
    p.set_defaults(func=run)


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


async def _launch(work: Path, name: str, owner_digest: bytes, firmware_digest: bytes) -> tuple[int, str, dict]:
    from agent.config import load_config
    from agent.io.http import HttpServer
    from agent.owner.config import load_owner_config
    from agent.owner.service import OwnerService
    from agent.sidecar import Sidecar, SidecarOptions
    from agent.sim.machine import SimConfig
    from agent.sim.qmp_server import Simulator

    tik, tek = os.urandom(16), os.urandom(16)
    d = work / name
    d.mkdir(mode=0o700)
    _write(d / "tik.bin", tik)
    _write(d / "tek.bin", tek)
    _write(d / "disk.pass", DEMO_SECRET)
    (d / "owner.toml").write_text(
        f'[vm.{name}]\ntik = "tik.bin"\ntek = "tek.bin"\npolicy = 1\n'
        f'digest = "{owner_digest.hex()}"\n'
        f'[[vm.{name}.secret]]\nguid = "luks-key"\nfile = "disk.pass"\n')

    owner = HttpServer(OwnerService(load_owner_config(d / "owner.toml")).handle)
    host, port = await owner.start_tcp("127.0.0.1", 0)
    qmp_path = str(d / "qmp.sock")
    sim_cfg = SimConfig(tik=tik, tek=tek, digest=firmware_digest, policy=1)
    try:
        async with Simulator(sim_cfg, qmp_path) as sim:
            cfg = load_config(None, {"vm_name": name, "sev_owner_url": f"http://{host}:{port}",
                                     "sev_timeout_s": "10"})
            events = str(d / "events.jsonl")
            sidecar = Sidecar(cfg, SidecarOptions(qmp_path=qmp_path, control_path=None,
                                                  event_log=events))
            code = await sidecar.run()
            state = {"status": sim.status, "secret_entries": len(sim.injected_entries),
                     "resumed_without_secret": sim.cont_before_secret}
    finally:
        await owner.close()
    return code, events, state


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)))


def _show(result: tuple[int, str, dict]) -> tuple[int, dict]:
    """Print one launch: its event log as a timeline, the outcome, the replay check."""
    from agent.eventlog import read_records
    from agent.replay import check, print_timeline

    code, events, state = result
    records = list(read_records(events))
    print_timeline(records, sys.stdout)
    entries = state["secret_entries"]
    print(f"agent exit status {code}; VM {state['status']}"
          f"{'' if state['status'] == 'running' else ' (never resumed)'}, "
          f"{entries} secret entr{'y' if entries == 1 else 'ies'} injected")
    print(check(records))
    return code, state


def run(args) -> int:
    from agent.logs import setup_logging

    setup_logging(args.log_level)
    firmware = hashlib.sha256(b"keyagent demo firmware").digest()
    ok = True
    with tempfile.TemporaryDirectory(prefix="keyagent-demo-") as tmp:
        work = Path(tmp)

        _section("1. the guest owner expects this firmware: secret released, VM runs")
        code, state = _show(asyncio.run(_launch(work, "demo-good", firmware, firmware)))
        ok &= code == 0 and state["status"] == "running" and not state["resumed_without_secret"]

        _section("2. the firmware differs from what the owner expects: refused")
        other = hashlib.sha256(b"tampered firmware").digest()
        code, state = _show(asyncio.run(_launch(work, "demo-bad", firmware, other)))
        ok &= code == 1 and state["status"] != "running" and state["secret_entries"] == 0

    _section("result")
    print("demo passed: the VM ran only with a released secret" if ok else "demo FAILED")
    return 0 if ok else 1
