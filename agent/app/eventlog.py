"""The event log: JSON lines of every flow's inputs and outputs.

The record format and its version are :mod:`agent.protocol.eventlog`: the
writer puts ``format`` into the start record, the reader takes every
version and hands on records in the current one.

Secrets are :class:`Secret` values in events and actions and are written as
``{"redacted": N}`` by :mod:`agent.core.codec`.  Each line is flushed as it
is written, so the log of a crashed agent ends at its last step.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from agent.common.errors import UsageError
from agent.core.codec import encode
from agent.protocol.eventlog import START, UnknownFormat, start_fields, upgrade


class EventLog:
    def __init__(self, path: str | None, clock=time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self._seq = 0
        self._file = None
        if path:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise UsageError(f"cannot open event log {path}: {exc.strerror}") from None
            self._file = os.fdopen(fd, "w", encoding="utf-8", buffering=1)

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def write(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        self._seq += 1
        if kind == START:
            fields = start_fields(fields)
        record = {"seq": self._seq, "t": round(self._clock() - self._t0, 6), "kind": kind, **fields}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flow(self, flow_id: str, flow) -> None:
        if self._file is not None:  # params_json() is dataclasses.asdict: not for a log nobody writes
            self.write("flow", flow=flow_id, flow_kind=flow.kind, params=flow.params_json())

    def event(self, flow_id: str, event) -> None:
        if self._file is not None:
            self.write("event", flow=flow_id, event=encode(event))

    def action(self, flow_id: str, action) -> None:
        if self._file is not None:
            self.write("action", flow=flow_id, action=encode(action))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LogFormatError(ValueError):
    """The log is unreadable: truncated, not JSON, or missing fields."""


_DECODER = json.JSONDecoder()


def _parse_plain(data: bytes) -> list[dict] | None:
    """Every record of a well-formed log, or None at the first thing that is
    not plainly right (then :func:`_parse_lines` says exactly what).

    One UTF-8 decode and one ``raw_decode`` per line, which must end exactly
    at its newline: the same records ``json.loads`` gives line by line, at
    half the cost (``keyagent replay`` spends most of its time here).  The
    garbage collector is off meanwhile: parsed JSON holds no cycles, and
    its passes over a growing log cost as much as the parsing.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse_text(text)
    finally:
        if collecting:
            gc.enable()


def _parse_text(text: str) -> list[dict] | None:
    raw_decode = _DECODER.raw_decode
    records: list[dict] = []
    append = records.append
    pos, end, last_seq = 0, len(text), 0
    try:
        while pos < end:
            record, stop = raw_decode(text, pos)
            if text[stop] != "\n" or type(record) is not dict:
                return None
            seq = record.get("seq")
            if (
                type(seq) is not int
                or seq != last_seq + 1
                or type(record.get("t")) not in (int, float)
                or type(record.get("kind")) is not str
            ):
                return None
            last_seq = seq
            append(record)
            pos = stop + 1
    except (ValueError, RecursionError, IndexError):
        return None
    return records


def read_records(path: str) -> Iterator[dict]:
    """Yield records in order, in the current format; raise LogFormatError with a one-line reason."""
    try:
        yield from upgrade(_read_records(path))
    except UnknownFormat as exc:
        raise LogFormatError(f"{path}: {exc}") from None


def _read_records(path: str) -> Iterator[dict]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise LogFormatError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        data = f.read()
    records = _parse_plain(data)
    if records is not None:
        yield from records
        return
    yield from _parse_lines(path, data)


def _parse_lines(path: str, data: bytes) -> Iterator[dict]:
    """Line by line, with the reason for the first bad line."""
    import io

    with io.BytesIO(data) as f:
        last_seq = 0
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                raise LogFormatError(f"{path}: truncated at line {number} (no end of line)")
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise LogFormatError(f"{path}: line {number} is not JSON") from None
            except RecursionError:
                raise LogFormatError(f"{path}: line {number} is nested too deeply") from None
            if not isinstance(record, dict):
                raise LogFormatError(f"{path}: line {number} is not a JSON object")
            seq, t, kind = record.get("seq"), record.get("t"), record.get("kind")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq != last_seq + 1:
                raise LogFormatError(f"{path}: line {number} has seq {seq!r}, expected {last_seq + 1}")
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not isinstance(kind, str):
                raise LogFormatError(f"{path}: line {number} lacks a numeric t or a kind")
            last_seq = seq
            yield record
