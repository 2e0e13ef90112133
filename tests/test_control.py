"""The control socket over a real unix socket: routes, metrics, refused peers."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess

import pytest

from agent.control import ControlServer
from agent.metrics import Metrics


class FakeSidecar:
    def __init__(self) -> None:
        self.metrics = Metrics()

    def status(self):
        return {"vm": "vm1", "qmp": "connected", "flows": {}}

    def control_verbs(self):
        return {("POST", "/v1/echo"): lambda args: {"echo": args}}


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


@pytest.fixture
def server(tmp_path):
    path = str(tmp_path / "control.sock")
    sidecar = FakeSidecar()
    loop = asyncio.new_event_loop()
    srv = ControlServer(sidecar, path, gid=4242)
    loop.run_until_complete(srv.start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield path, sidecar
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.run_until_complete(srv.close())
    loop.close()


def test_health_ready_status_and_verbs(server):
    path, _ = server
    assert get(path, "/healthz")[0] == 200
    assert get(path, "/readyz")[0] == 200
    assert json.loads(get(path, "/v1/status")[1])["vm"] == "vm1"
    conn = UnixHTTPConnection(path)
    conn.request("POST", "/v1/echo", body=json.dumps({"a": 1}),
                 headers={"Content-Type": "application/json"})
    assert json.loads(conn.getresponse().read()) == {"echo": {"a": 1}}
    assert get(path, "/nope")[0] == 404


def test_metrics_parse_with_prometheus_clients_parser(server):
    from prometheus_client.parser import text_string_to_metric_families

    path, sidecar = server
    m = sidecar.metrics
    m.flow_started("sev-launch")
    m.flow_finished("sev-launch", 0, 0.012)
    m.flow_started("sev-launch")
    m.flow_finished("sev-launch", 1, 0.5)
    m.secrets_added = 3
    status, body, ctype = get(path, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("keyagent_flows_started_total", (("kind", "sev-launch"),))] == 2
    assert samples[("keyagent_flows_finished_total",
                    (("kind", "sev-launch"), ("result", "failed")))] == 1
    assert samples[("keyagent_secrets_added_total", ())] == 3
    assert samples[("keyagent_attestation_seconds_count", ())] == 1
    assert samples[("keyagent_attestation_seconds_bucket", (("le", "0.025"),))] == 1


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")

CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
print(s.recv(100).split(b"\\r\\n")[0].decode())
"""


# Another user cannot run the venv's interpreter when it lives under /root.
SYSTEM_PYTHON = "/usr/bin/python3"


def as_user(path: str, uid: int, gid: int) -> str:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no /usr/bin/python3 to run a client as another user")
    return subprocess.run([SYSTEM_PYTHON, "-c", CLIENT, path], user=uid, group=gid,
                          extra_groups=[], capture_output=True, text=True, timeout=30).stdout.strip()


@needs_root
def test_socket_mode_and_group(server):
    path, _ = server
    st = os.stat(path)
    assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == 4242


@needs_root
def test_other_users_are_refused_and_the_configured_group_is_let_in(server, tmp_path):
    path, _ = server
    for d in (tmp_path, *tmp_path.parents):  # let the other user reach the socket
        if d == d.parent:
            break
        os.chmod(d, os.stat(d).st_mode | 0o711)
    assert as_user(path, 65534, 65534) == "EACCES"  # file mode: not even a connect
    assert as_user(path, 65534, 4242).endswith("200 OK")  # the configured group
    os.chmod(path, 0o666)  # let the kernel connect anyone: SO_PEERCRED still says no
    assert as_user(path, 65534, 65534).endswith("403 Forbidden")
