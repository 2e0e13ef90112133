"""``keyagent replay``: recorded traces re-run exactly; bad logs are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRACES = sorted((Path(__file__).parents[2] / "fixtures" / "traces").glob("*.jsonl"))


def replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "replay", *args], capture_output=True, text=True, timeout=60
    )


def test_there_are_recorded_traces():
    assert len(TRACES) >= 8


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_recorded_trace_replays_exactly(trace):
    from agent.app.eventlog import read_records
    from agent.app.replay import check

    assert check(list(read_records(str(trace)))).startswith("replay check passed")


def test_check_command_exits_zero_on_a_good_trace():
    out = replay("--check", str(TRACES[0]))
    assert out.returncode == 0, out.stderr
    assert "replay check passed" in out.stdout


def test_timeline_is_readable():
    out = replay(str(TRACES[0]))
    assert out.returncode == 0
    assert "-> SendQmp query-status" in out.stdout
    assert "<- QmpReply" in out.stdout


def _records(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_changed_action_is_a_divergence(tmp_path):
    records = _records(next(t for t in TRACES if t.stem == "launch-good"))
    for r in records:
        if r["kind"] == "action" and r["action"]["type"] == "SendQmp" and r["action"]["command"] == "query-sev":
            r["action"]["command"] = "query-sev-capabilities"
    out = replay("--check", _write(tmp_path / "log.jsonl", records))
    assert out.returncode == 1
    assert "query-sev-capabilities" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_changed_event_is_a_divergence(tmp_path):
    # Claim the owner refused: the recorded inject can no longer follow.
    records = _records(next(t for t in TRACES if t.stem == "launch-good"))
    for r in records:
        if r["kind"] == "event" and r["event"]["type"] == "OwnerReleased":
            r["event"] = {"type": "OwnerRefused", "status": 403, "error": "no"}
    out = replay("--check", _write(tmp_path / "log.jsonl", records))
    assert out.returncode == 1


def test_a_truncated_log_exits_two_with_one_line(tmp_path):
    text = TRACES[0].read_text()
    path = tmp_path / "cut.jsonl"
    path.write_text(text[: len(text) // 2 + 7])
    out = replay("--check", str(path))
    assert out.returncode == 2
    assert "truncated" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content, words",
    [
        ("not json\n", "not JSON"),
        ('{"seq": 1, "t": 0, "kind": "event", "flow": "x", "event": {"type": "Start"}}\n', "unknown flow"),
        ('{"seq": 2, "t": 0, "kind": "start"}\n', "seq"),
        ("[1, 2]\n", "not a JSON object"),
        ('{"seq": 1, "t": 0, "kind": "flow", "flow": "f", "flow_kind": "nope", "params": {}}\n', "unknown flow kind"),
        ('{"seq": 1, "t": 0, "kind": "start", "format": 99}\n', "newer than this agent reads"),
    ],
)
def test_an_invalid_log_exits_two(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    out = replay("--check", str(path))
    assert out.returncode == 2, out.stderr
    assert words in out.stderr
    assert "Traceback" not in out.stderr


def test_an_event_log_written_now_says_its_format_and_reads_back(tmp_path):
    from agent.app.eventlog import EventLog, read_records
    from agent.protocol.eventlog import FORMAT_VERSION

    path = tmp_path / "events.jsonl"
    log = EventLog(str(path))
    log.write("start", version="test", vm="vm1")
    log.close()
    (start,) = read_records(str(path))
    assert start["format"] == FORMAT_VERSION and start["vm"] == "vm1"


def test_a_missing_log_exits_two(tmp_path):
    out = replay("--check", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2
    assert "cannot read" in out.stderr
