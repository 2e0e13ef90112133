"""The event-log format: versioned; old recordings are read in the current format."""

from __future__ import annotations

import pytest

from agent.protocol.eventlog import FORMAT_VERSION, UnknownFormat, format_of, start_fields, upgrade

PREPARED = "migration prepared, waiting for the key"


def _v1_log(fields: dict) -> list[dict]:
    return [
        {"seq": 1, "t": 0, "kind": "start", "version": "0.1.0", "vm": "src"},
        {"seq": 2, "t": 0, "kind": "flow", "flow": "migrate-1", "flow_kind": "migration", "params": {}},
        {
            "seq": 3,
            "t": 0,
            "kind": "action",
            "flow": "migrate-1",
            "action": {"type": "Log", "level": "info", "message": PREPARED, "fields": fields},
        },
    ]


def test_a_start_record_written_now_carries_the_format_version():
    assert start_fields({"vm": "x"}) == {"format": FORMAT_VERSION, "vm": "x"}
    assert format_of({"kind": "start", **start_fields({})}) == FORMAT_VERSION


def test_a_log_without_a_version_is_version_1():
    assert format_of({"kind": "start", "vm": "x"}) == 1
    assert format_of({"kind": "flow"}) == 1
    assert format_of(None) == 1


def test_a_log_from_a_newer_agent_is_refused():
    with pytest.raises(UnknownFormat, match="newer than this agent reads"):
        format_of({"kind": "start", "format": FORMAT_VERSION + 1})
    with pytest.raises(UnknownFormat, match="not a version number"):
        format_of({"kind": "start", "format": "2"})


def test_version_1_migration_line_gains_postcopy_false():
    records = list(upgrade(_v1_log({"role": "source"})))
    assert records[2]["action"]["fields"] == {"role": "source", "postcopy": False}


def test_version_1_line_that_named_postcopy_is_kept():
    records = list(upgrade(_v1_log({"role": "source", "postcopy": True})))
    assert records[2]["action"]["fields"] == {"role": "source", "postcopy": True}


def test_current_records_pass_through_untouched():
    log = _v1_log({"role": "source"})
    log[0]["format"] = FORMAT_VERSION
    records = list(upgrade(log))
    assert records == log and all(a is b for a, b in zip(records, log))


def test_damaged_flow_ids_are_left_for_replay_to_name():
    log = _v1_log({})
    log[1]["flow"] = ["not", "an", "id"]
    assert len(list(upgrade(log))) == 3
