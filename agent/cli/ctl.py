"""``keyagent ctl``: talk to a running agent over its control socket.

Prints the agent's JSON answer on stdout and exits 0 on success.  An error
answer is one line on stderr: exit 2 when the request itself was bad (HTTP
400), 1 otherwise.  ``migrate wait`` prints the final status and exits 0
only when it is ``completed``.

Key files are never read here: ``--psk-file F`` is sent as the reference
``file:/abs/F`` and the agent reads it, so the key crosses no extra process.
"""

from __future__ import annotations

import asyncio
import json
import os

from agent.app.config import unix_path
from agent.common.errors import FlowFailed, UsageError

TIMEOUT_S = 30.0


def _file_ref(path: str | None) -> str | None:
    """``file:`` with the directory's real path, resolved here with the
    caller's own rights: the agent follows no symlink for a peer limited to
    ``[control] ref_dirs``, and the file itself must not be one."""
    if path is None:
        return None
    path = os.path.abspath(path)
    return "file:" + os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _migrate_opts(p, psk: bool, cookie: bool) -> None:
    p.add_argument("--uri", required=True, metavar="tcp:HOST:PORT")
    if cookie:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--cookie", metavar="B64")
        g.add_argument("--psk-file", metavar="F")
        g.add_argument("--psk-ref", metavar="REF", help="file:PATH, keyring:DESC or libvirt:UUID")
    elif psk:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--psk-file", metavar="F")
        g.add_argument("--psk-ref", metavar="REF", help="file:PATH, keyring:DESC or libvirt:UUID")
    p.add_argument("--multifd", action="store_true", help="use multifd channels")
    p.add_argument("--multifd-channels", type=int, default=2, metavar="N")
    p.add_argument(
        "--postcopy", action="store_true", help="postcopy (give it on both sides; the source switches once active)"
    )


def _migrate_body(args) -> dict:
    body: dict = {"uri": args.uri, "multifd": args.multifd, "multifd_channels": args.multifd_channels}
    if args.postcopy:
        body["postcopy"] = True
    if getattr(args, "cookie", None):
        body["cookie"] = args.cookie
    ref = getattr(args, "psk_ref", None) or _file_ref(getattr(args, "psk_file", None))
    if ref:
        body["psk_ref"] = ref
    return body


