"""Splits a QMP byte stream into JSON values the way QEMU's parser does.

A QMP peer sends JSON objects back to back, with or without a newline
(qemu.qmp sends none), so the monitor cannot read lines.  QEMU's JSON
streamer (qobject/json-streamer.c) counts braces and brackets outside
strings to find where a value ends, parses it, and on an error throws tokens
away until the braces balance again, so that one bad message costs one error
reply and the next message still parses.  It also caps a message's size and
nesting depth.  This class does the same over bytes, without I/O: ``feed``
returns the values and errors found so far.

Each value is parsed with :mod:`json` (``raw_decode``); only the framing is
done here.  Error texts follow QEMU 7.2 ("JSON parse error, ...", "JSON token
size limit exceeded", "JSON nesting depth limit exceeded").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["JsonStream", "Parsed", "ParseFailure", "MAX_NESTING", "DEFAULT_MAX_MESSAGE"]

#: qobject/json-streamer.c MAX_NESTING
MAX_NESTING = 1 << 10
#: QEMU allows 64 MiB per message; a simulator has no use for that much.
DEFAULT_MAX_MESSAGE = 1 << 20

_WS = b" \t\r\n"
# Outside a string only these bytes change the framing state.
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
# Inside a string only a quote or a backslash matters.
_IN_STRING = re.compile(rb'["\\]')
# A bare scalar at top level ends at whitespace or a structural byte.
_SCALAR_END = re.compile(rb'[\s{}\[\],:"]')


@dataclass(frozen=True)
class Parsed:
    """One complete JSON value."""

    value: Any


@dataclass(frozen=True)
class ParseFailure:
    """One message that could not be parsed; ``desc`` is QEMU's error text."""

    desc: str


def _reject_constant(name: str) -> Any:
    # QEMU's parser knows no NaN / Infinity.
    raise ValueError(f"invalid keyword '{name}'")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _describe(exc: json.JSONDecodeError) -> str:
    msg = exc.msg
    return msg[:1].lower() + msg[1:]


def _decode(frame: bytes) -> Parsed | ParseFailure:
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return ParseFailure("JSON parse error, invalid UTF-8 sequence in string")
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        return ParseFailure(f"JSON parse error, {_describe(exc)}")
    except ValueError as exc:  # from _reject_constant
        return ParseFailure(f"JSON parse error, {exc}")
    if text[end:].strip():
        return ParseFailure("JSON parse error, expecting value")
    return Parsed(value)


def _shown(token: bytes) -> str:
    text = token[:32].decode("utf-8", "backslashreplace")
    return text


class JsonStream:
    """Incremental framer: ``feed(bytes) -> [Parsed | ParseFailure, ...]``."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE, max_nesting: int = MAX_NESTING) -> None:
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._pos = 0  # next byte to scan in _buf
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._discarding = False  # after an error, until the braces balance

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Parsed | ParseFailure]:
        self._buf += data
        out: list[Parsed | ParseFailure] = []
        while self._step(out):
            pass
        return out

    # -- internals -------------------------------------------------------

    def _step(self, out: list) -> bool:
        """Advance once; False when more input is needed."""
        buf = self._buf
        if self._depth == 0:
            return self._top_level(out)
        # Inside a container: scan to the next byte that matters.
        while True:
            if self._in_string:
                if self._escape:
                    if self._pos >= len(buf):
                        return self._need_more(out)
                    self._escape = False
                    self._pos += 1
                m = _IN_STRING.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    return self._need_more(out)
                self._pos = m.end()
                if m.group() == b"\\":
                    self._escape = True
                else:
                    self._in_string = False
                continue
            m = _STRUCTURAL.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return self._need_more(out)
            self._pos = m.end()
            c = m.group()
            if c == b'"':
                self._in_string = True
            elif c in (b"{", b"["):
                self._depth += 1
                if self._depth > self.max_nesting and not self._discarding:
                    self._fail(out, "JSON nesting depth limit exceeded")
            else:
                self._depth -= 1
                if self._depth == 0:
                    frame = bytes(buf[: self._pos])
                    del buf[: self._pos]
                    self._pos = 0
                    if self._discarding:
                        self._discarding = False
                    else:
                        out.append(_decode(frame))
                    return True
            if not self._discarding and self._pos > self.max_message:
                self._fail(out, "JSON token size limit exceeded")

    def _need_more(self, out: list) -> bool:
        if self._discarding:
            # Keep only the framing state, not the bytes.
            del self._buf[:]
            self._pos = 0
        elif len(self._buf) > self.max_message:
            self._fail(out, "JSON token size limit exceeded")
            del self._buf[:]
            self._pos = 0
        return False

    def _fail(self, out: list, desc: str) -> None:
        out.append(ParseFailure(desc))
        self._discarding = True
        del self._buf[: self._pos]
        self._pos = 0

    def _top_level(self, out: list) -> bool:
        buf = self._buf
        i = 0
        while i < len(buf) and buf[i] in _WS:
            i += 1
        del buf[:i]
        self._pos = 0
        if not buf:
            return False
        c = buf[0:1]
        if c in (b"{", b"["):
            self._depth = 1
            self._pos = 1
            return True
        if c in (b"}", b"]"):
            del buf[:1]
            out.append(ParseFailure("JSON parse error, expecting value"))
            return True
        if c == b'"':
            # A bare string: find its end, then report it like any scalar.
            j, esc = 1, False
            while j < len(buf):
                b = buf[j]
                if esc:
                    esc = False
                elif b == 0x5C:
                    esc = True
                elif b == 0x22:
                    break
                j += 1
            else:
                if len(buf) > self.max_message:
                    del buf[:]
                    out.append(ParseFailure("JSON token size limit exceeded"))
                    return True
                return False
            token = bytes(buf[: j + 1])
            del buf[: j + 1]
            out.append(_decode(token))
            return True
        m = _SCALAR_END.search(buf)
        if m is None:
            if len(buf) > self.max_message:
                del buf[:]
                out.append(ParseFailure("JSON token size limit exceeded"))
                return True
            return False  # the token may go on in the next read
        end = max(m.start(), 1)
        token = bytes(buf[:end])
        del buf[:end]
        result = _decode(token)
        if isinstance(result, ParseFailure):
            if token[:1].isalpha():
                result = ParseFailure(f"JSON parse error, invalid keyword '{_shown(token)}'")
            else:
                result = ParseFailure(f"JSON parse error, stray '{_shown(token)}'")
        out.append(result)
        return True
