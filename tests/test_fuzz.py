"""Fuzzing every input the agent reads: never a traceback, never a hang.

Inputs and what each must do with garbage:

* the event log (``keyagent replay [--check]``): exit 0, 1 or 2 with at most
  one line on stderr;
* QMP bytes: into the simulator's JSON stream parser and its monitor (errors
  as QMP error replies), into the agent's QMP shell (a raw unix server plays a
  hostile QEMU: the connection ends with a one-line reason, never a hang);
* owner answers: always a release, a refusal or a one-line failure;
* the control API: an HTTP answer with a JSON body, never an internal error,
  and the server keeps serving;
* config files: a :class:`Config` or a one-line :class:`UsageError`.

Each crash found is kept as a small file under ``fixtures/fuzz/`` and
replayed by ``test_fuzz_fixtures_are_handled`` below.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.common.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
TRACES = sorted((ROOT / "fixtures" / "traces").glob("*.jsonl"))
FUZZ_FIXTURES = ROOT / "fixtures" / "fuzz"

# KEYAGENT_FUZZ_EXAMPLES=5000 for a long hunt; the default keeps the suite quick.
EXAMPLES = int(os.environ.get("KEYAGENT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
FEW = settings(FUZZ, max_examples=max(10, EXAMPLES // 4))

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def one_line(text: str) -> bool:
    return "\n" not in text.strip() and "Traceback" not in text


@pytest.fixture
def short_tmp():
    """A directory whose socket paths fit in sun_path (108 bytes)."""
    path = tempfile.mkdtemp(prefix="kfz", dir="/tmp")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ==========================================================================
# the event log


def replay_cli(path: str, *flags: str) -> tuple[int, str, str]:
    from agent.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["replay", *flags, path])
    return code, out.getvalue(), err.getvalue()


def assert_replay_is_clean(path: str) -> None:
    for flags in (("--check",), ()):
        code, _out, err = replay_cli(path, *flags)
        assert code in (0, 1, 2), (flags, code)
        if code:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("keyagent: error: "), err
        else:
            assert err == ""


def _records(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def _write_records(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=400), st.lists(st.text(max_size=60), max_size=8).map(lambda lines: "\n".join(lines).encode())
    )
)
def test_any_bytes_as_an_event_log_give_one_line(raw):
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
        f.write(raw)
        f.flush()
        assert_replay_is_clean(f.name)


MUTATIONS = (
    "replace-field",
    "drop-field",
    "replace-record",
    "drop-record",
    "duplicate-record",
    "swap-records",
    "replace-inner",
)


@FUZZ
@given(data=st.data())
def test_mutated_recorded_traces_give_one_line(data, tmp_path):
    records = _records(data.draw(st.sampled_from(TRACES)))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(records) - 1))
        how = data.draw(st.sampled_from(MUTATIONS))
        r = records[i]
        if not isinstance(r, dict) and how in ("replace-field", "drop-field", "replace-inner"):
            how = "replace-record"
        if how == "replace-field":
            r[data.draw(st.sampled_from(sorted(r) + ["flow", "event", "action", "x"]))] = data.draw(json_value)
        elif how == "drop-field" and r:
            del r[data.draw(st.sampled_from(sorted(r)))]
        elif how == "replace-record":
            records[i] = data.draw(json_value)
        elif how == "drop-record":
            del records[i]
        elif how == "duplicate-record":
            records.insert(i, json.loads(json.dumps(r)))
        elif how == "swap-records":
            j = data.draw(st.integers(0, len(records) - 1))
            records[i], records[j] = records[j], records[i]
        elif how == "replace-inner":
            inner = r.get("event") or r.get("action") or r.get("params")
            if isinstance(inner, dict) and inner:
                inner[data.draw(st.sampled_from(sorted(inner)))] = data.draw(json_value)
        if not records:
            break
    if data.draw(st.booleans()):  # keep seq in order, to get past the reader
        for n, r in enumerate(records, 1):
            if isinstance(r, dict):
                r["seq"] = n
    assert_replay_is_clean(_write_records(tmp_path / "log.jsonl", records))


def test_a_deeply_nested_event_log_line_is_refused_in_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    depth = 200_000
    path.write_text('{"seq":1,"t":0,"kind":"event","flow":"f","event":' + "[" * depth + "]" * depth + "}\n")
    code, _out, err = replay_cli(str(path), "--check")
    assert code == 2 and one_line(err), err


def test_a_huge_event_log_line_is_handled(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text('{"seq":1,"t":0,"kind":"start","pad":"' + "A" * (8 << 20) + '"}\n')
    assert_replay_is_clean(str(path))


@FUZZ
@given(
    record=st.one_of(
        json_value,
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(
                    [
                        "QmpReply",
                        "QmpEvent",
                        "OwnerReleased",
                        "ControlRequest",
                        "KeyProvided",
                        "TimerFired",
                        "Start",
                        "Nope",
                    ]
                )
            },
            optional={
                "tag": json_value,
                "name": json_value,
                "data": json_value,
                "result": json_value,
                "secret": st.one_of(json_value, st.builds(lambda n: {"redacted": n}, st.integers(-5, 2**22))),
                "packet_header": json_value,
                "req": json_value,
                "verb": json_value,
                "args": json_value,
                "key": json_value,
            },
        ),
    )
)
def test_decoding_any_record_is_an_event_or_a_codec_error(record):
    from agent.core.codec import CodecError, decode_event

    try:
        decode_event(record)
    except CodecError as exc:
        assert one_line(str(exc))


# ==========================================================================
# QMP into the simulator


@FUZZ
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [
                    b"{",
                    b"}",
                    b"[",
                    b"]",
                    b'"',
                    b"\\",
                    b'{"execute": "x"}',
                    b"\r\n",
                    b"\xff",
                    b'{"a": "\\u00',
                    b"nan",
                    b"-",
                    b"1e999",
                ]
            ),
        ),
        max_size=40,
    )
)
def test_simulator_stream_parser_never_raises_and_stays_bounded(chunks):
    from agent.tools.sim.json_stream import JsonStream, Parsed, ParseFailure

    stream = JsonStream(max_message=256, max_nesting=16)
    for chunk in chunks:
        for item in stream.feed(chunk):
            assert isinstance(item, (Parsed, ParseFailure))
            if isinstance(item, ParseFailure):
                assert one_line(item.desc)
        assert stream.pending <= 256 + len(chunk)
    # Whatever came before, once the framing is back at top level a good
    # message parses again.
    stream.feed(b"]" * 64 + b"}" * 64 + b'"\n')
    stream.feed(b"]" * 64 + b"}" * 64 + b"\n")


@FUZZ
@given(
    messages=st.lists(st.dictionaries(st.text(max_size=8), json_value, max_size=4), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_simulator_stream_parser_frames_any_split_the_same(messages, cuts):
    from agent.tools.sim.json_stream import JsonStream, Parsed

    wire = b"".join(json.dumps(m).encode() for m in messages)
    stream, got, last = JsonStream(), [], 0
    for cut in sorted(c % (len(wire) + 1) for c in cuts) + [len(wire)]:
        got += stream.feed(wire[last:cut])
        last = cut
    assert got == [Parsed(m) for m in messages]


@pytest.fixture(scope="module")
def monitor():
    from agent.tools.sim.machine import Machine, SimConfig
    from agent.tools.sim.qmp_server import Monitor

    return Monitor(Machine(SimConfig(tik=bytes(16), tek=bytes(16))))


@FUZZ
@given(
    request=st.one_of(
        json_value,
        st.fixed_dictionaries(
            {
                "execute": st.one_of(
                    st.sampled_from(
                        [
                            "qmp_capabilities",
                            "query-status",
                            "query-sev",
                            "query-sev-launch-measure",
                            "sev-inject-launch-secret",
                            "cont",
                            "stop",
                            "object-add",
                            "object-del",
                            "migrate-set-capabilities",
                            "query-commands",
                            "x-sim-query-clients",
                        ]
                    ),
                    json_value,
                )
            },
            optional={"arguments": json_value, "id": json_value, "exec-oob": json_value, "x": json_value},
        ),
    )
)
def test_simulator_monitor_answers_anything_with_a_reply(monitor, request):
    from agent.tools.sim.json_stream import Parsed

    reply, _name = monitor.handle(Parsed(request))
    assert ("return" in reply) != ("error" in reply)
    if "error" in reply:
        assert "internal simulator error" not in reply["error"]["desc"], reply
    json.dumps(reply)


async def test_simulator_keeps_serving_after_hostile_bytes(short_tmp):
    from agent.tools.sim.machine import SimConfig
    from agent.tools.sim.qmp_server import Simulator
    from tests.tools.sim.conftest import RawClient

    path = str(short_tmp / "sim.sock")
    hostile = [
        b"\xff\xfe" * 1000,
        b"{" * 5000,
        b'{"execute": ' + b'"x' * 300_000,
        b"}" * 10,
        b'{"execute": "query-status", "arguments": [1]}',
        b"[" * 2000 + b"]" * 2000,
        b'{"execute": "qmp_capabilities", "id": {"deep": [[[[]]]]}}',
    ]
    async with Simulator(SimConfig(tik=bytes(16), tek=bytes(16)), path, max_message=1 << 16):
        bad = await RawClient.connect(path)
        for chunk in hostile:
            await bad.send_raw(chunk)
        await bad.close()
        good = await RawClient.connect(path)
        await good.negotiate()
        assert (await good.cmd("query-status"))["return"]["status"] == "prelaunch"
        await good.close()


# ==========================================================================
# QMP into the agent: a hostile QEMU on a raw unix socket

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}\r\n'
)


class HostileQemu:
    """Says ``greeting``, answers ``qmp_capabilities``, then ``script`` to the next command."""

    def __init__(self, path: str, greeting: bytes, script: bytes, close: bool = True) -> None:
        self.path, self.greeting, self.script, self.close_after = path, greeting, script, close
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> HostileQemu:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader, writer) -> None:
        with contextlib.suppress(Exception):
            writer.write(self.greeting)
            await writer.drain()
            for n in range(2):
                data = await asyncio.wait_for(_read_message(reader), 5)
                if data is None:
                    return
                try:
                    rid = json.loads(data).get("id")
                except (ValueError, AttributeError):
                    rid = None
                if n == 0:
                    writer.write(json.dumps({"return": {}, "id": rid}).encode() + b"\r\n")
                else:
                    writer.write(self.script.replace(b"@ID@", json.dumps(rid).encode()))
                await writer.drain()
            if not self.close_after:
                await asyncio.sleep(30)
        with contextlib.suppress(Exception):
            writer.close()


async def _read_message(reader) -> bytes | None:
    """One JSON object from qemu.qmp (it sends no newline): read to a balanced brace."""
    buf, depth = b"", 0
    while True:
        c = await reader.read(1)
        if not c:
            return None
        buf += c
        if c == b"{":
            depth += 1
        elif c == b"}":
            depth -= 1
            if depth == 0:
                return buf


async def drive_agent_qmp(path: str) -> list[str]:
    """What QmpConnection makes of the peer: each step's outcome, bounded in time."""
    from agent.io import qmp as qmpio

    conn = qmpio.QmpConnection(events={"SHUTDOWN", "RESUME", "MIGRATION"}, max_events=16)
    seen: list[str] = []
    try:
        async with asyncio.timeout(10):
            try:
                await conn.connect(path, 0.5)
            except qmpio.MonitorGone as exc:
                seen.append(f"connect: {exc}")
                return seen
            try:
                seen.append(f"result: {await conn.execute('query-status')!r}"[:200])
            except qmpio.QmpCommandError as exc:
                seen.append(f"error: {exc.error_class}: {exc.desc}")
            except qmpio.MonitorGone as exc:
                seen.append(f"disconnected: {exc}")
            assert conn.events._queue.qsize() <= 16
            seen.append(f"gone: {await conn.wait_disconnected()}")
    finally:
        await conn.close()
    return seen


