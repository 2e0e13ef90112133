"""Real processes for end-to-end tests: simulator, owner, agent, stand-in owners.

Every process is the installed ``keyagent`` command (or ``python -m
agent.cli``), talking over real unix sockets and real HTTP.  Everything it
prints is captured for the leak scan.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.leakscan import LeakScan

KEYAGENT = [sys.executable, "-m", "agent.cli"]
DIGEST = hashlib.sha256(b"keyagent-e2e-firmware").digest()
DISK_PASS = b"e2e disk passphrase: tr0ub4dor&3 \x00\xff binary tail"
LUKS_GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def qmp_once(path: str | Path, command: str, args: dict | None = None, client: str = "e2e-probe"):
    """One QMP command on its own connection (QEMU and the simulator serve
    several monitors' clients); an error answer raises ExecuteError."""
    from qemu.qmp import QMPClient
    from qemu.qmp.protocol import ConnectError
    from qemu.qmp.qmp_client import NegotiationError

    async def go():
        qmp = QMPClient(client)
        for attempt in range(5):
            try:
                await qmp.connect(str(path))
                break
            except ConnectError as exc:
                # QEMU switches a monitor to command mode before it answers
                # qmp_capabilities, so an event from another thread (a
                # migration's MIGRATION_PASS) may come first, and qemu.qmp
                # fails the negotiation; the agent retries its connect the same way
                if not isinstance(exc.exc, NegotiationError) or attempt == 4:
                    raise
                await asyncio.sleep(0.05)
        try:
            return await qmp.execute(command, args)
        finally:
            try:
                await qmp.disconnect()
            except Exception:  # after quit, QEMU closes first
                pass

    return asyncio.run(go())


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def listening(self, timeout: float = 10.0, what: str = "owner listening line") -> str:
        """The URL in the first stdout line of ``owner serve`` (``{"listening": ...}``), once it is there."""
        wait_for(lambda: self.stdout_path.stat().st_size > 0 or self.popen.poll() is not None, timeout, what)
        assert self.popen.poll() is None, self.stderr
        return json.loads(self.stdout.splitlines()[0])["listening"]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class World:
    """One test's processes and files, all under ``tmp``."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tik = os.urandom(16)
        self.tek = os.urandom(16)
        (self.tmp / "tik.bin").write_bytes(self.tik)
        (self.tmp / "tek.bin").write_bytes(self.tek)
        (self.tmp / "disk.pass").write_bytes(DISK_PASS)
        os.chmod(self.tmp / "tik.bin", 0o600)
        os.chmod(self.tmp / "tek.bin", 0o600)
        self.qmp = str(self.tmp / "qmp.sock")

    def spawn(self, name: str, args: list[str], env: dict | None = None) -> Proc:
        out = self.tmp / f"{name}.stdout"
        err = self.tmp / f"{name}.stderr"
        popen = subprocess.Popen(
            [*KEYAGENT, *args],
            stdout=open(out, "wb"),
            stderr=open(err, "wb"),
            stdin=subprocess.DEVNULL,
            cwd=self.tmp,
            env={**os.environ, **(env or {})},
        )
        proc = Proc(name, popen, out, err)
        self.procs.append(proc)
        return proc

    # -- the simulator --------------------------------------------------------
    def simulator(self, *extra: str, sev_es: bool = False) -> Proc:
        proc = self.spawn(
            "sim",
            [
                "simulate",
                "--qmp",
                f"unix:{self.qmp}",
                "--sev-es" if sev_es else "--sev",
                "--tik",
                str(self.tmp / "tik.bin"),
                "--tek",
                str(self.tmp / "tek.bin"),
                "--digest",
                DIGEST.hex(),
                *extra,
            ],
        )
        wait_for(lambda: os.path.exists(self.qmp) or proc.popen.poll() is not None, what="simulator socket")
        assert proc.popen.poll() is None, proc.stderr
        return proc

    def sim_query(self, command: str) -> dict:
        """Ask the simulator directly (it serves several clients)."""
        return qmp_once(self.qmp, command)

    # -- the owner ------------------------------------------------------------
    def owner_config(self, digest: bytes = DIGEST, policy: int = 1) -> Path:
        path = self.tmp / "owner.toml"
        path.write_text(f"""
[vm.vm1]
tik = "tik.bin"
tek = "tek.bin"
policy = {policy}
digest = "{digest.hex()}"
[[vm.vm1.secret]]
guid = "luks-key"
file = "disk.pass"
""")
        return path

    def owner(self, digest: bytes = DIGEST, policy: int = 1) -> str:
        cfg = self.owner_config(digest, policy)
        proc = self.spawn("owner", ["owner", "serve", "--config", str(cfg), "--listen", "127.0.0.1:0"])
        return proc.listening()

    # -- the agent ------------------------------------------------------------
    def agent(self, owner_url: str, *extra: str) -> Proc:
        return self.spawn(
            "agent",
            [
                "run",
                "--qmp",
                f"unix:{self.qmp}",
                "--owner-url",
                owner_url,
                "--vm-name",
                "vm1",
                "--event-log",
                str(self.tmp / "events.jsonl"),
                "--log-level",
                "debug",
                *extra,
            ],
        )

    def replay_check(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*KEYAGENT, "replay", "--check", str(self.tmp / "events.jsonl")], capture_output=True, text=True, timeout=60
        )

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


@dataclass
class HostIdentity:
    """A host key made by ``keyagent hostkey init`` and the directory of the hosts it trusts."""

    name: str
    key: Path
    public: str
    trusted: Path

    def trust(self, *others: HostIdentity) -> None:
        for other in others:
            (self.trusted / other.name).write_text(other.public + "\n")

    def distrust(self, other: HostIdentity) -> None:
        (self.trusted / other.name).unlink()

    def flags(self) -> list[str]:
        return ["--migration-host-key", str(self.key), "--migration-trusted-hosts", str(self.trusted)]

    def seed(self) -> bytes:
        """The raw private key, for the leak scan."""
        from cryptography.hazmat.primitives import serialization

        from agent.crypto.hostkey import load_private

        return load_private(str(self.key)).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )


def host_identity(tmp: Path, name: str) -> HostIdentity:
    base = tmp / f"hostid-{name}"
    (base / "trusted").mkdir(parents=True)
    os.chmod(base / "trusted", 0o755)
    out = subprocess.run(
        [*KEYAGENT, "hostkey", "init", str(base / "host.key")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return HostIdentity(name, base / "host.key", out.stdout.strip(), base / "trusted")


def trusting_hosts(tmp: Path, *names: str) -> list[HostIdentity]:
    """Hosts that all trust each other (the sealed hand-over needs them)."""
    hosts = [host_identity(tmp, n) for n in names]
    for h in hosts:
        h.trust(*(o for o in hosts if o is not h))
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandInOwner:
    """A guest owner that misbehaves on purpose: stalls, or answers garbage."""

    def __init__(self, status: int = 200, body: bytes = b"{}", stall: float = 0.0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if outer.stall:
                    time.sleep(outer.stall)
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(outer.body)))
                    self.end_headers()
                    self.wfile.write(outer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent gave up waiting, as it should

            def log_message(self, *args):
                pass

        self.status, self.body, self.stall = status, body, stall
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scan_launch_secrets(scan: LeakScan, world: World) -> None:
    """The secrets of every SEV launch test: the disk passphrase, the VM's TIK and TEK."""
    scan.secret("disk passphrase", DISK_PASS)
    scan.secret("TIK", world.tik)
    scan.secret("TEK", world.tek)


@contextmanager
def leak_checked(world: World, *, dirs: tuple[str, ...] = ("run",), files: tuple[str, ...] = ("events.jsonl",)):
    """Run a test's processes under the leak scan.

    Argv is watched while the test runs; afterwards every process's stderr
    and stdout, the named files and directories (relative to the world's
    tmp) are searched for every secret the test registered on ``world.scan``.
    """
    from tests.leakscan import ArgvWatcher, LeakScan

    scan = LeakScan()
    world.scan = scan
    with ArgvWatcher() as argv:
        scan.argv = argv
        try:
            yield scan
        finally:
            world.close()
    for proc in world.procs:
        scan.text(f"{proc.name} stderr", proc.stderr)
        scan.text(f"{proc.name} stdout", proc.stdout)
    for name in files:
        if (world.tmp / name).exists():
            scan.file(str(world.tmp / name))
    scan.dirs += [str(world.tmp / d) for d in dirs]
    scan.check()


def ctl(control: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``keyagent ctl`` against the agent's control socket at ``control``."""
    return subprocess.run(
        [*KEYAGENT, "ctl", "--control", f"unix:{control}", *args], capture_output=True, text=True, timeout=timeout
    )


def ctl_json(control: Path, *args: str) -> dict:
    """``keyagent ctl`` that must succeed: its JSON answer."""
    out = ctl(control, *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
