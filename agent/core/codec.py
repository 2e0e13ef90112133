"""Events and actions to and from JSON-friendly dicts, for the event log.

A :class:`Secret` is written as ``{"redacted": N}`` and read back as N zero
bytes: a replay cannot know the secret, and does not need to, because flows
only move secrets around; they never branch on their bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from agent.common.secret import Secret
from agent.core.actions import ACTION_TYPES, Action
from agent.core.events import EVENT_TYPES, Event


class CodecError(ValueError):
    pass


# Values written and read as they are.  Checked by exact type first: the
# codec runs on every event and action the agent records and on every one
# ``keyagent replay --check`` re-runs, and most values are these.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _field_names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names, computed once per class
    (``dataclasses.fields()`` costs more than the encoding itself)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def to_json(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
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
    if type(value) in _SCALARS:
        return value
    if isinstance(value, dict):
        if set(value) == {"redacted"} and isinstance(value["redacted"], int):
            n = value["redacted"]
            if not 0 <= n <= 1 << 20:
                raise CodecError(f"redacted length {n} out of range")
            return Secret.placeholder(n)
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def encode(obj: Any) -> dict[str, Any]:
    """``{"type": "QmpReply", "tag": ..., ...}``"""
    cls = type(obj)
    out: dict[str, Any] = {"type": cls.__name__}
    for name in _field_names(cls):
        out[name] = to_json(getattr(obj, name))
    return out


def _decode(record: dict[str, Any], types: dict[str, type]) -> Any:
    if not isinstance(record, dict):
        raise CodecError("record is not an object")
    name = record.get("type")
    cls = types.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CodecError(f"unknown type {name!r}")
    names = _field_names(cls)
    kwargs = {k: from_json(v) for k, v in record.items() if k != "type"}
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise CodecError(f"{name}: unknown field {sorted(unknown)[0]!r}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise CodecError(f"{name}: {exc}") from None


def decode_event(record: dict[str, Any]) -> Event:
    return cast(Event, _decode(record, EVENT_TYPES))


def decode_action(record: dict[str, Any]) -> Action:
    return cast(Action, _decode(record, ACTION_TYPES))