HOSTILE_QMP = {
    "bad greeting": (b'{"QMP": nope}\r\n', b""),
    "greeting not an object": (b"[1, 2]\r\n", b""),
    "greeting without QMP": (b'{"hello": 1}\r\n', b""),
    "binary greeting": (bytes(range(256)) + b"\r\n", b""),
    "huge greeting": (b'{"QMP": "' + b"A" * (12 << 20) + b'"}\r\n', b""),
    "garbage reply": (GREETING, b"}}}{{{ nope\r\n"),
    "reply with a wrong id": (GREETING, b'{"return": {}, "id": "zzz"}\r\n'),
    "reply without id": (GREETING, b'{"return": {}}\r\n'),
    "error not an object": (GREETING, b'{"error": "boom", "id": @ID@}\r\n'),
    "error without desc": (GREETING, b'{"error": {"class": "X"}, "id": @ID@}\r\n'),
    "huge reply": (GREETING, b'{"return": "' + b"B" * (12 << 20) + b'", "id": @ID@}\r\n'),
    "deep nesting": (GREETING, b"[" * 100_000 + b"]" * 100_000 + b"\r\n"),
    "event name not a string": (GREETING, b'{"event": ["SHUTDOWN"]}\r\n{"return": {}, "id": @ID@}\r\n'),
    "event name a number": (GREETING, b'{"event": 5}\r\n{"return": {}, "id": @ID@}\r\n'),
    "unknown fields": (GREETING, b'{"return": {}, "id": @ID@, "x-new": {"a": 1}}\r\n'),
    "flood then reply": (
        GREETING,
        b'{"event": "SHUTDOWN", "data": {}}\r\n' * 5000 + b'{"return": {"status": "prelaunch"}, "id": @ID@}\r\n',
    ),
    "invalid utf-8": (GREETING, b'{"return": "\xff\xfe", "id": @ID@}\r\n'),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_QMP))
