"""Fixtures for the simulator tests: a short socket path, known keys, clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import uuid

import pytest

from agent.sev.guids import LUKS_KEY_GUID
from agent.sev.measurement import split_blob
from agent.sev.packet import build_packet
from agent.sev.secret_table import build_secret_table
from agent.tools.sim.machine import SimConfig
from agent.tools.sim.qmp_server import Simulator

TIK = bytes(range(16))
TEK = bytes(range(16, 32))
DIGEST = hashlib.sha256(b"tests/sim firmware").digest()
DISK_PASS = b"sim test passphrase \x00\xff"


@pytest.fixture
def sock_path(tmp_path):
    """A unix socket path in tmp_path, or a shorter one if that is too long."""
    path = str(tmp_path / "qmp.sock")
    if len(path) < 100:
        yield path
        return
    short = tempfile.mkdtemp(prefix="sim", dir="/tmp")
    try:
        yield os.path.join(short, "qmp.sock")
    finally:
        shutil.rmtree(short, ignore_errors=True)


def make_config(**overrides) -> SimConfig:
    base = dict(tik=TIK, tek=TEK, digest=DIGEST)
    base.update(overrides)
    return SimConfig(**base)


@pytest.fixture
async def sim(sock_path):
    async with Simulator(make_config(), sock_path) as s:
        yield s


def packet_for(blob: bytes, entries=None, tik: bytes = TIK, tek: bytes = TEK) -> tuple[str, str]:
    """(packet-header b64, secret b64) as a guest owner would build them."""
    import base64

    measure, _ = split_blob(blob)
    table = build_secret_table(entries or [(LUKS_KEY_GUID, DISK_PASS)])
    header, ciphertext = build_packet(tik, tek, measure, table, iv=os.urandom(16))
    return base64.b64encode(header).decode(), base64.b64encode(ciphertext).decode()


class RawClient:
    """A bare QMP client over asyncio streams, to see the wire as it is."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict | None = None
        self.raw_lines: list[bytes] = []

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        client.greeting = await client.recv()
        return client

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> dict:
        line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
        self.raw_lines.append(line)
        return json.loads(line)

    async def cmd(self, name: str, arguments: dict | None = None, **extra) -> dict:
        msg = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        await self.send_raw(json.dumps(msg).encode())  # no newline, like qemu.qmp
        return await self.recv()

    async def negotiate(self) -> None:
        assert await self.cmd("qmp_capabilities") == {"return": {}}

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, BrokenPipeError):
            pass


@pytest.fixture
async def client(sim):
    c = await RawClient.connect(sim.path)
    await c.negotiate()
    yield c
    await c.close()


def new_guid() -> uuid.UUID:
    return uuid.uuid4()
