"""A plain HTTP client for the agent's control socket (GET only), for tests."""

from __future__ import annotations

import http.client
import socket


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def get(path: str, route: str) -> tuple[int, bytes, str]:
    conn = UnixHTTPConnection(path)
    conn.request("GET", route)
    resp = conn.getresponse()
    return resp.status, resp.read(), resp.getheader("Content-Type")
