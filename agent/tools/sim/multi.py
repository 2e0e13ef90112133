"""Many simulated VMs in one process: ``keyagent simulate --vms N --qmp-dir DIR``.

Measuring a host that runs 100 VMs must not measure 100 simulator
processes competing for the same cores.  :class:`MultiSimulator` serves N
independent VMs from one asyncio loop, with no thread per VM: each VM is a
:class:`~agent.tools.sim.qmp_server.Simulator` (its own QMP socket, run state,
PSP launch context, MNONCE and session keys), listening at
``DIR/vm-000.sock``, ``DIR/vm-001.sock``, ... (:func:`socket_name`).

What the VMs share is what one host shares: the PSP's platform identity
(PDH key and certificate chain, :class:`~agent.tools.sim.psp.Platform`), made
once.  Their TIK/TEK are their own, as the guest owner refuses keys shared
by two VMs.

A VM that receives ``quit`` closes its socket as its QEMU would exit; the
others go on.  :meth:`MultiSimulator.wait_closed` returns when every VM has quit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os

from agent.tools.sim.machine import SimConfig
from agent.tools.sim.psp import Platform
from agent.tools.sim.qmp_server import Simulator

__all__ = ["MultiSimulator", "socket_name", "vm_name", "MAX_VMS"]

#: more is possible, but two file descriptors per VM (listener, client) and
#: one loop: a thousand VMs is already far beyond one host's worth
MAX_VMS = 1000


def vm_name(index: int, count: int) -> str:
    """``vm-000`` ... : zero-padded to three digits (more when ``count`` > 1000)."""
    width = max(3, len(str(count - 1)))
    return f"vm-{index:0{width}d}"


def socket_name(index: int, count: int) -> str:
    """The socket file of VM ``index`` (0-based) of ``count``: ``vm-000.sock`` ..."""
    return f"{vm_name(index, count)}.sock"


class MultiSimulator:
    """N simulated QEMUs, one socket each, in the calling loop.

    ``configs[i]`` is VM i's :class:`SimConfig` (its own TIK/TEK); the shared
    ``platform`` is made from the first config's PDH key unless given.
    """

    def __init__(self, configs: list[SimConfig], qmp_dir: str, *, platform: Platform | None = None) -> None:
        if not 1 <= len(configs) <= MAX_VMS:
            raise ValueError(f"between 1 and {MAX_VMS} VMs, got {len(configs)}")
        first = configs[0]
        if any(c.session is not None for c in configs):
            raise ValueError("a launch session is one VM's: not supported with several VMs")
        self.platform = platform or Platform(
            first.pdh_private_key, api_major=first.api_major, api_minor=first.api_minor
        )
        count = len(configs)
        self.names = [vm_name(i, count) for i in range(count)]
        self.paths = [os.path.join(qmp_dir, socket_name(i, count)) for i in range(count)]
        self.vms = [
            Simulator(config, path, platform=self.platform, name=name)
            for config, path, name in zip(configs, self.paths, self.names)
        ]

    @classmethod
    def with_keys(cls, base: SimConfig, keys: list[tuple[bytes, bytes]], qmp_dir: str) -> MultiSimulator:
        """One VM per (TIK, TEK) pair, everything else as in ``base``."""
        configs = [dataclasses.replace(base, tik=tik, tek=tek) for tik, tek in keys]
        return cls(configs, qmp_dir)

    async def __aenter__(self) -> MultiSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on every socket; on a failure, close the ones already listening."""
        try:
            for vm in self.vms:
                await vm.start()
        except BaseException:
            await self.close()
            raise

    async def wait_closed(self) -> None:
        """Return once every VM has received ``quit``; each VM's socket goes
        when it quits, as its QEMU would exit."""

        async def one(vm: Simulator) -> None:
            await vm.wait_closed()
            await vm.close()

        await asyncio.gather(*(one(vm) for vm in self.vms))

    async def close(self) -> None:
        for vm in self.vms:
            with contextlib.suppress(Exception):
                await vm.close()
