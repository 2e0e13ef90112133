"""The event log's record format, with a version number.

One JSON object per line, each with ``seq`` (1, 2, ...), ``t`` (seconds
since the agent started) and ``kind``:

* ``start``: the first record: ``format`` (:data:`FORMAT_VERSION`),
  ``version`` (the agent's), ``vm``, ``wall`` (UTC, ISO 8601);
* ``flow``: a flow was created: ``flow`` (its id), ``flow_kind``, ``params``;
* ``event``: an input fed to a flow: ``flow``, ``event`` (:mod:`agent.core.codec`);
* ``action``: an output of a flow: ``flow``, ``action``;
* ``exit``: the agent's end: ``code``, ``reason``.

Versions:

1. (no ``format`` in the start record, or no start record): before the
   version existed.  The migration flow's first log line ("migration
   prepared, waiting for the key") named ``postcopy`` only when it was on.
2. that line always names ``postcopy``.

A reader takes every version up to :data:`FORMAT_VERSION` and hands on
records in the current one (:func:`upgrade`): the flows carry no
workarounds for old recordings, and a recorded trace never has to be
re-recorded because a flow's output grew.  A log from a newer agent is
refused (:class:`UnknownFormat`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

FORMAT_VERSION: Final = 2
#: a log that does not say: written before the version existed
FIRST_VERSION: Final = 1

START: Final = "start"
FLOW: Final = "flow"
EVENT: Final = "event"
ACTION: Final = "action"
EXIT: Final = "exit"
KINDS: Final = frozenset({START, FLOW, EVENT, ACTION, EXIT})

Record = dict[str, Any]

_MIGRATION_PREPARED = "migration prepared, waiting for the key"


class UnknownFormat(ValueError):
    """The log's format is newer than this agent reads (or not a version at all)."""


def start_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The start record's fields, with the format version first."""
    return {"format": FORMAT_VERSION, **fields}


def format_of(first: Record | None) -> int:
    """The version of a log whose first record is ``first``; UnknownFormat if unreadable."""
    if first is None or first.get("kind") != START or "format" not in first:
        return FIRST_VERSION
    version = first["format"]
    if isinstance(version, bool) or not isinstance(version, int) or version < FIRST_VERSION:
        raise UnknownFormat(f"the start record's format {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise UnknownFormat(f"log format {version} is newer than this agent reads (up to {FORMAT_VERSION})")
    return version


def upgrade(records: Iterable[Record]) -> Iterator[Record]:
    """The records in the current format, whatever version they were written in.

    The version is read from the first record; UnknownFormat for a newer one.
    Records already current pass through untouched (no copy).
    """
    it = iter(records)
    first = next(it, None)
    if first is None:
        return
    version = format_of(first)
    yield first
    if version >= FORMAT_VERSION:
        yield from it
        return
    yield from _v1_to_v2(it, first)


def _v1_to_v2(records: Iterator[Record], first: Record) -> Iterator[Record]:
    """Version 1 -> 2: the migration flow's first log line gains ``postcopy: false``."""
    migrations: set[str] = set()  # the ids of the migration flows (a damaged log may have others)
    for record in _chain(first, records):
        kind, flow = record.get("kind"), record.get("flow")
        if not isinstance(flow, str):
            pass  # not a flow's record, or damaged: replay names it
        elif kind == FLOW and record.get("flow_kind") == "migration":
            migrations.add(flow)
        elif kind == ACTION and flow in migrations:
            record = _with_postcopy(record)
        if record is not first:
            yield record


def _chain(first: Record, rest: Iterator[Record]) -> Iterator[Record]:
    yield first
    yield from rest


def _with_postcopy(record: Record) -> Record:
    action = record.get("action")
    if not (isinstance(action, dict) and action.get("type") == "Log" and action.get("message") == _MIGRATION_PREPARED):
        return record
    fields = action.get("fields")
    if not isinstance(fields, dict) or "postcopy" in fields:
        return record
    return {**record, "action": {**action, "fields": {**fields, "postcopy": False}}}
