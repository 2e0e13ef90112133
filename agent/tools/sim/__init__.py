"""SEV-capable QEMU stand-in: a real QMP server with the PSP's crypto.

``from agent.tools.sim import Simulator, SimConfig`` for in-process use; the
names load lazily so that ``keyagent``'s command line does not pay for the
simulator's imports.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Simulator", "SimConfig"]


def __getattr__(name: str) -> Any:
    if name == "Simulator":
        from agent.tools.sim.qmp_server import Simulator

        return Simulator
    if name == "SimConfig":
        from agent.tools.sim.machine import SimConfig

        return SimConfig
    raise AttributeError(name)
