"""swtpm with an encrypted state whose key only ever travels on pipes.

An encrypted TPM state with its key in a file next to it is no better than a
plain one, so the key reaches ``swtpm_setup`` and ``swtpm`` on pipe file
descriptors: one pipe per option (swtpm reads each fd once, with a single
``read()``, then closes it), the secret written in one ``write()`` of at most
``PIPE_BUF`` bytes and the write end closed before the child starts.  Argv
holds fd numbers only; nothing of the key is written under any directory.

Facts checked against swtpm 0.7.1 (Debian) and its sources (tag v0.7.1):

- ``swtpm_setup --keyfile-fd N --cipher aes-256-cbc`` hands the fd to swtpm as
  ``--key fd=N,mode=aes-256-cbc`` with swtpm's default ``format=hex``
  (src/swtpm_setup/swtpm_setup.c): the setup pipe carries the key as 64 hex
  digits.  ``swtpm socket`` is then given ``format=binary`` and the 32 raw
  bytes: the same AES key.
- ``--pwdfile-fd`` becomes ``--key pwdfd=N,mode=aes-256-cbc``; swtpm's
  default KDF is PBKDF2 (HMAC-SHA512, salt "swtpm", 1000 iterations,
  src/swtpm/key.c), so the swtpm side says ``kdf=pbkdf2`` explicitly.
- Without ``--flags not-need-init`` swtpm loads (decrypts) the state only when
  its controller sends CMD_INIT, i.e. once QEMU runs.  With it, swtpm decrypts
  at start and exits 1 on a wrong or missing key ("Verification of HMAC
  failed", "Could not find plain data in byte stream", then "Could not
  initialize libtpms").  QEMU's own CMD_INIT later simply re-initialises.
- The control socket is created before the state is loaded, so its presence
  proves nothing; the main loop answers control commands only after a
  successful start, so an answer to CMD_GET_CAPABILITY is the readiness proof.
- A plain state started with a 256-bit key fails with the misleading "Wrong
  decryption key. Need 128 bit key."; swtpm cannot convert a plain state.
  The state file's blob header tells plain from encrypted
  (src/swtpm/swtpm_nvstore.c ``blobheader``), so a plain state is refused
  before swtpm runs.
- QEMU's ``-tpmdev emulator,chardev=`` talks to the *control* socket and
  passes the data channel over it (CMD_SET_DATAFD); with ``--terminate``
  swtpm exits 0 when QEMU goes away.  SIGTERM makes it exit 0 as well.
- The control socket serves one client at a time (src/swtpm/mainloop.c
  polls the listening socket only while no client is connected): while
  QEMU is connected, a second client is never answered, and newer swtpm
  ends on the control client's hang-up.  So a restarted agent never
  connects to a live swtpm to recognise it: :func:`find_live` reads
  ``/proc`` instead (:class:`AdoptedSwtpm`).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import os
import select
import signal
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from agent.common.errors import FlowFailed, UsageError
from agent.common.logs import get_logger
from agent.common.secret import Secret

log = get_logger("keyagent.swtpm")

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"
CIPHER = "aes-256-cbc"
RAW_KEY_LEN = 32  # aes-256-cbc
# One write() of at most PIPE_BUF bytes into an empty pipe is atomic and
# never blocks, and swtpm reads the key fd with a single read().
MAX_PIPE_SECRET = select.PIPE_BUF
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL

VERSIONS = ("2.0", "1.2")
KEY_KINDS = ("raw", "passphrase")
DEVICES = ("tpm-crb", "tpm-tis")

# The permanent-state file of the dir backend: "tpm%s-%02lx.%s" with suffix
# "2" for a TPM 2 (src/swtpm/swtpm_nvstore.c).
STATE_FILE = {"2.0": "tpm2-00.permall", "1.2": "tpm-00.permall"}

# swtpm_nvstore.c ``blobheader`` (packed, big-endian):
#   uint8 version; uint8 min_version; uint16 hdrsize; uint16 flags; uint32 totlen
BLOB_HEADER = struct.Struct(">BBHHI")
BLOB_FLAG_ENCRYPTED = 0x01
BLOB_FLAG_ENCRYPTED_256BIT_KEY = 0x08

# Control channel (include/swtpm/tpm_ioctl.h): big-endian uint32 command code;
# CMD_GET_CAPABILITY answers a uint64 ``ptm_cap``.
CMD_GET_CAPABILITY = 1
CTRL_CMD = struct.Struct(">I")
PTM_CAP = struct.Struct(">Q")

CTRL_SOCKET_NAME = "swtpm-ctrl.sock"
PID_FILE_NAME = "swtpm.pid"


# ---------------------------------------------------------------------------
# The state on disk


class StateKind(enum.Enum):
    ABSENT = "absent"  # no state yet: swtpm_setup creates it encrypted
    PLAIN = "plain"  # written without a key: swtpm cannot convert it
    ENCRYPTED = "encrypted"
    UNKNOWN = "unknown"  # no blob header (pre-0.2 swtpm?): cannot tell


@dataclass(frozen=True)
class StateInfo:
    kind: StateKind
    path: str
    key_bits: int | None = None  # for ENCRYPTED: 128 or 256


def inspect_state(state_dir: str, version: str) -> StateInfo:
    """What the permanent-state file's blob header says, without a key."""
    path = os.path.join(state_dir, STATE_FILE[version])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return StateInfo(StateKind.ABSENT, path)
    except OSError as exc:
        raise UsageError(f"cannot read vTPM state {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"vTPM state {path} is not a regular file")
        head = os.read(fd, BLOB_HEADER.size)
    finally:
        os.close(fd)
    if len(head) < BLOB_HEADER.size:
        return StateInfo(StateKind.UNKNOWN, path)
    _version, min_version, hdrsize, flags, totlen = BLOB_HEADER.unpack(head)
    if hdrsize != BLOB_HEADER.size or totlen != st.st_size or min_version > 2:
        return StateInfo(StateKind.UNKNOWN, path)
    if not flags & BLOB_FLAG_ENCRYPTED:
        return StateInfo(StateKind.PLAIN, path)
    bits = 256 if flags & BLOB_FLAG_ENCRYPTED_256BIT_KEY else 128
    return StateInfo(StateKind.ENCRYPTED, path, bits)


def check_state(state_dir: str, version: str) -> StateInfo:
    """ABSENT or ENCRYPTED with a 256-bit key; anything else is refused."""
    info = inspect_state(state_dir, version)
    if info.kind is StateKind.ABSENT:
        other = next(v for v in VERSIONS if v != version)
        if os.path.exists(os.path.join(state_dir, STATE_FILE[other])):
            raise UsageError(f"vTPM state_dir {state_dir} holds a TPM {other} state, but [vtpm] version is {version}")
    elif info.kind is StateKind.PLAIN:
        raise UsageError(
            f"vTPM state {info.path} is not encrypted and swtpm cannot encrypt "
            "an existing state; move it away to create a new encrypted one"
        )
    elif info.kind is StateKind.UNKNOWN:
        raise UsageError(
            f"vTPM state {info.path} has no swtpm blob header; cannot tell whether it is encrypted, refusing it"
        )
    elif info.key_bits != 256:
        raise UsageError(f"vTPM state {info.path} is encrypted with a {info.key_bits}-bit key; keyagent uses {CIPHER}")
    return info


# ---------------------------------------------------------------------------
# Key pipes


def check_key(key: Secret, kind: str) -> None:
    if kind not in KEY_KINDS:
        raise UsageError(f"vTPM key_kind must be one of {', '.join(KEY_KINDS)}")
    if kind == "raw" and len(key) != RAW_KEY_LEN:
        raise UsageError(f"vTPM key must be {RAW_KEY_LEN} raw bytes for key_kind raw (got {len(key)})")
    if kind == "passphrase" and not 0 < len(key) <= MAX_PIPE_SECRET:
        raise UsageError(f"vTPM passphrase must be 1 to {MAX_PIPE_SECRET} bytes (got {len(key)})")


def secret_pipe(data: bytes | bytearray) -> int:
    """A pipe holding ``data``: one write(), write end closed; returns the read end.

    The read end is inheritable only through ``pass_fds``; the caller closes
    it once the child has started.
    """
    if not 0 < len(data) <= MAX_PIPE_SECRET:
        raise ValueError("secret does not fit one atomic pipe write")
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        n = os.write(w, data)
        if n != len(data):  # pragma: no cover - impossible for <= PIPE_BUF
            raise OSError("short write to key pipe")
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def key_option(fd: int, kind: str) -> str:
    """``--key``/``--migration-key`` value: fd numbers and modes, nothing secret."""
    if kind == "raw":
        return f"fd={fd},format=binary,mode={CIPHER}"
    return f"pwdfd={fd},mode={CIPHER},kdf=pbkdf2"


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# swtpm_setup: the first start


def setup_argv(state_dir: str, version: str, kind: str, fd: int, swtpm_setup: str = SWTPM_SETUP) -> list[str]:
    argv = [swtpm_setup]
    if version == "2.0":
        argv.append("--tpm2")
    argv += [
        "--tpm-state",
        state_dir,
        "--createek",
        "--keyfile-fd" if kind == "raw" else "--pwdfile-fd",
        str(fd),
        "--cipher",
        CIPHER,
    ]
    return argv


def _last_reason(lines: list[str]) -> str:
    for line in reversed(lines):
        if "rror" in line or "ould not" in line or "failed" in line:
            return line.strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "no output"


async def _spawn_with_key_fds(make_argv, fds: list[int], binary: str):
    """Start ``binary`` with the read ends of the key pipes, then close ours.

    The fds are closed on every path: the child has its copies, and a failed
    start must not leave a pipe holding key bytes in this process.
    """
    try:
        try:
            return await asyncio.create_subprocess_exec(
                *make_argv(),
                pass_fds=tuple(fds),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise FlowFailed(f"cannot run {binary}: {exc.strerror}") from None
    finally:
        _close_all(fds)


async def setup_state(
    state_dir: str, version: str, key: Secret, kind: str, *, swtpm_setup: str = SWTPM_SETUP, timeout: float = 60.0
) -> StateInfo:
    """Create the TPM state in ``state_dir``, encrypted from its first byte."""
    check_key(key, kind)
    if check_state(state_dir, version).kind is not StateKind.ABSENT:
        raise UsageError(f"vTPM state already exists in {state_dir}")
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create vTPM state_dir {state_dir}: {exc.strerror}") from None
    # swtpm_setup passes the fd to swtpm with format=hex: send hex digits.
    material = bytearray(key.hex().encode()) if kind == "raw" else bytearray(key.reveal())
    try:
        fd = secret_pipe(material)
    finally:
        material[:] = bytes(len(material))
    log.info("swtpm_setup_start", state_dir=state_dir, version=version, key_kind=kind)
    proc = await _spawn_with_key_fds(lambda: setup_argv(state_dir, version, kind, fd, swtpm_setup), [fd], swtpm_setup)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FlowFailed(f"swtpm_setup did not finish within {timeout:g} s") from None
    lines = out.decode(errors="replace").splitlines()
    for line in lines:
        if line.strip():
            log.info("swtpm_setup_output", line=line.rstrip())
    if proc.returncode != 0:
        raise FlowFailed(f"swtpm_setup failed (exit {proc.returncode}): {_last_reason(lines)}")
    info = inspect_state(state_dir, version)
    if info.kind is not StateKind.ENCRYPTED or info.key_bits != 256:
        raise FlowFailed(f"swtpm_setup left {info.path} {info.kind.value}, not encrypted")
    log.info("swtpm_setup_done", state=info.path)
    return info


# ---------------------------------------------------------------------------
# swtpm socket: every start


def swtpm_argv(
    state_dir: str,
    version: str,
    kind: str,
    key_fd: int,
    migration_fd: int,
    ctrl_socket: str,
    pid_file: str,
    *,
    data_socket: str | None = None,
    terminate: bool = True,
    swtpm: str = SWTPM,
    incoming: bool = False,
) -> list[str]:
    argv = [
        swtpm,
        "socket",
        "--tpmstate",
        f"dir={state_dir},mode=0600",
        "--ctrl",
        f"type=unixio,path={ctrl_socket},mode=0600",
        "--key",
        key_option(key_fd, kind),
        "--migration-key",
        key_option(migration_fd, kind),
        "--pid",
        f"file={pid_file}",
    ]
    if not incoming:
        # Decrypt the state now, so a wrong key fails here, not in QEMU.  An
        # incoming VM's TPM waits, uninitialised, for the migrated state blobs.
        argv += ["--flags", "not-need-init"]
    if version == "2.0":
        argv.append("--tpm2")
    if data_socket is not None:
        argv += ["--server", f"type=unixio,path={data_socket},mode=0600"]
    if terminate:
        argv.append("--terminate")
    return argv


def qemu_tpm_args(
    ctrl_socket: str, device: str = "tpm-crb", *, tpm_id: str = "tpm0", chardev_id: str = "chrtpm"
) -> list[str]:
    """QEMU's side: the chardev is swtpm's control socket."""
    if device not in DEVICES:
        raise UsageError(f"vTPM device must be one of {', '.join(DEVICES)}")
    return [
        "-chardev",
        f"socket,id={chardev_id},path={ctrl_socket}",
        "-tpmdev",
        f"emulator,id={tpm_id},chardev={chardev_id}",
        "-device",
        f"{device},tpmdev={tpm_id}",
    ]


def failure_reason(lines: list[str], status: int | None, state_dir: str) -> str:
    """One line saying why swtpm did not come up."""
    text = "\n".join(lines)
    if "Verification of HMAC failed" in text:
        return f"the vTPM key does not decrypt the state in {state_dir} (wrong key)"
    if "Could not find plain data" in text:
        return f"the vTPM state in {state_dir} is encrypted but swtpm got no key"
    if "Wrong decryption key" in text:
        return (
            f"the vTPM state in {state_dir} does not match the key size "
            f"(swtpm: {_last_matching(lines, 'Wrong decryption key')})"
        )
    if "Could not lock access to lockfile" in text:
        return f"the vTPM state in {state_dir} is in use by another swtpm"
    code = "" if status is None else f" (exit {status})"
    return f"swtpm failed to start{code}: {_last_reason(lines)}"


def _last_matching(lines: list[str], needle: str) -> str:
    return next((ln.strip() for ln in reversed(lines) if needle in ln), needle)


def _unlink(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory")
    os.unlink(path)


class SwtpmProcess:
    """A running ``swtpm socket``: its output drained, its exit awaitable."""

    def __init__(self, proc: asyncio.subprocess.Process, ctrl_socket: str, pid_file: str, state_dir: str) -> None:
        self._proc = proc
        self.ctrl_socket = ctrl_socket
        self.pid_file = pid_file
        self.state_dir = state_dir
        self.output: collections.deque[str] = collections.deque(maxlen=50)
        self._stopping = False
        self._drain = asyncio.get_running_loop().create_task(self._drain_output())
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._monitor.done() else None

    async def _drain_output(self) -> None:
        assert self._proc.stdout is not None
        while True:
            line = await self._proc.stdout.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                self.output.append(text)
                log.info("swtpm_output", pid=self._proc.pid, line=text)

    async def _watch(self) -> int:
        status = await self._proc.wait()
        try:
            await asyncio.wait_for(self._drain, 2.0)
        except (TimeoutError, asyncio.CancelledError):
            pass
        if self._stopping or status == 0:
            log.info("swtpm_exited", pid=self._proc.pid, status=status)
        else:
            log.error("swtpm_died", pid=self._proc.pid, status=status, reason=_last_reason(list(self.output)))
        for path in (self.pid_file,):
            try:
                os.unlink(path)
            except OSError:
                pass
        return status

    async def wait(self) -> int:
        """swtpm's exit status (0 after QEMU closed the connection or SIGTERM)."""
        return await asyncio.shield(self._monitor)

    def failure(self) -> str:
        return failure_reason(list(self.output), self._proc.returncode, self.state_dir)

    async def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM (swtpm exits cleanly), SIGKILL after ``timeout``."""
        if self._monitor.done():
            return self._monitor.result()
        self._stopping = True
        try:
            self._proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            log.warning("swtpm_kill", pid=self._proc.pid)
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
            return await self.wait()


async def _probe(ctrl_socket: str) -> bool:
    """True once swtpm's main loop answers CMD_GET_CAPABILITY."""
    try:
        reader, writer = await asyncio.open_unix_connection(ctrl_socket)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    try:
        writer.write(CTRL_CMD.pack(CMD_GET_CAPABILITY))
        await writer.drain()
        await reader.readexactly(PTM_CAP.size)
        return True
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def start_swtpm(
    state_dir: str,
    version: str,
    key: Secret,
    kind: str,
    run_dir: str,
    *,
    data_socket: str | None = None,
    terminate: bool = True,
    swtpm: str = SWTPM,
    ready_timeout: float = 10.0,
    incoming: bool = False,
) -> SwtpmProcess:
    """Start swtpm on an existing encrypted state; return once it has decrypted it.

    ``incoming``: the state arrives by migration; an absent state is fine.
    """
    if version not in VERSIONS:
        raise UsageError(f"vTPM version must be one of {', '.join(VERSIONS)}")
    check_key(key, kind)
    info = check_state(state_dir, version)
    if info.kind is StateKind.ABSENT and incoming:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    elif info.kind is StateKind.ABSENT:
        raise UsageError(f"no vTPM state in {state_dir} (run setup first)")
    ctrl_socket = os.path.join(run_dir, CTRL_SOCKET_NAME)
    pid_file = os.path.join(run_dir, PID_FILE_NAME)
    for sock in filter(None, (ctrl_socket, data_socket)):
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            raise UsageError(f"socket path {sock} is longer than {SUN_PATH_MAX} bytes")
        _unlink(sock)  # a stale socket of a predecessor in our run_dir
    _unlink(pid_file)

    material = bytearray(key.reveal())
    fds: list[int] = []
    try:
        fds.append(secret_pipe(material))  # --key
        fds.append(secret_pipe(material))  # --migration-key: its own pipe
    except BaseException:
        _close_all(fds)
        raise
    finally:
        material[:] = bytes(len(material))
    proc = await _spawn_with_key_fds(
        lambda: swtpm_argv(
            state_dir,
            version,
            kind,
            fds[0],
            fds[1],
            ctrl_socket,
            pid_file,
            data_socket=data_socket,
            terminate=terminate,
            swtpm=swtpm,
            incoming=incoming,
        ),
        fds,
        swtpm,
    )
    sw = SwtpmProcess(proc, ctrl_socket, pid_file, state_dir)
    log.info(
        "swtpm_started", pid=proc.pid, state_dir=state_dir, version=version, key_kind=kind, ctrl_socket=ctrl_socket
    )
    try:
        await asyncio.wait_for(_wait_ready(sw), ready_timeout)
    except TimeoutError:
        await sw.stop()
        raise FlowFailed(f"swtpm did not answer on {ctrl_socket} within {ready_timeout:g} s") from None
    except BaseException:
        await sw.stop()
        raise
    return sw


async def _wait_ready(sw: SwtpmProcess) -> None:
    exited = asyncio.ensure_future(sw.wait())
    try:
        delay = 0.005
        while True:
            if await _probe(sw.ctrl_socket):
                log.info("swtpm_ready", pid=sw.pid)
                return
            if exited.done() or sw._proc.returncode is not None:
                await exited
                raise FlowFailed(sw.failure())
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
    finally:
        if not exited.done():
            exited.cancel()


# ---------------------------------------------------------------------------
# A live swtpm a killed predecessor started: adopted, not started twice

MAX_PID_FILE = 32
SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags": a listening socket


def _read_pid_file(path: str) -> int | None:
    """The pid in swtpm's pid file, if it is a small regular file of ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > MAX_PID_FILE:
            return None
        text = os.read(fd, MAX_PID_FILE).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and 1 < int(text) < 1 << 22 else None


def _option(argv: list[str], name: str) -> dict[str, str] | None:
    """``--name k=v,k=v`` of an argv as a dict (the first occurrence)."""
    try:
        value = argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None
    return dict(part.partition("=")[::2] for part in value.split(","))


def _listening_inodes(path: str, table: Iterable[str]) -> set[str]:
    """Inodes of the unix sockets listening at ``path`` (``/proc/net/unix`` lines)."""
    inodes = set()
    for line in table:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) == 8 and fields[7] == path:
            try:
                if int(fields[3], 16) & SO_ACCEPTCON:
                    inodes.add(fields[6])
            except ValueError:
                continue
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _is_our_swtpm(pid: int, run_dir: str, state_dir: str, swtpm: str) -> str | None:
    """None if ``pid`` is the swtpm this agent would have started for this
    VM, else why not: its argv names our control socket and state dir, it
    runs as us, and it holds the socket listening at that path."""
    ctrl_socket = os.path.join(run_dir, CTRL_SOCKET_NAME)
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return "not ours"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read(1 << 16).split(b"\0") if a]
        with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
            inodes = _listening_inodes(ctrl_socket, f)
    except OSError:
        return "gone"
    if len(argv) < 2 or os.path.basename(argv[0]) != os.path.basename(swtpm) or argv[1] != "socket":
        return "not swtpm socket"
    ctrl, state = _option(argv, "--ctrl"), _option(argv, "--tpmstate")
    if ctrl is None or ctrl.get("path") != ctrl_socket:
        return "another control socket"
    if state is None or os.path.abspath(state.get("dir", "")) != os.path.abspath(state_dir):
        return "another state"
    if not inodes or not _holds_socket(pid, inodes):
        return "does not hold the control socket"
    return None


def find_live(run_dir: str, state_dir: str, swtpm: str = SWTPM) -> AdoptedSwtpm | None:
    """The live swtpm a killed predecessor started for this VM, or None.

    Found from the run_dir's pid file, pinned with a pidfd before anything
    is read about it, checked (:func:`_is_our_swtpm`), and checked alive
    through the pidfd afterwards: had that process died meanwhile and its
    PID gone to another, the pidfd would say so, whatever ``/proc`` said.
    """
    pid_file = os.path.join(run_dir, PID_FILE_NAME)
    pid = _read_pid_file(pid_file)
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone (ESRCH), or no pidfd here
        return None
    try:
        why = _is_our_swtpm(pid, run_dir, state_dir, swtpm)
        signal.pidfd_send_signal(pidfd, 0)  # ProcessLookupError once it has exited
    except OSError:
        why = "gone"
    if why is not None:
        os.close(pidfd)
        log.info("swtpm_not_adopted", pid=pid, reason=why)
        return None
    return AdoptedSwtpm(pidfd, pid, os.path.join(run_dir, CTRL_SOCKET_NAME), pid_file, state_dir)


class AdoptedSwtpm:
    """A live swtpm that is not our child, supervised through its pidfd.

    Same face as :class:`SwtpmProcess`, but its exit status is not ours to
    read (only its parent, or init, can wait for it): ``wait()`` returns
    None once it has exited.
    """

    def __init__(self, pidfd: int, pid: int, ctrl_socket: str, pid_file: str, state_dir: str) -> None:
        self._pidfd = pidfd
        self._pid = pid
        self.ctrl_socket = ctrl_socket
        self.pid_file = pid_file
        self.state_dir = state_dir
        self.output: collections.deque[str] = collections.deque(maxlen=1)
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, self._on_exit)  # a pidfd is readable once its process has exited

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return None

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        (log.info if self._stopping else log.error)("swtpm_exited" if self._stopping else "swtpm_died", pid=self._pid)
        try:
            os.unlink(self.pid_file)
        except OSError:
            pass
        if not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> None:
        await asyncio.shield(self._exited)

    def failure(self) -> str:
        return f"the adopted swtpm (pid {self._pid}) exited"

    def _signal(self, sig: int) -> None:
        if self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM through the pidfd (never a recycled PID), SIGKILL after ``timeout``."""
        if self._exited.done():
            return
        self._stopping = True
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            log.warning("swtpm_kill", pid=self._pid)
            self._signal(signal.SIGKILL)
            await self.wait()
