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
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Awaitable, Callable
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

    def __new__(cls, pid: int, uid: int, gid: int, groups=None) -> "PeerCred":
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
        return list(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
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
    def json(cls, status: int, obj: Any) -> "Response":
        return cls(status, json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def text(cls, status: int, text: str,
             content_type: str = "text/plain; version=0.0.4") -> "Response":
        # The default is the Prometheus text exposition format's type.
        return cls(status, text.encode(), content_type)

    def __repr__(self) -> str:  # the body may be a secret packet
        return f"Response(status={self.status}, body=<{len(self.body)} bytes>, content_type={self.content_type!r})"


@dataclass
class Request:
    method: str
    path: str                      # the request target, query included
    headers: dict[str, str]        # names lower-case
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


async def request_json(method: str, url: str, body: dict | None, *, timeout: float,
                       unix_path: str | None = None) -> tuple[int, Any]:
    """One HTTP request with a JSON body; returns ``(status, parsed JSON)``.

    The parsed JSON is ``None`` when the response body is not JSON.  With
    ``unix_path`` the request goes to that unix socket (the URL still gives
    the target).  The whole exchange, connect included, is bounded by
    ``timeout``.  Raises :class:`HttpError` with a one-line reason.
    """
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


async def _exchange(method: str, host: str, port: int, target: str, body: dict | None,
                    unix_path: str | None) -> tuple[int, Any]:
    if unix_path is not None:
        reader, writer = await asyncio.open_unix_connection(unix_path)
        host_header = "localhost"
    else:
        reader, writer = await asyncio.open_connection(host, port)
        host_header = _host_header(host, port)
    try:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = [("Host", host_header), ("Connection", "close"),
                   ("Accept", "application/json"), ("Content-Length", str(len(payload)))]
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
        return status, parsed
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# --------------------------------------------------------------------------
# server

def _reason(status: int) -> bytes:
    from http import HTTPStatus

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
        return PeerCred(*UCRED.unpack(raw), groups=_peer_groups(sock))
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple):
        return tuple(peername[:2])
    return peername


class _Close(Exception):
    """End this connection quietly."""


@dataclass
class HttpServer:
    """Serve ``handler`` over HTTP/1.1 on TCP and/or unix sockets.

    The handler sees every request the peer is allowed to make, 404s
    included.  The server itself answers 400 (unparseable request), 403
    (``allow_peer`` said no), 413 (body over ``max_body``) and 500 (the
    handler raised), each as JSON ``{"error": ...}``.
    """

    handler: Handler
    _: KW_ONLY
    max_body: int = 1 << 20
    allow_peer: Callable[[object], bool] | None = None
    # A connection that sends nothing for this long is closed (keep-alive
    # idle time and slow senders alike).
    idle_timeout: float = 60.0
    _servers: list[asyncio.AbstractServer] = field(default_factory=list, init=False)
    _tasks: set[asyncio.Task] = field(default_factory=set, init=False)
    _unix_paths: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._log = get_logger("keyagent.http")

    async def start_tcp(self, host: str, port: int) -> tuple[str, int]:
        server = await asyncio.start_server(self._on_connect, host, port)
        self._servers.append(server)
        addr = server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def start_unix(self, path: str, mode: int = 0o600) -> None:
        """Listen on ``path``; its mode is set before anyone can connect.

        The socket is bound, chmod-ed, and only then listens: a connect
        before ``listen()`` is refused, so there is no window in which the
        socket is reachable with the umask's mode.  A stale socket at
        ``path`` is replaced; any other file there is an error.
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
            server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._servers.append(server)
        self._unix_paths.append(path)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    # -- one connection -----------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (_Close, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # pragma: no cover - a bug in this module
            self._log.error("http connection failed", error=type(exc).__name__)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        peer = _peer_of(writer)
        allowed = self.allow_peer is None or bool(self.allow_peer(peer))

        async def next_event() -> Any:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._send_error(conn, writer, exc.error_status_hint or 400, "bad request")
                    raise _Close() from None
                if event is not h11.NEED_DATA:
                    return event
                data = await asyncio.wait_for(reader.read(READ_CHUNK), self.idle_timeout)
                conn.receive_data(data)

        while True:
            event = await next_event()
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 ordering
                raise _Close()
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            request = Request(method=event.method.decode("ascii", "replace"),
                              path=event.target.decode("latin-1"),
                              headers=headers, peer=peer)
            if not allowed:
                await self._send_error(conn, writer, 403, "forbidden")
                raise _Close()
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                await self._send_error(conn, writer, 413, f"request body over {self.max_body} bytes")
                raise _Close()

            if conn.they_are_waiting_for_100_continue:  # curl does this for bodies over 1 KiB
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                await writer.drain()

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
                self._log.error("http handler failed", method=request.method,
                                path=request.path.split("?", 1)[0],
                                error=type(exc).__name__, where=where)
                response = Response.json(500, {"error": "internal error"})
            await self._send(conn, writer, response, head=request.method == "HEAD")

            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                raise _Close()
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                raise _Close() from None

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                    response: Response, close: bool = False, head: bool = False) -> None:
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))),
                   ("Cache-Control", "no-store")]
        if close:
            headers.append(("Connection", "close"))
        out = conn.send(h11.Response(status_code=response.status, headers=headers,
                                     reason=_reason(response.status)))
        if response.body and not head:  # a HEAD answer has the headers only
            out += conn.send(h11.Data(data=response.body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()

    async def _send_error(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                          status: int, reason: str) -> None:
        # After a protocol error h11 can only send a response if it has not
        # started one; otherwise the connection just closes.
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send(conn, writer, Response.json(status, {"error": reason}), close=True)
        except (h11.LocalProtocolError, ConnectionError):
            pass
