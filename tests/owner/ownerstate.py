"""Helpers for the owner's database tests: an owner dir with a session VM, requests, answers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from agent.io.http import Request
from agent.sev.measurement import measurement_blob, split_blob
from agent.sev.packet import open_packet
from agent.sev.secret_table import parse_secret_table

from .conftest import API, DIGEST, POLICY, OwnerDir, write_owner_dir

SESSION_VM = """
[vm.vm2]
session = true
platform = "any"
policy = {policy}
digest = "{digest}"
[[vm.vm2.secret]]
guid = "luks-key"
file = "vm1-disk.pass"
"""


def write_state_owner_dir(root: Path, state_key: bytes | None = None) -> OwnerDir:
    """vm1 (offline TIK/TEK) and vm2 (launch sessions, any platform); ``[owner] state_key`` if given."""
    d = write_owner_dir(root)
    head = ""
    if state_key is not None:
        (root / "state.key").write_bytes(state_key)
        os.chmod(root / "state.key", 0o600)
        head = '[owner]\nstate_key = "file:state.key"\n'
    d.toml.write_text(head + d.toml.read_text() + SESSION_VM.format(policy=POLICY, digest=DIGEST.hex()))
    return d


@cache
def _platform():
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.tools.sim.psp import Platform

    key = ec.generate_private_key(ec.SECP384R1())
    return Platform(key), key


def platform():
    """One simulated platform per test process: the test holds its PDH key, so it can open sessions."""
    return _platform()[0]


def session_request() -> dict:
    return {"vm": "vm2", "pdh": base64.b64encode(platform().pdh_cert.to_bytes()).decode(), "policy": POLICY}


def session_keys(answer: dict) -> tuple[bytes, bytes]:
    """(tik, tek) the owner put in a session answer."""
    from agent.sev.session import open_session

    godh, blob = base64.b64decode(answer["godh"]), base64.b64decode(answer["session"])
    tek, tik = open_session(_platform()[1], godh, blob, POLICY)
    return tik, tek


def secret_request(vm: str, tik: bytes, mnonce: bytes) -> dict:
    blob = measurement_blob(tik, API[0], API[1], API[2], POLICY, DIGEST, mnonce)
    return {
        "vm": vm,
        "measurement": base64.b64encode(blob).decode(),
        "api_major": API[0],
        "api_minor": API[1],
        "build_id": API[2],
        "policy": POLICY,
    }


def opened(request: dict, raw: bytes, tik: bytes, tek: bytes) -> list:
    """The secret table a 200 answer carries (the packet opens under this launch's keys)."""
    body = json.loads(raw)
    measure, _ = split_blob(base64.b64decode(request["measurement"]))
    table = open_packet(tik, tek, measure, base64.b64decode(body["packet_header"]), base64.b64decode(body["secret"]))
    return parse_secret_table(table)


def http_request(path: str, body: dict) -> Request:
    return Request("POST", path, {"content-type": "application/json"}, json.dumps(body).encode(), ("127.0.0.1", 1))


async def call(service, path: str, body: dict) -> tuple[int, bytes]:
    """One request straight into OwnerService.handle: (status, body bytes as they would be sent)."""
    response = await service.handle(http_request(path, body))
    return response.status, response.body


# -- owner serve in a subprocess -------------------------------------------------------------


@dataclass
class Replica:
    proc: subprocess.Popen
    url: str
    log: Path  # its stderr: a file, never a pipe nobody reads (a full pipe would stall the owner)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        return self.log.read_text()


def start_replica(keyagent: list[str], toml: Path, db: str) -> Replica:
    """``keyagent owner serve --db DB`` on a free port; waits for its listening line."""
    log = toml.parent / f"owner-{os.urandom(4).hex()}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*keyagent, "owner", "serve", "--config", str(toml), "--listen", "127.0.0.1:0", "--db", db],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"owner serve did not start: {log.read_text()}")
    return Replica(proc, json.loads(line)["listening"], log)


async def flood(urls: list[str], path: str, bodies: list[dict], *, timeout: float = 60.0) -> list[tuple[int, bytes]]:
    """All at once, request i to urls[i % len(urls)]; (status, raw body), or (0, b"") on a broken connection."""
    from .rawhttp import post_raw

    async def one(i: int, body: dict) -> tuple[int, bytes]:
        try:
            return await post_raw(urls[i % len(urls)] + path, body, timeout=timeout)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            return 0, b""

    return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


def audit_lines(keyagent: list[str], db: str, *extra: str) -> list[dict]:
    out = subprocess.run(
        [*keyagent, "owner", "audit", "--db", db, *extra], capture_output=True, text=True, timeout=60, check=True
    )
    return [json.loads(line) for line in out.stdout.splitlines()]
