"""Large event logs made from the recorded traces, for the replay tests.

The records of real flows are copied under new flow ids, with ``seq``,
``t`` and QMP tags renumbered the way the agent would have written them, so
the result is a log the flows still replay over (``replay --check`` passes
on it).
"""

from __future__ import annotations

import json
from pathlib import Path

TRACES = Path(__file__).parent.parent / "fixtures" / "traces"


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (TRACES / f"{name}.jsonl").read_text().splitlines()]


def flow_records(name: str) -> list[dict]:
    """The flow, event and action records of a single-flow trace."""
    return [r for r in records(name) if r["kind"] in ("flow", "event", "action")]


class LogWriter:
    def __init__(self, vm: str = "vm1") -> None:
        self.out: list[dict] = []
        self.t = 0.0
        self.add({"kind": "start", "version": "0.1.0", "vm": vm}, 0.0)

    def add(self, record: dict, dt: float) -> None:
        self.t += max(dt, 0.0)
        r = dict(record)
        r["seq"] = len(self.out) + 1
        r["t"] = round(self.t, 6)
        self.out.append(r)

    def copy_flow(self, recs: list[dict], flow_id: str, repeat: tuple[int, int, int] | None = None) -> None:
        """Append ``recs`` as flow ``flow_id``; ``repeat=(start, end, times)``
        plays ``recs[start:end]`` that many times (a retry loop going on)."""
        if repeat:
            start, end, times = repeat
            recs = recs[:start] + recs[start:end] * times + recs[end:]
        tags: dict[str, str] = {}
        counter = 0
        last_t = recs[0]["t"]
        for r in recs:
            r = json.loads(json.dumps(r))
            dt = r["t"] - last_t if r["t"] >= last_t else 0.1  # a repeated block starts again
            last_t = r["t"]
            r["flow"] = flow_id
            body = r.get("action") if r["kind"] == "action" else r.get("event")
            if isinstance(body, dict) and isinstance(body.get("tag"), str):
                kind, _, command = body["tag"].split(":", 2)
                if r["kind"] == "action":
                    counter += 1
                    tags[body["tag"]] = f"{kind}:{counter}:{command}"
                body["tag"] = tags.get(body["tag"], body["tag"])
            self.add(r, dt)

    def exit(self, code: int = 0, reason: str = "") -> None:
        self.add({"kind": "exit", "code": code, "reason": reason}, 0.001)

    def write(self, path: Path) -> Path:
        path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.out))
        return path


def retry_block(recs: list[dict]) -> tuple[int, int]:
    """Where the measurement retry loop of launch-measurement-retried is:
    from the first query-sev-launch-measure to the first retry timer firing."""
    start = next(i for i, r in enumerate(recs) if r["kind"] == "action"
                 and r["action"].get("command") == "query-sev-launch-measure")
    end = next(i for i, r in enumerate(recs) if r["kind"] == "event"
               and r["event"] == {"type": "TimerFired", "name": "retry"})
    return start, end + 1


def big_log(path: Path, records_wanted: int = 100_000) -> tuple[Path, dict]:
    """A log of about ``records_wanted`` records: one launch whose measurement
    is retried for half of them, then good and refused launches, alternating,
    each a flow of its own.  Returns the path and what it holds."""
    log = LogWriter()
    retried = flow_records("launch-measurement-retried")
    start, end = retry_block(retried)
    times = (records_wanted // 2) // (end - start)
    log.copy_flow(retried, "launch-retry", repeat=(start, end, times))
    good, refused = flow_records("launch-good"), flow_records("launch-refused-quit")
    n = 0
    while len(log.out) + len(good) < records_wanted - 1:
        log.copy_flow(good if n % 2 == 0 else refused, f"launch-{n + 1}")
        n += 1
    log.exit()
    return log.write(path), {"retries": times, "flows": n + 1,
                             "refused": n // 2, "records": len(log.out)}