async def test_agent_qmp_shell_survives_a_hostile_qemu(name, short_tmp):
    greeting, script = HOSTILE_QMP[name]
    path = str(short_tmp / "qmp.sock")
    async with HostileQemu(path, greeting, script):
        seen = await drive_agent_qmp(path)
    assert seen and all(one_line(s) for s in seen), seen


@FEW
@given(
    script=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.one_of(
                json_value,
                st.fixed_dictionaries(
                    {"event": st.one_of(st.sampled_from(["SHUTDOWN", "RESUME", "MIGRATION", "X"]), json_value)},
                    optional={"data": json_value, "timestamp": json_value},
                ),
                st.fixed_dictionaries({"return": json_value}, optional={"id": json_value}),
                st.fixed_dictionaries({"error": json_value}, optional={"id": json_value}),
            ),
            max_size=5,
        ).map(lambda msgs: b"".join(json.dumps(m).encode() + b"\r\n" for m in msgs)),
    )
)
def test_agent_qmp_shell_survives_random_qemu_output(script):
    async def go():
        where = tempfile.mkdtemp(prefix="kfzq", dir="/tmp")
        try:
            async with HostileQemu(os.path.join(where, "qmp.sock"), GREETING, script):
                return await drive_agent_qmp(os.path.join(where, "qmp.sock"))
        finally:
            shutil.rmtree(where, ignore_errors=True)

    seen = asyncio.run(go())
    assert seen and all(one_line(s) for s in seen), seen


