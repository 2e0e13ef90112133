"""Coverage-guided fuzzing with atheris (optional; not part of the pytest run).

    pip install atheris
    python tests/fuzz/atheris_targets.py TARGET [libFuzzer options, e.g. -runs=200000]

TARGET is one of: eventlog, json_stream, owner_answer, config, codec, http_request.
Each target feeds the fuzzer's bytes to one input the agent reads and lets
only the documented one-line errors through: anything else (a traceback)
is a crash, which libFuzzer saves as ``crash-*``.  Keep a crash as a small
file under ``fixtures/fuzz/<kind>/``: ``tests/test_fuzz.py`` replays those.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import agent.app.config
    import agent.app.eventlog
    import agent.app.replay
    import agent.core.codec
    import agent.core.owner_answer
    import agent.io.http
    import agent.tools.sim.json_stream
    from agent.common.errors import KeyagentError

_TMP = tempfile.mkdtemp(prefix="keyagent-atheris-")


def _file(data: bytes, name: str) -> str:
    path = os.path.join(_TMP, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def eventlog(data: bytes) -> None:
    path = _file(data, "log.jsonl")
    try:
        records = list(agent.app.eventlog.read_records(path))
    except agent.app.eventlog.LogFormatError:
        return
    agent.app.replay.print_timeline(records, io.StringIO())
    try:
        agent.app.replay.check(records)
    except KeyagentError:
        pass


def json_stream(data: bytes) -> None:
    stream = agent.tools.sim.json_stream.JsonStream(max_message=4096, max_nesting=64)
    fdp = atheris.FuzzedDataProvider(data)
    while fdp.remaining_bytes():
        stream.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)))
        assert stream.pending <= 4096 + 64


def owner_answer(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    status = fdp.ConsumeIntInRange(0, 999)
    try:
        body = json.loads(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
    except (ValueError, RecursionError):
        return
    agent.core.owner_answer.parse_owner_answer(status, body)


def config(data: bytes) -> None:
    try:
        agent.app.config.load_config(_file(data, "keyagent.toml"))
    except agent.common.errors.UsageError:
        pass


def codec(data: bytes) -> None:
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        agent.core.codec.decode_event(record)
    except agent.core.codec.CodecError:
        pass


def http_request(data: bytes) -> None:
    request = agent.io.http.Request("POST", "/v1/secret/add", {}, data)
    try:
        request.json()
    except agent.io.http.InvalidJson:
        pass


TARGETS = {f.__name__: f for f in (eventlog, json_stream, owner_answer, config, codec, http_request)}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
