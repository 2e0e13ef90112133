"""The event log as a picture: ``keyagent replay LOG --html/--svg/--summary``.

An operator asking "why did this VM not start?" reads a sequence diagram
faster than a log.  This module turns the records of one or more event
logs into:

* a self-contained HTML page (inline CSS, a few lines of inline script, no
  network, no fonts): a summary table of every flow (VM, flow, start,
  duration, result) linking to one section per flow, each an inline SVG
  sequence diagram;
* a standalone SVG of one flow, for issues and chat;
* the summary table as text.

The diagram has five lanes (control peer, agent, QEMU, guest owner, swtpm).
Each recorded event or action becomes an arrow between two lanes (a QMP
command, its reply, a QMP event, an owner request and its answer, a control
request and its reply) or a note on the agent's lane (timers, key
directories, log lines).  The flow's state is not recorded, so it is
re-derived the way ``replay --check`` does: the flow is rebuilt from its
parameters and fed the recorded events; a state pill marks each change on
the agent's lane.  A failed flow gets its failing step marked with the
reason it finished with.

Secret fields are ``{"redacted": N}`` in the log and are drawn as
``[redacted, N bytes]``: the log never held the bytes, so neither can the
picture.

Long logs stay small in the browser: identical consecutive runs of steps
(retries, polls) fold into one occurrence with a count, and once a page
holds a few thousand rows the remaining diagrams travel compressed and are
drawn only when their section is opened.

Only ``agent.app.replay`` imports this module, and only for these options:
nothing on the agent's launch path pays for it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import enum
import html
import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.common.errors import UsageError

# -- lanes -------------------------------------------------------------------------------------

CONTROL, AGENT, QEMU, OWNER, SWTPM = "control", "agent", "qemu", "owner", "swtpm"
LANES = (CONTROL, AGENT, QEMU, OWNER, SWTPM)
LANE_NAMES = {CONTROL: "control peer", AGENT: "agent", QEMU: "QEMU", OWNER: "guest owner", SWTPM: "swtpm"}
LANE_X = {CONTROL: 150, AGENT: 330, QEMU: 610, OWNER: 880, SWTPM: 1070}
WIDTH = 1150
GUTTER = 92  # the elapsed-time column
TOP = 58  # below the lane headers

# Row heights by row kind.
ROW_H = {"arrow": 30, "note": 19, "state": 22, "fail": 28, "gap": 26}

#: rows drawn at once in one page before further diagrams are drawn on demand
EAGER_ROWS = 2000
#: rows of one flow beyond which its middle is left out (the text timeline has it all)
MAX_FLOW_ROWS = 3000
HEAD_ROWS, TAIL_ROWS = 2000, 800
#: longest run of steps that folds as one repeated unit
MAX_PERIOD = 8


# -- text helpers -----------------------------------------------------------------------------

_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def esc(text: str, quote: bool = True) -> str:
    """Escaped for HTML and XML attributes (``quote=False``: for text, where
    quotes may stay as they are); characters XML cannot hold (controls, lone
    surrogates a damaged log may carry) become U+FFFD."""
    return html.escape(_BAD_XML.sub("\ufffd", text), quote=quote)


_NOT_PRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def clean(text: str) -> str:
    """For a terminal: no control character (a log could carry escape
    sequences) and no lone surrogate (unprintable as UTF-8)."""
    return _NOT_PRINTABLE.sub("\ufffd", text)


def tx(text: str) -> str:
    return esc(text, quote=False)


def is_redacted(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "redacted" in value and type(value["redacted"]) is int


def show(value: Any, depth: int = 0) -> str:
    """Compact JSON, with each secret shown as ``[redacted, N bytes]``."""
    if depth == 0 and type(value) in (dict, list):
        # One C-speed dump unless a secret (or something odd) is inside.
        try:
            text = json.dumps(value, ensure_ascii=False, check_circular=False)
        except (TypeError, ValueError, RecursionError):
            text = '"redacted"'
        if '"redacted"' not in text:
            return text
    if is_redacted(value):
        return f"[redacted, {value['redacted']} bytes]"
    if depth > 12:
        return "…"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {show(v, depth + 1)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(show(v, depth + 1) for v in value) + "]"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def short(value: Any, limit: int) -> str:
    text = show(value) if not isinstance(value, str) else value
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def kv(data: Any, limit: int = 60) -> str:
    """``{"status": "active"}`` as ``status=active``: shorter labels."""
    if not isinstance(data, dict) or not data or is_redacted(data):
        return "" if data in ({}, None) else short(data, limit)
    parts = [f"{k}={v if isinstance(v, str) else show(v)}" for k, v in data.items()]
    return short(" ".join(parts), limit)


def describe(body: Any) -> str:
    """An event or action in full (secrets as their redacted lengths)."""
    if isinstance(body, str):
        return body
    if isinstance(body, dict) and not is_redacted(body):
        return f"{body.get('type', '?')} {show({k: v for k, v in body.items() if k != 'type'})}"
    return show(body)


def elapsed(seconds: float) -> str:
    if seconds < 0:
        return f"-{elapsed(-seconds)}"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 100:
        return f"{seconds:.3f} s"
    return f"{seconds:.1f} s"


# -- the model --------------------------------------------------------------------------------


@dataclass
class Step:
    """One row of a diagram: an arrow between lanes, or a note on one lane."""

    t: float
    seq: int
    src: str
    dst: str
    label: str
    detail: Any = ""  # the full record (a str, or the event/action it shows)
    cls: str = ""
    row: str = "arrow"  # arrow | note | state | fail | gap
    bad: bool = False  # an input that can end a flow (refusal, error, deadline)
    inp: bool = False  # drawn from an event (an input of the flow), not an action

    def signature(self) -> tuple:
        return (self.src, self.dst, self.label, self.cls, self.row)


@dataclass
class Group:
    """A run of ``times`` repetitions of ``steps`` (folded to one)."""

    steps: list[Step]
    times: int
    t_first: float
    t_last: float


@dataclass
class FlowView:
    id: str
    vm: str
    name: str
    kind: str
    log: str
    t0: float
    params: Any = None
    t_end: float | None = None
    code: int | None = None
    reason: str = ""
    steps: list[Step] = field(default_factory=list)
    records: int = 0
    fail_at: int | None = None  # index in steps of the failing step
    anchor: str = ""
    rows: list | None = None  # the folded rows, once drawn
    wall0: float | None = None  # the log's t = 0 as a POSIX time, when its start record says
    open_at_exit: bool = False  # not finished, but the agent's exit is in the log

    @property
    def result(self) -> str:
        if self.code is None:
            return "unfinished"
        return "ok" if self.code == 0 else "failed"

    @property
    def result_text(self) -> str:
        if self.code is None:
            if self.open_at_exit:
                return "unfinished (still open when the agent exited)"
            return "unfinished (the log ends before the flow does)"
        if self.code == 0:
            return f"ok: {self.reason}" if self.reason else "ok"
        return f"failed: {self.reason}" if self.reason else f"failed (code {self.code})"

    @property
    def duration(self) -> float:
        end = self.t_end if self.t_end is not None else (self.steps[-1].t if self.steps else self.t0)
        return max(end - self.t0, 0.0)


@dataclass
class Report:
    logs: list[str]
    flows: list[FlowView]
    records: int
    exits: list[tuple[str, str, Any, str]]  # (log, vm, code, reason)


# -- records to steps -------------------------------------------------------------------------


def _tag_command(tag: Any, commands: dict) -> str:
    if isinstance(tag, str):
        if tag in commands:
            return commands[tag]
        return tag.rsplit(":", 1)[-1]
    return "?"


def _lane_of_type(name: str) -> str | None:
    low = name.lower()
    if "swtpm" in low or "tpm" in low:
        return SWTPM
    return None


def _event_step(r: dict, ev: Any, commands: dict) -> Step:
    t, seq = r["t"], r["seq"]
    if not isinstance(ev, dict):
        return Step(t, seq, AGENT, AGENT, "event " + short(ev, 70), show(ev), "err", "note")
    typ = str(ev.get("type", "?"))
    rest = {k: v for k, v in ev.items() if k != "type"}
    detail = ev  # described when drawn: most steps of a long log never are
    if typ == "QmpReply":
        cmd = _tag_command(ev.get("tag"), commands)
        res = ev.get("result")
        return Step(t, seq, QEMU, AGENT, f"↩ {cmd} {kv(res, 44)}".rstrip(), detail, "reply")
    if typ == "QmpError":
        cmd = _tag_command(ev.get("tag"), commands)
        return Step(t, seq, QEMU, AGENT, short(f"✗ {cmd}: {ev.get('desc', '')}", 60), detail, "err", bad=True)
    if typ == "QmpEvent":
        name = str(ev.get("name", "?"))
        data = ev.get("data")
        status = data.get("status") if isinstance(data, dict) else None
        bad = name in ("SHUTDOWN", "GUEST_PANICKED") or status in ("failed", "cancelled")
        return Step(
            t, seq, QEMU, AGENT, f"{name} {kv(data, 40)}".rstrip(), detail, "qevent err" if bad else "qevent", bad=bad
        )
    if typ == "QmpDisconnected":
        return Step(
            t, seq, QEMU, AGENT, short(f"✗ QMP disconnected: {ev.get('reason', '')}", 60), detail, "err", bad=True
        )
    if typ == "QmpConnected":
        return Step(t, seq, QEMU, AGENT, short(f"QMP connected {ev.get('qemu_version', '')}", 60), detail, "reply")
    if typ == "OwnerReleased":
        gpa = ev.get("gpa")
        label = f"200 released: secret {show(ev.get('secret'))}" + (f" gpa={gpa}" if gpa is not None else "")
        return Step(t, seq, OWNER, AGENT, short(label, 80), detail, "reply ok")
    if typ == "OwnerRefused":
        return Step(
            t, seq, OWNER, AGENT, short(f"✗ {ev.get('status')} {ev.get('error', '')}", 80), detail, "err", bad=True
        )
    if typ == "OwnerFailed":
        return Step(t, seq, OWNER, AGENT, short(f"✗ {ev.get('reason', '')}", 80), detail, "err dashed", bad=True)
    if typ == "ControlRequest":
        return Step(t, seq, CONTROL, AGENT, short(f"{ev.get('verb', '?')} {kv(ev.get('args'))}", 34), detail, "ctl")
    if typ == "TimerFired":
        timer = ev.get("name")
        bad = timer not in ("retry", "poll")
        return Step(
            t, seq, AGENT, AGENT, f"timer {timer} fired", detail, "timer err" if bad else "timer", "note", bad=bad
        )
    if typ == "Start":
        return Step(t, seq, AGENT, AGENT, "start", detail, "minor", "note")
    if typ == "KeyProvided":
        return Step(t, seq, AGENT, AGENT, f"key {ev.get('name')} {show(ev.get('key'))}", detail, "key", "note")
    if typ == "KeyDirReady":
        return Step(t, seq, AGENT, AGENT, f"key dir {ev.get('name')} ready", detail, "minor", "note")
    if typ == "KeyDirFailed":
        return Step(
            t,
            seq,
            AGENT,
            AGENT,
            short(f"✗ key dir {ev.get('name')} failed {kv(rest)}", 80),
            detail,
            "err",
            "note",
            bad=True,
        )
    if typ == "KeyringReady":
        return Step(t, seq, AGENT, AGENT, f"keyring {ev.get('name')} ready", detail, "minor", "note")
    if typ.startswith("Keyring") and "Fail" in typ:
        return Step(t, seq, AGENT, AGENT, short(f"✗ {typ} {kv(rest)}", 80), detail, "err", "note", bad=True)
    lane = _lane_of_type(typ)
    if lane:
        return Step(
            t,
            seq,
            lane,
            AGENT,
            short(f"{typ} {kv(rest)}", 60),
            detail,
            "err" if "Fail" in typ or "Exit" in typ else "reply",
        )
    return Step(t, seq, AGENT, AGENT, short(f"{typ} {kv(rest)}", 80), detail, "", "note")


def _action_step(r: dict, act: Any, commands: dict) -> Step:
    t, seq = r["t"], r["seq"]
    if not isinstance(act, dict):
        return Step(t, seq, AGENT, AGENT, "action " + short(act, 70), show(act), "err", "note")
    typ = str(act.get("type", "?"))
    rest = {k: v for k, v in act.items() if k != "type"}
    detail = act
    if typ == "SendQmp":
        cmd = str(act.get("command", "?"))
        if isinstance(act.get("tag"), str):
            commands[act["tag"]] = cmd
        args = act.get("args")
        return Step(t, seq, AGENT, QEMU, f"{cmd} {kv(args, 40)}".rstrip(), detail, "cmd")
    if typ == "PostOwner":
        return Step(
            t, seq, AGENT, OWNER, f"POST {act.get('path', '?')} {kv(act.get('body'), 60)}".rstrip(), detail, "req"
        )
    if typ == "ControlReply":
        return Step(
            t,
            seq,
            AGENT,
            CONTROL,
            short(f"{act.get('status')} {kv(act.get('body'))}", 34),
            detail,
            "ctl" if act.get("status") in (200, None) else "ctl err",
        )
    if typ == "Log":
        level = str(act.get("level", "info"))
        text = str(act.get("message", ""))
        fields = act.get("fields")
        if fields:
            text += f" ({kv(fields, 70)})"
        cls = {"error": "log err", "warning": "log warn", "debug": "log minor"}.get(level, "log")
        return Step(t, seq, AGENT, AGENT, short(f"log {level}: {text}", 96), detail, cls, "note")
    if typ == "ArmTimer":
        return Step(
            t, seq, AGENT, AGENT, f"timer arm {act.get('name')} {act.get('seconds')} s", detail, "minor", "note"
        )
    if typ == "CancelTimer":
        return Step(t, seq, AGENT, AGENT, f"timer cancel {act.get('name')}", detail, "minor", "note")
    if typ == "Finish":
        code = act.get("code")
        return Step(
            t,
            seq,
            AGENT,
            AGENT,
            short(f"■ finish {code}: {act.get('reason', '')}", 96),
            detail,
            "finish ok" if code == 0 else "finish err",
            "note",
        )
    if typ == "WriteKeyDir":
        files = act.get("files")
        what = (
            ", ".join(f"{k} {show(v) if is_redacted(v) else '(public)'}" for k, v in files.items())
            if isinstance(files, dict)
            else show(files)
        )
        return Step(t, seq, AGENT, AGENT, short(f"write key dir {act.get('name')}: {what}", 96), detail, "key", "note")
    if typ == "RemoveKeyDir":
        return Step(t, seq, AGENT, AGENT, f"remove key dir {act.get('name')}", detail, "key", "note")
    if typ == "KeyringAdd":
        return Step(
            t,
            seq,
            AGENT,
            AGENT,
            short(f"keyring add {act.get('description')} {show(act.get('key'))}", 96),
            detail,
            "key",
            "note",
        )
    if typ == "KeyringDrop":
        return Step(t, seq, AGENT, AGENT, f"keyring drop {act.get('name')}", detail, "key", "note")
    lane = _lane_of_type(typ)
    if lane:
        return Step(t, seq, AGENT, lane, short(f"{typ} {kv(rest)}", 60), detail, "cmd")
    return Step(t, seq, AGENT, AGENT, short(f"{typ} {kv(rest)}", 80), detail, "", "note")


class _StateTracker:
    """Re-runs a flow over its recorded events to learn its state after each.

    The same rebuild ``replay --check`` does; any trouble (unknown kind,
    bad parameters, an event the flow cannot take) only ends the tracking:
    the picture is still drawn, without states from there on."""

    def __init__(self, kind: Any, params: Any) -> None:
        self.flow = None
        try:
            from agent.core.registry import FLOW_KINDS

            cls = FLOW_KINDS.get(kind) if isinstance(kind, str) else None
            if cls is not None and isinstance(params, dict):
                self.flow = cls.from_params(params)
        except Exception:  # noqa: BLE001 - a damaged log: no states, still a picture
            self.flow = None

    def feed(self, event: Any) -> str | None:
        if self.flow is None:
            return None
        from agent.core.codec import decode_event

        try:
            self.flow.handle(decode_event(event))
        except Exception:  # noqa: BLE001
            self.flow = None
            return None
        state = getattr(self.flow, "state", None)
        if isinstance(state, enum.Enum):
            return str(state.value)
        return None if state is None else str(state)


def _fail_index(steps: list[Step]) -> int | None:
    """The input that made a failed flow fail: the first bad input that is
    not a retried error, else the input before the first error line, else
    the last input."""
    inputs = [i for i, s in enumerate(steps) if s.inp]
    for n, i in enumerate(inputs):
        if not steps[i].bad:
            continue
        if "err" in steps[i].cls and steps[i].src == QEMU and steps[i].label.startswith("✗"):
            # an error followed by a retry timer is a retry, not the failure
            nxt = inputs[n + 1] if n + 1 < len(inputs) else None
            if nxt is not None and steps[nxt].cls == "timer":
                continue
        return i
    for i, s in enumerate(steps):
        if s.cls == "log err":
            before = [j for j in inputs if j < i]
            return before[-1] if before else i
    return inputs[-1] if inputs else (len(steps) - 1 if steps else None)


def build(logs: Iterable[tuple[str, list[dict]]]) -> Report:
    flows: list[FlowView] = []
    exits = []
    total = 0
    names = []
    for path, records in logs:
        names.append(path)
        total += len(records)
        vm = ""
        wall0 = None
        by_name: dict[str, FlowView] = {}
        trackers: dict[str, _StateTracker] = {}
        states: dict[str, str | None] = {}
        commands: dict[str, dict] = {}
        for r in records:
            kind = r["kind"]
            if kind == "start":
                vm = str(r.get("vm") or vm)
                wall = _parse_wall(r.get("wall"))
                wall0 = wall - r["t"] if wall is not None else None
                continue
            if kind == "exit":
                exits.append((path, vm, r.get("code"), str(r.get("reason") or "")))
                for open_fv in by_name.values():
                    open_fv.open_at_exit = open_fv.code is None
                continue
            if kind not in ("flow", "event", "action"):
                continue
            fname = r.get("flow")
            fname = fname if isinstance(fname, str) else show(fname)
            rvm = str(r["vm"]) if isinstance(r.get("vm"), str) else vm
            key = f"{rvm}\0{fname}"
            fv = by_name.get(key)
            if kind == "flow" or fv is None:
                if fv is not None:  # the same flow id again: a new flow
                    by_name.pop(key)
                fv = FlowView(id="", vm=rvm, name=fname, kind="?", log=path, t0=r["t"], wall0=wall0)
                by_name[key] = fv
                flows.append(fv)
                commands[key] = {}
                trackers.pop(key, None)
                states[key] = None
                if kind == "flow":
                    fv.kind = str(r.get("flow_kind"))
                    fv.params = r.get("params")
                    trackers[key] = _StateTracker(r.get("flow_kind"), r.get("params"))
                    fv.records += 1
                    continue
            fv.records += 1
            if kind == "event":
                ev = r.get("event")
                step = _event_step(r, ev, commands[key])
                step.inp = True
                fv.steps.append(step)
                tracker = trackers.get(key)
                state = tracker.feed(ev) if tracker is not None else None
                if state is not None and state != states[key]:
                    states[key] = state
                    fv.steps.append(
                        Step(r["t"], r["seq"], AGENT, AGENT, state, "flow state: " + state, "state", "state")
                    )
            else:
                act = r.get("action")
                fv.steps.append(_action_step(r, act, commands[key]))
                if isinstance(act, dict) and act.get("type") == "Finish":
                    fv.t_end = r["t"]
                    code = act.get("code")
                    fv.code = code if type(code) is int else 1
                    fv.reason = " ".join(str(act.get("reason", "")).split())
    _assign_ids(flows)
    for n, fv in enumerate(flows, start=1):
        fv.anchor = f"f{n}"
        if fv.result == "failed":
            fv.fail_at = _fail_index(fv.steps)
    return Report(names, flows, total, exits)


def _parse_wall(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def start_text(fv: FlowView) -> str:
    """When the flow started: UTC wall-clock time when the log has it, else
    seconds since the agent started."""
    if fv.wall0 is None:
        return f"{fv.t0:.3f} s"
    try:
        when = datetime.datetime.fromtimestamp(fv.wall0 + fv.t0, datetime.UTC)
    except (OverflowError, ValueError, OSError):  # a hand-made start record
        return f"{fv.t0:.3f} s"
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _assign_ids(flows: list[FlowView]) -> None:
    """Flow ids for ``--flow``: the flow's name in the log (``launch``,
    ``migrate-1``), ``VM/name`` when the logs hold several VMs, and ``#2``,
    ``#3``... for a name seen again."""
    several_vms = len({f.vm for f in flows}) > 1
    seen: dict[str, int] = {}
    for f in flows:
        base = f"{f.vm}/{f.name}" if several_vms else f.name
        seen[base] = seen.get(base, 0) + 1
        f.id = base if seen[base] == 1 else f"{base}#{seen[base]}"


