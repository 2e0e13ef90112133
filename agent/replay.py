"""``keyagent replay LOG [--check | --html OUT | --svg OUT --flow ID | --summary]``.

Without an option it prints a timeline.  ``--html``, ``--svg`` and
``--summary`` draw the log as sequence diagrams (:mod:`agent.replayviz`,
imported only for them); they take several logs (one per VM in host mode).  With ``--check`` it rebuilds each
flow from its recorded parameters, feeds it the recorded events in order,
and compares every action it returns with the recorded one: exit 0 when all
match, 1 at the first divergence, 2 when the log is unreadable.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any, Iterable, TextIO

import agent.core.launch  # noqa: F401  (registers the flow kinds)
import agent.core.migration  # noqa: F401
import agent.core.resume  # noqa: F401
import agent.core.secrets  # noqa: F401
import agent.core.snp_launch  # noqa: F401
from agent.core.codec import CodecError, decode_event, encode
from agent.core.flow import FLOW_KINDS, Flow
from agent.errors import FlowFailed, UsageError
from agent.eventlog import LogFormatError, read_records


def register(sub) -> None:
    p = sub.add_parser("replay", help="show or re-check a recorded event log")
    p.add_argument("log", metavar="LOG", nargs="+",
                   help="event log (--html, --svg and --summary take several, e.g. one per VM, "
                        "or a directory of them)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="re-run the flows and compare every action (exit 1 on divergence)")
    mode.add_argument("--html", metavar="OUT",
                      help="write a self-contained HTML page: a summary table and one sequence "
                           "diagram per flow")
    mode.add_argument("--svg", metavar="OUT", help="write the sequence diagram of one flow (--flow ID)")
    mode.add_argument("--summary", action="store_true",
                      help="print the summary table (flow ids, VM, start, duration, result)")
    p.add_argument("--flow", metavar="ID", help="the flow --svg draws (ids: see --summary)")
    p.set_defaults(func=run)


def run(args) -> int:
    visual = bool(args.html or args.svg or args.summary)
    if args.flow is not None and not args.svg:
        raise UsageError("replay: --flow goes with --svg")
    if not visual and len(args.log) > 1:
        raise UsageError("replay: several logs only with --html, --svg or --summary")
    try:
        return run_visual(args) if visual else run_text(args)
    except BrokenPipeError:  # `keyagent replay LOG | head`: the reader has seen enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def run_text(args) -> int:
    try:
        records = list(read_records(args.log[0]))
        # The records live until the end and hold no cycles: keep the
        # collector from walking them again and again (a third of the time
        # of a large --check).
        gc.freeze()
        if args.check:
            result = check(records)
            print(result)
            return 0
        print_timeline(records, sys.stdout)
        return 0
    except LogFormatError as exc:
        raise UsageError(str(exc)) from None


def run_visual(args) -> int:
    """--html / --svg / --summary: everything is read and drawn before the
    output is written (whole, by a rename): a bad log or flow id writes
    nothing."""
    from agent import replayviz

    paths = _expand(args.log)
    out = args.html or args.svg
    if out:
        replayviz.check_output_path(out, paths)
    try:
        logs = [(path, list(read_records(path))) for path in paths]
    except LogFormatError as exc:
        raise UsageError(str(exc)) from None
    gc.freeze()
    report = replayviz.build(logs)
    if args.summary:
        sys.stdout.write(replayviz.summary_text(report))
        return 0
    if args.svg:
        text = replayviz.standalone_svg(replayviz.find_flow(report, args.flow))
    else:
        text = replayviz.page(report)
    replayviz.write_atomically(out, text)
    return 0


def _expand(paths: list[str]) -> list[str]:
    """A directory stands for the event logs in it (``*.jsonl``, by name):
    host mode writes one per VM into its ``--event-log-dir``."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            logs = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".jsonl"))
            if not logs:
                raise UsageError(f"{path}: a directory without event logs (*.jsonl)")
            out.extend(logs)
        else:
            out.append(path)
    return out


class Divergence(FlowFailed):
    pass


def _summary(obj: Any) -> str:
    if not isinstance(obj, dict):  # a damaged log: show it, do not interpret it
        return json.dumps(obj)[:160]
    kind = obj.get("type", "?")
    rest = {k: v for k, v in obj.items() if k != "type"}
    if kind == "SendQmp":
        args = json.dumps(rest.get("args") or {}, separators=(",", ":"))
        return f"SendQmp {rest.get('command')} {args if args != '{}' else ''}".rstrip()
    if kind == "QmpReply":
        return f"QmpReply {json.dumps(rest.get('result'), separators=(',', ':'))[:160]}"
    if kind in ("Log", "Finish"):
        return f"{kind} " + " ".join(f"{k}={json.dumps(v)}" for k, v in rest.items() if v != {})
    return f"{kind} " + json.dumps(rest, separators=(",", ":")) if rest else kind


