"""agent.io.http over real sockets: TCP on 127.0.0.1 and unix sockets in tmp_path."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat

import h11
import pytest

from agent.common.logs import setup_logging
from agent.io.http import HttpError, HttpServer, InvalidJson, Request, Response, request_json


async def echo(request: Request) -> Response:
    if request.path.startswith("/echo"):
        return Response.json(
            200,
            {
                "method": request.method,
                "path": request.path,
                "headers": request.headers,
                "body": request.json() if request.body else None,
                "peer": list(request.peer) if isinstance(request.peer, tuple) else None,
            },
        )
    if request.path == "/metrics":
        return Response.text(200, "up 1\n")
    if request.path == "/slow":
        await asyncio.sleep(5)
        return Response.json(200, {})
    if request.path == "/boom":
        raise RuntimeError("handler blew up with " + request.body.decode())
    return Response.json(404, {"error": "not found"})


@pytest.fixture
async def tcp_server():
    server = HttpServer(echo, max_body=1000)
    host, port = await server.start_tcp("127.0.0.1", 0)
    yield server, f"http://{host}:{port}"
    await server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    finally:
        writer.close()
    return b"".join(chunks)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- TCP ---------------------------------------------------------------------


async def test_json_roundtrip_over_tcp(tcp_server):
    _, url = tcp_server
    status, body = await request_json("POST", url + "/echo?x=1", {"a": [1, 2]}, timeout=5)
    assert status == 200
    assert body["method"] == "POST"
    assert body["path"] == "/echo?x=1"
    assert body["body"] == {"a": [1, 2]}
    assert body["headers"]["content-type"] == "application/json"
    assert body["peer"][0] == "127.0.0.1"


async def test_get_without_body(tcp_server):
    _, url = tcp_server
    status, body = await request_json("GET", url + "/echo", None, timeout=5)
    assert status == 200 and body["body"] is None and body["method"] == "GET"


async def test_not_found_is_the_handlers_answer(tcp_server):
    _, url = tcp_server
    assert await request_json("GET", url + "/nope", None, timeout=5) == (404, {"error": "not found"})


async def test_non_json_response_body_parses_as_none(tcp_server):
    _, url = tcp_server
    assert await request_json("GET", url + "/metrics", None, timeout=5) == (200, None)


async def test_keep_alive_serves_several_requests_on_one_connection(tcp_server):
    _, url = tcp_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    conn = h11.Connection(h11.CLIENT)
    peers = []
    try:
        for i in range(3):
            body = json.dumps({"i": i}).encode()
            writer.write(
                conn.send(
                    h11.Request(
                        method="POST",
                        target="/echo",
                        headers=[
                            ("Host", "x"),
                            ("Content-Length", str(len(body))),
                            ("Content-Type", "application/json"),
                        ],
                    )
                )
            )
            writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            await writer.drain()
            data = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await asyncio.wait_for(reader.read(65536), 2))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            reply = json.loads(data)
            assert reply["body"] == {"i": i}
            peers.append(tuple(reply["peer"]))
            conn.start_next_cycle()
    finally:
        writer.close()
    assert len(set(peers)) == 1  # the same client port each time: one connection


async def test_head_gets_headers_only(tcp_server):
    _, url = tcp_server
    reply = await raw_exchange(port_of(url), b"HEAD /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: " in head.lower()
    assert body == b""


async def test_expect_100_continue_is_answered(tcp_server):
    _, url = tcp_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b'{"a":1}')
        reply = await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"body":{"a":1}' in reply


async def test_oversize_body_is_413(tcp_server):
    _, url = tcp_server
    status, body = await request_json("POST", url + "/echo", {"x": "a" * 2000}, timeout=5)
    assert status == 413
    assert "error" in body


async def test_oversize_chunked_body_is_413(tcp_server):
    _, url = tcp_server
    chunk = b"a" * 600
    data = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(chunk)
        + chunk
        + b"\r\n"
        + b"%x\r\n" % len(chunk)
        + chunk
        + b"\r\n0\r\n\r\n"
    )
    reply = await raw_exchange(port_of(url), data)
    assert reply.startswith(b"HTTP/1.1 413 ")


async def test_garbage_bytes_get_400_json(tcp_server):
    _, url = tcp_server
    reply = await raw_exchange(port_of(url), b"\x00\x01\x02 not http at all\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"application/json" in head
    assert "error" in json.loads(body)


async def test_handler_exception_is_500_and_log_omits_body(tcp_server):
    _, url = tcp_server
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        status, body = await request_json("POST", url + "/boom", {"pass": "hunter2-in-body"}, timeout=5)
    finally:
        setup_logging("info")
    assert (status, body) == (500, {"error": "internal error"})
    log = buf.getvalue()
    assert "http handler failed" in log and "RuntimeError" in log
    assert "hunter2" not in log


async def test_client_timeout_is_one_line(tcp_server):
    _, url = tcp_server
    with pytest.raises(HttpError) as err:
        await request_json("GET", url + "/slow", None, timeout=0.2)
    assert str(err.value).startswith("timed out after 0.2s")
    assert "\n" not in str(err.value)


async def test_idle_connection_is_closed_by_server():
    server = HttpServer(echo, idle_timeout=0.2)
    _, port = await server.start_tcp("127.0.0.1", 0)
    try:
        reply = await raw_exchange(port, b"", read_timeout=3)
        assert reply == b""  # closed without a word, well before the read timeout
    finally:
        await server.close()


async def test_connection_refused_names_the_address():
    port = free_port()
    with pytest.raises(HttpError) as err:
        await request_json("POST", f"http://127.0.0.1:{port}/v1/secret", {}, timeout=5)
    assert str(err.value) == f"connection refused to 127.0.0.1:{port}"


@pytest.mark.parametrize(
    "answer, words",
    [
        (b"NOT-HTTP SECRETBODY\r\n\r\n", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nSECRETBODY", ""),
    ],
    ids=["malformed", "truncated"],
)
async def test_a_broken_response_is_an_error_without_its_bytes(answer, words):
    async def peer(reader, writer):
        await reader.read(65536)
        writer.write(answer)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HttpError) as err:
            await request_json("GET", f"http://127.0.0.1:{port}/", None, timeout=5)
    finally:
        srv.close()
    assert str(err.value).startswith(words)
    assert "SECRETBODY" not in str(err.value)


async def test_only_http_urls_are_accepted():
    with pytest.raises(HttpError, match="scheme"):
        await request_json("GET", "https://127.0.0.1:1/", None, timeout=1)


async def test_request_json_rejects_bad_json():
    req = Request("POST", "/", {}, b"{nope", None)
    with pytest.raises(ValueError):
        req.json()
    with pytest.raises(InvalidJson):
        req.json()


def test_reprs_do_not_show_bodies():
    assert "hunter2" not in repr(Request("POST", "/", {}, b"hunter2", None))
    assert "hunter2" not in repr(Response(200, b"hunter2"))


async def test_close_ends_open_keep_alive_connections(tcp_server):
    server, url = tcp_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.close(), 2)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


# -- unix sockets -------------------------------------------------------------


async def test_unix_socket_roundtrip_with_peer_credentials(tmp_path):
    seen = []

    async def handler(request: Request) -> Response:
        seen.append(request.peer)
        return Response.json(200, {"ok": True})

    path = str(tmp_path / "ctl.sock")
    server = HttpServer(handler)
    await server.start_unix(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        status, body = await request_json("GET", "http://localhost/healthz", None, timeout=5, unix_path=path)
        assert (status, body) == (200, {"ok": True})
        assert seen == [(os.getpid(), os.getuid(), os.getgid())]
    finally:
        await server.close()
    assert not os.path.exists(path)


async def test_refused_peer_gets_403(tmp_path):
    calls = []

    async def handler(request: Request) -> Response:
        calls.append(request)
        return Response.json(200, {})

    path = str(tmp_path / "ctl.sock")
    server = HttpServer(handler, allow_peer=lambda peer: peer[1] != os.getuid())
    await server.start_unix(path)
    try:
        status, body = await request_json("POST", "http://localhost/x", {"a": 1}, timeout=5, unix_path=path)
    finally:
        await server.close()
    assert status == 403 and "error" in body
    assert calls == []


async def test_allowed_peer_passes(tmp_path):
    path = str(tmp_path / "ctl.sock")
    server = HttpServer(echo, allow_peer=lambda peer: peer[1] == os.getuid())
    await server.start_unix(path, mode=0o660)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        status, _ = await request_json("GET", "http://localhost/echo", None, timeout=5, unix_path=path)
    finally:
        await server.close()
    assert status == 200


async def test_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    server = HttpServer(echo)
    await server.start_unix(path)
    try:
        status, _ = await request_json("GET", "http://localhost/echo", None, timeout=5, unix_path=path)
        assert status == 200
    finally:
        await server.close()


async def test_regular_file_in_the_way_is_not_removed(tmp_path):
    path = tmp_path / "ctl.sock"
    path.write_text("keep me")
    with pytest.raises(HttpError, match="not a socket"):
        await HttpServer(echo).start_unix(str(path))
    assert path.read_text() == "keep me"


async def test_missing_unix_socket_is_one_line(tmp_path):
    path = str(tmp_path / "absent.sock")
    with pytest.raises(HttpError) as err:
        await request_json("GET", "http://localhost/", None, timeout=5, unix_path=path)
    assert str(err.value) == f"no socket at {path}"


# -- what one peer can hold: connections, time -------------------------------


async def answered(port: int, path: str = "/echo", timeout: float = 5.0) -> bytes:
    """One request on a fresh connection; the raw answer ("" if none came in time)."""
    try:
        return await raw_exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), read_timeout=timeout
        )
    except TimeoutError:
        return b""


async def wait_until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_at_the_connection_cap_new_connections_wait_until_one_closes():
    server = HttpServer(echo, max_connections=2, request_timeout=30)
    _, port = await server.start_tcp("127.0.0.1", 0)
    holders = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        await wait_until(lambda: server.connections == 2)
        waiting = asyncio.ensure_future(answered(port, timeout=10))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # in the listen backlog, not accepted
        assert server.connections == 2
        holders[0][1].close()
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.startswith(b"HTTP/1.1 200 ")
    finally:
        for _, writer in holders:
            writer.close()
        await server.close()


async def test_at_the_cap_keep_alive_ends_to_make_room():
    server = HttpServer(echo, max_connections=2, idle_timeout=60, request_timeout=30)
    _, port = await server.start_tcp("127.0.0.1", 0)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    silent = None
    try:
        idle_writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive, below the cap
        head = await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(idle_reader.readexactly(length), 5)
        silent = await asyncio.open_connection("127.0.0.1", port)
        # The cap is reached with the first one idle between requests: it is closed.
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        reply = await asyncio.wait_for(answered(port), 5)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" in reply.lower()  # served at the cap: no keep-alive
    finally:
        idle_writer.close()
        if silent is not None:
            silent[1].close()
        await server.close()


async def test_a_request_trickled_a_byte_at_a_time_is_cut_off_at_one_deadline():
    # Each byte comes well inside any per-read timeout; the whole request does not.
    server = HttpServer(echo, idle_timeout=5, request_timeout=0.5)
    _, port = await server.start_tcp("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:

        async def trickle():
            for byte in b"GET /echo HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

        sender = asyncio.ensure_future(trickle())
        reply = await asyncio.wait_for(reader.read(), 5)
        elapsed = loop.time() - start
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    finally:
        writer.close()
        await server.close()
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 2.0


async def test_a_connection_that_says_nothing_is_closed_at_the_request_deadline():
    server = HttpServer(echo, idle_timeout=60, request_timeout=0.3)
    _, port = await server.start_tcp("127.0.0.1", 0)
    try:
        reply = await raw_exchange(port, b"", read_timeout=3)
        assert reply == b""
        await wait_until(lambda: server.connections == 0, 2)
    finally:
        await server.close()


async def test_a_response_nobody_reads_does_not_hold_its_connection():
    big = b"x" * (32 << 20)  # far more than the socket buffers take

    async def handler(request: Request) -> Response:
        return Response(200, big, "application/octet-stream")

    server = HttpServer(handler, request_timeout=0.5)
    _, port = await server.start_tcp("127.0.0.1", 0)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: server.connections == 1, 2)
        await wait_until(lambda: server.connections == 0, 5)  # never read: dropped
    finally:
        sock.close()
        await server.close()


async def test_pipelined_requests_are_all_answered():
    server = HttpServer(echo, request_timeout=2)
    _, port = await server.start_tcp("127.0.0.1", 0)
    try:
        two = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = await raw_exchange(port, two, read_timeout=3)
    finally:
        await server.close()
    assert reply.count(b"HTTP/1.1 200 ") == 2 and reply.endswith(b"up 1\n")


@pytest.mark.parametrize(
    "bad",
    [{"max_connections": 0}, {"request_timeout": float("nan")}, {"idle_timeout": 0}, {"request_timeout": float("inf")}],
)
def test_server_limits_must_be_sane(bad):
    with pytest.raises(ValueError):
        HttpServer(echo, **bad)


async def test_close_is_quiet_with_connections_in_every_state(tmp_path):
    """Accepted but not yet served, mid-request, in the handler, idle keep-alive,
    and a response nobody reads: close() ends them all at once, and neither
    asyncio nor the server logs anything."""
    in_handler = asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/hang":
            in_handler.set()
            await asyncio.sleep(60)
        if request.path == "/big":
            return Response(200, b"x" * (32 << 20), "application/octet-stream")
        return Response.json(200, {})

    loop = asyncio.get_running_loop()
    problems: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    buf = io.StringIO()
    setup_logging("debug", stream=buf)
    server = HttpServer(handler, request_timeout=30)
    _, port = await server.start_tcp("127.0.0.1", 0)
    socks = []
    try:

        def connect(data: bytes) -> None:
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(data)
            socks.append(s)

        connect(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        connect(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        connect(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        connect(b"GET /half HTTP/1.1\r\nHo")
        await asyncio.wait_for(in_handler.wait(), 5)
        await asyncio.sleep(0.2)
        connect(b"")  # accepted at most, never served
        started = loop.time()
        await asyncio.wait_for(server.close(), 5)
        assert loop.time() - started < 3
        await asyncio.sleep(0.1)
    finally:
        setup_logging("info")
        loop.set_exception_handler(None)
        for s in socks:
            s.close()
    assert problems == []
    assert buf.getvalue() == ""
    assert server.connections == 0


def test_reason_phrases_are_the_standard_librarys():
    from http import HTTPStatus

    from agent.io.http import REASONS, _reason

    for status, phrase in REASONS.items():
        assert phrase == HTTPStatus(status).phrase.encode()
    assert _reason(418) == HTTPStatus(418).phrase.encode()  # not in the table: looked up
    assert _reason(599) == b""