@contextlib.contextmanager
def launch_waiting_for_owner(short_tmp, owner_answer: bytes):
    """A real ``keyagent run`` whose SEV launch waits on a stand-in owner.

    The owner holds every request until ``release`` is set, then answers 403
    with ``owner_answer``.  Yields (QEMU stand-in, agent process, release).
    """
    import threading

    from tests.e2e.harness import StandInOwner, wait_for
    from tests.e2e.tinyqemu import TinyQemu, start_agent

    qemu = TinyQemu(str(short_tmp / "qmp.sock"))
    owner = StandInOwner(403, owner_answer)
    release = threading.Event()
    handler = owner.server.RequestHandlerClass
    original = handler.do_POST
    handler.do_POST = lambda self: (release.wait(60), original(self))
    agent = start_agent(short_tmp, owner.url)
    try:
        wait_for(
            lambda: "query-sev-launch-measure" in qemu.commands or agent.poll() is not None,
            timeout=20,
            what="the launch waiting for the owner",
        )
        yield qemu, agent, release
    finally:
        release.set()
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        owner.close()
        qemu.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"}}}{{{ not json\r\n",
        b"\xff\xfe" * 64 + b"\r\n",
        b"[" * 50_000 + b"]" * 50_000 + b"\r\n",
        b'{"error": {"class": "GenericError", "desc": "x"}}\r\n',
    ],
    ids=["junk", "binary", "deep", "error-without-id"],
)
def test_keyagent_run_fails_cleanly_when_qemu_sends_garbage(garbage, short_tmp):
    import subprocess

    with launch_waiting_for_owner(short_tmp, b'{"error": "not yet"}') as (qemu, agent, release):
        qemu.send(garbage)
        try:
            code = agent.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("the agent hung after QEMU sent garbage") from None
        stderr = (short_tmp / "agent.stderr").read_text()
        assert code == 1, stderr
        assert "Traceback" not in stderr
        for line in stderr.splitlines():
            json.loads(line)  # structlog JSON lines only
        assert "QMP connection lost while waiting for the guest owner" in stderr
        assert not [p for p in (short_tmp / "run").iterdir() if p.name.startswith("key-")]


