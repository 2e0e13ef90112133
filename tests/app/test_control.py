"""The control socket over a real unix socket: routes, metrics, refused peers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

import pytest

from agent.app.control import ControlServer, access_for, peer_check, resolve_ref
from agent.app.metrics import Metrics
from agent.app.offloop import OffLoop
from agent.common.errors import ControlError, UsageError
from agent.io.http import PeerCred
from agent.io.secretref import NOBODY, NOT_ALLOWED, UNRESTRICTED
from tests.control_client import UnixHTTPConnection, get


async def read_ref(args):
    """A verb that resolves a reference the way secret add and migrate do."""
    try:
        secret = await resolve_ref(args["ref"], "secret")
    except UsageError as exc:
        raise ControlError(400, str(exc)) from None
    return {"length": len(secret)}


class FakeSidecar:
    def __init__(self) -> None:
        self.metrics = Metrics()

    def status(self):
        return {"vm": "vm1", "qmp": "connected", "flows": {}}

    def control_verbs(self):
        return {("POST", "/v1/echo"): lambda args: {"echo": args}, ("POST", "/v1/ref"): read_ref}


@pytest.fixture(params=[False, True], ids=["on-loop", "off-loop"])
def server(tmp_path, request):
    path = str(tmp_path / "control.sock")
    sidecar = FakeSidecar()
    loop = asyncio.new_event_loop()
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "k").write_bytes(b"group key")
    srv = ControlServer(sidecar, path, gid=4242, ref_dirs=(os.path.realpath(refs),))
    # off the loop: keyagent host's batched worker thread
    loop.run_until_complete(srv.start(off_loop=OffLoop() if request.param else None))
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
    conn.request("POST", "/v1/echo", body=json.dumps({"a": 1}), headers={"Content-Type": "application/json"})
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
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("keyagent_flows_started_total", (("kind", "sev-launch"),))] == 2
    assert samples[("keyagent_flows_finished_total", (("kind", "sev-launch"), ("result", "failed")))] == 1
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


def as_user(path: str, uid: int, gid: int, extra_groups: list[int] | None = None) -> str:
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("no /usr/bin/python3 to run a client as another user")
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", CLIENT, path],
        user=uid,
        group=gid,
        extra_groups=extra_groups or [],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


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


def test_the_configured_group_counts_as_a_supplementary_group_too():
    allow = peer_check(4242)
    assert allow(PeerCred(1, 65534, 4242, groups=()))
    assert allow(PeerCred(1, 65534, 100, groups={100, 4242}))  # SO_PEERCRED gives only 100
    assert not allow(PeerCred(1, 65534, 100, groups={100}))
    assert not allow(PeerCred(1, 65534, 100, groups=None))  # kernel could not tell: primary only
    assert not peer_check(None)(PeerCred(1, 65534, 4242, groups={4242}))


def test_only_our_uid_and_root_resolve_any_reference():
    assert access_for((1, os.geteuid(), 1)) is UNRESTRICTED
    assert access_for((1, 0, 0)) is UNRESTRICTED
    other = access_for(PeerCred(1, 65534, 100, groups={4242}), ("/etc/keyagent/refs",))
    assert not other.unrestricted and other.groups == {100, 4242}
    assert other.ref_dirs == ("/etc/keyagent/refs",) and other.uid == 65534
    assert access_for(("127.0.0.1", 80)) is NOBODY


async def test_a_reference_outside_a_control_request_is_refused(tmp_path):
    (tmp_path / "k").write_bytes(b"k")
    with pytest.raises(UsageError, match=NOT_ALLOWED):
        await resolve_ref(f"file:{tmp_path / 'k'}", "secret")


POST_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
body = json.dumps({"ref": sys.argv[2]}).encode()
s.sendall(b"POST /v1/ref HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
          b"Content-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
data = b""
while b"}" not in data:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
head, _, rest = data.partition(b"\\r\\n\\r\\n")
print(head.split(b" ")[1].decode(), rest.decode())
"""


