"""Re-running recorded flows: the timeline and ``--check`` of ``keyagent replay``.

:func:`check` rebuilds each flow from its recorded parameters, feeds it the
recorded events in order, and compares every action it returns with the
recorded one (:class:`Divergence`, exit 1, at the first difference).  The
command line is :mod:`agent.cli.replay`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
from collections.abc import Iterable
from typing import Any, TextIO, cast

from agent.common.errors import FlowFailed, UsageError
from agent.core.codec import CodecError, decode_action, decode_event, encode
from agent.core.flow import Flow
from agent.core.registry import FLOW_KINDS
from agent.protocol.eventlog import FORMAT_VERSION, START


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


# An event or action line exactly as EventLog writes it, up to the value:
# seq, a JSON number t, the kind, a flow id that needs no escaping, and the
# value's key naming the kind again.
_LINE = re.compile(
    r'\{"seq":(0|[1-9][0-9]*),"t":-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?,'
    r'"kind":"(event|action)","flow":"([^"\\\x00-\x1f]*)","\2":'
)
# Decoded events and actions by their text in the log: a log repeats most of
# them (the same QMP commands and replies in every flow).  Emptied when full.
_CACHE_MAX = 8192
_PARTIAL = object()  # a recorded action that names only some fields: equal to nothing


def check_text(text: str) -> str | None:
    """:func:`check`'s fast path, on the log's text: its summary, or None
    when the log needs the full path.

    Every line is either checked the full path's way (``json.loads``, then
    :class:`_Check`), or, for an event or action line exactly as the agent
    writes it (seq, t, kind, flow, value, nothing else), without parsing
    the whole line: its value is parsed and decoded once per distinct text,
    and a recorded action is compared with the computed one as objects
    first.  Equal objects encode to equal JSON when the recorded action
    names every field, so that is enough; otherwise (a field left out, a
    value that changes type on the way such as a tuple, a Secret whose
    bytes differ but not its length, a NaN) the action is compared the full
    path's way, its encoding against the recorded JSON.  Anything else
    (another log format, a damaged or hand-made line, a divergence) returns
    None, and the full path (:func:`check`) gives the verdict with its
    reason, so both paths answer the same.
    """
    collecting = gc.isenabled()
    gc.disable()  # nothing here makes cycles; the collector's passes cost more than they find
    try:
        return _check_text(text)
    except Exception:  # whatever it is, the full path names it
        return None
    finally:
        if collecting:
            gc.enable()


def _check_text(text: str) -> str | None:
    lines = text.split("\n")
    if lines.pop() != "":  # the last line lacks its newline
        return None
    run = _Check()
    flows, pending = run.flows, run.pending
    match = _LINE.match
    loads = json.loads
    events: dict[str, Any] = {}
    actions: dict[str, Any] = {}
    seq = 0
    for line in lines:
        seq += 1
        m = match(line)
        if m is None or m[1] != str(seq) or line[-1] != "}":
            record = loads(line)
            if (
                type(record) is not dict
                or record.get("seq") != seq
                or type(record.get("seq")) is not int
                or type(record.get("t")) not in (int, float)
                or type(record.get("kind")) is not str
            ):
                return None
            kind = record["kind"]
            if seq == 1:
                version = record.get("format")
                if kind != START or type(version) is not int or version != FORMAT_VERSION:
                    return None  # an older format: upgraded on the full path
            if kind == "flow":
                run.flow(record, _flow_id(record))
            elif kind == "event":
                run.event(record, _flow_id(record))
            elif kind == "action":
                run.action(record, _flow_id(record))
            elif kind == "exit":
                run.ended = True
            continue
        if seq == 1:
            return None  # the first line is the start record
        fid = m[3]
        value = line[m.end() : -1]
        if m[2] == "action":
            left = pending.get(fid)
            if not left:
                return None
            computed = left.pop(0)
            expected = actions.get(value)
            if expected is None:
                recorded = loads(value)
                expected = decode_action(recorded)
                if len(recorded) != len(dataclasses.fields(expected)) + 1:
                    expected = _PARTIAL  # a field left out: decoding filled in its default
                if len(actions) >= _CACHE_MAX:
                    actions.clear()
                actions[value] = expected
            if computed != expected and encode(computed) != loads(value):  # the full path's comparison
                return None
            run.actions += 1
            continue
        flow = flows.get(fid)
        if flow is None or pending[fid]:
            return None
        event = events.get(value)
        if event is None:
            event = decode_event(loads(value))
            if '"redacted"' not in value:  # flows wipe the secrets they are given: a fresh one each time
                if len(events) >= _CACHE_MAX:
                    events.clear()
                events[value] = event
        run.events += 1
        pending[fid] = list(flow.handle(event))
    return run.summary()


def check(records: list[dict]) -> str:
    """Re-run every flow; return a one-line summary or raise Divergence.

    A damaged or hand-made log is refused with a one-line reason
    (``UsageError``), whatever it holds: wrong types, unknown flows,
    parameters or events a flow cannot take."""
    run = _Check()
    for r in records:
        kind = r["kind"]
        if kind == "flow":
            run.flow(r, _flow_id(r))
        elif kind == "event":
            run.event(r, _flow_id(r))
        elif kind == "action":
            run.action(r, _flow_id(r))
        elif kind == "exit":
            run.ended = True
    return run.summary()


class _Check:
    """The flows being re-run, and the actions each computed that the log has yet to show."""

    def __init__(self) -> None:
        self.flows: dict[str, Flow] = {}
        self.pending: dict[str, list[Any]] = {}
        self.events = self.actions = 0
        self.ended = False

    def flow(self, r: dict[str, Any], fid: str) -> None:
        flow_kind = r.get("flow_kind")
        cls = FLOW_KINDS.get(flow_kind) if isinstance(flow_kind, str) else None
        if cls is None:
            raise _bad(r, f"unknown flow kind {flow_kind!r}")
        params = r.get("params") or {}
        if not isinstance(params, dict):
            raise _bad(r, "flow parameters are not an object")
        try:
            self.flows[fid] = cls.from_params(params)
        except (TypeError, KeyError, ValueError) as exc:
            raise _bad(r, f"bad flow parameters ({type(exc).__name__})") from None
        self.pending[fid] = []

    def event(self, r: dict[str, Any], fid: str) -> None:
        flow = self.flows.get(fid)
        if flow is None:
            raise _bad(r, f"event for unknown flow {fid!r}")
        left = self.pending[fid]
        if left:
            raise Divergence(
                f"record {r['seq']}: flow {fid} produced {_summary(encode(left[0]))} that the log does not have"
            )
        try:
            event = decode_event(cast(dict, r.get("event")))  # it refuses a non-object itself
        except CodecError as exc:
            raise _bad(r, str(exc)) from None
        except RecursionError:
            raise _bad(r, "event nested too deeply") from None
        self.events += 1
        try:
            computed = flow.handle(event)
        except Exception as exc:  # a hand-made event or parameters no agent recorded
            raise _bad(r, f"flow {fid} cannot take this event ({type(exc).__name__})") from None
        self.pending[fid] = list(computed)

    def action(self, r: dict[str, Any], fid: str) -> None:
        left = self.pending.get(fid)
        if left is None:
            raise _bad(r, f"action for unknown flow {fid!r}")
        recorded = r.get("action")
        if not left:
            raise Divergence(
                f"record {r['seq']}: the log has {_summary(recorded or {})} but flow {fid} produced nothing"
            )
        computed = left.pop(0)
        if encode(computed) != recorded:
            raise Divergence(
                f"record {r['seq']}: flow {fid} produced "
                f"{_summary(encode(computed))}, the log has {_summary(recorded or {})}"
            )
        self.actions += 1

    def summary(self) -> str:
        for fid, left in self.pending.items():
            if left and self.ended:
                raise Divergence(f"flow {fid} produced {_summary(encode(left[0]))} that the log does not have")
        return f"replay check passed: {len(self.flows)} flow(s), {self.events} events, {self.actions} actions match"
