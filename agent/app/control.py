"""The control socket: ``keyagent ctl`` verbs and health probes over HTTP.

A unix socket in the run_dir, mode 0600, answering JSON.  Only peers with
the agent's uid, or root, may talk to it (SO_PEERCRED), and, with
``[control] gid``, members of that group (primary or supplementary: the
socket is then 0660 with that group).  A group member is less trusted than
the agent's own uid: the references it names (``--file``, ``--psk-file``,
``--ref``) are resolved with :data:`agent.io.secretref.RefAccess` limits,
only below ``[control] ref_dirs``.  Routes:

* ``GET /v1/status``: what the agent and its flows are doing (``ctl status``);
* ``GET /healthz``: the agent process is alive;
* ``GET /readyz``: QMP is connected (Kubernetes readiness);
* ``GET /metrics``: Prometheus text format (see ``agent.app.metrics``);
* ``POST /v1/migrate/{prepare,begin,accept,start,wait,cancel}``: JSON
  arguments in, JSON out (see ``agent.app.verbs.migrate``).

The routes and answer shapes are :mod:`agent.protocol.control`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from agent.app.flowhost import ControlHost
from agent.common.errors import UsageError
from agent.common.secret import Secret
from agent.io.http import HttpError, HttpServer, InvalidJson, PeerCred, Request, Response, bind_unix
from agent.io.secretref import NOBODY, UNRESTRICTED, RefAccess, resolve_async
from agent.protocol import control as wire

# The RefAccess of the control request being served, for the verbs that
# resolve references (set around each handler call; NOBODY outside one).
_ACCESS: contextvars.ContextVar[RefAccess] = contextvars.ContextVar("keyagent_ref_access", default=NOBODY)


def _groups(peer: tuple) -> frozenset[int]:
    if isinstance(peer, PeerCred):
        return peer.all_groups()
    return frozenset({peer[2]})


def _trusted(peer: tuple) -> bool:
    return peer[1] in (0, os.geteuid())


def peer_check(gid: int | None = None):
    """SO_PEERCRED: our uid, root, or (when configured) one group, which the
    peer may have as its primary or as a supplementary group."""

    def allow_peer(peer: object) -> bool:
        if not isinstance(peer, tuple) or len(peer) != 3:
            return False
        return _trusted(peer) or (gid is not None and gid in _groups(peer))

    return allow_peer


allow_peer = peer_check()
CONTROL_MAX_CONNECTIONS = 32


def access_for(peer: object, ref_dirs: tuple[str, ...] = ()) -> RefAccess:
    """What references ``peer`` may name: anything for our uid and root;
    files below ``ref_dirs`` for everyone else."""
    if not isinstance(peer, tuple) or len(peer) != 3:
        return NOBODY
    if _trusted(peer):
        return UNRESTRICTED
    return RefAccess(unrestricted=False, uid=peer[1], groups=_groups(peer), ref_dirs=tuple(ref_dirs))


async def resolve_ref(ref: str, what: str) -> Secret:
    """Resolve a reference a control peer sent, within that peer's rights.

    Runs off the event loop under a deadline; a UsageError (one line) for
    anything refused.  Outside a control request nothing is allowed.
    """
    return await resolve_async(ref, what, _ACCESS.get())


def check_socket_free(path: str) -> None:
    """Refuse (exit 2) a control socket path where another agent listens.

    The server replaces a stale socket at its path; a live one belongs to a
    running agent (same ``--control`` given twice), which must keep it.  The
    probe is a non-blocking connect: it never waits on the other side.
    """
    import errno
    import socket
    import stat

    from agent.common.errors import UsageError

    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # HttpServer refuses a non-socket there with its own message
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        code = probe.connect_ex(path)
    finally:
        probe.close()
    if code in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise UsageError(f"control socket {path} is in use by another agent")


async def close_and_unlink(server: HttpServer, path: str) -> None:
    """Stop serving a control socket and remove its file (gone already is
    fine): a sidecar's socket and ``keyagent host``'s alike."""
    await server.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ControlServer:
    def __init__(self, host: ControlHost, path: str, gid: int | None = None, ref_dirs: tuple[str, ...] = ()) -> None:
        self.host = host
        self.path = path
        self.gid = gid
        self.ref_dirs = tuple(ref_dirs)
        # A few ctl calls and probes at a time; ``migrate wait`` holds one for
        # minutes.  More wait in the listen backlog; every request's head
        # and body must arrive within 10 s (HttpServer's default).
        self.server = HttpServer(
            self.handle, allow_peer=peer_check(gid), max_body=256 * 1024, max_connections=CONTROL_MAX_CONNECTIONS
        )

    async def start(self, off_loop: Callable[..., Awaitable[Any]] | None = None) -> None:
        """Listen; a path that cannot be bound is a UsageError (one line, exit 2).

        The sidecar's preflight refuses these before anything is created;
        this is the wall for what changed on disk in between.  ``off_loop``
        (``keyagent host``: :class:`agent.app.offloop.OffLoop`, one loop for
        every VM): the socket is made on a worker thread, so that its
        file-system calls (0.1-0.4 ms under load) do not hold up the other VMs.
        """
        # 0600, or 0660 for the configured group, so that it can connect at all.
        mode = 0o600 if self.gid is None else 0o660
        try:
            bound = await self._bind_off_loop(off_loop, mode) if off_loop is not None else None
            await self.server.start_unix(self.path, mode=mode, bound=bound)
        except HttpError as exc:
            raise UsageError(f"control socket: {exc}") from None
        except OSError as exc:
            raise UsageError(
                f"cannot listen on control socket {self.path}: {exc.strerror or type(exc).__name__}"
            ) from None
        if self.gid is not None:
            try:
                os.chown(self.path, -1, self.gid)
            except (OSError, OverflowError) as exc:
                await self.close()
                raise UsageError(
                    f"cannot give control socket {self.path} to group {self.gid}: "
                    f"{getattr(exc, 'strerror', None) or exc}"
                ) from None

    async def _bind_off_loop(self, off_loop: Callable[..., Awaitable[Any]], mode: int) -> socket.socket:
        made = asyncio.ensure_future(off_loop(bind_unix, self.path, mode, self.server.backlog))
        try:
            return await asyncio.shield(made)
        except asyncio.CancelledError:  # the VM stopped meanwhile: nobody will serve what the thread makes
            made.add_done_callback(self._discard)
            raise

    def _discard(self, made: asyncio.Future[socket.socket]) -> None:
        if made.cancelled() or made.exception() is not None:
            return
        made.result().close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def close(self) -> None:
        await close_and_unlink(self.server, self.path)

    async def handle(self, request: Request) -> Response:
        route = (request.method, request.path.split("?", 1)[0])
        if route == wire.HEALTHZ:
            return Response.json(200, wire.health_body())
        if route == wire.READYZ:
            return Response.json(*wire.ready_answer(self.host.status()["qmp"] == "connected"))
        if route == wire.METRICS:
            body, content_type = self.host.metrics.render()
            return Response(200, body, content_type)
        if route == wire.STATUS:
            return Response.json(200, self.host.status())
        handler = self.host.control_verbs().get(route)
        if handler is not None:
            return await self._call(handler, request)
        return Response.json(404, wire.not_found(request.method, route[1]))

    async def _call(self, handler, request: Request) -> Response:
        from agent.common.errors import ControlError

        try:
            args = request.json() if request.body else {}
        except InvalidJson as exc:
            return Response.json(wire.BAD_REQUEST, wire.error_body(str(exc)))
        if not isinstance(args, dict):
            return Response.json(wire.BAD_REQUEST, wire.error_body("request body must be a JSON object"))
        token = _ACCESS.set(access_for(request.peer, self.ref_dirs))
        try:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await result
        except ControlError as exc:
            return Response.json(exc.status, wire.error_body(exc.error))
        finally:
            _ACCESS.reset(token)
        status, body = result if isinstance(result, tuple) else (200, result)
        return Response.json(status, body)