# -- folding ----------------------------------------------------------------------------------


def fold(steps: list[Step]) -> list[Step | Group]:
    """Runs of identical consecutive steps (or of a repeated unit of up to
    ``MAX_PERIOD`` steps: send, error, retry timer...) become one Group."""
    sigs: dict[tuple, int] = {}
    ids = [sigs.setdefault(s.signature(), len(sigs)) for s in steps]
    out: list[Step | Group] = []
    i, n = 0, len(steps)
    while i < n:
        best_p, best_reps = 0, 1
        for p in range(1, MAX_PERIOD + 1):
            if i + 2 * p > n:
                break
            if ids[i : i + p] != ids[i + p : i + 2 * p]:
                continue
            reps = 2
            while i + (reps + 1) * p <= n and ids[i + reps * p : i + (reps + 1) * p] == ids[i : i + p]:
                reps += 1
            if reps * p > best_reps * max(best_p, 1):
                best_p, best_reps = p, reps
        if best_p:
            span = steps[i : i + best_reps * best_p]
            out.append(Group(steps[i : i + best_p], best_reps, span[0].t, span[-1].t))
            i += best_reps * best_p
        else:
            out.append(steps[i])
            i += 1
    return out


# -- SVG --------------------------------------------------------------------------------------

CSS = """
.ka text{font-family:system-ui,"DejaVu Sans","Liberation Sans",Arial,sans-serif;font-size:12px;fill:#1f2328}
.ka .halo{paint-order:stroke;stroke:#fff;stroke-width:4px;stroke-linejoin:round}
.ka .lane{stroke:#b8c0cc;stroke-width:1;stroke-dasharray:4 4}
.ka .lane-agent{stroke:#6b7b90;stroke-width:2;stroke-dasharray:none}
.ka .lanebox{fill:#eef2f7;stroke:#8a96a8;rx:6}
.ka .lanebox-agent{fill:#dbe7ff;stroke:#3d6bd8}
.ka .lane-name{font-weight:600;text-anchor:middle;font-size:13px}
.ka .time{fill:#6a737d;font-size:11px;text-anchor:end;font-variant-numeric:tabular-nums}
.ka .arrow{stroke:#3d6bd8;stroke-width:1.6;marker-end:url(#ka-head)}
.ka .arrow.reply{stroke:#6a737d;stroke-dasharray:5 3;marker-end:url(#ka-head-grey)}
.ka .arrow.qevent{stroke:#8250df;marker-end:url(#ka-head-purple)}
.ka .arrow.req{stroke:#1a7f37;marker-end:url(#ka-head-green)}
.ka .arrow.ok{stroke:#1a7f37;marker-end:url(#ka-head-green)}
.ka .arrow.ctl{stroke:#bf8700;marker-end:url(#ka-head-amber)}
.ka .arrow.err{stroke:#cf222e;stroke-width:2;stroke-dasharray:none;marker-end:url(#ka-head-red)}
.ka .arrow.dashed{stroke-dasharray:5 3}
.ka .arrow.failing{stroke:#cf222e;stroke-width:2.6;stroke-dasharray:none;marker-end:url(#ka-head-red)}
.ka .label{text-anchor:middle}
.ka .label.err,.ka .note.err{fill:#cf222e;font-weight:600}
.ka .note{font-size:11.5px}
.ka .note.minor{fill:#6a737d}
.ka .note.key{fill:#7d4e00}
.ka .note.timer{fill:#6a737d}
.ka .note.warn{fill:#9a6700}
.ka .note.finish.ok{fill:#1a7f37;font-weight:600}
.ka .dot{fill:#6b7b90}
.ka .dot.err{fill:#cf222e}
.ka .pill{fill:#fff;stroke:#3d6bd8;stroke-width:1.2}
.ka .state{font-size:11px;text-anchor:middle;fill:#3d6bd8;font-weight:600}
.ka .failbox{fill:#ffebe9;stroke:#cf222e;stroke-width:1.2}
.ka .failtext{fill:#a40e26;font-weight:700}
.ka .fold{stroke:#8250df;stroke-width:2;fill:none}
.ka .foldtext{fill:#8250df;font-weight:700;font-size:12px}
.ka .gap{fill:#6a737d;font-style:italic;text-anchor:middle}
.ka .head{font-size:14px;font-weight:700}
"""

