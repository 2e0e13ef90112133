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

    def copy_flow(self, recs: list[dict], flow_id: str, repeat: tuple[int, int, int, int] | None = None) -> None:
        """Append ``recs`` as flow ``flow_id``; ``repeat=(start, end, stop,
        times)`` plays ``recs[start:end]`` that many times in place of
        ``recs[start:stop]`` (a retry loop going on for longer)."""
        if repeat:
            start, end, stop, times = repeat
            recs = recs[:start] + recs[start:end] * times + recs[stop:]
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


def retry_loop(recs: list[dict], times: int) -> tuple[int, int, int, int]:
    """``copy_flow``'s ``repeat`` for launch-measurement-retried: its
    measurement retry (query-sev-launch-measure, the error, the retry timer
    firing) done ``times`` times instead of the recorded three."""
    start = next(
        i
        for i, r in enumerate(recs)
        if r["kind"] == "action" and r["action"].get("command") == "query-sev-launch-measure"
    )
    fired = [
        i for i, r in enumerate(recs) if r["kind"] == "event" and r["event"] == {"type": "TimerFired", "name": "retry"}
    ]
    return start, fired[0] + 1, fired[-1] + 1, times


def big_log(path: Path, records_wanted: int = 100_000) -> tuple[Path, dict]:
    """A log of about ``records_wanted`` records: one launch whose measurement
    is retried for half of them, then good and refused launches, alternating,
    each a flow of its own.  Returns the path and what it holds."""
    log = LogWriter()
    retried = flow_records("launch-measurement-retried")
    start, end, _, _ = retry_loop(retried, 1)
    times = (records_wanted // 2) // (end - start)
    log.copy_flow(retried, "launch-retry", repeat=retry_loop(retried, times))
    good, refused = flow_records("launch-good"), flow_records("launch-refused-quit")
    n = 0
    while len(log.out) + len(good) < records_wanted - 1:
        log.copy_flow(good if n % 2 == 0 else refused, f"launch-{n + 1}")
        n += 1
    log.exit()
    return log.write(path), {"retries": times, "flows": n + 1, "refused": n // 2, "records": len(log.out)}


def replay_with_secrets(path: Path, trace: str, secrets: dict[str, bytes]) -> Path:
    """Run the flow of a single-flow ``trace`` again through the real event
    log writer, its secret inputs replaced by known bytes: ``secrets`` maps
    an event type (``OwnerReleased``, ``KeyProvided``) to the bytes its
    secret field gets.  The log holds what the agent would write for those
    secrets, so a test can look for them anywhere downstream."""
    import dataclasses

    from agent.app.eventlog import EventLog
    from agent.common.secret import Secret
    from agent.core.codec import decode_event
    from agent.core.registry import FLOW_KINDS

    recs = records(trace)
    log = EventLog(str(path))
    log.write("start", version="0.1.0", vm=recs[0].get("vm", "vm1"))
    flow = None
    fid = ""
    for r in recs:
        if r["kind"] == "flow":
            fid = r["flow"]
            flow = FLOW_KINDS[r["flow_kind"]].from_params(r["params"])
            log.flow(fid, flow)
        elif r["kind"] == "event":
            event = decode_event(r["event"])
            name = type(event).__name__
            if name in secrets:
                secret_field = "secret" if name == "OwnerReleased" else "key"
                event = dataclasses.replace(event, **{secret_field: Secret(secrets[name])})
            log.event(fid, event)
            for action in flow.handle(event):
                log.action(fid, action)
    log.write("exit", code=0, reason="")
    log.close()
    return path
