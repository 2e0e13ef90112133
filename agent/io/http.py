"""A small HTTP/1.1 layer for JSON over TCP and unix sockets.

Why not aiohttp: importing it alone costs about 33 MB of RSS, more than the
whole idle sidecar may use.  h11 does the HTTP/1.1 parsing and framing as a
state machine without I/O; this module only moves bytes between asyncio
streams and h11 and turns failures into one-line reasons.

Two things it never does, because bodies carry secret packets and keys:
it never puts a request or response body into an exception message, and it
never logs one.

Client: :func:`request_json` (one request per connection, whole exchange
bounded by one timeout).  Server: :class:`HttpServer` (keep-alive, body size
limit, peer credentials for unix sockets, errors as JSON ``{"error": ...}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
import struct
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field

# Imported here, not at the first answer: a server out of file descriptors
# (EMFILE) could not import it then.
from typing import Any
from urllib.parse import urlsplit

import h11

from agent.common.logs import get_logger

__all__ = [
    "HttpError",
    "InvalidJson",
    "Request",
    "Response",
    "Handler",
    "HttpServer",
    "PeerCred",
    "request_json",
]

READ_CHUNK = 65536
# A response body larger than this is refused by the client: the owner's and
# the control socket's answers are a few kilobytes at most.
MAX_RESPONSE_BODY = 16 << 20
# struct ucred { pid_t pid; uid_t uid; gid_t gid; } (Linux, socket(7))
UCRED = struct.Struct("3i")
# SO_PEERGROUPS (Linux 4.13+, asm-generic/socket.h; Python has no name for it):
# the peer's supplementary groups as gid_t[], taken at connect() like
# SO_PEERCRED, so no race with the peer exiting and its pid being reused.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
NGROUPS_MAX = 65536


class PeerCred(tuple):
    """``(pid, uid, gid)`` from SO_PEERCRED, plus ``groups``.

    A plain 3-tuple to everything that compares or unpacks it; ``groups`` is
    the peer's supplementary groups from SO_PEERGROUPS, or ``None`` when the
    kernel does not tell (then only the primary gid can count).
    """

    groups: frozenset[int] | None

    def __new__(cls, pid: int, uid: int, gid: int, groups=None) -> PeerCred:
        self = super().__new__(cls, (pid, uid, gid))
        self.groups = None if groups is None else frozenset(groups)
        return self

    @property
    def pid(self) -> int:
        return self[0]

    @property
    def uid(self) -> int:
        return self[1]

    @property
    def gid(self) -> int:
        return self[2]

    def all_groups(self) -> frozenset[int]:
        return frozenset({self.gid}) | (self.groups or frozenset())


def _peer_groups(sock: socket.socket) -> list[int] | None:
    for count in (256, NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return None
        return list(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return None


class HttpError(Exception):
    """An HTTP exchange failed.  The message is one line and holds no body."""


class InvalidJson(HttpError, ValueError):
    """A body that should be JSON is not (catchable as either base class)."""


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, obj: Any) -> Response:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def text(cls, status: int, text: str, content_type: str = "text/plain; version=0.0.4") -> Response:
        # The default is the Prometheus text exposition format's type.
        return cls(status, text.encode(), content_type)

    def __repr__(self) -> str:  # the body may be a secret packet
        return f"Response(status={self.status}, body=<{len(self.body)} bytes>, content_type={self.content_type!r})"


@dataclass
class Request:
    method: str
    path: str  # the request target, query included
    headers: dict[str, str]  # names lower-case
    body: bytes = b""
    # PeerCred (pid, uid, gid; .groups) for unix sockets, (host, port) for TCP.
    peer: object = None

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidJson("request body is not valid JSON") from None

    def __repr__(self) -> str:  # the body may be a secret
        return f"Request({self.method} {self.path}, body=<{len(self.body)} bytes>, peer={self.peer!r})"


Handler = Callable[[Request], Awaitable[Response]]


# --------------------------------------------------------------------------
# client


def _split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise HttpError(f"unsupported URL scheme {parts.scheme!r} (only http)")
    if not parts.hostname:
        raise HttpError("URL has no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise HttpError("URL has an invalid port") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, port, target


def _host_header(host: str, port: int) -> str:
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return host if port == 80 else f"{host}:{port}"


async def request_json(
    method: str, url: str, body: dict | None, *, timeout: float, unix_path: str | None = None
) -> tuple[int, Any]:
    """One HTTP request with a JSON body; returns ``(status, parsed JSON)``.

    The parsed JSON is ``None`` when the response body is not JSON.  With
    ``unix_path`` the request goes to that unix socket (the URL still gives
    the target).  The whole exchange, connect included, is bounded by
    ``timeout``.  Raises :class:`HttpError` with a one-line reason.
    """
    status, parsed, _headers = await request_json_headers(method, url, body, timeout=timeout, unix_path=unix_path)
    return status, parsed


async def request_json_headers(
    method: str, url: str, body: dict | None, *, timeout: float, unix_path: str | None = None
) -> tuple[int, Any, dict[str, str]]:
    """:func:`request_json`, plus the response's headers (names lower-case):
    a retrying client needs ``Retry-After``."""
    host, port, target = _split_url(url)
    if unix_path is not None:
        where = unix_path
    else:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(method, host, port, target, body, unix_path)
    except TimeoutError:
        raise HttpError(f"timed out after {timeout:g}s talking to {where}") from None
    except ConnectionRefusedError:
        raise HttpError(f"connection refused to {where}") from None
    except FileNotFoundError:
        raise HttpError(f"no socket at {where}") from None
    except socket.gaierror:
        raise HttpError(f"cannot resolve host {host!r}") from None
    except h11.ProtocolError:
        raise HttpError(f"malformed HTTP response from {where}") from None
    except (ConnectionResetError, BrokenPipeError):
        raise HttpError(f"connection reset by {where}") from None
    except OSError as exc:
        raise HttpError(f"cannot talk to {where}: {exc.strerror or type(exc).__name__}") from None


async def _exchange(
    method: str, host: str, port: int, target: str, body: dict | None, unix_path: str | None
) -> tuple[int, Any, dict[str, str]]:
    if unix_path is not None:
        reader, writer = await asyncio.open_unix_connection(unix_path)
        host_header = "localhost"
    else:
        reader, writer = await asyncio.open_connection(host, port)
        host_header = _host_header(host, port)
    try:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = [
            ("Host", host_header),
            ("Connection", "close"),
            ("Accept", "application/json"),
            ("Content-Length", str(len(payload))),
        ]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        conn = h11.Connection(h11.CLIENT)
        out = conn.send(h11.Request(method=method, target=target, headers=headers))
        if payload:
            out += conn.send(h11.Data(data=payload))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()

        status: int | None = None
        response_headers: dict[str, str] = {}
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_CHUNK)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BODY:
                    raise HttpError("response body too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("connection closed before a complete response")
        assert status is not None
        raw = b"".join(chunks)
        try:
            parsed = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        return status, parsed, response_headers
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --------------------------------------------------------------------------
# server


# The reason phrases of the statuses our servers send, as ``http.HTTPStatus``
# words them (tests/io/test_http.py checks they agree): the ``http`` module is
# an enum of ~70 members, ~64 kB of RSS in every idle sidecar for a few words.
REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Request Entity Too Large",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def _reason(status: int) -> bytes:
    phrase = REASONS.get(status)
    if phrase is not None:
        return phrase
    from http import HTTPStatus  # any other status: rare

    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _peer_of(writer: asyncio.StreamWriter) -> object:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
        except OSError:
            return None
        pid, uid, gid = UCRED.unpack(raw)
        return PeerCred(pid, uid, gid, groups=_peer_groups(sock))
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple):
        return tuple(peername[:2])
    return peername


class _Close(Exception):
    """End this connection quietly."""


# accept() failing with one of these means "out of a resource for now" (file
# descriptors above all): the pending connection stays in the kernel's
# backlog, and the server tries again after a pause.
ACCEPT_BACKOFF_FIRST = 0.05
ACCEPT_BACKOFF_MAX = 1.0
# A burst (of accept failures, or of time at the connection cap) is logged
# when it starts and when it has been over for this long, with its count.
BURST_QUIET_S = 5.0
# Closing a connection waits this long for unsent bytes to leave, then aborts.
CLOSE_TIMEOUT_S = 1.0
# accept() errors that only mean this one peer went away first.
_PEER_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EAGAIN, errno.EINTR}


class _Burst:
    """A condition that can repeat thousands of times a second (accept()
    failing with EMFILE; new connections waiting at the cap), logged once
    when it starts and once when it has stayed away for ``BURST_QUIET_S``."""

    def __init__(self, log: Any, start: str, end: str) -> None:
        self._log, self._start, self._end = log, start, end
        self.count = 0
        self._since = 0.0
        self._last = 0.0

    def hit(self, now: float, **fields: Any) -> None:
        if self.count == 0:
            self._since = now
            self._log.warning(self._start, **fields)
        self.count += 1
        self._last = now

    def clear(self, now: float, **fields: Any) -> None:
        if self.count and now - self._last >= BURST_QUIET_S:
            self._log.info(self._end, times=self.count, lasted_s=round(self._last - self._since, 3), **fields)
            self.count = 0


class _Conn:
    """One accepted connection, as the server tracks it."""

    __slots__ = ("sock", "transport", "idle")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.transport: asyncio.WriteTransport | None = None
        self.idle = False  # between two requests of a keep-alive connection


def bind_unix(path: str, mode: int = 0o600, backlog: int = 1024) -> socket.socket:
    """A listening unix socket at ``path``; its mode is set before anyone can connect.

    The socket is bound, chmod-ed, and only then listens: a connect
    before ``listen()`` is refused, so there is no window in which the
    socket is reachable with the umask's mode.  A stale socket at
    ``path`` is replaced; any other file there is an error.  Blocking
    file-system calls only, no event loop: a caller may run it on a thread.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise HttpError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


