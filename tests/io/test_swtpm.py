"""swtpm with an encrypted state: real swtpm 0.7.1, the key only on pipes.

A value is stored in a TPM 2 NV index over swtpm's data socket (raw TPM 2
commands, no tpm2-tools needed) and read back after a restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import tempfile

import pytest

from agent.common.errors import FlowFailed, UsageError
from agent.common.secret import Secret
from agent.io import swtpm
from tests.leakscan import ArgvWatcher, LeakScan

pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
    reason="needs swtpm and swtpm_setup (apt: swtpm swtpm-tools)",
)

PASSPHRASE = b"correct horse battery staple, for the vTPM"


# --- a few TPM 2 commands, enough to store a value and read it back ---------
# Part 3 of the TPM 2.0 spec; every field big-endian.
TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS = 0x8001, 0x8002
TPM_CC_STARTUP, TPM_CC_NV_DEFINE, TPM_CC_NV_WRITE, TPM_CC_NV_READ = 0x144, 0x12A, 0x137, 0x14E
TPM_RH_OWNER, TPM_RS_PW = 0x40000001, 0x40000009
TPM_ALG_SHA256 = 0x000B
TPMA_NV_AUTHWRITE, TPMA_NV_AUTHREAD, TPMA_NV_NO_DA = 1 << 2, 1 << 18, 1 << 25
TPM_RC_INITIALIZE = 0x100
HEADER = struct.Struct(">HII")  # tag, commandSize/responseSize, commandCode/responseCode
PW_SESSION = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)  # handle, nonce(0), attributes, hmac(0)
NV_INDEX = 0x01500017


def _command(tag: int, cc: int, handles: tuple[int, ...], params: bytes) -> bytes:
    body = b"".join(struct.pack(">I", h) for h in handles)
    if tag == TPM_ST_SESSIONS:
        body += struct.pack(">I", len(PW_SESSION)) + PW_SESSION
    body += params
    return HEADER.pack(tag, HEADER.size + len(body), cc) + body


async def _transact(reader, writer, cmd: bytes) -> tuple[int, bytes]:
    writer.write(cmd)
    await writer.drain()
    head = await reader.readexactly(HEADER.size)
    _tag, size, rc = HEADER.unpack(head)
    return rc, await reader.readexactly(size - HEADER.size)


async def _tpm(data_socket: str, *cmds: bytes) -> list[tuple[int, bytes]]:
    reader, writer = await asyncio.open_unix_connection(data_socket)
    try:
        return [await _transact(reader, writer, c) for c in cmds]
    finally:
        writer.close()
        await writer.wait_closed()


def startup() -> bytes:
    return _command(TPM_ST_NO_SESSIONS, TPM_CC_STARTUP, (), struct.pack(">H", 0))  # TPM_SU_CLEAR


def nv_define(size: int) -> bytes:
    public = struct.pack(
        ">IHIHH", NV_INDEX, TPM_ALG_SHA256, TPMA_NV_AUTHWRITE | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA, 0, size
    )
    return _command(
        TPM_ST_SESSIONS,
        TPM_CC_NV_DEFINE,
        (TPM_RH_OWNER,),
        struct.pack(">H", 0) + struct.pack(">H", len(public)) + public,
    )


def nv_write(data: bytes) -> bytes:
    return _command(
        TPM_ST_SESSIONS,
        TPM_CC_NV_WRITE,
        (NV_INDEX, NV_INDEX),
        struct.pack(">H", len(data)) + data + struct.pack(">H", 0),
    )


def nv_read(size: int) -> bytes:
    return _command(TPM_ST_SESSIONS, TPM_CC_NV_READ, (NV_INDEX, NV_INDEX), struct.pack(">HH", size, 0))


async def store_value(data_socket: str, value: bytes) -> None:
    (rc0, _), (rc1, _), (rc2, _) = await _tpm(data_socket, startup(), nv_define(len(value)), nv_write(value))
    assert rc0 in (0, TPM_RC_INITIALIZE) and rc1 == 0 and rc2 == 0, (rc0, rc1, rc2)


async def read_value(data_socket: str, size: int) -> bytes:
    (rc0, _), (rc1, resp) = await _tpm(data_socket, startup(), nv_read(size))
    assert rc0 in (0, TPM_RC_INITIALIZE) and rc1 == 0, (rc0, rc1)
    # parameterSize (u32), then TPM2B_MAX_NV_BUFFER
    (n,) = struct.unpack_from(">H", resp, 4)
    return resp[6 : 6 + n]


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def short_dir():
    """A short base path: unix socket paths must fit 107 bytes."""
    d = tempfile.mkdtemp(prefix="swtpm-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def run_dir(short_dir):
    path = os.path.join(short_dir, "run")
    os.mkdir(path, 0o700)
    return path


@pytest.fixture(scope="module")
def raw_key() -> bytes:
    return os.urandom(32)


@pytest.fixture(scope="module")
def encrypted_template(raw_key, tmp_path_factory):
    """One TPM 2 state made by swtpm_setup with the raw key; tests copy it."""
    state = str(tmp_path_factory.mktemp("tpl") / "tpm2")
    asyncio.run(swtpm.setup_state(state, "2.0", Secret(raw_key), "raw"))
    return state


@pytest.fixture
def state_dir(encrypted_template, short_dir):
    path = os.path.join(short_dir, "state")
    shutil.copytree(encrypted_template, path)
    return path


def plain_swtpm(state_dir: str, run_dir: str) -> subprocess.CompletedProcess:
    """swtpm started on the state with no key at all."""
    return subprocess.run(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state_dir}",
            "--ctrl",
            f"type=unixio,path={run_dir}/nokey.sock",
            "--flags",
            "not-need-init",
        ],
        capture_output=True,
        timeout=10,
    )


# --- tests -------------------------------------------------------------------


def test_state_is_created_encrypted_and_unreadable_without_the_key(state_dir, run_dir):
    info = swtpm.inspect_state(state_dir, "2.0")
    assert info.kind is swtpm.StateKind.ENCRYPTED and info.key_bits == 256
    with open(os.path.join(state_dir, "tpm2-00.permall"), "rb") as f:
        version, _min, hdrsize, flags, totlen = swtpm.BLOB_HEADER.unpack(f.read(10))
    assert (version, hdrsize, flags & 0x09) == (2, 10, 0x09)
    done = plain_swtpm(state_dir, run_dir)
    assert done.returncode == 1
    assert b"Could not find plain data" in done.stderr + done.stdout


async def test_wrong_key_is_refused_with_a_one_line_reason(state_dir, run_dir):
    wrong = os.urandom(32)
    with pytest.raises(FlowFailed) as err:
        await swtpm.start_swtpm(state_dir, "2.0", Secret(wrong), "raw", run_dir)
    reason = str(err.value)
    assert "wrong key" in reason and "\n" not in reason
    assert wrong.hex() not in reason
    assert not os.path.exists(os.path.join(run_dir, swtpm.PID_FILE_NAME))


async def test_value_survives_a_restart_with_the_right_key(state_dir, run_dir, raw_key):
    data_sock = os.path.join(run_dir, "data.sock")
    value = os.urandom(16)
    sw = await swtpm.start_swtpm(
        state_dir, "2.0", Secret(raw_key), "raw", run_dir, data_socket=data_sock, terminate=False
    )
    try:
        await store_value(data_sock, value)
    finally:
        assert await sw.stop() == 0
    assert swtpm.inspect_state(state_dir, "2.0").kind is swtpm.StateKind.ENCRYPTED
    sw = await swtpm.start_swtpm(
        state_dir, "2.0", Secret(raw_key), "raw", run_dir, data_socket=data_sock, terminate=False
    )
    try:
        assert await read_value(data_sock, len(value)) == value
    finally:
        await sw.stop()


async def test_key_is_in_no_argv_and_nowhere_under_run_dir(short_dir, run_dir):
    key = os.urandom(32)
    key_path = os.path.join(short_dir, "vm.tpmkey")
    with open(key_path, "wb") as f:
        f.write(key)
    state = os.path.join(short_dir, "fresh")
    scan = LeakScan(dirs=[run_dir])
    scan.secret("vtpm key", key)
    with ArgvWatcher(interval=0.005) as watcher:
        await swtpm.setup_state(state, "2.0", Secret(key), "raw")
        sw = await swtpm.start_swtpm(state, "2.0", Secret(key), "raw", run_dir)
        await asyncio.sleep(0.05)
        argv_seen = [a for a in watcher.seen if b"swtpm" in a]
        await sw.stop()
    scan.argv = watcher
    scan.check()
    assert any(b"fd=" in a for a in argv_seen), "the watcher saw swtpm's argv"
    assert not any(key_path.encode() in a for a in watcher.seen)
    assert not any(b"vm.tpmkey" in a for a in watcher.seen)


def test_plain_state_is_refused_with_a_clear_message(short_dir, run_dir):
    state = os.path.join(short_dir, "plain")
    os.mkdir(state)
    subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpm-state", state, "--createek"], check=True, capture_output=True, timeout=30
    )
    assert swtpm.inspect_state(state, "2.0").kind is swtpm.StateKind.PLAIN
    with pytest.raises(UsageError, match="is not encrypted") as err:
        asyncio.run(swtpm.start_swtpm(state, "2.0", Secret(os.urandom(32)), "raw", run_dir))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="is not encrypted"):
        asyncio.run(swtpm.setup_state(state, "2.0", Secret(os.urandom(32)), "raw"))


async def test_passphrase_kind_uses_pbkdf2_and_survives_a_restart(short_dir, run_dir):
    state = os.path.join(short_dir, "pw")
    data_sock = os.path.join(run_dir, "data.sock")
    await swtpm.setup_state(state, "2.0", Secret(PASSPHRASE), "passphrase")
    assert swtpm.inspect_state(state, "2.0").key_bits == 256
    value = b"passphrase-kept!"
    sw = await swtpm.start_swtpm(
        state, "2.0", Secret(PASSPHRASE), "passphrase", run_dir, data_socket=data_sock, terminate=False
    )
    assert "kdf=pbkdf2" in " ".join(swtpm.swtpm_argv(state, "2.0", "passphrase", 3, 4, "c", "p"))
    try:
        await store_value(data_sock, value)
    finally:
        await sw.stop()
    with pytest.raises(FlowFailed, match="wrong key"):
        await swtpm.start_swtpm(state, "2.0", Secret(PASSPHRASE + b"x"), "passphrase", run_dir)
    sw = await swtpm.start_swtpm(
        state, "2.0", Secret(PASSPHRASE), "passphrase", run_dir, data_socket=data_sock, terminate=False
    )
    try:
        assert await read_value(data_sock, len(value)) == value
    finally:
        await sw.stop()


async def test_tpm_1_2_state_is_created_encrypted_and_starts(short_dir, run_dir):
    state = os.path.join(short_dir, "tpm12")
    key = Secret(os.urandom(32))
    await swtpm.setup_state(state, "1.2", key, "raw")
    info = swtpm.inspect_state(state, "1.2")
    assert info.kind is swtpm.StateKind.ENCRYPTED and info.path.endswith("tpm-00.permall")
    with pytest.raises(UsageError, match="holds a TPM 1.2 state"):
        swtpm.check_state(state, "2.0")
    sw = await swtpm.start_swtpm(state, "1.2", key, "raw", run_dir)
    assert await sw.stop() == 0


async def test_swtpm_death_is_reported_by_wait(state_dir, run_dir, raw_key):
    sw = await swtpm.start_swtpm(state_dir, "2.0", Secret(raw_key), "raw", run_dir)
    os.kill(sw.pid, 9)
    assert await asyncio.wait_for(sw.wait(), 5) == -9
    assert not os.path.exists(sw.pid_file)


def test_key_sizes_are_checked_before_anything_runs():
    with pytest.raises(UsageError, match="32 raw bytes"):
        swtpm.check_key(Secret(b"short key"), "raw")
    with pytest.raises(UsageError, match="passphrase must be"):
        swtpm.check_key(Secret(b"x" * 5000), "passphrase")


def test_state_header_kinds(tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "tpm2-00.permall")
    assert swtpm.inspect_state(d, "2.0").kind is swtpm.StateKind.ABSENT
    for flags, kind, bits in (
        (0x00, swtpm.StateKind.PLAIN, None),
        (0x01, swtpm.StateKind.ENCRYPTED, 128),
        (0x09, swtpm.StateKind.ENCRYPTED, 256),
    ):
        with open(path, "wb") as f:
            f.write(swtpm.BLOB_HEADER.pack(2, 1, 10, flags, 16) + b"\0" * 6)
        info = swtpm.inspect_state(d, "2.0")
        assert (info.kind, info.key_bits) == (kind, bits)
        if bits == 128:
            with pytest.raises(UsageError, match="128-bit key"):
                swtpm.check_state(d, "2.0")
    with open(path, "wb") as f:
        f.write(b"\x00\x01garbage without a header")
    assert swtpm.inspect_state(d, "2.0").kind is swtpm.StateKind.UNKNOWN
    with pytest.raises(UsageError, match="no swtpm blob header"):
        swtpm.check_state(d, "2.0")


def test_argv_holds_fd_numbers_only():
    argv = swtpm.swtpm_argv("/s", "2.0", "raw", 5, 6, "/r/c.sock", "/r/p")
    assert argv[:2] == ["swtpm", "socket"]
    assert "fd=5,format=binary,mode=aes-256-cbc" in argv
    assert "fd=6,format=binary,mode=aes-256-cbc" in argv
    assert "--tpm2" in argv and "--terminate" in argv
    setup = swtpm.setup_argv("/s", "2.0", "passphrase", 7)
    assert setup[setup.index("--pwdfile-fd") + 1] == "7" and "aes-256-cbc" in setup


def test_qemu_args_point_the_chardev_at_the_control_socket():
    assert swtpm.qemu_tpm_args("/run/x/swtpm-ctrl.sock", "tpm-tis") == [
        "-chardev",
        "socket,id=chrtpm,path=/run/x/swtpm-ctrl.sock",
        "-tpmdev",
        "emulator,id=tpm0,chardev=chrtpm",
        "-device",
        "tpm-tis,tpmdev=tpm0",
    ]
    with pytest.raises(UsageError):
        swtpm.qemu_tpm_args("/c", "tpm-spapr")
