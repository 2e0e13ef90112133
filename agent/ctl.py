"""``keyagent ctl``: talk to a running agent over its control socket.

Prints the agent's JSON answer on stdout and exits 0 on success; an error
answer is printed on stderr as one line, exit 1 (2 when the agent says the
request itself was bad).
"""

from __future__ import annotations

import asyncio
import json
import sys

from agent.config import unix_path
from agent.errors import FlowFailed, UsageError

TIMEOUT_S = 30.0


def register(sub) -> None:
    p = sub.add_parser("ctl", help="send a verb to a running agent")
    p.add_argument("--control", required=True, metavar="unix:PATH")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, metavar="S")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    s = verbs.add_parser("status", help="what the agent and its flows are doing")
    s.set_defaults(func=run, method="GET", route="/v1/status", body=None)


def run(args) -> int:
    from agent.io.http import HttpError, request_json

    path = unix_path(args.control, "--control")
    try:
        status, answer = asyncio.run(request_json(
            args.method, f"http://localhost{args.route}", args.body,
            timeout=args.timeout, unix_path=path))
    except HttpError as exc:
        raise FlowFailed(f"control socket {path}: {exc}") from None
    if 200 <= status < 300:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    error = answer.get("error") if isinstance(answer, dict) else None
    reason = error or f"HTTP {status}"
    if 400 <= status < 500 and status not in (403, 404, 409):
        raise UsageError(reason)
    raise FlowFailed(reason)