DEFS = "".join(
    f'<marker id="ka-head{suffix}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
    f'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
    f'<path d="M0,0L10,5L0,10z" fill="{colour}"/></marker>'
    for suffix, colour in (
        ("", "#3d6bd8"),
        ("-grey", "#6a737d"),
        ("-purple", "#8250df"),
        ("-green", "#1a7f37"),
        ("-amber", "#bf8700"),
        ("-red", "#cf222e"),
    )
)


def _rows(fv: FlowView) -> list[Step | Group]:
    """The folded rows of a flow, with the failure marked and a very long
    middle left out (computed once per flow)."""
    if fv.rows is None:
        fv.rows = _make_rows(fv)
    return fv.rows


def _make_rows(fv: FlowView) -> list[Step | Group]:
    steps = list(fv.steps)
    if fv.fail_at is not None:
        failing = steps[fv.fail_at] = dataclasses.replace(steps[fv.fail_at])
        failing.cls += " failing"
        steps.insert(
            fv.fail_at + 1,
            Step(failing.t, failing.seq, AGENT, AGENT, f"✗ failed here: {fv.reason}", fv.reason, "fail", "fail"),
        )
    items = fold(steps)
    if len(items) > MAX_FLOW_ROWS:
        left = len(items) - HEAD_ROWS - TAIL_ROWS
        first = items[HEAD_ROWS]
        gap = Step(
            first.t if isinstance(first, Step) else first.t_first,
            0,
            AGENT,
            AGENT,
            f"… {left} more rows left out here (keyagent replay LOG prints them all) …",
            "",
            "gap",
            "gap",
        )
        items = items[:HEAD_ROWS] + [gap] + items[-TAIL_ROWS:]
    return items


