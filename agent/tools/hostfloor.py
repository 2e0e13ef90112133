"""The floor for host mode: one bare qemu.qmp process launching N SEV VMs at once.

``keyagent bench`` compares ``keyagent host`` (one agent process for every
VM on a host) with this script: one process, one asyncio loop, that for every
VM makes the same QMP calls and the same guest-owner round trip as the
agent's SEV launch (as its event log lists them: ``query-status``,
``query-sev``, ``query-sev-launch-measure``, ``POST /v1/secret``,
``sev-inject-launch-secret``, ``cont``), all VMs concurrently, with nothing
else: no event log, no structured logs, no redaction, no control sockets,
no state machine, no checks beyond what it needs to go on.

The owner round trip is one HTTP/1.1 request per connection over asyncio
streams, framed by h11 (what the agent's own client does, without the agent):
a blocking ``http.client`` call, as :mod:`agent.tools.benchfloor` makes for a
single VM, would serialise 100 VMs behind one another and flatter the agent.

Protocol with the bench: start it (``python -m agent.tools.hostfloor
--qmp-dir DIR --vms N --owner-url URL``); it imports everything, prints
``{"ready": true}`` and waits for a line on stdin; that line is "QEMU ready"
for every VM.  It then launches them all and prints one JSON line: per VM,
milliseconds from the go line to ``cont`` answered, or the reason it failed;
exit 0 when every VM launched.  The bench times both sides the same way,
from the simulator's stamps; this script's own figures are a cross-check.

``--duties DIR`` makes it the floor *with the agent's duties*: per VM it
also does, as barely as plain Python does them, what ``keyagent host`` must
do for each VM besides the launch's calls (the issue's "every VM keeps what
it has as a sidecar", DESIGN.md's crash-only start, the master key for
QEMU's secret objects, structured logs with secrets scrubbed): read and
parse its TOML file (written into ``DIR/conf`` before the ready line, as the
bench stages the host's), take its run_dir (``DIR/run/<vm>``: checked ours,
``flock``-ed for the VM's life), sweep it of stale key material (one
``scandir``; the VM's ``keyagent:<vm>:`` keys from one listing of the user
keyring per batch, as the host lists once per scan), ``qom-list /objects``
(the crash-only inspection), bind, chmod and listen on ``control.sock`` in
the run_dir and serve it, make a 32-byte master key, put it in the user
keyring and ``object-add`` it as ``secret_keyring`` (add_key(2) and
keyctl(2) through ctypes, the agent's six calls: add, setperm, then revoke
and unlink once QEMU has read it), write the launch note (create, write,
``fsync``, rename: on a worker thread, batched per loop turn as the host's
are, awaited before ``cont``), and write
the nine JSON info lines the host writes per VM while it launches
(``json.dumps`` of a dict to stderr, each checked for the hex form of the
VM's master key and launch secret).  It holds every VM's socket, lock and
QMP connection after the result line, as the host holds them for the VM's
life, until SIGTERM or SIGINT; then it lets them go (the host's three lines
per VM at a stop included) and exits.  It does no more than that: no state
machine, no event log (the bench's host has none: no ``--event-log-dir``),
no metrics, no adoption beyond finding none.

Not part of the agent, and it imports none of the agent's modules (the
socket names ``vm-000.sock`` ... are the simulator's ``--vms`` naming); the
QMP sequence is :mod:`agent.tools.benchfloor`'s, which imports none either.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import datetime
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import h11
from qemu.qmp import QMPClient

from agent.tools.benchfloor import sev_launch


def vm_name(index: int, count: int) -> str:
    """``keyagent simulate --vms``'s naming: vm-000, vm-001, ..."""
    return f"vm-{index:0{max(3, len(str(count - 1)))}d}"


async def post_json(url: str, body: dict, timeout: float) -> tuple[int, Any]:
    """One POST with a JSON body, one connection, h11 framing; (status, JSON answer)."""
    parts = urlsplit(url)
    assert parts.hostname is not None  # the bench's own owner URL

    async def exchange() -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            conn = h11.Connection(h11.CLIENT)
            data = json.dumps(body).encode()
            headers = [
                ("Host", parts.netloc),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Connection", "close"),
            ]
            writer.write(
                conn.send(h11.Request(method="POST", target=parts.path, headers=headers))
                + conn.send(h11.Data(data=data))
                + conn.send(h11.EndOfMessage())
            )
            await writer.drain()
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            return status, json.loads(b"".join(chunks) or b"null")
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)


