"""``replay --check`` in two processes (agent.app.replay._check_split): the
one-process verdict wherever the log is split, or none (the full path names it)."""

from __future__ import annotations

import gc
import json
import os
import subprocess

import pytest

from agent.app import replay
from agent.app.eventlog import read_records
from agent.app.replay import check_text
from tests.app.replay_logs import TRACES, current, full, interleaved, renumbered, text_of
from tests.executable import KEYAGENT

# six traces with launches, migrations (both sides, adopted, postcopy) and MH flows
MIXED = [
    t
    for t in TRACES
    if t.stem
    in {
        "launch-good",
        "launch-measurement-retried",
        "migration-source-postcopy",
        "migration-destination-adopted-completed",
        "mh-source-peer-key-and-report",
        "launch-refused-quit",
    }
]


def line_starts(text: str) -> list[int]:
    """Where each line after the start record begins, and the end of the text."""
    starts = [i + 1 for i, c in enumerate(text) if c == "\n"]
    return starts


def split_verdicts(records: list[dict]) -> set[str | None]:
    text = text_of(records)
    return {check_text(text, split_at=at) for at in line_starts(text)}


def test_the_mixed_log_has_every_kind_of_flow_and_interleaves_them():
    assert len(MIXED) == 6
    records = interleaved(MIXED)
    kinds = {r["flow_kind"] for r in records if r["kind"] == "flow"}
    assert {"sev-launch", "migration", "mh-peer"} <= kinds
    flows = [r["flow"] for r in records if r["kind"] in ("event", "action")]
    assert sum(a != b for a, b in zip(flows, flows[1:])) > len(MIXED) * 4


def test_a_split_at_any_line_gives_the_one_process_summary():
    records = interleaved(MIXED)
    assert full(records).startswith("replay check passed")
    assert split_verdicts(records) == {full(records)}


@pytest.mark.parametrize("where", [0.25, 0.75, 0.99])
def test_a_changed_action_in_either_half_is_no_verdict_and_the_full_path_names_it(where):
    records = interleaved(MIXED)
    actions = [i for i, r in enumerate(records) if r["kind"] == "action" and r["action"]["type"] == "SendQmp"]
    i = actions[int(len(actions) * where)]
    records[i] = {**records[i], "action": {**records[i]["action"], "command": "quit"}}
    assert full(records).startswith("Divergence")
    assert split_verdicts(records) == {None}


def test_a_changed_event_of_a_first_half_flow_seen_by_the_child_is_no_verdict():
    records = interleaved(MIXED)
    events = [i for i, r in enumerate(records) if r["kind"] == "event" and r["event"]["type"] == "QmpReply"]
    i = events[-1]
    records[i] = {**records[i], "event": {**records[i]["event"], "tag": "other"}}
    text = text_of(records)
    assert check_text(text) is None  # one process
    # the flow began early, this event comes late: wherever the split falls before it
    fid = records[i]["flow"]
    first = next(j for j, r in enumerate(records) if r.get("flow") == fid)
    starts = line_starts(text)
    assert {check_text(text, split_at=starts[j]) for j in range(first, i)} == {None}


def test_an_action_missing_at_the_end_of_a_log_that_exited_is_no_verdict():
    records = interleaved(MIXED)
    last_action = max(i for i, r in enumerate(records) if r["kind"] == "action")
    records = renumbered([*records[:last_action], *records[last_action + 1 :]])
    assert full(records).startswith("Divergence")
    assert split_verdicts(records) == {None}


def test_a_flow_id_created_again_in_the_second_half_replaces_the_first_ones_flow():
    """The first flow stops with actions the log does not have; the one
    process forgets them when the id is created again, and so must the split."""
    first = [r for r in current(TRACES[0]) if r["kind"] in ("flow", "event", "action")]
    cut = max(i for i, r in enumerate(first) if r["kind"] == "event")  # its last event's actions dropped
    second = [r for r in current(MIXED[1]) if r["kind"] in ("flow", "event", "action")]
    fid = first[0]["flow"]
    start = current(TRACES[0])[0]
    records = renumbered(
        [start, *first[: cut + 1], *({**r, "flow": fid} for r in second), {"kind": "exit", "code": 0, "reason": ""}]
    )
    assert full(records).startswith("replay check passed: 1 flow(s)")
    assert split_verdicts(records) == {full(records)}