@dataclass
class HttpServer:
    """Serve ``handler`` over HTTP/1.1 on TCP and/or unix sockets.

    The handler sees every request the peer is allowed to make, 404s
    included.  The server itself answers 400 (unparseable request), 403
    (``allow_peer`` said no), 408 (a request not received in time), 413
    (body over ``max_body``) and 500 (the handler raised), each as JSON
    ``{"error": ...}``.

    What one peer can hold, and for how long:

    * at most ``max_connections`` connections are open at once.  At the cap
      the server stops accepting: new connections wait in the kernel's
      listen backlog (no file descriptor of ours) until one closes; idle
      keep-alive connections are closed to make room, and responses sent
      at the cap end their connection (``Connection: close``);
    * a request's head and body must arrive within ``request_timeout`` of
      its first byte (of the accept, for a connection's first request),
      however slowly they trickle in; a response must leave within it too;
    * a keep-alive connection waits ``idle_timeout`` for its next request.

    The handler's own time is not bounded here (``migrate wait`` runs for
    minutes on purpose).  ``accept()`` failures (EMFILE when the process is
    out of file descriptors) are retried with a growing pause and logged
    once per burst, not once per retry as asyncio's own server does.
    """

    handler: Handler
    _: KW_ONLY
    max_body: int = 1 << 20
    allow_peer: Callable[[object], bool] | None = None
    idle_timeout: float = 60.0
    request_timeout: float = 10.0
    max_connections: int = 100
    backlog: int = 1024
    _listeners: list[tuple[socket.socket, str]] = field(default_factory=list, init=False)
    _accepters: list[asyncio.Task] = field(default_factory=list, init=False)
    _conns: dict[asyncio.Task, _Conn] = field(default_factory=dict, init=False)
    _unix_paths: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name in ("idle_timeout", "request_timeout"):
            value = getattr(self, name)
            if not (value > 0 and value != float("inf")):  # nan fails too
                raise ValueError(f"{name} must be a finite number above 0")
        self._log = get_logger("keyagent.http")
        self._slot_free = asyncio.Event()
        self._accept_failures = _Burst(
            self._log, "accept() failed: pausing before trying again", "accept() works again"
        )
        self._at_cap = _Burst(
            self._log,
            "connection limit reached: new connections wait in the listen backlog",
            "below the connection limit again",
        )

    @property
    def connections(self) -> int:
        """Connections open now (for tests and metrics)."""
        return len(self._conns)

    async def start_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on every address ``host`` resolves to; return the first bound one."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        made: list[socket.socket] = []
        try:
            for family, type_, proto, _, sockaddr in dict.fromkeys(infos):
                sock = socket.socket(family, type_, proto)
                made.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(self.backlog)
                sock.setblocking(False)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        for sock in made:
            addr = sock.getsockname()
            self._listen(sock, f"{addr[0]}:{addr[1]}")
        addr = made[0].getsockname()
        return addr[0], addr[1]

    async def start_unix(self, path: str, mode: int = 0o600, bound: socket.socket | None = None) -> None:
        """Listen on ``path`` (:func:`bind_unix`), or serve ``bound``, the
        socket a caller already made there with :func:`bind_unix` (on a
        worker thread: ``keyagent host`` starting 100 VMs)."""
        sock = bound if bound is not None else bind_unix(path, mode, self.backlog)
        self._unix_paths.append(path)
        self._listen(sock, path)

    def _listen(self, sock: socket.socket, where: str) -> None:
        self._listeners.append((sock, where))
        self._accepters.append(asyncio.ensure_future(self._accept_loop(sock, where)))

    async def close(self) -> None:
        """Stop listening and end every connection, quietly."""
        for task in self._accepters:
            task.cancel()
        await asyncio.gather(*self._accepters, return_exceptions=True)
        self._accepters.clear()
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        tasks = list(self._conns)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    # -- accepting ------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket, where: str) -> None:
        loop = asyncio.get_running_loop()
        unix = listener.family == socket.AF_UNIX
        pause = ACCEPT_BACKOFF_FIRST
        while True:
            if len(self._conns) >= self.max_connections:
                self._at_cap.hit(loop.time(), listen=where, limit=self.max_connections)
                self._slot_free.clear()
                self._shed_idle()
                await self._slot_free.wait()
                continue
            try:
                sock = await self._accept(listener)
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    continue
                self._accept_failures.hit(
                    loop.time(), listen=where, error=errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, ACCEPT_BACKOFF_MAX)
                continue
            pause = ACCEPT_BACKOFF_FIRST
            now = loop.time()
            self._accept_failures.clear(now, listen=where)
            self._at_cap.clear(now, listen=where)
            sock.setblocking(False)
            state = _Conn(sock)
            task = loop.create_task(self._on_connect(state, unix))
            self._conns[task] = state
            task.add_done_callback(self._on_conn_done)

    @staticmethod
    async def _accept(listener: socket.socket) -> socket.socket:
        """``accept()``, waiting for the listener to be readable.

        Not ``loop.sock_accept``: in Python 3.11 its callback can still run
        after the future was cancelled (server closing), which logs an
        InvalidStateError and loses the accepted socket.  The reader is
        registered only while waiting: at the cap or during a back-off the
        loop must not be woken by a readable listener it will not serve.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = listener.accept()
                return sock
            except (BlockingIOError, InterruptedError):
                pass
            readable = loop.create_future()
            fd = listener.fileno()

            def wake(fut: asyncio.Future[None] = readable) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await readable
            finally:
                loop.remove_reader(fd)

    def _shed_idle(self) -> None:
        """At the cap, idle keep-alive connections go first (HTTP/1.1 lets a
        server close a connection between requests at any time)."""
        for task, state in list(self._conns.items()):
            if state.idle:
                task.cancel()

    def _on_conn_done(self, task: asyncio.Task) -> None:
        state = self._conns.pop(task, None)
        if state is not None:
            if state.transport is not None:
                state.transport.abort()  # a no-op once it has closed
            else:
                state.sock.close()  # cancelled before it ever ran
        self._slot_free.set()

    # -- one connection -----------------------------------------------------

    async def _on_connect(self, state: _Conn, unix: bool) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            if unix:
                reader, writer = await asyncio.open_unix_connection(sock=state.sock)
            else:
                reader, writer = await asyncio.open_connection(sock=state.sock)
            state.transport = writer.transport
            await self._serve(reader, writer, state)
        except (_Close, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is closing, or shed this idle connection
        except Exception as exc:  # pragma: no cover - a bug in this module
            self._log.error("http connection failed", error=type(exc).__name__)
        finally:
            if writer is not None:
                writer.close()
                try:  # unsent bytes get a moment to leave; a peer that reads nothing gets none
                    await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
                except BaseException:  # noqa: BLE001 - the done callback aborts the transport
                    pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn = h11.Connection(h11.SERVER)
        peer = _peer_of(writer)
        allowed = self.allow_peer is None or bool(self.allow_peer(peer))
        # The first request's clock starts at the accept; a later one's at its first byte.
        deadline: float | None = loop.time() + self.request_timeout
        started = False  # a byte of the current request has arrived

        async def next_event() -> Any:
            nonlocal deadline, started
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._send_error(conn, writer, exc.error_status_hint or 400, "bad request")
                    raise _Close() from None
                if event is not h11.NEED_DATA:
                    return event
                if not started:
                    # Waiting for a request: keep-alive idle time, and the
                    # first request's deadline.
                    wait = self.idle_timeout
                    if deadline is not None:
                        wait = min(wait, deadline - loop.time())
                    state.idle = deadline is None
                    try:
                        async with asyncio.timeout(max(wait, 0)):
                            data = await reader.read(READ_CHUNK)
                    finally:
                        state.idle = False
                    started = True
                    if deadline is None:
                        deadline = loop.time() + self.request_timeout
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await reader.read(READ_CHUNK)
                    except TimeoutError:
                        await self._send_error(conn, writer, 408, "request not received in time")
                        raise _Close() from None
                conn.receive_data(data)

        while True:
            event = await next_event()
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 ordering
                raise _Close()
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            request = Request(
                method=event.method.decode("ascii", "replace"),
                path=event.target.decode("latin-1"),
                headers=headers,
                peer=peer,
            )
            if not allowed:
                await self._send_error(conn, writer, 403, "forbidden")
                raise _Close()
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                await self._send_error(conn, writer, 413, f"request body over {self.max_body} bytes")
                raise _Close()

            if conn.they_are_waiting_for_100_continue:  # curl does this for bodies over 1 KiB
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                await self._drain(writer)

            chunks: list[bytes] = []
            size = 0
            while True:
                event = await next_event()
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self.max_body:  # chunked bodies have no declared length
                        await self._send_error(conn, writer, 413, f"request body over {self.max_body} bytes")
                        raise _Close()
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise _Close()  # connection closed mid-body
            request.body = b"".join(chunks)

            try:
                response = await self.handler(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Type and place only: the message or traceback text could
                # quote the request body.
                frame = traceback.extract_tb(exc.__traceback__)[-1:] or None
                where = f"{os.path.basename(frame[0].filename)}:{frame[0].lineno}" if frame else "?"
                self._log.error(
                    "http handler failed",
                    method=request.method,
                    path=request.path.split("?", 1)[0],
                    error=type(exc).__name__,
                    where=where,
                )
                response = Response.json(500, {"error": "internal error"})
            # At the cap, keep-alive ends: the slot goes to whoever waits in the backlog.
            await self._send(
                conn, writer, response, head=request.method == "HEAD", close=len(self._conns) >= self.max_connections
            )

            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                raise _Close()
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                raise _Close() from None
            if conn.trailing_data[0]:  # the next request is already here (pipelined)
                deadline, started = loop.time() + self.request_timeout, True
            else:
                deadline, started = None, False

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """A response leaves within ``request_timeout``, read or not.

        Nothing left in the transport's buffer (the usual case: the kernel
        took it all at write()): it has left, and no timer is armed.
        """
        if not writer.transport.get_write_buffer_size() and not writer.transport.is_closing():
            return
        async with asyncio.timeout(self.request_timeout):
            await writer.drain()

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: Response,
        close: bool = False,
        head: bool = False,
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
        ]
        if close:
            headers.append(("Connection", "close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
        if response.body and not head:  # a HEAD answer has the headers only
            out += conn.send(h11.Data(data=response.body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await self._drain(writer)

    async def _send_error(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        # After a protocol error h11 can only send a response if it has not
        # started one; otherwise the connection just closes.
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send(conn, writer, Response.json(status, {"error": reason}), close=True)
        except (h11.LocalProtocolError, ConnectionError, TimeoutError):
            pass