def row_count(fv: FlowView) -> int:
    return sum(len(i.steps) if isinstance(i, Group) else 1 for i in _rows(fv))


def _step_svg(s: Step, y: float, t0: float, out: list[str], times: int = 1) -> float:
    """Draw one step at the top of y; return its height."""
    h = ROW_H[s.row]
    count = times  # a folded run of this one step
    title = f"<title>{tx(f'#{s.seq} t={s.t:.6f}s  {describe(s.detail)}')}</title>" if s.detail else ""
    if s.row != "gap":
        out.append(f'<text class="time" x="{GUTTER - 8}" y="{y + h - 8:.0f}">{elapsed(s.t - t0)}</text>')
    if s.row == "arrow":
        x1, x2 = LANE_X[s.src], LANE_X[s.dst]
        ly = y + h - 6
        sign = 1 if x2 > x1 else -1
        mid = (x1 + x2) / 2
        room = int(abs(x2 - x1) / 6.6) - 2
        suffix = f"  ×{count}" if count > 1 else ""
        label = short(s.label, max(room - len(suffix), 12)) + suffix
        tag = "err" if "err" in s.cls or "failing" in s.cls else ""
        out.append(
            f'<g class="step{" failing" if "failing" in s.cls else ""}">{title}'
            f'<line class="arrow {esc(s.cls)}" x1="{x1 + 3 * sign}" y1="{ly:.0f}" '
            f'x2="{x2 - 3 * sign}" y2="{ly:.0f}"/>'
            f'<text class="label halo {tag}" x="{mid:.0f}" y="{ly - 5:.0f}">{tx(label)}</text></g>'
        )
    elif s.row == "note":
        x = LANE_X[s.src]
        label = s.label + (f"  ×{count}" if count > 1 else "")
        cls = "err" if "err" in s.cls or "failing" in s.cls else ""
        out.append(
            f'<g class="step{" failing" if "failing" in s.cls else ""}">{title}'
            f'<circle class="dot {cls}" cx="{x}" cy="{y + h - 8:.0f}" r="3"/>'
            f'<text class="note halo {esc(s.cls)}" x="{x + 9}" y="{y + h - 4:.0f}">'
            f"{tx(label)}</text></g>"
        )
    elif s.row == "state":
        x = LANE_X[AGENT]
        w: float = 7 * len(s.label) + 18
        out.append(
            f'<g class="state-change"><title>{esc(s.detail)}</title>'
            f'<rect class="pill" x="{x - w / 2:.0f}" y="{y + 3:.0f}" width="{w}" height="16" rx="8"/>'
            f'<text class="state" x="{x}" y="{y + 15:.0f}">{tx(s.label)}</text></g>'
        )
    elif s.row == "fail":
        x = LANE_X[AGENT]
        text = s.label
        w = min(max(7.2 * len(text) + 24, 200), WIDTH - x + 60)
        out.append(
            f'<g class="fail"><rect class="failbox" x="{x - 60}" y="{y + 3:.0f}" width="{w:.0f}" '
            f'height="{h - 6}" rx="5"/>'
            f'<text class="failtext" x="{x - 48}" y="{y + h - 10:.0f}">{tx(text)}</text></g>'
        )
    elif s.row == "gap":
        out.append(f'<text class="gap" x="{WIDTH / 2:.0f}" y="{y + h - 9:.0f}">{tx(s.label)}</text>')
    return h


