"""``keyagent launch [options] -- QEMU-ARGV...``: the container entrypoint."""

from __future__ import annotations

import asyncio
import os
import signal

from agent.app.config import config_from_args
from agent.app.hardening import harden_process
from agent.cli.run import add_agent_options, control_path
from agent.common.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("launch", help="start QEMU and run the flows for it (entrypoint)")
    add_agent_options(p)
    p.add_argument("qemu_argv", nargs="*", metavar="QEMU-ARGV", help="the QEMU command, after --")
    p.set_defaults(func=run)


def run(args) -> int:
    from agent.app.launcher import ChildReaper, Launcher
    from agent.app.sidecar import SidecarOptions
    from agent.common.logs import setup_logging

    harden_process()  # no core dump, no same-uid ptrace: the agent holds keys
    setup_logging(args.log_level)
    argv = list(args.qemu_argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("launch needs a QEMU command after --")
    cfg = config_from_args(args)
    opts = SidecarOptions(qmp_path="", control_path=control_path(args, cfg), event_log=args.event_log)
    launcher = Launcher(cfg, opts, argv)

    async def main() -> int:
        if os.getpid() == 1:
            reaper = ChildReaper(own=launcher.children)
            asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, reaper.reap)
        return await launcher.run()

    return asyncio.run(main())
