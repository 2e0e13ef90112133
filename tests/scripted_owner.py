"""A guest owner over real HTTP that answers from a script, for retry tests.

Each request gets the next ``(status, body, headers)`` of the script (the
last one again once the script runs out) and is recorded with its arrival
time (the loop's clock), path and JSON body.  Raw asyncio streams, not
``agent.io.http``'s server: the tests need headers (``Retry-After``) that
the agent's own server never sends.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

Answer = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class Seen:
    at: float
    path: str
    body: Any


@dataclass
class ScriptedOwner:
    script: list[Answer]
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> ScriptedOwner:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            raw = await reader.readexactly(length) if length else b""
            self.seen.append(Seen(asyncio.get_running_loop().time(), path, json.loads(raw) if raw else None))
            status, body, headers = self.script.pop(0) if len(self.script) > 1 else self.script[0]
            payload = json.dumps(body).encode()
            out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(payload)}", "Content-Type: application/json"]
            out += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def refusing_url() -> str:
    """A URL where nothing listens: every connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
