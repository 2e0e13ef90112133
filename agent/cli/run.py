"""``keyagent run``: the sidecar's command line."""

from __future__ import annotations

import argparse
import asyncio
import math
import os

from agent.app.config import add_config_flags, config_from_args, unix_path
from agent.app.hardening import harden_process
from agent.common.errors import UsageError


def add_agent_options(p) -> None:
    add_config_flags(p)
    p.add_argument("--owner-url", metavar="URL", action="append", help="(repeat) guest owner URL ([sev] owner_url)")
    p.add_argument("--control", metavar="unix:PATH", help="control socket (default: <run_dir>/control.sock)")
    p.add_argument("--event-log", metavar="FILE", help="write the event log here (JSON lines)")
    p.add_argument("--log-level", default="info", metavar="LEVEL", choices=("debug", "info", "warning", "error"))


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
    monitor.add_argument(
        "--libvirt",
        metavar="URI",
        help="libvirt connection URI, for a VM whose monitor libvirt owns "
        "(needs --domain; pip install 'keyagent[libvirt]')",
    )
    p.add_argument("--domain", metavar="NAME", help="the libvirt domain (name, UUID or id)")
    p.add_argument(
        "--qmp-timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="how long to wait for QEMU's monitor (start QEMU after a vTPM sidecar)",
    )
    p.add_argument(
        "--incoming", action="store_true", help="QEMU will be started with -incoming: do not create a vTPM state"
    )
    add_agent_options(p)
    p.set_defaults(func=run)


def control_path(args, cfg) -> str | None:
    if args.control:
        return unix_path(args.control, "--control")
    if cfg.vm_run_dir:
        return os.path.join(cfg.vm_run_dir, "control.sock")
    return None


def run(args) -> int:
    from agent.app.sidecar import Sidecar, SidecarOptions
    from agent.common.logs import setup_logging

    harden_process()  # no core dump, no same-uid ptrace: the agent holds keys
    setup_logging(args.log_level)
    if args.libvirt is not None:
        if not args.libvirt or not args.domain:
            raise UsageError("--libvirt URI needs --domain NAME")
    elif args.domain is not None:
        raise UsageError("--domain is only for --libvirt")
    qmp_path = unix_path(args.qmp, "--qmp") if args.qmp is not None else ""
    cfg = config_from_args(args)
    opts = SidecarOptions(
        qmp_path=qmp_path,
        control_path=control_path(args, cfg),
        event_log=args.event_log,
        qmp_timeout=args.qmp_timeout,
        incoming=args.incoming,
    )
    if args.libvirt is None:
        sidecar = Sidecar(cfg, opts)
    else:
        from agent.app.libvirt_sidecar import LibvirtSidecar

        sidecar = LibvirtSidecar(cfg, opts, args.libvirt, str(args.domain))  # both checked above
    code = asyncio.run(sidecar.run())
    return code