def print_timeline(records: Iterable[dict], out: TextIO) -> None:
    for r in records:
        t = f"{r['t']:9.3f}s"
        kind = r["kind"]
        if kind == "event":
            line = f"{r.get('flow', '')} <- {_summary(r.get('event') or {})}"
        elif kind == "action":
            line = f"{r.get('flow', '')} -> {_summary(r.get('action') or {})}"
        elif kind == "flow":
            line = f"{r.get('flow', '')} == new {r.get('flow_kind')} flow {json.dumps(r.get('params'))}"
        else:
            extra = {k: v for k, v in r.items() if k not in ("seq", "t", "kind")}
            line = f"agent {kind} {json.dumps(extra, separators=(',', ':'))}"
        out.write(f"{t}  {line}\n")


def _bad(record: dict, why: str) -> UsageError:
    return UsageError(f"record {record.get('seq')}: {why}")


def _flow_id(record: dict) -> str:
    fid = record.get("flow")
    if not isinstance(fid, str):
        raise _bad(record, f"flow id {fid!r} is not a string")
    return fid


def check(records: list[dict]) -> str:
    """Re-run every flow; return a one-line summary or raise Divergence.

    A damaged or hand-made log is refused with a one-line reason
    (``UsageError``), whatever it holds: wrong types, unknown flows,
    parameters or events a flow cannot take."""
    flows: dict[str, Flow] = {}
    pending: dict[str, list[tuple[dict, Any]]] = {}
    events = actions = 0
    ended = False
    for r in records:
        kind = r["kind"]
        if kind in ("flow", "event", "action"):
            _flow_id(r)
        if kind == "flow":
            flow_kind = r.get("flow_kind")
            cls = FLOW_KINDS.get(flow_kind) if isinstance(flow_kind, str) else None
            if cls is None:
                raise _bad(r, f"unknown flow kind {flow_kind!r}")
            params = r.get("params") or {}
            if not isinstance(params, dict):
                raise _bad(r, "flow parameters are not an object")
            try:
                flows[r["flow"]] = cls.from_params(params)
            except (TypeError, KeyError, ValueError) as exc:
                raise _bad(r, f"bad flow parameters ({type(exc).__name__})") from None
            pending[r["flow"]] = []
        elif kind == "event":
            flow = flows.get(r.get("flow"))
            if flow is None:
                raise _bad(r, f"event for unknown flow {r.get('flow')!r}")
            left = pending[r["flow"]]
            if left:
                raise Divergence(f"record {r['seq']}: flow {r['flow']} produced "
                                 f"{_summary(encode(left[0][1]))} that the log does not have")
            try:
                event = decode_event(r.get("event"))
            except CodecError as exc:
                raise _bad(r, str(exc)) from None
            except RecursionError:
                raise _bad(r, "event nested too deeply") from None
            events += 1
            try:
                computed = flow.handle(event)
            except Exception as exc:  # a hand-made event or parameters no agent recorded
                raise _bad(r, f"flow {r['flow']} cannot take this event "
                              f"({type(exc).__name__})") from None
            pending[r["flow"]] = [(r, a) for a in computed]
        elif kind == "action":
            left = pending.get(r.get("flow"))
            if left is None:
                raise _bad(r, f"action for unknown flow {r.get('flow')!r}")
            recorded = r.get("action")
            if not left:
                raise Divergence(f"record {r['seq']}: the log has {_summary(recorded or {})} "
                                 f"but flow {r['flow']} produced nothing")
            _, computed = left.pop(0)
            if encode(computed) != recorded:
                raise Divergence(f"record {r['seq']}: flow {r['flow']} produced "
                                 f"{_summary(encode(computed))}, the log has {_summary(recorded or {})}")
            actions += 1
        elif kind == "exit":
            ended = True
    for fid, left in pending.items():
        if left and ended:
            raise Divergence(f"flow {fid} produced {_summary(encode(left[0][1]))} "
                             "that the log does not have")
    return (f"replay check passed: {len(flows)} flow(s), {events} events, "
            f"{actions} actions match")
