"""The QMP shell: redacted at the source, bounded events, errors as values."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os

import pytest

from agent.common.logs import setup_logging
from agent.common.secret import Secret
from agent.io import qmp as qmpio
from agent.tools.sim.machine import SimConfig
from agent.tools.sim.qmp_server import Simulator


@pytest.fixture
async def sim(tmp_path):
    cfg = SimConfig(tik=os.urandom(16), tek=os.urandom(16), digest=hashlib.sha256(b"fw").digest())
    path = str(tmp_path / "qmp.sock")
    async with Simulator(cfg, path) as s:
        yield s, path


@pytest.fixture
def captured_logs():
    stream = io.StringIO()
    setup_logging("debug", stream)
    yield stream
    setup_logging("info")


async def test_a_secret_argument_is_redacted_in_qemu_qmp_debug_log(sim, captured_logs):
    _sim, path = sim
    conn = qmpio.QmpConnection("t")
    await conn.connect(path, 5)
    secret = Secret(b"super secret payload bytes 0123")
    with pytest.raises(qmpio.QmpCommandError):
        # The simulator refuses the packet (bad MAC): the error text is QEMU's.
        await conn.execute(
            "sev-inject-launch-secret", {"packet-header": base64.b64encode(bytes(52)).decode(), "secret": secret}
        )
    await conn.close()
    text = captured_logs.getvalue()
    assert "sev-inject-launch-secret" in text
    assert secret.b64() not in text and "super secret" not in text
    assert "<redacted>" in text


async def test_the_qemu_version_is_the_greetings_and_empty_before_one(sim):
    _sim, path = sim
    conn = qmpio.QmpConnection("t")
    assert conn.qemu_version == ""
    await conn.connect(path, 5)
    assert conn.qemu_version == "7.2.0"  # the simulator greets as QEMU 7.2
    await conn.close()


async def test_execute_error_becomes_qmp_error_with_qemus_text(sim):
    _sim, path = sim
    conn = qmpio.QmpConnection("t")
    await conn.connect(path, 5)
    with pytest.raises(qmpio.QmpCommandError) as err:
        await conn.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound"
    await conn.close()


async def test_connect_to_missing_socket_times_out_with_one_line(tmp_path):
    conn = qmpio.QmpConnection("t")
    with pytest.raises(qmpio.MonitorGone) as err:
        await conn.connect(str(tmp_path / "none.sock"), 0.3)
    assert "cannot connect to QMP socket" in str(err.value)
    assert "\n" not in str(err.value)


async def test_connect_waits_for_a_socket_that_appears_late(tmp_path):
    cfg = SimConfig(tik=os.urandom(16), tek=os.urandom(16), digest=bytes(32))
    path = str(tmp_path / "late.sock")
    conn = qmpio.QmpConnection("t")
    connecting = asyncio.ensure_future(conn.connect(path, 5))
    await asyncio.sleep(0.3)
    async with Simulator(cfg, path):
        await connecting
        assert (await conn.execute("query-status"))["status"] == "prelaunch"
        await conn.close()


async def test_cancelling_connect_ends_it_at_once(tmp_path):
    # Python 3.11's wait_for drops a cancellation that arrives as the inner
    # connect() fails (here: at once, no socket): the retry loop must not
    # take that for one more refused attempt, or a SIGTERM waits for the
    # whole --qmp-timeout.  Cancelled at many points, it always ends.
    for i in range(60):
        conn = qmpio.QmpConnection("test")
        task = asyncio.ensure_future(conn.connect(str(tmp_path / "absent.sock"), 60))
        for _ in range(i):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert done and task.cancelled(), f"still connecting after a cancel at step {i}"
        await asyncio.wait_for(conn.close(), 2)


async def test_wait_disconnected_returns_when_qemu_quits(sim):
    s, path = sim
    conn = qmpio.QmpConnection("t")
    await conn.connect(path, 5)
    waiter = asyncio.ensure_future(conn.wait_disconnected())
    await conn.execute("quit")
    reason = await asyncio.wait_for(waiter, 5)
    assert isinstance(reason, str) and reason


async def test_listener_keeps_only_named_events_and_is_bounded():
    from qemu.qmp.message import Message

    listener = qmpio.BoundedListener({"RESUME"}, maxsize=2)
    for _ in range(5):
        await listener.put(Message({"event": "RESUME", "data": {}}))
        await listener.put(Message({"event": "NOISE", "data": {}}))
    assert listener._queue.qsize() == 2
    assert listener.dropped == 3


def test_redact_replaces_secret_keys_and_secrets():
    msg = {
        "execute": "object-add",
        "arguments": {"qom-type": "secret", "id": "s0", "data": "Y2lwaGVy", "keyid": "m0", "x": Secret(b"abc")},
    }
    out = qmpio.redact(msg)
    assert out["arguments"]["data"] == "<redacted>"
    assert out["arguments"]["x"] == "<redacted>"
    assert out["arguments"]["id"] == "s0"


def test_wire_args_send_a_secret_as_base64():
    assert qmpio.wire_args({"a": Secret(b"\x00\x01"), "b": {"c": Secret(b"z")}}) == {"a": "AAE=", "b": {"c": "eg=="}}


class _ScriptedQemu:
    """A QMP peer that greets, accepts capabilities, records every command's
    bytes as sent and answers each with the next scripted reply (the id
    copied in)."""

    def __init__(self, replies: list[dict]) -> None:
        self.replies = replies
        self.received: list[bytes] = []
        self.tasks: list[asyncio.Task] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import json

        self.tasks.append(asyncio.current_task())
        writer.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, ')
        writer.write(b'"capabilities": []}}\r\n')
        decoder = json.JSONDecoder()
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
            while buf.strip():
                text = buf.decode().lstrip()
                try:
                    msg, end = decoder.raw_decode(text)
                except ValueError:
                    break
                raw, buf = text[:end].encode(), text[end:].encode()
                if msg.get("execute") == "qmp_capabilities":
                    reply: dict = {"return": {}}
                else:
                    self.received.append(raw)
                    reply = dict(self.replies.pop(0))
                if "id" in msg:
                    reply["id"] = msg["id"]
                writer.write(json.dumps(reply).encode() + b"\r\n")
        writer.close()


async def _scripted(tmp_path, replies: list[dict]):
    peer = _ScriptedQemu(replies)
    path = str(tmp_path / "scripted.sock")
    server = await asyncio.start_unix_server(peer.serve, path)
    conn = qmpio.QmpConnection("t")
    await conn.connect(path, 5)
    return peer, server, conn


async def _end(peer, server, conn) -> None:
    await conn.close()
    server.close()
    await asyncio.wait_for(asyncio.gather(*peer.tasks), 5)  # each saw the client's EOF


async def test_a_command_is_serialised_once_and_reaches_qemu_as_the_librarys_execute_sends_it(tmp_path, monkeypatch):
    from qemu.qmp import QMPClient
    from qemu.qmp.message import Message

    peer, server, conn = await _scripted(tmp_path, [{"return": {"a": 1}}, {"return": {"a": 1}}, {"return": []}])
    encodings = []
    real = Message._serialize.__func__

    def counting(cls, value):
        encodings.append(value)
        return real(cls, value)

    monkeypatch.setattr(Message, "_serialize", classmethod(counting))
    args = {"qom-type": "secret", "id": "s0", "data": Secret(b"\x01\x02"), "nested": {"k": [1, "x"]}}
    assert await conn.execute("object-add", args) == {"a": 1}
    assert len(encodings) == 1
    # the library's own path, for the same command: the same bytes but the id
    assert await QMPClient.execute(conn.client, "object-add", qmpio.wire_args(args)) == {"a": 1}
    assert len(encodings) == 4  # make_execute_msg, execute_msg's copy, the writer
    ours, theirs = peer.received
    assert ours.replace(b"#00000", b"#00001") == theirs
    assert ours.startswith(b'{"execute":"object-add","arguments":{"qom-type":"secret"')
    assert await conn.execute("qom-list", {"path": "/objects"}) == []
    await _end(peer, server, conn)


async def test_malformed_replies_are_a_lost_monitor_as_with_the_librarys_execute(tmp_path):
    peer, server, conn = await _scripted(tmp_path, [{"error": {"desc": "no class"}}])
    with pytest.raises(qmpio.MonitorGone) as err:
        await conn.execute("query-status")
    assert "malformed" in str(err.value)
    await _end(peer, server, conn)
    peer, server, conn = await _scripted(tmp_path, [{"neither": 1}])
    with pytest.raises(qmpio.MonitorGone) as err:
        await conn.execute("query-status")
    assert "missing" in str(err.value)
    await _end(peer, server, conn)


async def test_a_command_after_the_monitor_closed_is_a_lost_monitor(sim):
    _sim, path = sim
    conn = qmpio.QmpConnection("t")
    await conn.connect(path, 5)
    await conn.close()
    with pytest.raises(qmpio.MonitorGone) as err:
        await conn.execute("query-status")
    assert "disconnected" in str(err.value)