def _lane_heads(head_y: int) -> str:
    parts = []
    for lane in LANES:
        x = LANE_X[lane]
        extra = "-agent" if lane == AGENT else ""
        parts.append(
            f'<rect class="lanebox lanebox{extra}" x="{x - 52}" y="{head_y}" width="104" height="26" rx="6"/>'
            f'<text class="lane-name" x="{x}" y="{head_y + 17}">{LANE_NAMES[lane]}</text>'
        )
    parts.append(f'<text class="time" x="{GUTTER - 8}" y="{head_y + 17}">elapsed</text>')
    return "".join(parts)


def _lane_lines(y1: float, y2: float) -> str:
    return "".join(
        f'<line class="lane lane{"-agent" if lane == AGENT else ""}" x1="{LANE_X[lane]}" '
        f'y1="{y1:.0f}" x2="{LANE_X[lane]}" y2="{y2:.0f}"/>'
        for lane in LANES
    )


#: the lane names above a diagram in a page: kept in view while it scrolls
PAGE_HEAD = (
    f'<div class="lanes"><svg class="ka ka-head" xmlns="http://www.w3.org/2000/svg" '
    f'width="{WIDTH}" height="40" viewBox="0 0 {WIDTH} 40">{_lane_lines(34, 40)}'
    f"{_lane_heads(7)}</svg></div>"
)


