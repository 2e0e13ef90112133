"""``keyagent hostkey init|show PATH``: this host's identity key for the hand-over.

The key, its formats and the trusted-hosts directory are
:mod:`agent.crypto.hostkey`; this module only parses and prints.
"""

from __future__ import annotations

import sys

from agent.common.errors import UsageError
from agent.crypto.hostkey import HostKeyError, format_public, init, load_private, public_raw


def register(sub) -> None:
    p = sub.add_parser("hostkey", help="this host's identity key for the migration hand-over")
    verbs = p.add_subparsers(dest="hostkey_verb", metavar="VERB")
    verbs.required = True
    x = verbs.add_parser("init", help="write a new host key (0600, never overwrites); print its public key")
    x.add_argument("path", metavar="PATH")
    x.set_defaults(func=_init)
    x = verbs.add_parser("show", help="print the public key of a host key")
    x.add_argument("path", metavar="PATH")
    x.set_defaults(func=_show)


def _init(args) -> int:
    try:
        line = init(args.path)
    except HostKeyError as exc:
        raise UsageError(str(exc)) from None
    print(line)
    sys.stdout.flush()
    return 0


def _show(args) -> int:
    try:
        key = load_private(args.path)
    except HostKeyError as exc:
        raise UsageError(str(exc)) from None
    print(format_public(public_raw(key)))
    return 0
