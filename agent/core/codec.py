"""Events and actions to and from JSON-friendly dicts, for the event log.

A :class:`Secret` is written as ``{"redacted": N}`` and read back as N zero
bytes: a replay cannot know the secret, and does not need to, because flows
only move secrets around; they never branch on their bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.core.actions import ACTION_TYPES
from agent.core.events import EVENT_TYPES
from agent.core.secret import Secret


class CodecError(ValueError):
    pass


def to_json(value: Any) -> Any:
    if isinstance(value, Secret):
        return value.to_log()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (bytes, bytearray)):  # never secret: secrets are Secret
        raise TypeError("raw bytes in an event or action: wrap secrets in Secret, encode others")
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"redacted"} and isinstance(value["redacted"], int):
            n = value["redacted"]
            if not 0 <= n <= 1 << 20:
                raise CodecError(f"redacted length {n} out of range")
            return Secret(bytes(n))
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def encode(obj: Any) -> dict:
    """``{"type": "QmpReply", "tag": ..., ...}``"""
    out = {"type": type(obj).__name__}
    for f in dataclasses.fields(obj):
        out[f.name] = to_json(getattr(obj, f.name))
    return out


def _decode(record: dict, types: dict[str, type]) -> Any:
    if not isinstance(record, dict):
        raise CodecError("record is not an object")
    name = record.get("type")
    cls = types.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CodecError(f"unknown type {name!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: from_json(v) for k, v in record.items() if k != "type"}
    unknown = set(kwargs) - names
    if unknown:
        raise CodecError(f"{name}: unknown field {sorted(unknown)[0]!r}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise CodecError(f"{name}: {exc}") from None


def decode_event(record: dict) -> Any:
    return _decode(record, EVENT_TYPES)


def decode_action(record: dict) -> Any:
    return _decode(record, ACTION_TYPES)
