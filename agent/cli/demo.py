"""``keyagent demo``: a simulated SEV VM with a local guest owner (:mod:`agent.tools.demo`)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="launch a simulated SEV VM with a local guest owner")
    p.add_argument("--log-level", default="critical", metavar="LEVEL", help="agent log lines on stderr (default: none)")
    p.set_defaults(func=run)


def run(args) -> int:
    from agent.tools.demo import run as demo

    return demo(args)