def flow_svg(fv: FlowView, standalone: bool = False) -> str:
    """The sequence diagram of one flow: an SVG file of its own
    (``standalone``, lane names on top), or for a page, the lane names in a
    header of their own that stays in view (:data:`PAGE_HEAD`) and the
    diagram below it."""
    body: list[str] = []
    y: float = TOP + 34 if standalone else 4
    for item in _rows(fv):
        if isinstance(item, Group):
            top = y
            for s in item.steps:
                y += _step_svg(s, y, fv.t0, body, item.times if len(item.steps) == 1 else 1)
            if len(item.steps) > 1:
                span = f"from {elapsed(item.t_first - fv.t0)} to {elapsed(item.t_last - fv.t0)}"
                body.append(
                    f'<g class="folded"><title>{esc(f"repeated {item.times} times, {span}")}</title>'
                    f'<path class="fold" d="M{GUTTER + 2},{top + 4:.0f}h6v{y - top - 8:.0f}h-6"/>'
                    f'<text class="foldtext" x="{GUTTER + 12}" y="{(top + y) / 2 + 4:.0f}">'
                    f"×{item.times}</text></g>"
                )
        else:
            y += _step_svg(item, y, fv.t0, body)
    height = y + 16
    if standalone:
        lanes = _lane_lines(70, height - 6) + _lane_heads(42)
    else:
        lanes = _lane_lines(0, height - 6)
    head = ""
    if standalone:
        head = (
            f'<rect width="100%" height="100%" fill="#fff"/>'
            f'<text class="head" x="12" y="24">{tx(f"{_title(fv)} ({fv.kind}) · {fv.result_text}")}</text>'
        )
    svg_open = (
        f'<svg class="ka" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
        f'viewBox="0 0 {WIDTH} {height:.0f}" role="img" '
        f'aria-label="{esc(f"sequence diagram of flow {fv.id}")}">'
    )
    defs = f"<defs>{DEFS}</defs><style>{CSS}</style>" if standalone else ""
    svg = svg_open + defs + head + lanes + "".join(body) + "</svg>"
    return svg if standalone else PAGE_HEAD + svg


