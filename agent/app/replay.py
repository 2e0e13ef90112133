"""Re-running recorded flows: the timeline and ``--check`` of ``keyagent replay``.

:func:`check` rebuilds each flow from its recorded parameters, feeds it the
recorded events in order, and compares every action it returns with the
recorded one (:class:`Divergence`, exit 1, at the first difference).  The
command line is :mod:`agent.cli.replay`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import marshal
import os
import re
import select
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, cast

from agent.common.errors import FlowFailed, UsageError
from agent.common.secret import Secret
from agent.core.actions import ACTION_TYPES
from agent.core.codec import CodecError, decode_action, decode_event, encode
from agent.core.events import EVENT_TYPES
from agent.core.flow import Flow
from agent.core.frozen import fast_init
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


# Every line of the log, in order: an event or action line exactly as
# EventLog writes it gives (seq, kind, flow id, value, ""): seq, a JSON
# number t, the kind, a flow id that needs no escaping, the value's key
# naming the kind again, the value, the closing brace; any other line gives
# ("", "", "", "", the line).  One ``findall`` per chunk of the text does
# the matching in C: a tuple per line, nothing else made per line.
_RECORDS = re.compile(
    r'^(?:\{"seq":(0|[1-9][0-9]*),"t":-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?,'
    r'"kind":"(event|action)","flow":"([^"\\\x00-\x1f]*)","\2":(.*)\}|(.*))$',
    re.MULTILINE,
)
#: characters of text per findall: the tuples of one chunk are made and dropped together
_CHUNK = 1 << 20
# Decoded events and actions by their text in the log: a log repeats most of
# them (the same QMP commands and replies in every flow).  Emptied when full.
_CACHE_MAX = 8192

_Line = tuple[str, str, str, str, str]  # what _RECORDS gives for one line


class _Partial:
    """A recorded action that names only some fields: equal to nothing."""


_PARTIAL = _Partial()


class _Fresh:
    """An event holding a Secret: flows wipe the secrets they are given, so
    it is fed as a fresh copy each time."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def check_text(text: str, split: bool | None = None, split_at: int | None = None) -> str | None:
    """:func:`check`'s fast path, on the log's text: its summary, or None
    when the log needs the full path.

    Every line is either checked the full path's way (``json.loads``, then
    :class:`_Check`), or, for an event or action line exactly as the agent
    writes it (seq, t, kind, flow, value, nothing else), without parsing
    the whole line: an event's value is parsed and decoded once per
    distinct text; an action's is compared the full path's way the first
    time its text is met, and from the second on decoded once and compared
    with the computed one as objects first.  Equal objects encode to equal
    JSON when the recorded action names every field, so that is enough;
    otherwise (a field left out, a value that changes type on the way such
    as a tuple, a Secret whose bytes differ but not its length, a NaN) the
    action is compared the full path's way, its encoding against the
    recorded JSON.  Anything else
    (another log format, a damaged or hand-made line, a divergence) returns
    None, and the full path (:func:`check`) gives the verdict with its
    reason, so both paths answer the same.

    A log of more than :data:`_SPLIT_MIN` characters, on a machine with
    two CPUs or more, is checked in two processes (``split``; None: by
    size), each half of the log's lines in one (:func:`_check_split`);
    ``split_at`` puts the second half's first line at that index instead
    of the line in the middle (the tests try every line).  The command
    checks a file with :func:`check_file`, which reads it in chunks.
    """
    collecting = gc.isenabled()
    gc.disable()  # nothing here makes cycles; the collector's passes cost more than they find
    try:
        fast = _Fast()
        pos = fast.start(text)
        if pos is None:
            return None
        last = len(text) - 1
        if split is None:
            split = last - pos >= _SPLIT_MIN and _cpus() >= 2
        if split_at is not None:
            if not pos <= split_at <= len(text) or text[split_at - 1] != "\n":
                raise ValueError("split_at is not where a line begins")
            return _check_split(fast, text, pos, split_at)
        if split:
            return _check_split(fast, text, pos, text.index("\n", pos + (last - pos) // 2) + 1)
        if fast.lines(text, pos, last, 1, None) is None:
            return None
        return fast.summary()
    except Exception:  # whatever it is, the full path names it
        return None
    finally:
        if collecting:
            gc.enable()


class _Fast:
    """The fast path's flows, caches and counts."""

    def __init__(self) -> None:
        # every action of every flow is made again: the cheaper constructor
        fast_init(*EVENT_TYPES.values(), *ACTION_TYPES.values(), *(kind.Params for kind in FLOW_KINDS.values()))
        self.run = _Check()
        self.events: dict[str, Any] = {}  # event (or _Fresh) by its text
        self.actions: dict[str, Any] = {}  # decoded action (or _PARTIAL) by its text
        self.seen: set[str] = set()  # actions met once, by their text

    def start(self, text: str) -> int | None:
        """The first line, the start record with the current format: where
        the next line begins, or None."""
        if not text.endswith("\n"):  # the last line lacks its newline
            return None
        pos = text.index("\n") + 1
        record = json.loads(text[: pos - 1])
        if not _plain(record, 1) or record["kind"] != START:
            return None
        version = record.get("format")
        if type(version) is not int or version != FORMAT_VERSION:
            return None  # an older format: upgraded on the full path
        return pos

    def lines(self, text: str, pos: int, last: int, seq: int, foreign: list[_Line] | None) -> int | None:
        """Check the lines from ``pos`` to the newline at ``last``, the
        first of them record ``seq + 1``: the seq of the last one, or None
        for no verdict.  With a ``foreign`` list, an event or action of a
        flow not created here is put in it instead (:func:`_check_split`)."""
        return self.feed(_chunks(text, pos, last), seq, True, foreign)

    def feed(self, chunks: Iterable[list[_Line]], seq: int, verify: bool, foreign: list[_Line] | None) -> int | None:
        """:meth:`lines` on lines already matched; ``verify=False`` for
        lines whose seq another process checked (they do not follow each
        other)."""
        run = self.run
        flows, pending = run.flows, run.pending
        events, actions, seen = self.events, self.actions, self.seen
        loads = json.loads
        n_events = n_actions = 0
        for lines in chunks:
            for line in lines:
                seq_text, kind, fid, value, other = line
                seq += 1
                if not kind:  # another kind of record, or another layout: the full path's way
                    record = loads(other)
                    if not _plain(record, seq if verify else record.get("seq")):
                        return None
                    if foreign is not None and _foreign(run, record):
                        foreign.append(line)
                    else:
                        _apply(run, record)
                    continue
                if seq_text != str(seq) and verify:
                    return None
                if kind == "action":
                    left = pending.get(fid)
                    if left is None:
                        if foreign is None:
                            return None
                        foreign.append(line)
                        continue
                    computed = left.pop(0)  # none left (IndexError): no verdict
                    expected = actions.get(value)
                    if expected is None:
                        if value not in seen:
                            # Seen once: compared the full path's way, and only
                            # decoded if it comes again (most that do not repeat
                            # never will: a VM's name, a flow's own ids).
                            if len(seen) >= _CACHE_MAX:
                                seen.clear()
                            seen.add(value)
                            if encode(computed) != loads(value):
                                return None
                            n_actions += 1
                            continue
                        expected = actions[value] = self._action(value)
                    # A dataclass's equality is its fields': their dicts,
                    # compared in C (a frozen dataclass holds nothing else).
                    if computed.__dict__ != expected.__dict__ or computed.__class__ is not expected.__class__:
                        if encode(computed) != loads(value):  # the full path's comparison
                            return None
                    n_actions += 1
                    continue
                flow = flows.get(fid)
                if flow is None:
                    if foreign is None:
                        return None
                    foreign.append(line)
                    continue
                if pending[fid]:
                    return None
                event = events.get(value)
                if event is None:
                    event = events[value] = self._event(value)
                if event.__class__ is _Fresh:
                    event = event.make()
                n_events += 1
                pending[fid] = list(flow.handle(event))
        run.events += n_events
        run.actions += n_actions
        return seq

    def _action(self, value: str) -> Any:
        """The recorded action, decoded; or :data:`_PARTIAL` when it leaves a
        field out (decoding filled in its default)."""
        if len(self.actions) >= _CACHE_MAX:
            self.actions.clear()
        recorded = json.loads(value)
        expected = decode_action(recorded)
        if len(recorded) != len(dataclasses.fields(expected)) + 1:
            return _PARTIAL
        return expected

    def _event(self, value: str) -> Any:
        """The recorded event, decoded; or a :class:`_Fresh` maker of copies.

        A copy is the event's fields with new placeholders when every
        Secret in it is a field of its own (every ``"redacted"`` in its
        text is one); else the event is decoded again each time."""
        if len(self.events) >= _CACHE_MAX:
            self.events.clear()
        recorded = json.loads(value)
        event = decode_event(recorded)
        if '"redacted"' not in value:
            return event
        fields = dict(event.__dict__)
        secrets = [(name, len(v)) for name, v in fields.items() if type(v) is Secret]
        if value.count('"redacted"') != len(secrets):  # one inside a field: decode again
            return _Fresh(lambda: decode_event(recorded))
        cls = type(event)
        placeholder = Secret.placeholder

        def make() -> Any:
            copy = object.__new__(cls)
            values = copy.__dict__
            values.update(fields)
            for name, n in secrets:
                values[name] = placeholder(n)
            return copy

        return _Fresh(make)

    def summary(self) -> str:
        return self.run.summary()


def _plain(record: Any, seq: int) -> bool:
    """A record as the full path reads it: an object, record ``seq``, with a numeric t and a kind."""
    return (
        type(record) is dict
        and record.get("seq") == seq
        and type(record.get("seq")) is int
        and type(record.get("t")) in (int, float)
        and type(record.get("kind")) is str
    )


def _apply(run: _Check, record: dict[str, Any]) -> None:
    """One record, the full path's way."""
    kind = record["kind"]
    if kind == "flow":
        run.flow(record, _flow_id(record))
    elif kind == "event":
        run.event(record, _flow_id(record))
    elif kind == "action":
        run.action(record, _flow_id(record))
    elif kind == "exit":
        run.ended = True


def _foreign(run: _Check, record: dict[str, Any]) -> bool:
    """An event or action of a flow this process has not created."""
    return record["kind"] in ("event", "action") and record.get("flow") not in run.flows


def _chunks(text: str, pos: int, last: int) -> Iterator[list[_Line]]:
    """The lines from ``pos`` to the newline at ``last``, matched, a chunk
    of whole lines at a time (each chunk's last newline left out)."""
    findall = _RECORDS.findall
    while pos <= last:
        stop = text.find("\n", pos + _CHUNK) if pos + _CHUNK < last else last
        yield findall(text, pos, stop)
        pos = stop + 1


#: bytes (characters) of log below which one process checks it all (a fork
#: costs about a millisecond; a 4 MB log about 0.05 s to check)
_SPLIT_MIN = 4 << 20
#: how long the first half waits for the second once its own half is done,
#: at least, and in multiples of the time its own half took
_SPLIT_WAIT_S = 60.0
_SPLIT_WAIT_FACTOR = 10


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_split(fast: _Fast, text: str, pos: int, mid: int) -> str | None:
    """:func:`check_text` in two processes: this one checks the lines
    before ``mid``, a forked child those from ``mid`` on (:func:`_in_two`)."""
    seq_mid = 1 + text.count("\n", pos, mid)  # records before mid: the start record and the lines from pos

    def alone() -> str | None:
        return fast.summary() if fast.lines(text, pos, len(text) - 1, 1, None) is not None else None

    def first() -> tuple[_Fast, int] | None:
        last = fast.lines(text, pos, mid - 1, 1, None)
        return None if last is None else (fast, last)

    return _in_two(first, lambda: _second_half(_chunks(text, mid, len(text) - 1), seq_mid), alone)


def check_file(path: str) -> str | None:
    """:func:`check_text` of the log at ``path``, or None (also when it
    cannot be read or is not UTF-8: the full path says why).

    The file is read and decoded a chunk (:data:`_CHUNK`) at a time.  A log
    over :data:`_SPLIT_MIN` bytes, with two CPUs, is read in two halves by
    two processes: this one reads and checks the lines up to the first
    newline from the middle of the file on, a forked child reads and checks
    the rest (:func:`_in_two`); the child does not know how many records
    come before its first, so it takes that record's seq as given and this
    process checks it follows its own last one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    collecting = gc.isenabled()
    gc.disable()  # as in check_text
    try:
        size = os.fstat(fd).st_size
        if size - 1 < _SPLIT_MIN or _cpus() < 2:
            checked = _first_part(fd, size, size)
            return None if checked is None else checked[0].summary()
        return _check_file_split(fd, size)
    except Exception:  # whatever it is, the full path names it
        return None
    finally:
        os.close(fd)
        if collecting:
            gc.enable()


def _check_file_split(fd: int, size: int) -> str | None:
    mid = _line_end(fd, size // 2, size)  # the second half begins after the first newline from the middle on

    def alone() -> str | None:
        checked = _first_part(fd, size, size)
        return None if checked is None else checked[0].summary()

    return _in_two(lambda: _first_part(fd, mid, size), lambda: _second_half(_file_chunks(fd, mid, size), None), alone)


def _first_part(fd: int, stop: int, size: int) -> tuple[_Fast, int] | None:
    """The start record and the lines after it up to ``stop``, checked: the
    state and the last seq, or None."""
    first_line = _read(fd, 0, _line_end(fd, 0, size))
    fast = _Fast()
    if first_line is None or fast.start(first_line) is None:
        return None
    last = fast.feed(_file_chunks(fd, len(first_line.encode()), stop), 1, True, None)
    return None if last is None else (fast, last)


def _line_end(fd: int, pos: int, stop: int) -> int:
    """Where the line at ``pos`` ends, its newline included (``stop`` if it has none)."""
    while pos < stop:
        chunk = os.pread(fd, min(1 << 16, stop - pos), pos)
        if not chunk:
            break
        i = chunk.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(chunk)
    return stop


def _file_chunks(fd: int, pos: int, stop: int) -> Iterator[list[_Line]]:
    """:func:`_chunks` of the file's bytes ``pos`` to ``stop``, read and
    decoded a chunk at a time (a few MB live at once, not the whole log);
    ValueError if they do not end with a newline or are not UTF-8."""
    findall = _RECORDS.findall
    size = _CHUNK
    while pos < stop:
        data = os.pread(fd, min(size, stop - pos), pos)
        if not data:
            raise ValueError("the log is shorter than it was")
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # a line longer than a chunk
            if pos + len(data) >= stop:
                raise ValueError("the last line lacks its newline")
            size *= 2
            continue
        size = _CHUNK
        text = str(memoryview(data)[:cut], "utf-8")  # UnicodeDecodeError is a ValueError
        pos += cut
        yield findall(text, 0, cut - 1)


def _read(fd: int, start: int, stop: int) -> str | None:
    """The text of bytes ``start`` to ``stop`` (at most: a log that grows is read as it was), or None."""
    parts = []
    while start < stop:
        part = os.pread(fd, stop - start, start)
        if not part:
            break
        parts.append(part)
        start += len(part)
    try:
        return b"".join(parts).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _in_two(
    first: Callable[[], tuple[_Fast, int] | None], second: Callable[[], bytes], alone: Callable[[], str | None]
) -> str | None:
    """The fast path in two processes: ``first`` here (the first half of
    the log: the checked state and the last seq, or None), ``second`` in a
    forked child (:func:`_second_half`'s answer); ``alone`` if there is no
    fork.

    Flows are independent of each other: a flow's verdict depends on its
    own records only, in order.  The child re-runs the flows created in
    its half; an event or action of a flow created before it is handed
    back (with its seq checked) and this process feeds it to that flow
    after its own half, in order.  A flow id the child creates again
    replaces this process's flow of that id from there on, as in one
    process.  Whatever either half cannot take (a divergence, anything
    damaged, the child's death or silence) is no verdict, and the full
    path, in one process, gives the verdict and names the first
    divergence, so the answer is the one-process answer whatever the
    split.
    """
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return alone()
    if pid == 0:  # the child: its half, its answer down the pipe, and nothing else
        os.close(read_end)
        answer = b""
        try:
            answer = second()
        finally:
            with contextlib.suppress(BaseException):
                view = memoryview(answer)
                while view:
                    view = view[os.write(write_end, view) :]
            os._exit(0)
    os.close(write_end)
    reaped = False
    try:
        began = time.monotonic()
        mine = first()
        if mine is None:
            return None
        fast, last = mine
        wait = max(_SPLIT_WAIT_S, _SPLIT_WAIT_FACTOR * (time.monotonic() - began))
        data = _read_all(read_end, time.monotonic() + wait)
        if data is None:
            return None  # no answer in time: the child is killed below
        os.waitpid(pid, 0)  # it has closed the pipe: it is exiting
        reaped = True
        if not data:
            return None
        base, events, actions, ended, left, child_flows, foreign = marshal.loads(data)
        if base is not None and base != last:
            return None  # the second half does not follow the first: the full path says where
        if fast.feed([foreign], 0, False, None) is None:
            return None
        run = fast.run
        for fid in child_flows:  # created again in the second half: this one's flow was replaced
            run.pending.pop(fid, None)
        if (ended or run.ended) and (left or any(run.pending.values())):
            return None  # a flow produced actions the log does not have: the full path names it
        flows = len(run.flows.keys() | set(child_flows))
        return _passed(flows, run.events + events, run.actions + actions)
    finally:
        os.close(read_end)
        if not reaped:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _second_half(chunks: Iterator[list[_Line]], base: int | None) -> bytes:
    """The child's answer for the lines of ``chunks``, the first of them
    record ``base + 1`` (None: whatever seq it has): the seq before its
    first line, its counts and flows, and the records of flows it did not
    create; empty for no verdict."""
    try:
        head = next(chunks, None)
        if head is None:  # nothing after the first half
            return marshal.dumps((None, 0, 0, False, False, [], []))
        if base is None:
            base = _seq_of(head[0]) - 1
        fast = _Fast()
        foreign: list[_Line] = []
        if fast.feed(itertools.chain([head], chunks), base, True, foreign) is None:
            return b""
        run = fast.run
        left = any(run.pending.values())
        return marshal.dumps((base, run.events, run.actions, run.ended, left, list(run.flows), foreign))
    except Exception:
        return b""


def _seq_of(line: _Line) -> int:
    """The seq of a matched line (ValueError if it has none)."""
    seq_text, kind, _, _, other = line
    if kind:
        return int(seq_text)
    record = json.loads(other)
    seq = record.get("seq") if type(record) is dict else None
    if type(seq) is not int:
        raise ValueError("a record without a seq")
    return seq


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything the child writes, or None if it has not finished by the deadline."""
    parts: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


def check(records: list[dict]) -> str:
    """Re-run every flow; return a one-line summary or raise Divergence.

    A damaged or hand-made log is refused with a one-line reason
    (``UsageError``), whatever it holds: wrong types, unknown flows,
    parameters or events a flow cannot take."""
    run = _Check()
    for r in records:
        _apply(run, r)
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
        return _passed(len(self.flows), self.events, self.actions)


def _passed(flows: int, events: int, actions: int) -> str:
    return f"replay check passed: {flows} flow(s), {events} events, {actions} actions match"