def test_keyagent_run_drops_a_reply_nobody_asked_for(short_tmp):
    from tests.e2e.harness import ctl

    with launch_waiting_for_owner(short_tmp, b'{"error": "measurement rejected"}') as (qemu, agent, release):
        # qmp-spec: "Clients should drop all the responses that have an unknown id".
        qemu.send(b'{"return": {"status": "running"}, "id": "nobody-asked"}\r\n')
        assert ctl(short_tmp / "run" / "control.sock", "status").returncode == 0
        assert agent.poll() is None
        release.set()  # the owner refuses: the launch goes on to its refusal
        assert agent.wait(15) == 1
        assert "quit" in qemu.commands
        assert "Traceback" not in (short_tmp / "agent.stderr").read_text()


@pytest.mark.parametrize("malformed_first", [False, True])
def test_agent_still_sees_resume_after_an_event_with_malformed_data(malformed_first, short_tmp):
    from tests.e2e.harness import ctl, wait_for

    with launch_waiting_for_owner(short_tmp, b'{"error": "not yet"}') as (qemu, agent, release):
        wait_for(lambda: ctl(short_tmp / "run" / "control.sock", "status").returncode == 0, what="agent ready")
        ts = b', "timestamp": {"seconds": 1, "microseconds": 0}}\r\n'
        if malformed_first:
            qemu.send(b'{"event": "RESUME", "data": "not an object"' + ts)
        try:
            qemu.send(b'{"event": "RESUME", "data": {}' + ts)
        except ConnectionResetError:
            # The malformed RESUME was a RESUME all the same: the agent already
            # quit QEMU and closed the monitor before the second one went out.
            assert malformed_first and "quit" in qemu.commands
        # Somebody resumed the VM before attestation: the agent must quit it.
        wait_for(lambda: "quit" in qemu.commands or agent.poll() is not None, timeout=5, what="quit after RESUME")
        assert "quit" in qemu.commands


# ==========================================================================
# owner answers

b64_of = st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())
owner_body = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {},
        optional={
            "packet_header": st.one_of(
                b64_of, st.sampled_from([base64.b64encode(bytes(52)).decode(), "!!", "QUJD", None]), json_value
            ),
            "secret": st.one_of(b64_of, st.just(base64.b64encode(bytes(70000)).decode()), json_value),
            "gpa": st.one_of(st.integers(-2, 2**65), json_value),
            "error": st.one_of(st.text(max_size=300), json_value),
        },
    ),
)


