"""``keyagent host``: one agent for every VM of a host (:mod:`agent.app.host`)."""

from __future__ import annotations

import asyncio
import os

from agent.app.config import unix_path


def register(sub) -> None:
    from agent.cli.run import seconds

    p = sub.add_parser("host", help="run the flows of every VM configured in a directory (one process per host)")
    p.add_argument(
        "--config-dir",
        required=True,
        metavar="DIR",
        help='one VM per DIR/*.toml: a keyagent run configuration plus [vm] qmp = "unix:PATH" (or [vm] domain)',
    )
    p.add_argument("--control", metavar="unix:PATH", help="the host's control socket (/v1/vms, /metrics)")
    p.add_argument("--event-log-dir", metavar="DIR", help="write each VM's event log to DIR/<vm>.jsonl")
    p.add_argument(
        "--libvirt",
        metavar="URI",
        help="libvirt connection URI: each file names its domain with [vm] domain (pip install 'keyagent[libvirt]')",
    )
    p.add_argument(
        "--qmp-timeout", type=seconds, default=10.0, metavar="S", help="how long each VM waits for QEMU's monitor"
    )
    p.add_argument("--log-level", default="info", metavar="LEVEL", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def run(args) -> int:
    from agent.app.hardening import harden_process
    from agent.app.host import Host, HostOptions, check_host_args
    from agent.common.logs import get_logger, setup_logging

    opts = HostOptions(
        config_dir=os.path.abspath(args.config_dir),
        control_path=unix_path(args.control, "--control") if args.control is not None else None,
        event_log_dir=os.path.abspath(args.event_log_dir) if args.event_log_dir is not None else None,
        libvirt=args.libvirt,
        qmp_timeout=args.qmp_timeout,
    )
    check_host_args(opts)  # exit 2 before anything is created
    problems = harden_process()  # no core dump, no same-uid ptrace: the host holds every VM's keys
    setup_logging(args.log_level)
    for problem in problems:
        get_logger("keyagent.host").warning("hardening incomplete", problem=problem)

    async def main() -> int:
        return await Host(opts).run()

    return asyncio.run(main())