def register(sub) -> None:
    from agent.protocol import control as wire

    p = sub.add_parser("ctl", help="send a verb to a running agent")
    p.add_argument("--control", required=True, metavar="unix:PATH")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="how long to wait for the agent's answer")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    s = verbs.add_parser("status", help="what the agent and its flows are doing")
    s.set_defaults(func=run, route=wire.STATUS, body=lambda a: None)

    s = verbs.add_parser("health", help="GET /healthz: exit 0 while the agent lives (liveness)")
    s.set_defaults(func=run, route=wire.HEALTHZ, body=lambda a: None)
    s = verbs.add_parser("ready", help="GET /readyz: exit 0 when QMP is connected (readiness)")
    s.set_defaults(func=run, route=wire.READYZ, body=lambda a: None)

    s = verbs.add_parser("vms", help="(keyagent host) every VM: name, state, running flows, last result")
    s.add_argument("--json", action="store_true", help="print the JSON answer instead of the table")
    s.set_defaults(func=run, route=wire.VMS, body=lambda a: None, render=_vms_table)

    m = verbs.add_parser("migrate", help="encrypted migration (TLS-PSK)")
    mv = m.add_subparsers(dest="migrate_verb", metavar="MIGRATE_VERB")
    mv.required = True
    x = mv.add_parser("prepare", help="(destination) make a one-time key, print the offer signed with the host key")
    x.set_defaults(func=run, route=wire.MIGRATE_PREPARE, body=lambda a: {})
    x = mv.add_parser(
        "begin",
        help="(source) check the offer comes from a trusted host, make the PSK, seal it to the offer, sign the cookie",
    )
    x.add_argument("--offer", required=True, metavar="B64")
    x.set_defaults(func=run, route=wire.MIGRATE_BEGIN, body=lambda a: {"offer": a.offer})
    x = mv.add_parser(
        "accept", help="(destination) check the cookie comes from a trusted host, open it, listen for the migration"
    )
    _migrate_opts(x, psk=True, cookie=True)
    x.set_defaults(func=run, route=wire.MIGRATE_ACCEPT, body=_migrate_body)
    x = mv.add_parser("start", help="(source) migrate to the destination")
    _migrate_opts(x, psk=True, cookie=False)
    x.set_defaults(func=run, route=wire.MIGRATE_START, body=_migrate_body)
    x = mv.add_parser("wait", help="wait for the final status (exit 0 only if completed)")
    x.add_argument("--timeout", dest="wait_timeout", type=float, default=3600.0, metavar="S")
    x.set_defaults(func=run, route=wire.MIGRATE_WAIT, body=lambda a: {"timeout": a.wait_timeout}, success="completed")
    x = mv.add_parser("cancel", help="cancel the migration in progress")
    x.set_defaults(func=run, route=wire.MIGRATE_CANCEL, body=lambda a: {})
    x = mv.add_parser(
        "mh-target", help="(source, SEV fast migration) hand the target MH's public key from the owner to the VM"
    )
    x.set_defaults(func=run, route=wire.MIGRATE_MH_TARGET, body=lambda a: {})

    sec = verbs.add_parser("secret", help="encrypted secret objects in QEMU")
    sv = sec.add_subparsers(dest="secret_verb", metavar="SECRET_VERB")
    sv.required = True
    x = sv.add_parser("add", help="object-add an AES-256-CBC encrypted inline secret")
    x.add_argument("--id", required=True, dest="secret_id", metavar="ID")
    g = x.add_mutually_exclusive_group(required=True)
    g.add_argument("--file", metavar="F")
    g.add_argument("--ref", metavar="REF", help="file:PATH, keyring:DESC or libvirt:UUID")
    x.set_defaults(
        func=run, route=wire.SECRET_ADD, body=lambda a: {"id": a.secret_id, "ref": a.ref or _file_ref(a.file)}
    )
    x = sv.add_parser("remove", help="object-del a secret the agent added")
    x.add_argument("--id", required=True, dest="secret_id", metavar="ID")
    x.set_defaults(func=run, route=wire.SECRET_REMOVE, body=lambda a: {"id": a.secret_id})


def run(args) -> int:
    from agent.io.http import HttpError, request_json

    path = unix_path(args.control, "--control")
    body = args.body(args)
    timeout = args.timeout
    if timeout is None:
        timeout = TIMEOUT_S + (body.get("timeout", 0) if isinstance(body, dict) else 0)
    try:
        method, route = args.route
        status, answer = asyncio.run(
            request_json(method, f"http://localhost{route}", body, timeout=timeout, unix_path=path)
        )
    except HttpError as exc:
        raise FlowFailed(f"control socket {path}: {exc}") from None
    if 200 <= status < 300:
        render = getattr(args, "render", None)
        if render is not None and not getattr(args, "json", False):
            print(render(answer), end="")
            return 0
        print(json.dumps(answer, indent=2, sort_keys=True))
        wanted = getattr(args, "success", None)
        if wanted and (not isinstance(answer, dict) or answer.get("status") != wanted):
            return 1
        return 0
    from agent.protocol.control import BAD_REQUEST, error_reason

    reason = error_reason(status, answer)
    if status == BAD_REQUEST:
        raise UsageError(reason)
    raise FlowFailed(reason)


def _vms_table(answer: object) -> str:
    """``ctl vms``: one line per VM, columns padded to their widest cell."""
    vms = answer.get("vms") if isinstance(answer, dict) else None
    if not isinstance(vms, list):
        raise FlowFailed("the agent's answer has no VM list (is this a keyagent host socket?)")
    rows = [("NAME", "STATE", "FLOWS", "RESULT")]
    for vm in vms:
        if not isinstance(vm, dict):
            continue
        result = vm.get("result")
        text = "-"
        if isinstance(result, dict):
            flow = result.get("flow")
            text = f"{flow + ': ' if flow else ''}{result.get('code')} {result.get('reason') or ''}".strip()
        flows = vm.get("flows")
        rows.append(
            (
                str(vm.get("name")),
                str(vm.get("state")),
                ",".join(map(str, flows)) if isinstance(flows, list) and flows else "-",
                " ".join(text.split()),  # one line, whatever the reason holds
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] + "\n" for row in rows)
