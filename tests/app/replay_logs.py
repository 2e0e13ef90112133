"""Event logs for the ``replay --check`` tests: the recorded traces in the
current format, as text, and several of them interleaved in one log."""

from __future__ import annotations

import json
import random
from pathlib import Path

from agent.app.eventlog import read_records
from agent.app.replay import check
from agent.common.errors import FlowFailed, UsageError
from agent.protocol.eventlog import FORMAT_VERSION

TRACES = sorted((Path(__file__).parent.parent.parent / "fixtures" / "traces").glob("*.jsonl"))


def current(trace: Path) -> list[dict]:
    """The trace's records in the current format, as EventLog writes them now."""
    records = list(read_records(str(trace)))
    records[0] = {**records[0], "format": FORMAT_VERSION}
    return records


def text_of(records: list[dict]) -> str:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def full(records: list[dict]) -> str:
    """The full path's verdict: its summary, or the error it names."""
    try:
        return check(records)
    except (FlowFailed, UsageError) as exc:  # Divergence, a damaged log
        return f"{type(exc).__name__}: {exc.reason}"


def interleaved(traces: list[Path], seed: int = 1) -> list[dict]:
    """The flows of ``traces`` in one log, each trace's flows under ids of
    their own, their records interleaved at random (each trace's in its
    order), renumbered; one exit record at the end."""
    rng = random.Random(seed)
    queues = []
    for k, trace in enumerate(traces):
        recs = [r for r in current(trace) if r["kind"] in ("flow", "event", "action")]
        queues.append([{**r, "flow": f"{r['flow']}.{k}"} for r in recs])
    out = [{"kind": "start", "format": FORMAT_VERSION, "version": "test", "vm": "vm1"}]
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        out.append(queue.pop(0))
    out.append({"kind": "exit", "code": 0, "reason": ""})
    return renumbered(out)


def renumbered(records: list[dict]) -> list[dict]:
    """``seq`` 1, 2, ... and ``t`` growing, each record's keys in the writer's order."""
    out = []
    for i, r in enumerate(records):
        rest = {k: v for k, v in r.items() if k not in ("seq", "t", "kind")}
        out.append({"seq": i + 1, "t": round(i * 0.001, 6), "kind": r["kind"], **rest})
    return out
