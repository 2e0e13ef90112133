"""``keyagent`` and its subcommands.

Each subcommand lives with the code it drives and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable ``func(args) -> int``.  This module only dispatches and turns the
errors into exit statuses with a one-line reason (``agent.common.errors``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from agent.common.errors import KeyagentError, SevFormatError, UsageError

PROG = "keyagent"


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil.

    argparse asks shutil for the width every time it builds a formatter,
    which ``add_argument`` does; shutil imports zlib, bz2 and lzma, which the
    sidecar otherwise never loads."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse's default width; every HelpFormatter takes width (typeshed's protocol names prog only)
        return self.formatter_class(prog=self.prog, width=terminal_columns() - 2)  # type: ignore[call-arg]


# Subcommand -> module.  Only the module of the command being run is
# imported: the sidecar should not pay for the owner's or the simulator's
# imports (``--help`` imports them all).
SUBCOMMANDS = {
    "run": "agent.cli.run",
    "host": "agent.cli.host",
    "launch": "agent.cli.launch",
    "ctl": "agent.cli.ctl",
    "replay": "agent.cli.replay",
    "owner": "agent.cli.owner",
    "simulate": "agent.cli.simulate",
    "demo": "agent.cli.demo",
    "bench": "agent.cli.bench",
    "hostkey": "agent.cli.hostkey",
}


def build_parser(argv: Sequence[str] = ()) -> ArgumentParser:
    import importlib

    parser = ArgumentParser(prog=PROG, description="Secrets sidecar for QEMU virtual machines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    first = next((a for a in argv if not a.startswith("-")), None)
    names = [first] if first in SUBCOMMANDS else list(SUBCOMMANDS)
    for name in names:
        module_name = SUBCOMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not written yet
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
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except KeyagentError as exc:
        return fail(exc.reason, exc.exit_code)
    except SevFormatError as exc:  # agent.sev's input errors are the caller's usage errors
        return fail(UsageError(str(exc)).reason, UsageError.exit_code)
    except KeyboardInterrupt:
        return fail("interrupted", 130)


def entry() -> NoReturn:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