# -- HTML -------------------------------------------------------------------------------------

PAGE_CSS = """
body{font-family:system-ui,"DejaVu Sans","Liberation Sans",Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1200px;min-width:1180px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:20px;margin:4px 0 2px}
.sub{color:#57606a;font-size:13px;margin-bottom:12px}
table.summary{border-collapse:collapse;width:100%;background:#fff;font-size:13px;margin-bottom:18px}
table.summary th,table.summary td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
table.summary th{background:#eef2f7}
table.summary td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.result-ok{color:#1a7f37;font-weight:600}
td.result-failed{color:#cf222e;font-weight:600}
td.result-unfinished{color:#9a6700;font-weight:600}
section.flow{background:#fff;border:1px solid #d0d7de;border-radius:8px;margin:14px 0;padding:8px 12px}
section.flow.failed{border-color:#cf222e}
section.flow h2{font-size:16px;margin:4px 0}
section.flow summary{cursor:pointer;color:#57606a;font-size:13px;margin:4px 0}
.meta{font-size:13px;color:#57606a}
.reason{color:#cf222e;font-weight:600}
.lanes{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid #eef2f7}
code{font-size:12px}
.legend{font-size:12px;color:#57606a;margin:6px 0 10px}
"""

# Diagrams past the eager budget travel as one gzip-compressed, base64 JSON
# array of SVG texts (a script element of a type browsers do not run: the
# parser skips it) and are drawn when their section is opened.  The
# diagrams of a long log repeat themselves, so this is a tenth of their size.
SCRIPT = """
var kaLazy=null;
function kaData(){if(!kaLazy){var b=atob(document.getElementById('ka-lazy').textContent.trim());
var u=new Uint8Array(b.length);for(var i=0;i<b.length;i++)u[i]=b.charCodeAt(i);
kaLazy=new Response(new Blob([u]).stream().pipeThrough(new DecompressionStream('gzip'))).json();}
return kaLazy;}
function kaDraw(d){var s=d.querySelector('div[data-lazy]');if(!s)return;var k=+s.dataset.lazy;
s.removeAttribute('data-lazy');s.textContent='drawing…';
kaData().then(function(a){s.className='diagram';s.innerHTML=a[k];});}
document.addEventListener('toggle',function(e){if(e.target.open)kaDraw(e.target);},true);
function kaOpen(){var id=location.hash.slice(1);var sec=id&&document.getElementById(id);
if(sec){var d=sec.querySelector('details');if(d&&!d.open){d.open=true;kaDraw(d);}}}
window.addEventListener('hashchange',kaOpen);kaOpen();
window.addEventListener('load',function(){document.body.dataset.loadedMs=Math.round(performance.now());});
"""


class _LazyBlob:
    """A JSON array of SVG texts, gzip-compressed as it is written (the
    diagrams of a long log never sit in memory all at once), then base64."""

    def __init__(self) -> None:
        self.count = 0
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: the gzip format
        self._parts = [self._z.compress(b"[")]

    def add(self, svg: str) -> None:
        self._parts.append(self._z.compress((b"," if self.count else b"") + json.dumps(svg).encode()))
        self.count += 1

    def finish(self) -> str:
        self._parts.append(self._z.compress(b"]") + self._z.flush())
        return base64.b64encode(b"".join(self._parts)).decode()


def summary_rows(report: Report) -> list[tuple[str, ...]]:
    return [(f.id, f.vm, f.kind, start_text(f), elapsed(f.duration), f.result_text) for f in report.flows]


SUMMARY_HEAD = ("ID", "VM", "FLOW", "START", "DURATION", "RESULT")