def post_ref(path: str, ref: str, **user) -> tuple[int, dict]:
    """POST /v1/ref from a separate process, as another user if asked."""
    python = sys.executable
    if user:
        if not os.path.exists(SYSTEM_PYTHON):
            pytest.skip("no /usr/bin/python3 to run a client as another user")
        python = SYSTEM_PYTHON
    out = subprocess.run([python, "-c", POST_CLIENT, path, ref], capture_output=True, text=True, timeout=30, **user)
    status, _, body = out.stdout.strip().partition(" ")
    assert status.isdigit(), out.stderr
    return int(status), json.loads(body)


def open_path_to(tmp_path) -> None:
    for d in (tmp_path, *tmp_path.parents):  # let the other user reach the socket
        if d == d.parent:
            break
        os.chmod(d, os.stat(d).st_mode | 0o711)


@needs_root
def test_a_supplementary_member_of_the_group_is_let_in(server, tmp_path):
    path, _ = server
    open_path_to(tmp_path)
    assert as_user(path, 65534, 65534, extra_groups=[4242]).endswith("200 OK")


@needs_root
def test_a_group_peer_cannot_make_the_agent_read_files_outside_ref_dirs(server, tmp_path):
    path, _ = server
    open_path_to(tmp_path)
    outside = tmp_path / "outside.key"
    outside.write_bytes(b"root's")
    group_peer = dict(user=65534, group=4242, extra_groups=[])
    for ref in (
        "file:/etc/shadow",
        "file:/proc/self/environ",
        f"file:{outside}",
        "file:/etc/no-such-file",
        "keyring:keyagent:vm1:master",
    ):
        assert post_ref(path, ref, **group_peer) == (400, {"error": NOT_ALLOWED}), ref
    inside = f"file:{tmp_path / 'refs' / 'k'}"
    assert post_ref(path, inside, **group_peer) == (200, {"length": 9})
    # Our own uid (and root) keep every reference.
    assert post_ref(path, f"file:{outside}") == (200, {"length": 6})


def test_a_stale_control_socket_is_free_and_a_live_one_is_not(tmp_path):
    from agent.app.control import check_socket_free

    path = str(tmp_path / "c.sock")
    check_socket_free(path)  # nothing there
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # what a SIGKILLed agent leaves: bound, nobody listening
    try:
        check_socket_free(path)
        s.listen(1)
        with pytest.raises(UsageError, match="in use by another agent"):
            check_socket_free(path)
    finally:
        s.close()


async def test_migrate_and_secret_verbs_resolve_references_within_the_peers_rights(tmp_path):
    from agent.app import control
    from agent.app.verbs.migrate import MigrationControl
    from agent.app.verbs.secrets import SecretsControl
    from agent.io.secretref import RefAccess

    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    token = control._ACCESS.set(RefAccess(unrestricted=False, uid=65534, groups=frozenset({4242})))
    try:
        for call in (
            MigrationControl._psk_from_ref({"psk_ref": f"file:{key}"}),
            SecretsControl(None).add({"id": "s0", "ref": f"file:{key}"}),
        ):
            with pytest.raises(ControlError) as info:
                await call
            assert (info.value.status, info.value.error) == (400, NOT_ALLOWED)
    finally:
        control._ACCESS.reset(token)
    token = control._ACCESS.set(UNRESTRICTED)
    try:
        assert len(await MigrationControl._psk_from_ref({"psk_ref": f"file:{key}"})) == 32
    finally:
        control._ACCESS.reset(token)


async def test_a_socket_made_off_the_loop_for_a_vm_stopped_meanwhile_is_closed_and_removed(tmp_path, monkeypatch):
    import threading

    from agent.app import control
    from agent.io.http import bind_unix

    path = str(tmp_path / "control.sock")
    made, release = [], threading.Event()

    def slow_bind(*args):
        release.wait(5)
        made.append(bind_unix(*args))
        return made[-1]

    monkeypatch.setattr(control, "bind_unix", slow_bind)
    srv = ControlServer(FakeSidecar(), path)
    task = asyncio.ensure_future(srv.start(off_loop=OffLoop()))
    await asyncio.sleep(0.01)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if made and made[0].fileno() == -1:
            break
        await asyncio.sleep(0.01)
    assert made[0].fileno() == -1 and not os.path.exists(path)
