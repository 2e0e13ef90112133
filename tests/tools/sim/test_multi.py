"""Many VMs in one simulator process (``keyagent simulate --vms N --qmp-dir DIR``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import subprocess

import pytest

from agent.sev.measurement import verify_measurement
from agent.tools.sim.machine import DEFAULT_DIGEST
from agent.tools.sim.multi import MultiSimulator, socket_name, vm_name
from tests.executable import KEYAGENT
from tests.tools.sim.conftest import DIGEST, RawClient, make_config, packet_for


@pytest.fixture
def qmp_dir(sock_path):
    """A directory short enough for unix socket paths (sock_path's parent)."""
    return os.path.dirname(sock_path)


def keys_for(n: int) -> list[tuple[bytes, bytes]]:
    return [(bytes([i]) * 16, bytes([0x80 | i]) * 16) for i in range(n)]


def test_sockets_are_named_by_index_zero_padded():
    assert [socket_name(i, 3) for i in range(3)] == ["vm-000.sock", "vm-001.sock", "vm-002.sock"]
    assert socket_name(7, 1000) == "vm-007.sock"
    assert socket_name(7, 1001) == "vm-0007.sock" and vm_name(1000, 1001) == "vm-1000"


async def test_each_vm_measures_with_its_own_keys_and_launches_alone(qmp_dir):
    keys = keys_for(3)
    async with MultiSimulator.with_keys(make_config(), keys, qmp_dir) as sims:
        assert [os.path.basename(p) for p in sims.paths] == ["vm-000.sock", "vm-001.sock", "vm-002.sock"]
        clients = [await RawClient.connect(p) for p in sims.paths]
        try:
            blobs = []
            for c, (tik, _tek) in zip(clients, keys):
                await c.negotiate()
                blob = base64.b64decode((await c.cmd("query-sev-launch-measure"))["return"]["data"])
                assert verify_measurement(blob, tik, 1, 55, 21, 1, DIGEST)
                blobs.append(blob)
            assert len({b[32:] for b in blobs}) == 3  # an MNONCE each
            header, secret = packet_for(blobs[1], tik=keys[1][0], tek=keys[1][1])
            # VM 0 refuses VM 1's packet (another TIK): the launches are independent
            refused = await clients[0].cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
            assert "fw_error=11" in refused["error"]["desc"]
            ok = await clients[1].cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
            assert ok == {"return": {}}
            assert (await clients[1].cmd("cont"))["event"] == "RESUME"  # the event comes first, as in QEMU
            assert await clients[1].recv() == {"return": {}}
            states = [(await c.cmd("query-status"))["return"]["status"] for c in clients]
            assert states == ["prelaunch", "running", "prelaunch"]
            assert sims.vms[0].injections == 0 and sims.vms[1].injections == 1
            # one PSP per host: the VMs share the platform identity, not the launch keys
            assert sims.vms[0].machine.platform is sims.vms[2].machine.platform is sims.platform
        finally:
            for c in clients:
                await c.close()


async def test_a_vm_that_quits_closes_its_socket_and_the_others_go_on(qmp_dir):
    async with MultiSimulator.with_keys(make_config(), keys_for(2), qmp_dir) as sims:
        waiting = asyncio.ensure_future(sims.wait_closed())
        first = await RawClient.connect(sims.paths[0])
        await first.negotiate()
        assert await first.cmd("quit") == {"return": {}}
        assert (await first.recv())["event"] == "SHUTDOWN"
        await first.close()
        for _ in range(100):
            if not os.path.exists(sims.paths[0]):
                break
            await asyncio.sleep(0.02)
        assert not os.path.exists(sims.paths[0])
        assert not waiting.done()
        second = await RawClient.connect(sims.paths[1])
        await second.negotiate()
        assert (await second.cmd("query-status"))["return"]["status"] == "prelaunch"
        await second.cmd("quit")
        await second.close()
        await asyncio.wait_for(waiting, 5)
    assert not any(os.path.exists(p) for p in sims.paths)


def start_many(qmp_dir: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [*KEYAGENT, "simulate", "--vms", *extra[:1], "--qmp-dir", qmp_dir, *extra[1:], "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    line = proc.stdout.readline()
    assert line, proc.stderr.read().decode()
    return proc, json.loads(line)


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


async def test_one_process_serves_100_vms_on_one_thread_with_their_own_keys(qmp_dir, tmp_path):
    keys_dir = tmp_path / "keys"
    proc, ready = start_many(qmp_dir, "100", "--keys-out", str(keys_dir))
    try:
        assert ready["ready"] is True and ready["vms"] == 100 and ready["keys_out"] == str(keys_dir)
        paths = [s.removeprefix("unix:") for s in ready["qmp_sockets"]]
        assert paths == [os.path.join(qmp_dir, f"vm-{i:03d}.sock") for i in range(100)]
        assert threads_of(proc.pid) == 1

        async def measure(i: int, path: str) -> bool:
            c = await RawClient.connect(path)
            try:
                await c.negotiate()
                blob = base64.b64decode((await c.cmd("query-sev-launch-measure"))["return"]["data"])
                tik = (keys_dir / f"vm-{i:03d}" / "tik.bin").read_bytes()
                return verify_measurement(blob, tik, 1, 55, 21, 1, DEFAULT_DIGEST)
            finally:
                await c.close()

        assert all(await asyncio.gather(*(measure(i, p) for i, p in enumerate(paths))))
        for i in (0, 99):
            for name in ("tik.bin", "tek.bin"):
                assert stat.S_IMODE(os.stat(keys_dir / f"vm-{i:03d}" / name).st_mode) == 0o600
        assert threads_of(proc.pid) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        assert not any(os.path.exists(p) for p in paths)
        tik0 = (keys_dir / "vm-000" / "tik.bin").read_bytes()
        assert tik0.hex() not in err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_process_exits_0_when_every_vm_has_quit(qmp_dir):
    proc, ready = start_many(qmp_dir, "2")
    try:
        for uri in ready["qmp_sockets"]:
            c = await RawClient.connect(uri.removeprefix("unix:"))
            await c.negotiate()
            await c.cmd("quit")
            await c.close()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--vms", "3"], "--vms N and --qmp-dir DIR go together"),
        (["--qmp-dir", "{dir}"], "--vms N and --qmp-dir DIR go together"),
        (["--vms", "3", "--qmp-dir", "{dir}", "--qmp", "unix:{dir}/q.sock"], "--qmp is one VM's socket"),
        (["--vms", "0", "--qmp-dir", "{dir}"], "--vms must be at least 1"),
        (["--vms", "many", "--qmp-dir", "{dir}"], "--vms must be an integer"),
        (["--vms", "1001", "--qmp-dir", "{dir}"], "--vms must be 0..1000"),
        (["--vms", "2", "--qmp-dir", "{dir}/nope"], "is not a directory"),
        (["--vms", "2", "--qmp-dir", "{dir}", "--tik", "{file}", "--tek", "{file}"], "--tik does not apply to --vms"),
        (["--vms", "2", "--qmp-dir", "{dir}", "--snp"], "--snp does not apply to --vms"),
        (["--vms", "2", "--qmp-dir", "{dir}", "--digest", "abcd"], "--digest must be 32 bytes"),
        (["--vms", "3", "--qmp-dir", "{dir}"], "vm-001.sock exists and is not a socket"),
        ([], "--qmp unix:PATH is required"),
    ],
)
def test_bad_many_vm_arguments_exit_2_with_one_line(qmp_dir, args, reason):
    plain = os.path.join(qmp_dir, "plain")
    with open(plain, "w") as f:
        f.write("x")
    if "vm-001.sock" in reason:
        with open(os.path.join(qmp_dir, "vm-001.sock"), "w") as f:
            f.write("precious")
    argv = [a.format(dir=qmp_dir, file=plain) for a in args]
    proc = subprocess.run([*KEYAGENT, "simulate", *argv], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], proc.stderr
    assert not os.path.exists(os.path.join(qmp_dir, "vm-000.sock"))