async def launch_one(qmp_path: str, owner_url: str, vm: str, timeout: float = 30.0) -> None:
    """The agent's SEV launch, bare (benchfloor's :func:`sev_launch`, the owner
    asked over h11); raises on anything unexpected."""

    async def post(body: dict) -> tuple[int, Any]:
        return await post_json(owner_url.rstrip("/") + "/v1/secret", body, timeout)

    client = QMPClient(vm)
    await client.connect(qmp_path)
    try:
        stopped = await sev_launch(client, vm, post)
        if stopped is not None:
            raise RuntimeError(stopped)
    finally:
        await client.disconnect()


async def launch_all(qmp_dir: str, count: int, owner_url: str) -> dict:
    """Every VM at once; per VM the ms from now to its ``cont``, or why it failed."""
    t0 = time.monotonic()

    async def timed(i: int) -> tuple[str, float | str]:
        name = vm_name(i, count)
        try:
            await launch_one(os.path.join(qmp_dir, f"{name}.sock"), owner_url, name)
        except Exception as exc:
            return name, f"{type(exc).__name__}: {exc}"[:200]
        return name, round((time.monotonic() - t0) * 1000, 3)

    results = await asyncio.gather(*(timed(i) for i in range(count)))
    return {
        "launched_ms": {name: r for name, r in results if isinstance(r, float)},
        "failed": {name: r for name, r in results if isinstance(r, str)},
    }


# -- --duties: the agent's per-VM duties, as barely as Python does them -------------

# add_key(2) and keyctl(2) by number, through libc's syscall() (no keyutils)
_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219), "riscv64": (217, 219)}
KEY_SPEC_USER_KEYRING = -4
KEYCTL_REVOKE, KEYCTL_SETPERM, KEYCTL_DESCRIBE, KEYCTL_UNLINK, KEYCTL_READ = 3, 5, 6, 9, 11
#: possessor: all; user (QEMU runs as our uid): view, read, search
KEY_PERM = 0x3F000000 | 0x00010000 | 0x00020000 | 0x00080000
MASTER_ID = "keyagent-master"
MASTER_LEN = 32
NOTE = "launch.json"
NOTE_DEADLINE_S = 5.0
REDACTED = "<redacted>"
#: how long the VMs are held after the result line at most, without a signal
HOLD_S = 600.0
WORKERS = min(32, (os.cpu_count() or 1) + 4)  # the host's worker threads


