"""``keyagent`` and its subcommands.

Each subcommand lives with the code it drives and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable ``func(args) -> int``.  This module only dispatches and turns the
two error kinds into exit statuses with a one-line reason.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from agent.errors import KeyagentError, UsageError

PROG = "keyagent"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _subcommand_modules():
    # Imported lazily by name: the sidecar should not pay for the owner's or
    # the simulator's imports.
    return [
        "agent.runner_cli",
        "agent.ctl",
        "agent.replay",
        "agent.owner.cli",
        "agent.sim.cli",
        "agent.demo",
    ]


def build_parser() -> ArgumentParser:
    import importlib

    parser = ArgumentParser(prog=PROG, description="Secrets sidecar for QEMU virtual machines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name in _subcommand_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet
                continue
            raise
        module.register(sub)
    return parser


def fail(reason: str, code: int) -> int:
    print(f"{PROG}: error: {reason}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except KeyagentError as exc:
        return fail(exc.reason, exc.exit_code)
    except KeyboardInterrupt:
        return fail("interrupted", 130)


def entry() -> NoReturn:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
