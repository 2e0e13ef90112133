"""Real QEMU 7.2 (TCG) for end-to-end tests.

Each VM gets two monitors: one for its agent, one for the test to look at
QEMU directly (objects, migration parameters, guest memory).  The guest is
a boot sector that carries a random marker and halts, so a test can prove
the guest's RAM really travelled: the destination never reads the disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.e2e.harness import qmp_once, wait_for

QEMU = shutil.which("qemu-system-x86_64")
BOOT_ADDR = 0x7C00
MARKER_OFFSET = 0x100


def boot_image(path: Path, marker: bytes) -> None:
    sector = bytearray(512)
    sector[:4] = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp $-1
    sector[MARKER_OFFSET : MARKER_OFFSET + len(marker)] = marker
    sector[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(sector) + bytes(1024 * 1024 - 512))  # SeaBIOS skips tiny disks


def tcg_qemu_argv(*monitors: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """QEMU with TCG, 64 MiB, no default devices, no display; a QMP server
    (``wait=off``) on each of ``monitors``; then ``extra``."""
    argv = [QEMU or "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "64", "-nodefaults", "-display", "none"]
    for path in monitors:
        argv += ["-qmp", f"unix:{path},server=on,wait=off"]
    return [*argv, *extra]


def start_tcg_qemu(*monitors: str | Path, extra: Sequence[str] = (), stderr: Path | None = None) -> subprocess.Popen:
    """:func:`tcg_qemu_argv` started, stdin and stdout on /dev/null, stderr
    to the file ``stderr`` (or /dev/null).  The caller waits for a monitor."""
    with open(stderr, "wb") if stderr is not None else contextlib.nullcontext(subprocess.DEVNULL) as err:
        return subprocess.Popen(
            tcg_qemu_argv(*monitors, extra=extra), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )


class Qemu:
    def __init__(
        self, tmp: Path, name: str, disk: Path, incoming: bool = False, extra: list[str] | None = None
    ) -> None:
        self.name = name
        self.agent_qmp = str(tmp / f"{name}-qmp.sock")
        self.test_qmp = str(tmp / f"{name}-test.sock")
        self.stderr_path = tmp / f"{name}-qemu.stderr"
        args = tcg_qemu_argv(
            self.agent_qmp,
            self.test_qmp,
            extra=["-serial", "none", "-drive", f"file={disk},format=raw,if=ide", *(extra or [])],
        )
        if incoming:
            args += ["-incoming", "defer"]
        self.popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "wb")
        )
        wait_for(lambda: os.path.exists(self.test_qmp) or self.popen.poll() is not None, what=f"{name} QEMU monitor")
        assert self.popen.poll() is None, self.stderr

    @classmethod
    def attach(cls, name: str, test_qmp: str | Path) -> Qemu:
        """The test's view of a QEMU something else started: only its test
        monitor (:meth:`qmp` and what uses it), nothing to stop."""
        q = cls.__new__(cls)
        q.name, q.test_qmp = name, str(test_qmp)
        return q

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def qmp(self, command: str, args: dict | None = None):
        return qmp_once(self.test_qmp, command, args or {}, client=f"test-{self.name}")

    def tls_objects(self) -> list[str]:
        return [
            o["name"] for o in self.qmp("qom-list", {"path": "/objects"}) if o.get("type") == "child<tls-creds-psk>"
        ]

    def tls_creds(self) -> str:
        return self.qmp("query-migrate-parameters").get("tls-creds", "")

    def read_memory(self, addr: int, size: int, tmp: Path) -> bytes:
        out = tmp / f"{self.name}-mem-{addr:x}.bin"
        self.qmp("pmemsave", {"val": addr, "size": size, "filename": str(out)})
        data = out.read_bytes()
        out.unlink()
        return data

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def make_luks(image: Path, passfile: Path) -> None:
    # iter-time=10 ms keeps create and unlock fast.  qemu-img's PBKDF
    # benchmark fails at random ("Unable to get accurate CPU usage"): its
    # first 32768 iterations can take less than the thread-CPU clock's tick,
    # even on an idle machine.  A failed try is quick: try again, many times.
    for _ in range(40):
        out = subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                f"secret,id=s0,file={passfile}",
                "-o",
                "key-secret=s0,iter-time=10",
                str(image),
                "1M",
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            return
    raise AssertionError(out.stderr)