@FUZZ
@given(status=st.one_of(st.integers(-1, 1000), st.sampled_from([200, 200, 403, 500])), body=owner_body)
def test_owner_answer_is_always_an_event_with_one_line(status, body):
    from agent.core.events import OwnerFailed, OwnerRefused, OwnerReleased
    from agent.core.owner_answer import parse_owner_answer

    event = parse_owner_answer(status, body)
    assert isinstance(event, (OwnerReleased, OwnerRefused, OwnerFailed))
    if isinstance(event, OwnerReleased):
        assert status == 200 and len(base64.b64decode(event.packet_header)) == 52
        assert 1 <= len(event.secret) <= 64 * 1024
        assert event.gpa is None or (type(event.gpa) is int and 0 <= event.gpa < 2**64)
    elif isinstance(event, OwnerRefused):
        assert 400 <= event.status <= 599 and one_line(event.error) and len(event.error) <= 200
    else:
        assert one_line(event.reason)


@FEW
@given(
    answer=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda status, body: (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body,
            st.integers(0, 999),
            st.one_of(st.binary(max_size=100), json_value.map(lambda v: json.dumps(v).encode())),
        ),
    )
)
def test_owner_client_turns_any_http_answer_into_an_event(answer):
    from agent.app.runtime import ask_owner
    from agent.core.events import OwnerFailed, OwnerRefused, OwnerReleased

    async def go():
        async def serve(reader, writer):
            with contextlib.suppress(Exception):
                await reader.read(65536)
                writer.write(answer)
                await writer.drain()
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(5):
                return await ask_owner(f"http://127.0.0.1:{port}", "/v1/secret", {"vm": "x"}, 2.0)
        finally:
            server.close()

    event = asyncio.run(go())
    assert isinstance(event, (OwnerReleased, OwnerRefused, OwnerFailed))
    if isinstance(event, OwnerFailed):
        assert one_line(event.reason)


async def test_owner_client_takes_a_deeply_nested_answer_as_malformed():
    from agent.app.runtime import ask_owner
    from agent.core.events import OwnerFailed

    body = b"[" * 100_000 + b"]" * 100_000

    async def serve(reader, writer):
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        event = await ask_owner(f"http://127.0.0.1:{port}", "/v1/secret", {}, 5.0)
    finally:
        server.close()
    assert isinstance(event, OwnerFailed) and "not a JSON object" in event.reason


# ==========================================================================
# the control API


class FakeQmp:
    """A QEMU that says yes to everything (the control fuzz needs answers, not a VM)."""

    async def execute(self, command, args=None):
        return {}


@contextlib.asynccontextmanager
async def control_server(tmp: Path):
    from agent.app.config import load_config
    from agent.app.control import ControlServer
    from agent.app.eventlog import EventLog
    from agent.app.runtime import Runtime
    from agent.app.sidecar import Sidecar, SidecarOptions
    from agent.app.verbs.secrets import SecretsControl

    run_dir = tmp / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    from tests.hostkeys import make_host

    host = make_host(tmp, f"fuzz{os.urandom(4).hex()}")  # so the hand-over's parsers get fuzzed
    host.trust(host)
    cfg = load_config(
        None,
        {
            "vm_name": "fuzz",
            "vm_run_dir": str(run_dir),
            "secrets_master_key": "file",
            "migration_host_key": str(host.key),
            "migration_trusted_hosts": str(host.trusted),
        },
    )
    sock = str(tmp / "ctl.sock")
    sidecar = Sidecar(cfg, SidecarOptions(qmp_path=str(tmp / "qmp.sock"), control_path=sock, event_log=None))
    rt = sidecar.runtime = Runtime(qmp=FakeQmp(), event_log=EventLog(None), run_dir=str(run_dir), log=sidecar.log)
    sidecar.run_dir = str(run_dir)
    dispatch = asyncio.ensure_future(rt.dispatch())
    sidecar.secrets = SecretsControl(sidecar)
    sidecar.secrets.start()
    server = ControlServer(sidecar, sock)
    await server.start()
    try:
        yield server, sock
    finally:
        await server.close()
        rt.close()
        dispatch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatch


ROUTES = [
    "/v1/status",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/migrate/prepare",
    "/v1/migrate/begin",
    "/v1/migrate/accept",
    "/v1/migrate/start",
    "/v1/migrate/wait",
    "/v1/migrate/cancel",
    "/v1/secret/add",
    "/v1/secret/remove",
    "/nope",
    "/v1/status?x=1",
]


