"""``keyagent run``: the sidecar's command line."""

from __future__ import annotations

import asyncio
import os

from agent.config import add_config_flags, config_from_args, unix_path
from agent.errors import UsageError


def add_agent_options(p) -> None:
    add_config_flags(p)
    p.add_argument("--owner-url", metavar="URL", help="guest owner URL ([sev] owner_url)")
    p.add_argument("--control", metavar="unix:PATH",
                   help="control socket (default: <run_dir>/control.sock)")
    p.add_argument("--event-log", metavar="FILE", help="write the event log here (JSON lines)")
    p.add_argument("--log-level", default="info", metavar="LEVEL",
                   choices=("debug", "info", "warning", "error"))


def register(sub) -> None:
    p = sub.add_parser("run", help="run as a sidecar next to a running QEMU")
    p.add_argument("--qmp", required=True, metavar="unix:PATH", help="QEMU's QMP socket")
    p.add_argument("--qmp-timeout", type=float, default=10.0, metavar="S",
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
    from agent.logs import setup_logging
    from agent.sidecar import Sidecar, SidecarOptions

    setup_logging(args.log_level)
    qmp_path = unix_path(args.qmp, "--qmp")
    cfg = config_from_args(args)
    opts = SidecarOptions(qmp_path=qmp_path, control_path=control_path(args, cfg),
                          event_log=args.event_log, qmp_timeout=args.qmp_timeout,
                          incoming=args.incoming)
    code = asyncio.run(Sidecar(cfg, opts).run())
    return code
