"""``keyagent run --libvirt URI --domain NAME``: the sidecar of a libvirt domain.

The same :class:`~agent.app.sidecar.Sidecar`, with libvirt's side of the
monitor (:mod:`agent.io.libvirt_monitor`) instead of a QMP socket of its own:
libvirt owns QEMU's monitor, and the agent reaches it through libvirt's
QEMU monitor passthrough and event callbacks.
"""

from __future__ import annotations

from agent.app.config import Config
from agent.app.sidecar import Sidecar, SidecarOptions
from agent.io import libvirt_monitor
from agent.io.monitor import Monitor


class LibvirtSidecar(Sidecar):
    def __init__(self, cfg: Config, opts: SidecarOptions, uri: str, domain: str) -> None:
        super().__init__(cfg, opts)
        self.uri = uri
        self.domain = domain

    def check(self) -> None:
        libvirt_monitor.load_api()  # UsageError (exit 2) without libvirt-python

    async def open_monitor(self, events: set[str]) -> Monitor:
        conn = await libvirt_monitor.open_connection(
            self.uri, self.domain, f"keyagent.{self.cfg.vm_name}", events, self.opts.qmp_timeout
        )
        self.log.info(
            "libvirt connected",
            libvirt=self.uri,
            domain=self.domain,
            qemu=conn.qemu_version,
            monitor_events=conn.monitor_events,
        )
        return conn
