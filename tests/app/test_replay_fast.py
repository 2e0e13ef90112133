"""``replay --check``'s fast path (agent.app.replay.check_text) gives the full path's verdict, or none."""

from __future__ import annotations

import json

import pytest

from agent.app.eventlog import read_records
from agent.app.replay import check, check_text
from tests.app.replay_logs import TRACES, current, full, interleaved, text_of


def agree(records: list[dict], text: str | None = None) -> str | None:
    """The fast verdict, after checking it is the full path's (or None)."""
    fast = check_text(text_of(records) if text is None else text)
    if fast is not None:
        assert fast == full(records)
    return fast


@pytest.mark.parametrize("trace", TRACES, ids=[t.stem for t in TRACES])
def test_every_recorded_trace_passes_the_fast_path_with_the_full_paths_summary(trace):
    records = current(trace)
    assert agree(records) == check(records)


def test_an_older_format_goes_the_full_way():
    records = list(read_records(str(TRACES[0])))
    records[0] = {k: v for k, v in records[0].items() if k != "format"}
    assert check_text(text_of(records)) is None


def _first(records: list[dict], kind: str, type_: str | None = None) -> int:
    return next(i for i, r in enumerate(records) if r["kind"] == kind and (type_ is None or r[kind]["type"] == type_))


def test_a_changed_action_is_left_to_the_full_path_which_names_the_divergence():
    records = current(TRACES[0])
    i = _first(records, "action", "SendQmp")
    records[i] = {**records[i], "action": {**records[i]["action"], "command": "quit"}}
    assert agree(records) is None
    assert full(records).startswith("Divergence")


def test_a_missing_or_extra_action_is_left_to_the_full_path():
    records = current(TRACES[0])
    i = _first(records, "action")
    dropped = [*records[:i], *({**r, "seq": r["seq"] - 1} for r in records[i + 1 :])]
    assert agree(dropped) is None
    extra = [*records[: i + 1], {**records[i], "seq": i + 2}, *({**r, "seq": r["seq"] + 1} for r in records[i + 1 :])]
    assert agree(extra) is None


def test_a_changed_event_is_left_to_the_full_path():
    records = current(TRACES[0])
    i = _first(records, "event", "QmpReply")
    records[i] = {**records[i], "event": {**records[i]["event"], "tag": "other"}}
    assert agree(records) is None


def test_an_action_without_a_field_that_has_a_default_is_not_taken_as_equal():
    records = current(TRACES[0])
    i = _first(records, "action", "SendQmp")
    records[i] = {**records[i], "action": {k: v for k, v in records[i]["action"].items() if k != "args"}}
    assert agree(records) is None  # decoding would fill args={} in; the full path sees a field missing


def test_a_line_written_another_way_gets_the_same_verdict():
    records = current(TRACES[0])
    spaced = "".join(json.dumps(r) + "\n" for r in records)  # ", " and ": "
    assert check_text(spaced) in (None, check(records))
    reordered = "".join(json.dumps(dict(reversed(list(r.items()))), separators=(",", ":")) + "\n" for r in records)
    assert check_text(reordered) in (None, check(records))


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t[:-1],  # no final newline
        lambda t: t.replace('"seq":3,', '"seq":03,', 1),
        lambda t: t.replace('"seq":3,', '"seq":3.0,', 1),
        lambda t: t.replace('"seq":4,', '"seq":5,', 1),
        lambda t: t.replace('"t":', '"t":"x",', 1),
        lambda t: t.replace("\n", "\n\n", 1),
        lambda t: t + "{}\n",
        lambda t: t + "[1]\n",
    ],
)
def test_a_damaged_log_is_left_to_the_full_path(damage):
    assert check_text(damage(text_of(current(TRACES[0])))) is None


def test_secrets_in_actions_compare_by_length_as_the_full_path_does():
    """The migration's key line is a Secret the flow makes from the (zeroed) PSK
    placeholder: its bytes differ from a placeholder's, its length does not."""
    trace = next(t for t in TRACES if t.stem == "migration-source-wrong-psk")
    records = current(trace)
    assert any('"redacted"' in json.dumps(r.get("action")) for r in records)
    assert agree(records) == check(records)


def test_an_action_met_again_is_compared_as_objects_with_the_same_verdict():
    """The second flow's actions are texts met before: decoded once, compared as objects."""
    for trace in TRACES:
        records = interleaved([trace, trace])
        assert agree(records) == full(records)


def test_a_secret_in_an_action_met_again_compares_by_length_as_the_full_path_does():
    trace = next(t for t in TRACES if t.stem == "migration-source-wrong-psk")
    records = interleaved([trace, trace, trace])
    assert agree(records) == full(records)


def test_an_action_met_again_without_a_field_is_still_not_taken_as_equal():
    records = interleaved([TRACES[0], TRACES[0]])
    for i, r in enumerate(records):
        if r["kind"] == "action" and r["action"]["type"] == "SendQmp":
            records[i] = {**r, "action": {k: v for k, v in r["action"].items() if k != "args"}}
    assert full(records).startswith("Divergence")
    assert agree(records) is None
