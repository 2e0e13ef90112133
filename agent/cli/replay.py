"""``keyagent replay LOG [--check | --html OUT | --svg OUT --flow ID | --summary]``.

Without an option it prints a timeline.  ``--html``, ``--svg`` and
``--summary`` draw the log as sequence diagrams (:mod:`agent.tools.replayviz`,
imported only for them); they take several logs (one per VM in host mode).
With ``--check`` it rebuilds each flow from its recorded parameters, feeds it
the recorded events in order, and compares every action it returns with the
recorded one (:func:`agent.app.replay.check`): exit 0 when all match, 1 at
the first divergence, 2 when the log is unreadable.
"""

from __future__ import annotations

import gc
import os
import sys

from agent.app.eventlog import LogFormatError, read_records
from agent.app.replay import check, check_file, print_timeline
from agent.common.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("replay", help="show or re-check a recorded event log")
    p.add_argument(
        "log",
        metavar="LOG",
        nargs="+",
        help="event log (--html, --svg and --summary take several, e.g. one per VM, or a directory of them)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="re-run the flows and compare every action (exit 1 on divergence)"
    )
    mode.add_argument(
        "--html",
        metavar="OUT",
        help="write a self-contained HTML page: a summary table and one sequence diagram per flow",
    )
    mode.add_argument("--svg", metavar="OUT", help="write the sequence diagram of one flow (--flow ID)")
    mode.add_argument(
        "--summary", action="store_true", help="print the summary table (flow ids, VM, start, duration, result)"
    )
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
    if args.check:
        summary = _check_fast(args.log[0])
        if summary is not None:
            print(summary)
            return 0
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


def _check_fast(path: str) -> str | None:
    """--check on the log's text (:func:`agent.app.replay.check_file`), or
    None: then the records are read and checked the full way, which also
    names what is wrong with a log the fast path would not take."""
    return check_file(path)


def run_visual(args) -> int:
    """--html / --svg / --summary: everything is read and drawn before the
    output is written (whole, by a rename): a bad log or flow id writes
    nothing."""
    from agent.tools import replayviz

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