def summary_text(report: Report) -> str:
    rows = [SUMMARY_HEAD, *(tuple(map(clean, r)) for r in summary_rows(report))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SUMMARY_HEAD) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def page(report: Report, eager_rows: int = EAGER_ROWS) -> str:
    title = ", ".join(os.path.basename(p) for p in report.logs)
    vms = sorted({f.vm for f in report.flows if f.vm})
    failed = sum(1 for f in report.flows if f.result == "failed")
    out = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>keyagent replay: {esc(title)}</title><style>{PAGE_CSS}{CSS}</style></head><body>",
        f'<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>{DEFS}</defs></svg>',
        "<main>",
        f"<h1>keyagent replay: {esc(title)}</h1>",
        f'<div class="sub">{report.records} records · {len(report.flows)} flow(s) · '
        f"{failed} failed · VM {esc(', '.join(vms) or '?')}",
    ]
    for _log, vm, code, reason in report.exits:
        out.append(f" · agent {esc(vm)} exited {esc(str(code))}" + (f": {esc(reason)}" if reason else ""))
    out.append("</div>")
    out.append(
        '<table class="summary" id="summary"><thead><tr>'
        + "".join(f"<th>{h.title() if h != 'VM' and h != 'ID' else h}</th>" for h in SUMMARY_HEAD)
        + "</tr></thead><tbody>"
    )
    for f, row in zip(report.flows, summary_rows(report)):
        fid, vm, kind, start, duration, result = row
        out.append(
            f'<tr class="flow-row"><td><a href="#{f.anchor}">{esc(fid)}</a></td><td>{esc(vm)}</td>'
            f'<td>{esc(kind)}</td><td class="num">{esc(start)}</td><td class="num">{esc(duration)}</td>'
            f'<td class="result-{f.result}">{esc(result)}</td></tr>'
        )
    out.append("</tbody></table>")
    out.append(
        '<div class="legend">Arrows: solid blue a QMP command, grey dashed its reply, purple a '
        "QMP event, green the guest owner, amber the control peer, red an error or refusal. "
        "Pills on the agent lane: the flow's state. ×N: repeated N times in a row. "
        "Hover a step for the full record. Secrets appear only as [redacted, N bytes].</div>"
    )
    # Failed flows are drawn first (the page is opened to find out what went
    # wrong), then the others in log order, while the row budget lasts.
    budget = eager_rows
    drawn: set[int] = set()
    for f in sorted(report.flows, key=lambda f: f.result != "failed"):
        rows = row_count(f)
        if rows <= budget:
            budget -= rows
            drawn.add(id(f))
    lazy = _LazyBlob()
    for f in report.flows:
        rows = row_count(f)
        eager = id(f) in drawn
        out.append(
            f'<section class="flow {f.result}" id="{f.anchor}" data-flow="{esc(f.id)}">'
            f'<h2>{esc(_title(f))} <span class="meta">({esc(f.kind)})</span></h2>'
            f'<div class="meta">start {esc(start_text(f))} · {esc(elapsed(f.duration))} · '
            f"{f.records} records · {esc(os.path.basename(f.log))} · "
        )
        if f.result == "failed":
            out.append(f'<span class="reason">failed: {esc(f.reason)}</span>')
        else:
            out.append(esc(f.result_text))
        out.append(
            f"</div><details{' open' if eager else ''}><summary>diagram: {rows} rows"
            f"{'' if eager else ' (drawn when opened)'}</summary>"
        )
        svg = flow_svg(f)
        if eager:
            out.append(f'<div class="diagram">{svg}</div>')
        else:
            out.append(f'<div data-lazy="{lazy.count}"></div>')
            lazy.add(svg)
        out.append("</details></section>")
    out.append("</main>")
    if lazy.count:
        out.append(f'<script type="application/x-keyagent-lazy" id="ka-lazy">{lazy.finish()}</script>')
    out.append(f"<script>{SCRIPT}</script></body></html>\n")
    return "".join(out)


def _title(fv: FlowView) -> str:
    """``vm1 · launch``, or the id alone when it already names the VM."""
    return fv.id if fv.id.startswith(f"{fv.vm}/") or not fv.vm else f"{fv.vm} · {fv.id}"


def standalone_svg(fv: FlowView) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + flow_svg(fv, standalone=True) + "\n"


# -- output -----------------------------------------------------------------------------------


def check_output_path(path: str, inputs: list[str]) -> None:
    """Refuse, before anything is written, an output we could not write or
    that would overwrite an input log."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {path}: no directory {parent}")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {path}: it is a directory")
    for log in inputs:
        try:
            if os.path.exists(path) and os.path.samefile(path, log):
                raise UsageError(f"cannot write {path}: it is the log being read")
        except OSError:
            pass
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: directory {parent} is not writable")


def write_atomically(path: str, text: str) -> None:
    """Whole or not at all: a temporary file beside it, renamed over it."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=".keyagent-replay-", dir=parent)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def find_flow(report: Report, flow_id: str | None) -> FlowView:
    ids = [clean(f.id) for f in report.flows]
    if flow_id is None:
        if len(report.flows) == 1:
            return report.flows[0]
        raise UsageError(
            "--svg needs --flow ID; flows in this log: "
            + (", ".join(ids[:20]) or "none")
            + (" …" if len(ids) > 20 else "")
        )
    for f in report.flows:
        if f.id == flow_id:
            return f
    raise UsageError(
        f"no flow {clean(repr(flow_id))} in the log; flows: "
        + (", ".join(ids[:20]) or "none")
        + (" …" if len(ids) > 20 else "")
    )
