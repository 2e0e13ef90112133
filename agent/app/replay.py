"""Re-running recorded flows: the timeline and ``--check`` of ``keyagent replay``.

:func:`check` rebuilds each flow from its recorded parameters, feeds it the
recorded events in order, and compares every action it returns with the
recorded one (:class:`Divergence`, exit 1, at the first difference).  The
command line is :mod:`agent.cli.replay`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO, cast

from agent.common.errors import FlowFailed, UsageError
from agent.core.codec import CodecError, decode_event, encode
from agent.core.flow import Flow
from agent.core.registry import FLOW_KINDS


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