def control_body(tmp: Path):
    psk = str(tmp / "psk.bin")
    realistic = st.fixed_dictionaries(
        {},
        optional={
            "uri": st.sampled_from(["tcp:127.0.0.1:4444", "tcp:[::1]:1", "unix:/x", "tcp:a", ""]),
            "psk_ref": st.sampled_from([f"file:{psk}", "file:/nonexistent", "keyring:nope", "libvirt:x", "bogus", ""]),
            "ref": st.sampled_from([f"file:{psk}", "file:/nonexistent", "x"]),
            "id": st.sampled_from(["s0", "s1", "0bad", "", "x" * 200]),
            "cookie": b64_of,
            "offer": b64_of,
            "timeout": st.sampled_from([0.05, -1, 0, "1", True, 1e308]),
            "multifd": json_value,
            "multifd_channels": json_value,
        },
    )
    return st.one_of(realistic, json_value)


async def _ask(sock: str, method: str, path: str, body) -> tuple[int, object]:
    from agent.io.http import request_json

    return await request_json(method, "http://agent" + path, body, timeout=10, unix_path=sock)


async def test_control_api_answers_random_requests_and_keeps_serving(short_tmp):
    (short_tmp / "psk.bin").write_bytes(os.urandom(32))
    requests = []

    @FUZZ
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "HEAD"]),
        path=st.sampled_from(ROUTES),
        body=control_body(short_tmp),
    )
    def collect(method, path, body):
        requests.append((method, path, body))

    collect()
    async with control_server(short_tmp) as (_server, sock):
        for method, path, body in requests:
            if path == "/v1/migrate/wait" and isinstance(body, dict):
                body = {**body, "timeout": 0.05}  # a live migration would be waited for
            status, answer = await _ask(sock, method, path, body if method == "POST" else None)
            assert 200 <= status <= 599
            if method != "HEAD" and path != "/metrics":
                assert isinstance(answer, dict), (method, path, status, answer)
            assert answer != {"error": "internal error"}, (method, path, body)
        assert (await _ask(sock, "GET", "/healthz", None))[0] == 200


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda m, t, h, b: m + b" " + t + b" HTTP/1.1\r\n" + h + b"\r\n" + b,
            st.sampled_from([b"GET", b"POST", b"X", b""]),
            st.sampled_from([b"/v1/status", b"/v1/secret/add", b"*", b"/\xff", b""]),
            st.sampled_from(
                [
                    b"Host: a\r\n",
                    b"Content-Length: 5\r\n",
                    b"Content-Length: -1\r\n",
                    b"Content-Length: 99999999999\r\n",
                    b"Transfer-Encoding: chunked\r\n",
                    b"Host: a\r\nContent-Length: 3\r\n",
                    b"X: \xff\r\n",
                    b"",
                ]
            ),
            st.binary(max_size=40),
        ),
    )
)
def test_control_socket_survives_raw_garbage(raw):
    async def go():
        tmp = Path(tempfile.mkdtemp(prefix="kfzc", dir="/tmp"))
        try:
            async with control_server(tmp) as (_server, sock):
                reader, writer = await asyncio.open_unix_connection(sock)
                writer.write(raw)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                    writer.write_eof()
                async with asyncio.timeout(5):
                    answer = await reader.read()
                writer.close()
                if answer:
                    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
                status, body = await _ask(sock, "GET", "/v1/status", None)
                assert status == 200 and body["vm"] == "fuzz"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    asyncio.run(go())


async def test_control_api_refuses_a_deeply_nested_body_as_bad_json(short_tmp):
    from agent.io.http import request_json

    async with control_server(short_tmp) as (_server, sock):
        reader, writer = await asyncio.open_unix_connection(sock)
        body = b"[" * 100_000 + b"]" * 100_000
        writer.write(
            b"POST /v1/secret/add HTTP/1.1\r\nHost: a\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 400"), head
        assert (await request_json("GET", "http://a/healthz", None, timeout=5, unix_path=sock))[0] == 200