class Keyring:
    """The user keyring, by syscall number (``ctypes``), as the agent calls it."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(os.uname().machine)
        if numbers is None:
            raise OSError(f"keyring syscalls unknown on {os.uname().machine}")
        self.add_key_nr, self.keyctl_nr = numbers
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def _call(self, nr: int, *args: Any) -> int:
        ret = self.libc.syscall(ctypes.c_long(nr), *args)
        if ret == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(ret)

    def _keyctl(self, op: int, *args: Any) -> int:
        return self._call(self.keyctl_nr, ctypes.c_int(op), *args)

    def add(self, description: str, payload: bytearray) -> int:
        """The key, readable by our uid; its payload copied once, into a buffer zeroed after."""
        buf = (ctypes.c_char * len(payload)).from_buffer_copy(payload)
        try:
            serial = self._call(
                self.add_key_nr,
                ctypes.c_char_p(b"user"),
                ctypes.c_char_p(description.encode()),
                buf,
                ctypes.c_size_t(len(payload)),
                ctypes.c_int(KEY_SPEC_USER_KEYRING),
            )
        finally:
            ctypes.memset(buf, 0, len(payload))
        try:
            self._keyctl(KEYCTL_SETPERM, ctypes.c_int(serial), ctypes.c_uint(KEY_PERM))
        except OSError:
            self.drop(serial)
            raise
        return serial

    def drop(self, serial: int) -> None:
        """Revoke and unlink, quietly (it may be gone)."""
        for op, *args in ((KEYCTL_REVOKE,), (KEYCTL_UNLINK, ctypes.c_int(KEY_SPEC_USER_KEYRING))):
            try:
                self._keyctl(op, ctypes.c_int(serial), *args)
            except OSError:
                pass

    def _read(self, op: int, serial: int) -> bytes:
        size = self._keyctl(op, ctypes.c_int(serial), None, ctypes.c_size_t(0))
        buf = ctypes.create_string_buffer(max(size, 1))
        got = self._keyctl(op, ctypes.c_int(serial), buf, ctypes.c_size_t(size))
        return buf.raw[: min(got, size)]

    def listing(self, prefix: str) -> list[tuple[int, str]]:
        """(serial, description) of the user keyring's keys under ``prefix``."""
        try:
            raw = self._read(KEYCTL_READ, KEY_SPEC_USER_KEYRING)
        except OSError:
            return []
        found = []
        for serial in struct.unpack(f"<{len(raw) // 4}i", raw[: len(raw) // 4 * 4]):
            try:
                desc = self._read(KEYCTL_DESCRIBE, serial).rstrip(b"\0").decode(errors="replace")
            except OSError:
                continue
            desc = desc.split(";", 4)[-1]
            if desc.startswith(prefix):
                found.append((serial, desc))
        return found


def write_duty_configs(root: str, qmp_dir: str, count: int, owner_url: str) -> None:
    """Each VM's TOML file (``root/conf``) and run_dir (``root/run``), as the
    bench stages the host's: before the clock."""
    conf, run = os.path.join(root, "conf"), os.path.join(root, "run")
    for d in (root, conf, run):
        os.makedirs(d, 0o700, exist_ok=True)
    for i in range(count):
        name = vm_name(i, count)
        run_dir = os.path.join(run, name)
        os.makedirs(run_dir, 0o700, exist_ok=True)
        qmp = "unix:" + os.path.join(qmp_dir, f"{name}.sock")
        with open(os.path.join(conf, f"{name}.toml"), "w") as f:
            f.write(
                f"[vm]\nname = {json.dumps(name)}\nrun_dir = {json.dumps(run_dir)}\nqmp = {json.dumps(qmp)}\n"
                f"[sev]\nowner_url = {json.dumps(owner_url)}\n"
            )


def write_note(run_dir: str, measurement: str) -> None:
    """The launch note: a fresh 0600 file, fsync-ed, renamed over the old one."""
    tmp = os.path.join(run_dir, f".{NOTE}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, json.dumps({"measurement": measurement}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(run_dir, NOTE))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_note(run_dir: str) -> str | None:
    """A previous launch's measurement, as a restarted agent reads it first."""
    try:
        fd = os.open(os.path.join(run_dir, NOTE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4097)
    finally:
        os.close(fd)
    try:
        note = json.loads(raw)
    except ValueError:
        return None
    return note.get("measurement") if isinstance(note, dict) else None


class Batches:
    """The calls asked in one turn of the loop, run on the pool as jobs of at
    most :data:`BATCH` calls (the host's ``OffLoop``, in short): one hand-off
    to a worker and one wake-up of the loop per job, not per call.  Measured
    on this bench, one ``run_in_executor`` per note cost 0.3 ms of CPU per VM
    more than these batches (docs/hostbench.md, session 5)."""

    BATCH = 8

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.pending: list[tuple[Any, tuple[Any, ...], asyncio.Future[Any]]] = []

    def call(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((fn, args, future))
        return future

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        calls, self.pending = self.pending, []
        for i in range(0, len(calls), self.BATCH):
            job = calls[i : i + self.BATCH]
            loop.run_in_executor(self.pool, _run_job, job).add_done_callback(_settle_job)


def _run_job(job: list) -> list:
    out: list[tuple[asyncio.Future[Any], Any, Exception | None]] = []
    for fn, args, future in job:
        try:
            out.append((future, fn(*args), None))
        except Exception as exc:
            out.append((future, None, exc))
    return out


def _settle_job(done: asyncio.Future[list]) -> None:
    for future, result, exc in done.result():
        if future.done():  # its caller stopped waiting
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class DutyVm:
    """One VM's duties, held for its life (until :meth:`release`)."""

    def __init__(self, conf: str, keyring: Keyring, off_loop: Batches) -> None:
        self.conf, self.keyring, self.off_loop = conf, keyring, off_loop
        self.name = os.path.basename(conf).removesuffix(".toml")
        self.forms: list[str] = []  # hex forms of this VM's live secrets, for the scrub
        self.lock_fd = -1
        self.client: QMPClient | None = None
        self.server: asyncio.AbstractServer | None = None
        self.control = ""
        self.master: bytearray | None = None
        self.run_dir = ""

    def log(self, event: str, **fields: Any) -> None:
        """One JSON info line on stderr, the VM's secrets' hex forms scrubbed."""
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        line = json.dumps({"vm": self.name, **fields, "event": event, "level": "info", "timestamp": now})
        for form in self.forms:
            if form in line:
                line = line.replace(form, REDACTED)
        sys.stderr.write(line + "\n")

    async def run(self, listing: list[tuple[int, str]]) -> None:
        # the configuration
        with open(self.conf, "rb") as f:
            cfg = tomllib.load(f)
        vm, owner_url = cfg["vm"], cfg["sev"]["owner_url"]
        self.name, self.run_dir, qmp = vm["name"], vm["run_dir"], vm["qmp"].removeprefix("unix:")
        self.log("VM starting", config=os.path.basename(self.conf))
        self._claim_run_dir(listing)
        # the monitor, and what a killed predecessor may have left in QEMU
        self.client = client = QMPClient(self.name)
        await client.connect(qmp)
        greeting: Any = client.greeting
        v = greeting.QMP.version["qemu"]
        self.log("QMP connected", qmp=qmp, qemu=f"{v['major']}.{v['minor']}.{v['micro']}")
        objects: Any = await client.execute("qom-list", {"path": "/objects"})
        if any(o["name"] == MASTER_ID or o["name"].startswith("keyagent-tls-") for o in objects):
            raise RuntimeError("QEMU holds a previous agent's objects: adopting them is not the floor's")
        await self._serve_control()
        await self._hand_over_master(client)
        read_note(self.run_dir)  # a running VM may need nothing (a restarted agent)

        async def post(body: dict) -> tuple[int, Any]:
            return await post_json(owner_url.rstrip("/") + "/v1/secret", body, 30.0)

        stopped = await sev_launch(client, self.name, post, self.duty)
        if stopped is not None:
            raise RuntimeError(stopped)

    def _claim_run_dir(self, listing: list[tuple[int, str]]) -> None:
        """Ours (a directory of our uid, 0700), locked for the VM's life, swept."""
        try:
            os.mkdir(self.run_dir, 0o700)
        except FileExistsError:
            pass
        self.lock_fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self.lock_fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
            raise RuntimeError(f"run_dir {self.run_dir} is not ours")
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the stale-key sweep: key directories and PSK files a killed agent left
        for entry in os.scandir(self.run_dir):
            if entry.name.startswith("key-") and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.name == "keys.psk":
                os.unlink(entry.path)
        prefix = f"keyagent:{self.name}:"
        for serial, desc in listing:
            if desc.startswith(prefix):
                self.keyring.drop(serial)

    async def _serve_control(self) -> None:
        """control.sock in the run_dir: bound, 0600 before it listens, served."""
        self.control = path = os.path.join(self.run_dir, "control.sock")
        try:
            os.unlink(path)  # a stale socket (the run_dir is ours alone)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(64)
            sock.setblocking(False)
            self.server = await asyncio.start_unix_server(self._answer, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Any request: 200 and the VM's name (the floor has no verbs to run)."""
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            body = json.dumps({"vm": self.name}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), 5.0)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _hand_over_master(self, client: QMPClient) -> None:
        """32 random bytes, through the user keyring into a secret_keyring object."""
        self.master = master = bytearray(os.urandom(MASTER_LEN))
        self.forms.append(master.hex())
        serial = self.keyring.add(f"keyagent:{self.name}:master", master)
        try:
            await client.execute("object-add", {"qom-type": "secret_keyring", "id": MASTER_ID, "serial": serial})
        finally:
            self.keyring.drop(serial)  # QEMU read it at object-add (or failed to)
        self.log("master key handed to QEMU", flow="secrets", mode="keyring", id=MASTER_ID)

    async def duty(self, step: str, data: Any) -> None:
        """benchfloor's :data:`Duty`: the launch's log lines and its note."""
        if step == "sev":
            self.log(
                "SEV guest found",
                flow="launch",
                api=f"{data['api-major']}.{data['api-minor']}",
                build_id=data["build-id"],
                policy=data["policy"],
                sev_es=bool(data["policy"] & 0x4),
                sev_state=data["state"],
            )
        elif step == "asking":
            self.log("asking the guest owner to verify the measurement", flow="launch")
        elif step == "released":
            self.forms.append(base64.b64decode(data["secret"]).hex())
            self.log("guest owner released the launch secret", flow="launch")
        elif step == "injected":
            self.log("launch secret injected", flow="launch")
        elif step == "cont":  # durable before cont; past the deadline cont goes on (no note is the safe side)
            try:
                await asyncio.wait_for(self.off_loop.call(write_note, self.run_dir, data), NOTE_DEADLINE_S)
            except (OSError, TimeoutError) as exc:
                self.log("launch note not written", flow="launch", error=type(exc).__name__)
        elif step == "resumed":
            self.log("VM resumed after attestation", flow="launch")
            self.log("flow finished", flow="launch", code=0, reason="launched: secret injected, VM running")

    async def release(self, why: str) -> None:
        """What the VM held, let go: the control socket, QMP, the lock, the key."""
        self.log("VM stopping", why=why)
        if self.server is not None:
            self.server.close()
            try:
                os.unlink(self.control)
            except OSError:
                pass
        if self.client is not None:
            await self.client.disconnect()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        if self.master is not None:
            self.master[:] = bytes(len(self.master))
        self.log("keyagent exiting", code=0)
        self.log("VM ended", state="stopped", reason=why)


def start_workers(count: int = WORKERS) -> ThreadPoolExecutor:
    """The note's worker threads, all running before the clock starts (as the
    host starts its own before any VM)."""
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="floor-note")
    started = threading.Barrier(count)
    for _ in range(count):
        pool.submit(started.wait, 5.0)
    return pool


async def launch_all_duties(root: str, keyring: Keyring, off_loop: Batches) -> tuple[dict, list[DutyVm]]:
    """Every VM of ``root/conf`` at once, with its duties; the result as
    :func:`launch_all`'s and the VMs, still held."""
    t0 = time.monotonic()
    conf = os.path.join(root, "conf")
    with os.scandir(conf) as it:  # the host's scan of its directory
        files = sorted(e.path for e in it if e.name.endswith(".toml"))
    listing = keyring.listing("keyagent:")  # once per scan, as the host lists
    vms = [DutyVm(path, keyring, off_loop) for path in files]

    async def timed(vm: DutyVm) -> tuple[str, float | str]:
        try:
            await vm.run(listing)
        except Exception as exc:
            return vm.name, f"{type(exc).__name__}: {exc}"[:200]
        return vm.name, round((time.monotonic() - t0) * 1000, 3)

    results = await asyncio.gather(*(timed(vm) for vm in vms))
    return {
        "launched_ms": {name: r for name, r in results if isinstance(r, float)},
        "failed": {name: r for name, r in results if isinstance(r, str)},
    }, vms


async def _main_duties(args: argparse.Namespace) -> int:
    write_duty_configs(args.duties, args.qmp_dir, args.vms, args.owner_url)
    keyring, pool = Keyring(), start_workers()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(json.dumps({"ready": True}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "QEMU ready" for every VM
        result, vms = await launch_all_duties(args.duties, keyring, Batches(pool))
        print(json.dumps(result), flush=True)
        try:  # held for the VMs' life: here, until the bench stops us
            await asyncio.wait_for(stop.wait(), HOLD_S)
        except TimeoutError:
            pass
        await asyncio.gather(*(vm.release("SIGTERM") for vm in vms), return_exceptions=True)
    finally:
        pool.shutdown(wait=True)
    return 0 if not result["failed"] else 1


async def _main(args: argparse.Namespace) -> int:
    if args.duties is not None:
        return await _main_duties(args)
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "QEMU ready" for every VM
    result = await launch_all(args.qmp_dir, args.vms, args.owner_url)
    print(json.dumps(result), flush=True)
    return 0 if not result["failed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.tools.hostfloor")
    p.add_argument("--qmp-dir", required=True)
    p.add_argument("--vms", type=int, required=True)
    p.add_argument("--owner-url", required=True)
    p.add_argument(
        "--duties",
        metavar="DIR",
        help="also do the agent's per-VM duties, barely; each VM's config and run_dir under DIR",
    )
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
