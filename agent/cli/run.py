"""``keyagent run``: the sidecar's command line."""

from __future__ import annotations

import argparse
import asyncio
import math
import os

from agent.app.config import add_config_flags, config_from_args, unix_path
from agent.common.errors import UsageError
from agent.app.hardening import harden_process


def add_agent_options(p) -> None:
    add_config_flags(p)
    p.add_argument("--owner-url", metavar="URL", help="guest owner URL ([sev] owner_url)")
    p.add_argument("--control", metavar="unix:PATH",
                   help="control socket (default: <run_dir>/control.sock)")
    p.add_argument("--event-log", metavar="FILE", help="write the event log here (JSON lines)")
    p.add_argument("--log-level", default="info", metavar="LEVEL",
                   choices=("debug", "info", "warning", "error"))


def seconds(text: str) -> float:
    """A duration flag: a finite number above 0 (``nan`` would make every
    deadline comparison false, and the wait endless)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("run", help="run as a sidecar next to a running QEMU")
    monitor = p.add_mutually_exclusive_group(required=True)
    monitor.add_argument("--qmp", metavar="unix:PATH", help="QEMU's QMP socket")
    monitor.add_argument("--libvirt", metavar="URI",
                         help="libvirt connection URI, for a VM whose monitor libvirt owns "
                              "(needs --domain; pip install 'keyagent[libvirt]')")
    p.add_argument("--domain", metavar="NAME", help="the libvirt domain (name, UUID or id)")
    p.add_argument("--qmp-timeout", type=seconds, default=10.0, metavar="S",
                   help="how long to wait for QEMU's monitor (start QEMU after a vTPM sidecar)")
    p.add_argument("--incoming", action="store_true",
                   help="QEMU will be started with -incoming: do not create a vTPM state")
    add_agent_options(p)
    p.set_defaults(func=run)


def control_path(args, cfg) -> str | None:
    if args.control:
        return unix_path(args.control, "--control")
    if cfg.vm_run_dir:
        return os.path.join(cfg.vm_run_dir, "control.sock")
    return None


def run(args) -> int:
    from agent.common.logs import setup_logging
    from agent.app.sidecar import Sidecar, SidecarOptions

    harden_process()  # no core dump, no same-uid ptrace: the agent holds keys
    setup_logging(args.log_level)
    if args.libvirt is not None:
        if not args.libvirt or not args.domain:
            raise UsageError("--libvirt URI needs --domain NAME")
    elif args.domain is not None:
        raise UsageError("--domain is only for --libvirt")
    qmp_path = unix_path(args.qmp, "--qmp") if args.qmp is not None else ""
    cfg = config_from_args(args)
    opts = SidecarOptions(qmp_path=qmp_path, control_path=control_path(args, cfg),
                          event_log=args.event_log, qmp_timeout=args.qmp_timeout,
                          incoming=args.incoming)
    sidecar = (Sidecar(cfg, opts) if args.libvirt is None
               else libvirt_sidecar(cfg, opts, args.libvirt, args.domain))
    code = asyncio.run(sidecar.run())
    return code


def libvirt_sidecar(cfg, opts, uri: str, domain: str):
    """The same sidecar, with libvirt's side of the monitor (agent.io.libvirt_monitor)."""
    from agent.io import libvirt_monitor
    from agent.app.sidecar import Sidecar

    class LibvirtSidecar(Sidecar):
        def check(self) -> None:
            libvirt_monitor.load_api()  # UsageError (exit 2) without libvirt-python

        async def open_monitor(self, events: set[str]):
            conn = await libvirt_monitor.open_connection(
                uri, domain, f"keyagent.{self.cfg.vm_name}", events, self.opts.qmp_timeout)
            self.log.info("libvirt connected", libvirt=uri, domain=domain,
                          qemu=conn.qemu_version, monitor_events=conn.monitor_events)
            return conn

    return LibvirtSidecar(cfg, opts)
