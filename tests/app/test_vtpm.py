"""The vTPM orchestrator with real swtpm 0.7.1 and a real QEMU 7.2 (TCG)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tempfile

import pytest
from qemu.qmp import ConnectError, QMPClient

from agent.app.config import load_config
from agent.app.vtpm import Vtpm
from agent.common.errors import FlowFailed, UsageError
from agent.common.logs import setup_logging
from tests.leakscan import ArgvWatcher, LeakScan

QEMU = "qemu-system-x86_64"
pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
    reason="needs swtpm and swtpm_setup (apt: swtpm swtpm-tools)",
)


@pytest.fixture
def base():
    d = tempfile.mkdtemp(prefix="vtpm-", dir="/tmp")  # short: unix socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def captured_logs():
    stream = io.StringIO()
    setup_logging("debug", stream)
    yield stream
    setup_logging("info")


def write_config(base: str, key: bytes, *, kind: str = "raw", device: str = "tpm-crb") -> str:
    with open(os.path.join(base, "vm1.tpmkey"), "wb") as f:
        f.write(key)
    path = os.path.join(base, "agent.toml")
    with open(path, "w") as f:
        f.write(
            '[vm]\nname = "vm1"\nrun_dir = "run"\n'
            '[vtpm]\nstate_dir = "tpm"\nkey = "file:vm1.tpmkey"\n'
            f'version = "2.0"\nkey_kind = "{kind}"\ndevice = "{device}"\n'
        )
    return path


async def run_qemu(run_dir: str, tpm_args: list[str]) -> list[dict]:
    """QEMU paused (-S), TCG; returns query-tpm and quits."""
    qmp_path = os.path.join(run_dir, "qmp.sock")
    proc = await asyncio.create_subprocess_exec(
        QEMU,
        "-machine",
        "q35,accel=tcg",
        "-nographic",
        "-nodefaults",
        "-S",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        *tpm_args,
        stdin=asyncio.subprocess.DEVNULL,
    )
    client = QMPClient("vtpm-test")
    try:
        # The socket file appears at bind(), a moment before QEMU listens: retry
        # a refused connect until QEMU answers (a loaded machine is slow here).
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"qemu exited {proc.returncode}")
            try:
                await client.connect(qmp_path)
                break
            except ConnectError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.02)
        tpms = await client.execute("query-tpm")
        await client.execute("quit")
    finally:
        try:
            await client.disconnect()
        except EOFError:  # qemu.qmp re-raises QEMU closing first after 'quit'
            pass
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return tpms


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which(QEMU) is None, reason="needs qemu-system-x86_64")
async def test_qemu_sees_the_tpm_and_swtpm_exits_with_qemu(base, captured_logs):
    key = os.urandom(32)
    cfg = load_config(write_config(base, key))
    scan = LeakScan(dirs=[cfg.vm_run_dir])
    scan.secret("vtpm key", key)
    with ArgvWatcher(interval=0.005) as watcher:
        vtpm = Vtpm.from_config(cfg, cfg.vm_run_dir)
        args = await vtpm.start()
        assert vtpm.created
        assert args[args.index("-device") + 1] == "tpm-crb,tpmdev=tpm0"
        tpms = await run_qemu(cfg.vm_run_dir, args)
        assert tpms == [
            {"model": "tpm-crb", "id": "tpm0", "options": {"type": "emulator", "data": {"chardev": "chrtpm"}}}
        ]
        # --terminate: QEMU gone, swtpm goes too.
        assert await asyncio.wait_for(vtpm.wait(), 5) == 0

        # Second start: the state exists, no setup, same key decrypts it.
        again = Vtpm.from_config(cfg, cfg.vm_run_dir)
        args = await again.start()
        assert not again.created
        assert await again.stop() == 0
    scan.argv = watcher
    scan.text("logs", captured_logs.getvalue())
    scan.check()
    key_path = os.path.join(base, "vm1.tpmkey").encode()
    assert not any(key_path in a for a in watcher.seen)
    assert any(b"swtpm_ready" in line.encode() for line in captured_logs.getvalue().splitlines())


async def test_wrong_key_in_the_config_is_refused_in_one_line(base):
    cfg = load_config(write_config(base, os.urandom(32)))
    created = Vtpm.from_config(cfg, cfg.vm_run_dir)
    await created.start()  # creates the state
    await created.stop()
    with open(os.path.join(base, "vm1.tpmkey"), "wb") as f:
        f.write(os.urandom(32))
    first = Vtpm.from_config(cfg, cfg.vm_run_dir)
    with pytest.raises(FlowFailed) as err:
        await first.start()
    assert "wrong key" in str(err.value) and "\n" not in str(err.value)


async def test_passphrase_kind_from_config(base):
    cfg = load_config(write_config(base, b"a passphrase, not a raw key", kind="passphrase", device="tpm-tis"))
    vtpm = Vtpm.from_config(cfg, cfg.vm_run_dir)
    args = await vtpm.start()
    assert "tpm-tis,tpmdev=tpm0" in args
    assert await vtpm.stop() == 0
    again = Vtpm.from_config(cfg, cfg.vm_run_dir)
    assert await again.start() and not again.created
    await again.stop()


async def test_raw_key_of_the_wrong_size_is_a_usage_error(base):
    cfg = load_config(write_config(base, b"only sixteen b.."))
    with pytest.raises(UsageError, match="32 raw bytes"):
        await Vtpm.from_config(cfg, cfg.vm_run_dir).start()
    assert not os.path.exists(cfg.vtpm_state_dir)


def test_missing_settings_are_usage_errors(base):
    cfg = load_config(None, {"vtpm_key": "file:/nonexistent"})
    assert Vtpm.enabled(cfg)
    with pytest.raises(UsageError, match="state_dir is required"):
        Vtpm.from_config(cfg, base)
    assert not Vtpm.enabled(load_config(None))