def test_an_unknown_flow_in_the_second_half_is_no_verdict():
    records = interleaved(MIXED)
    i = next(i for i, r in enumerate(records) if i > len(records) // 2 and r["kind"] == "event")
    records[i] = {**records[i], "flow": "nobody"}
    assert full(records).startswith("UsageError")
    assert check_text(text_of(records), split=True) is None


def test_a_line_in_another_layout_in_the_second_half_is_checked_the_full_way():
    records = interleaved(MIXED)
    text = text_of(records)
    lines = text.splitlines(keepends=True)
    k = len(lines) * 3 // 4
    lines[k] = json.dumps(records[k]) + "\n"  # ", " and ": ": not the writer's layout
    spaced = "".join(lines)
    assert check_text(spaced, split=False) == full(records)
    assert check_text(spaced, split=True) == full(records)


def test_a_child_that_gives_no_answer_is_no_verdict(monkeypatch):
    monkeypatch.setattr(replay, "_second_half", lambda text, mid, seq: b"")
    assert check_text(text_of(interleaved(MIXED)), split=True) is None


def test_a_child_that_does_not_answer_in_time_is_killed_and_no_verdict(monkeypatch):
    def hang(text, mid, seq):
        import time

        time.sleep(60)
        return b""

    monkeypatch.setattr(replay, "_second_half", hang)
    monkeypatch.setattr(replay, "_SPLIT_WAIT_S", 0.2)
    monkeypatch.setattr(replay, "_SPLIT_WAIT_FACTOR", 0)
    forked = []
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    assert check_text(text_of(interleaved(MIXED)), split=True) is None
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(forked[0], os.WNOHANG)


def test_a_large_log_is_split_and_a_small_one_is_not(monkeypatch):
    forks = []
    real_fork = os.fork

    def fork():
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(replay, "_cpus", lambda: 2)
    text = text_of(interleaved(MIXED))
    monkeypatch.setattr(replay, "_SPLIT_MIN", len(text) // 2)
    assert check_text(text) == full(interleaved(MIXED))
    assert len(forks) == 1
    monkeypatch.setattr(replay, "_SPLIT_MIN", len(text))
    assert check_text(text) == full(interleaved(MIXED))
    assert len(forks) == 1
    monkeypatch.setattr(replay, "_SPLIT_MIN", 0)
    monkeypatch.setattr(replay, "_cpus", lambda: 1)
    assert check_text(text) == full(interleaved(MIXED))
    assert len(forks) == 1


def test_without_a_fork_the_log_is_checked_in_one_process(monkeypatch):
    def no_fork():
        raise OSError("no fork here")

    monkeypatch.setattr(os, "fork", no_fork)
    records = interleaved(MIXED)
    assert check_text(text_of(records), split=True) == full(records)


@pytest.fixture(scope="module")
def big_log(tmp_path_factory) -> str:
    """A log of launches and migrations the size above which the check splits, as the bench makes it."""
    from agent.tools.bench import generate_log

    path = tmp_path_factory.mktemp("replay") / "big.jsonl"
    events = 1000
    while True:
        generate_log(str(path), events)
        if path.stat().st_size >= replay._SPLIT_MIN + 4096:  # the start record is not counted
            break
        events *= 2
    return str(path)


def keyagent_check(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KEYAGENT, "replay", path, "--check"], capture_output=True, text=True, timeout=120)


def test_the_command_checks_a_large_log_in_two_processes_with_the_one_process_summary(big_log):
    records = list(read_records(big_log))
    out = keyagent_check(big_log)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == full(records)


def test_the_command_names_a_divergence_in_the_second_half_as_one_process_does(big_log, tmp_path):
    lines = open(big_log).read().splitlines(keepends=True)
    k = next(i for i in range(len(lines) * 3 // 4, len(lines)) if '"command":"query-sev"' in lines[i])
    lines[k] = lines[k].replace('"command":"query-sev"', '"command":"query-kvm"')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    out = keyagent_check(str(bad))
    assert out.returncode == 1
    assert out.stderr.strip() == f"keyagent: error: {full(list(read_records(str(bad)))).split(': ', 1)[1]}"


@pytest.fixture
def split_files(monkeypatch):
    """check_file splits any log of more than a line, on any machine."""
    monkeypatch.setattr(replay, "_SPLIT_MIN", 0)
    monkeypatch.setattr(replay, "_cpus", lambda: 2)


@pytest.mark.parametrize("seed", range(8))
def test_a_file_read_in_two_halves_gives_the_one_process_summary(split_files, tmp_path, seed):
    records = interleaved(MIXED, seed=seed)
    path = tmp_path / "log.jsonl"
    path.write_text(text_of(records))
    assert replay.check_file(str(path)) == full(records)


@pytest.mark.parametrize("offset", [-2, -1, 0, 1, 2, 10])
def test_a_record_missing_near_the_middle_of_a_file_is_no_verdict(split_files, tmp_path, offset):
    records = interleaved(MIXED)
    text = text_of(records)
    middle = text.count("\n", 0, len(text) // 2) + 1  # the index of the second half's first record
    k = middle + offset
    path = tmp_path / "log.jsonl"
    path.write_text(text_of([*records[:k], *records[k + 1 :]]))  # a gap in seq
    assert replay.check_file(str(path)) is None


def test_a_file_whose_middle_is_in_its_last_line_is_checked_by_one_half(split_files, tmp_path):
    records = interleaved(MIXED)
    records[-1] = {**records[-1], "reason": "x" * len(text_of(records))}
    path = tmp_path / "log.jsonl"
    path.write_text(text_of(records))
    assert replay.check_file(str(path)) == full(records)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # no final newline
        lambda b: b[: len(b) * 3 // 4] + b"\xff" + b[len(b) * 3 // 4 :],  # not UTF-8 in the second half
        lambda b: b[: len(b) // 4] + b"\xff" + b[len(b) // 4 :],  # in the first
    ],
)
def test_a_damaged_file_is_no_verdict(split_files, tmp_path, damage):
    path = tmp_path / "log.jsonl"
    path.write_bytes(damage(text_of(interleaved(MIXED)).encode()))
    assert replay.check_file(str(path)) is None


def test_an_unreadable_file_is_no_verdict(tmp_path):
    assert replay.check_file(str(tmp_path / "missing.jsonl")) is None


@pytest.mark.parametrize("first_line", ["not json", "[1]", '{"seq":1,"t":0,"kind":"exit"}'])
def test_a_file_with_a_bad_first_line_is_no_verdict(split_files, tmp_path, first_line):
    lines = text_of(interleaved(MIXED)).splitlines(keepends=True)
    path = tmp_path / "log.jsonl"
    path.write_text(first_line + "\n" + "".join(lines[1:]))
    assert replay.check_file(str(path)) is None


def test_the_check_of_a_file_runs_without_the_garbage_collector_and_restores_it(split_files, tmp_path, monkeypatch):
    seen = []
    real_feed = replay._Fast.feed

    def feed(self, *args):
        seen.append(gc.isenabled())
        return real_feed(self, *args)

    monkeypatch.setattr(replay._Fast, "feed", feed)
    records = interleaved(MIXED)
    path = tmp_path / "log.jsonl"
    path.write_text(text_of(records))
    assert gc.isenabled()
    assert replay.check_file(str(path)) == full(records)
    assert seen and not any(seen) and gc.isenabled()


@pytest.mark.parametrize("chunk", [16, 200, 4096])
def test_a_file_read_in_chunks_shorter_than_its_lines_gets_the_same_verdicts(split_files, tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(replay, "_CHUNK", chunk)
    records = interleaved(MIXED)
    path = tmp_path / "log.jsonl"
    path.write_text(text_of(records))
    assert replay.check_file(str(path)) == full(records)
    path.write_text(text_of(records)[:-1])  # no final newline
    assert replay.check_file(str(path)) is None
    i = max(i for i, r in enumerate(records) if r["kind"] == "action")
    records[i] = {**records[i], "action": {"type": "Log", "level": "info", "message": "not this", "fields": {}}}
    assert full(records).startswith("Divergence")
    path.write_text(text_of(records))
    assert replay.check_file(str(path)) is None


@pytest.mark.parametrize("trace", TRACES, ids=[t.stem for t in TRACES])
def test_a_small_file_is_read_in_chunks_by_one_process_with_the_full_paths_verdict(tmp_path, monkeypatch, trace):
    monkeypatch.setattr(replay, "_CHUNK", 300)
    records = current(trace)
    path = tmp_path / "log.jsonl"
    path.write_text(text_of(records))
    assert replay.check_file(str(path)) == full(records)