# ==========================================================================
# config files


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, (int, str)):
        return json.dumps(v, ensure_ascii=True) if isinstance(v, str) else str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _toml_text(doc: dict) -> str:
    out = []
    for section, table in doc.items():
        if isinstance(table, dict):
            out.append(f"[{json.dumps(section)}]")
            out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
        else:
            out.insert(0, f"{json.dumps(section)} = {_toml_value(table)}")
    return "\n".join(out) + "\n"


@functools.cache
def _config_doc():
    from agent.app.config import SCHEMA

    toml_scalar = st.one_of(
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.text(max_size=20).filter(lambda s: "\x00" not in s),
        st.sampled_from(
            ["vm1", "file:key.bin", "keyring:x", "http://o:1", "quit", "pause", "keyring", "file", "tpm-crb"]
        ),
    )
    toml_value = st.recursive(
        toml_scalar,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=2)),
        max_leaves=5,
    )
    sections = sorted({k.section for k in SCHEMA}) + ["nope"]
    names = sorted({k.name for k in SCHEMA}) + ["nope"]
    return st.dictionaries(
        st.sampled_from(sections),
        st.one_of(st.dictionaries(st.sampled_from(names), toml_value, max_size=4), toml_scalar),
        max_size=4,
    )


@FUZZ
@given(data=st.data())
def test_any_config_file_is_a_config_or_one_line(data, tmp_path):
    from agent.app.config import Config, load_config

    path = tmp_path / "keyagent.toml"
    if data.draw(st.booleans()):
        path.write_text(_toml_text(data.draw(_config_doc())))
    else:
        path.write_bytes(data.draw(st.binary(max_size=200)))
    try:
        cfg = load_config(str(path))
    except UsageError as exc:
        assert one_line(str(exc)), exc
        return
    assert isinstance(cfg, Config)
    for name in ("sev_timeout_s", "migration_dest_deadline_s", "launch_shutdown_grace_s"):
        value = getattr(cfg, name)
        assert math.isfinite(value) and value >= 0, (name, value)


@FUZZ
@given(
    flags=st.dictionaries(
        st.sampled_from(
            [
                "vm_name",
                "vm_run_dir",
                "sev_timeout_s",
                "sev_on_refusal",
                "sev_owner_url",
                "migration_psk_length",
                "migration_dest_deadline_s",
                "vtpm_key",
                "launch_shutdown_grace_s",
                "secrets_master_key",
                "nope",
            ]
        ),
        st.one_of(
            st.text(max_size=20), st.sampled_from(["nan", "inf", "-inf", "1e999", "0x10", "-0", "1_000", " 5 ", "\x00"])
        ),
        max_size=4,
    )
)
def test_any_config_flags_are_a_config_or_one_line(flags):
    from agent.app.config import load_config

    try:
        cfg = load_config(None, flags)
    except UsageError as exc:
        assert one_line(str(exc)), exc
        return
    for name in ("sev_timeout_s", "migration_dest_deadline_s", "launch_shutdown_grace_s"):
        assert math.isfinite(getattr(cfg, name))
    assert 16 <= cfg.migration_psk_length <= 1024


# ==========================================================================
# crashes found, kept


def _fixture_files(kind: str) -> list[Path]:
    return sorted((FUZZ_FIXTURES / kind).glob("*"))


@pytest.mark.parametrize("path", _fixture_files("eventlog"), ids=lambda p: p.name)
def test_fuzz_fixture_event_logs_are_handled(path, tmp_path):
    assert_replay_is_clean(str(path))


@pytest.mark.parametrize("path", _fixture_files("config"), ids=lambda p: p.name)
def test_fuzz_fixture_configs_are_refused_in_one_line(path):
    from agent.app.config import load_config

    with pytest.raises(UsageError) as exc:
        load_config(str(path))
    assert one_line(str(exc.value))


@pytest.mark.parametrize("path", _fixture_files("control"), ids=lambda p: p.name)
async def test_fuzz_fixture_control_requests_are_answered(path, short_tmp):
    raw = path.read_bytes()
    async with control_server(short_tmp) as (_server, sock):
        reader, writer = await asyncio.open_unix_connection(sock)
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 4"), head
        assert b"internal error" not in rest
