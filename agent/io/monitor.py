"""What the assembly needs of a QEMU monitor, whoever carries it.

The sidecar speaks QMP on QEMU's socket (:class:`agent.io.qmp.QmpConnection`);
under libvirt it goes through the domain's monitor
(:class:`agent.io.libvirt_monitor.LibvirtConnection`).  ``agent.app`` holds
either as a :class:`Monitor` and never asks which: opening one differs (a
socket path or a domain), using one does not.  Both raise what
``agent.common.errors`` names: ``QmpCommandError`` for QEMU's ``error``
answer, ``MonitorGone`` when the connection is lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol


class MonitorEvents(Protocol):
    """The monitor's asynchronous events, bounded: past the bound they are
    dropped and counted (``dropped``, a metric), never queued forever."""

    dropped: int

    def __aiter__(self) -> AsyncIterator[Mapping[str, Any]]: ...


class Monitor(Protocol):
    """An open monitor connection: commands, a bounded event stream, its end."""

    @property
    def qemu_version(self) -> str:
        """``major.minor.micro`` from the greeting, or ``""`` if QEMU gave none."""
        ...

    @property
    def events(self) -> MonitorEvents: ...

    async def execute(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        """QEMU's ``return``; ``QmpCommandError`` or ``MonitorGone`` otherwise."""
        ...

    async def wait_disconnected(self) -> str:
        """Return, with a one-line reason, once the connection is gone."""
        ...

    async def close(self) -> None: ...


if TYPE_CHECKING:  # the type checker proves both carriers are monitors
    from agent.io.libvirt_monitor import LibvirtConnection
    from agent.io.qmp import QmpConnection

    def _both_are_monitors(qmp: QmpConnection, libvirt: LibvirtConnection) -> tuple[Monitor, Monitor]:
        return qmp, libvirt
