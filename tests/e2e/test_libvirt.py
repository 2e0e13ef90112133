"""``keyagent run --libvirt``: a real libvirtd 9.0 running a TCG QEMU domain, and SEV on fakes.

What is real here: libvirtd (started by a session fixture, as root, with its
own sockets in a temporary directory), QEMU 7.2 under it, libvirt-python
with libvirtaio in the agent, QEMU's events through
``qemuMonitorEventRegister``, lifecycle events, ``qemuMonitorCommand``
passthrough.  The agent adds an encrypted secret object that then unlocks a
real LUKS image inside the libvirt domain, and refuses (and destroys) a
domain without SEV.

What cannot be real: SEV (no hardware).  ``launchSecurityInfo`` /
``setLaunchSecurityState`` / ``resume`` are exercised end to end with the
real owner service over HTTP and the whole sidecar, against a fake libvirt
domain backed by the simulator's QEMU + PSP model (tests/io/test_libvirt_monitor.py
has the fake).

The libvirtd fixture needs root and the Debian packages libvirt-daemon,
libvirt-daemon-driver-qemu and libvirt-clients (and libvirt-python in the
venv); it skips with the reason otherwise.  It writes /etc/libvirt/qemu.conf
(run QEMU as root, no security driver, no cgroups, QEMU's output to a file
so that virtlogd is not needed) and puts the previous file back afterwards,
and creates the ``libvirt-qemu`` system user if it is missing: libvirtd
looks that user up before it reads qemu.conf.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.harness import World, ctl, wait_for
from tests.e2e.qemu import QEMU, make_luks
from tests.leakscan import ArgvWatcher, LeakScan

LIBVIRTD = shutil.which("libvirtd") or ("/usr/sbin/libvirtd" if os.path.exists("/usr/sbin/libvirtd") else None)
VIRSH = shutil.which("virsh")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
OUR_QEMU_CONF = """# written by keyagent's tests (tests/e2e/test_libvirt.py) while they run
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""
PASSPHRASE = "libvirt LUKS passphrase " + os.urandom(6).hex()


def _why_no_libvirtd() -> str | None:
    if os.geteuid() != 0:
        return "a system libvirtd needs root"
    if LIBVIRTD is None or VIRSH is None:
        return (
            "libvirtd/virsh not installed (apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)"
        )
    if QEMU is None:
        return "qemu-system-x86_64 is not installed"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install '.[libvirt]')"
    return None


class Libvirtd:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sock_dir = tmp / "sock"
        self.log = tmp / "libvirtd.log"
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        self.domains: list[str] = []

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=60)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    def create(self, name: str) -> str:
        """A transient TCG q35 domain, started paused (QEMU at -S, as for SEV)."""
        xml = self.tmp / f"{name}.xml"
        xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>{QEMU}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>""")
        self.virsh("create", str(xml), "--paused")
        self.domains.append(name)
        return name

    def qmp(self, name: str, command: str, args: dict | None = None):
        msg = {"execute": command, **({"arguments": args} if args else {})}
        reply = json.loads(self.virsh("qemu-monitor-command", name, json.dumps(msg)).stdout)
        if "error" in reply:
            raise AssertionError(reply["error"])
        return reply["return"]

    def state(self, name: str) -> str:
        out = self.virsh("domstate", name, check=False)
        return out.stdout.strip() if out.returncode == 0 else "gone"

    def qemu_log(self, name: str) -> Path:
        return Path("/var/log/libvirt/qemu") / f"{name}.log"


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory):
    why = _why_no_libvirtd()
    if why:
        pytest.skip(why)
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        made = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                "libvirt-qemu",
            ],
            capture_output=True,
            text=True,
        )
        assert made.returncode == 0, made.stderr
    tmp = tmp_path_factory.mktemp("libvirtd")
    d = Libvirtd(tmp)
    d.sock_dir.mkdir()
    conf = tmp / "libvirtd.conf"
    # Our own sockets; QEMU monitor traffic logged at debug, so the leak scan
    # can prove that no plaintext secret ever reaches libvirtd.
    conf.write_text(
        f'unix_sock_dir = "{d.sock_dir}"\nunix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
        f'log_outputs = "1:file:{d.log}"\n'
        'log_filters = "1:qemu.qemu_monitor 3:*"\n'
    )
    saved = QEMU_CONF.read_bytes() if QEMU_CONF.exists() else None
    QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
    QEMU_CONF.write_text(OUR_QEMU_CONF)
    for path in ("/var/log/libvirt/qemu", "/run/libvirt", "/var/lib/libvirt/qemu"):
        os.makedirs(path, exist_ok=True)
    proc = subprocess.Popen(
        [LIBVIRTD, "-f", str(conf), "-p", str(tmp / "libvirtd.pid")],
        stdin=subprocess.DEVNULL,
        stdout=open(tmp / "libvirtd.out", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail("libvirtd exited: " + (tmp / "libvirtd.out").read_text()[-2000:])
            if d.virsh("version", check=False).returncode == 0:
                break
            assert time.monotonic() < deadline, "libvirtd did not come up in 60 s"
            time.sleep(0.1)
        yield d
    finally:
        for name in d.domains:
            d.virsh("destroy", name, check=False)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if saved is None:
            QEMU_CONF.unlink(missing_ok=True)
        else:
            QEMU_CONF.write_bytes(saved)


_names = iter(range(1000))


def domain_name() -> str:
    return f"keyagent-lv-{os.getpid()}-{next(_names)}"


# -- the agent as a process, against libvirtd ---------------------------------------------


def test_agent_secret_unlocks_luks_inside_a_libvirt_domain(libvirtd, tmp_path):
    world = World(tmp_path)
    (tmp_path / "pass.txt").write_text(PASSPHRASE)
    make_luks(tmp_path / "disk.luks", tmp_path / "pass.txt")
    name = libvirtd.create(domain_name())
    run_dir = tmp_path / "run"
    control = run_dir / "control.sock"
    scan = LeakScan()
    scan.secret("passphrase", PASSPHRASE.encode())
    with ArgvWatcher() as argv:
        scan.argv = argv
        try:
            agent = world.spawn(
                "agent",
                [
                    "run",
                    "--libvirt",
                    libvirtd.uri,
                    "--domain",
                    name,
                    "--vm-name",
                    "lv1",
                    "--vm-run-dir",
                    str(run_dir),
                    "--secrets-master-key",
                    "file",
                    "--event-log",
                    str(tmp_path / "events.jsonl"),
                    "--log-level",
                    "debug",
                ],
            )
            wait_for(
                lambda: ctl(control, "status").returncode == 0 or agent.popen.poll() is not None,
                timeout=20,
                what="agent",
            )
            assert agent.popen.poll() is None, agent.stderr
            out = ctl(control, "secret", "add", "--id", "luks0", "--file", str(tmp_path / "pass.txt"))
            assert out.returncode == 0, out.stderr + agent.stderr
            # QEMU (under libvirt) holds ciphertext under the master key, and it opens LUKS.
            assert PASSPHRASE not in libvirtd.qmp(name, "qom-get", {"path": "/objects/luks0", "property": "data"})
            assert (
                libvirtd.qmp(
                    name,
                    "blockdev-add",
                    {
                        "driver": "luks",
                        "node-name": "disk0",
                        "key-secret": "luks0",
                        "file": {"driver": "file", "filename": str(tmp_path / "disk.luks")},
                    },
                )
                == {}
            )
            assert [p.name for p in run_dir.rglob("*")] == ["control.sock"]
            libvirtd.virsh("resume", name)
            libvirtd.virsh("destroy", name)
            # The sidecar lives as long as its VM: the domain's end is its end.
            assert agent.wait(20) == 0, agent.stderr
        finally:
            world.close()
    assert '"libvirt connected"' in agent.stderr and '"monitor_events": true' in agent.stderr
    assert "the domain was destroyed" in agent.stderr
    scan.text("agent stderr", agent.stderr)
    scan.file(str(tmp_path / "events.jsonl"))
    scan.file(str(libvirtd.log))
    scan.file(str(libvirtd.qemu_log(name)))
    scan.dirs.append(str(run_dir))
    scan.check()
    # The passthrough really went through libvirtd (and is in its debug log as ciphertext).
    assert '"object-add"' in libvirtd.log.read_text(errors="replace")


def test_sev_launch_on_a_domain_without_sev_is_refused_and_destroyed(libvirtd, tmp_path):
    world = World(tmp_path)
    name = libvirtd.create(domain_name())
    try:
        agent = world.spawn(
            "agent",
            [
                "run",
                "--libvirt",
                libvirtd.uri,
                "--domain",
                name,
                "--vm-name",
                "lv2",
                "--owner-url",
                "http://127.0.0.1:9",
                "--event-log",
                str(tmp_path / "events.jsonl"),
                "--log-level",
                "debug",
            ],
        )
        assert agent.wait(30) == 1, agent.stderr
    finally:
        world.close()
    assert "SEV is not enabled for this VM" in agent.stderr
    assert libvirtd.state(name) == "gone"  # quit -> virDomainDestroy of a transient domain
    log = (tmp_path / "events.jsonl").read_text()
    for command in ("query-status", "query-sev", "quit"):
        assert f'"{command}"' in log
    assert '"cont"' not in log


def test_bad_domain_is_a_one_line_failure(libvirtd, tmp_path):
    from tests.e2e.harness import KEYAGENT

    out = subprocess.run(
        [*KEYAGENT, "run", "--libvirt", libvirtd.uri, "--domain", "no-such-vm", "--qmp-timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "no-such-vm" in out.stderr and "Traceback" not in out.stderr


# -- LibvirtConnection in-process, against libvirtd ------------------------------------------


class Sink:
    """A unix socket that swallows a migration stream (QEMU's exec: is seccomp-denied)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.received = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                self.received += len(chunk)


async def _next_event(conn, timeout: float = 10.0) -> dict:
    return await asyncio.wait_for(anext(aiter(conn.events)), timeout)


async def test_lifecycle_and_migration_events_through_libvirtd(libvirtd, tmp_path):
    from agent.io.libvirt_monitor import open_connection

    name = libvirtd.create(domain_name())
    conn = await open_connection(
        libvirtd.uri, name, "t", events={"RESUME", "STOP", "SHUTDOWN", "MIGRATION"}, timeout=10
    )
    try:
        assert conn.monitor_events and conn.qemu_version.startswith("7.")
        # libvirt starts a domain "paused (user)" where QEMU itself says prelaunch.
        assert (await conn.execute("query-status"))["status"] == "paused"
        assert libvirtd.qmp(name, "query-status")["status"] == "prelaunch"
        assert await conn.execute("query-sev") == {"enabled": False}

        await conn.execute("cont")
        assert (await _next_event(conn))["event"] == "RESUME"
        assert (await conn.execute("query-status"))["status"] == "running"
        await conn.execute("stop")
        assert (await _next_event(conn))["event"] == "STOP"  # once: no lifecycle double

        sink = Sink(tmp_path / "migrate.sock")
        assert await conn.execute("migrate", {"uri": f"unix:{sink.path}"}) == {}
        statuses = []
        while not statuses or statuses[-1] not in ("completed", "failed"):
            msg = await _next_event(conn)
            assert msg["event"] == "MIGRATION"
            statuses.append(msg["data"]["status"])
        assert statuses[0] == "setup" and statuses[-1] == "completed", statuses
        assert (await conn.execute("query-migrate"))["status"] == "completed"
        assert sink.received > 0

        with pytest.raises(Exception) as err:
            await conn.execute("no-such-command")
        assert getattr(err.value, "error_class", None) == "CommandNotFound"

        await conn.execute("quit")
        assert (await _next_event(conn))["data"] == {"guest": False, "reason": "host-signal"}
        assert await asyncio.wait_for(conn.wait_disconnected(), 10) == "the domain was destroyed"
    finally:
        await conn.close()
    assert libvirtd.state(name) == "gone"


# -- SEV end to end, on a fake libvirt domain ---------------------------------------------------


async def _sev_launch(tmp_path: Path, owner_digest: bytes, machine_digest: bytes):
    from agent.app.config import load_config
    from agent.app.sidecar import Sidecar, SidecarOptions
    from agent.io.http import HttpServer
    from agent.io.libvirt_monitor import LibvirtConnection
    from agent.owner.config import load_owner_config
    from agent.owner.service import OwnerService
    from agent.tools.sim.machine import Machine, SimConfig
    from tests.io.fake_libvirt import FakeLibvirt, FakeSevDomain

    tik, tek = os.urandom(16), os.urandom(16)
    (tmp_path / "tik.bin").write_bytes(tik)
    (tmp_path / "tek.bin").write_bytes(tek)
    (tmp_path / "disk.pass").write_bytes(PASSPHRASE.encode())
    (tmp_path / "owner.toml").write_text(
        f'[vm.vm1]\ntik = "tik.bin"\ntek = "tek.bin"\npolicy = 1\n'
        f'digest = "{owner_digest.hex()}"\n'
        f'[[vm.vm1.secret]]\nguid = "luks-key"\nfile = "disk.pass"\n'
    )
    owner = HttpServer(OwnerService(load_owner_config(tmp_path / "owner.toml")).handle)
    host, port = await owner.start_tcp("127.0.0.1", 0)
    lib = FakeLibvirt()
    dom = FakeSevDomain(lib, Machine(SimConfig(tik=tik, tek=tek, digest=machine_digest)))

    class FakeLibvirtSidecar(Sidecar):
        def check(self) -> None:
            pass

        async def open_monitor(self, events):
            return LibvirtConnection.attached(lib, dom, api=lib.api(), events=events)

    cfg = load_config(None, {"vm_name": "vm1", "sev_owner_url": f"http://{host}:{port}", "sev_timeout_s": "10"})
    events = tmp_path / "events.jsonl"
    try:
        code = await FakeLibvirtSidecar(
            cfg, SidecarOptions(qmp_path="", control_path=None, event_log=str(events))
        ).run()
    finally:
        await owner.close()
    return code, lib, dom, events


async def test_sev_launch_through_libvirt_apis_end_to_end(tmp_path, capfd):
    digest = hashlib.sha256(b"libvirt fw").digest()
    code, lib, dom, events = await _sev_launch(tmp_path, digest, digest)
    assert code == 0
    assert [c[0] for c in dom.calls] == ["launchSecurityInfo", "launchSecurityInfo", "setLaunchSecurityState", "resume"]
    params = dom.calls[2][1]
    assert set(params) == {"sev-secret-header", "sev-secret"}  # the firmware's secret area
    assert len(base64.b64decode(params["sev-secret-header"])) == 52
    assert dom.machine.status == "running" and not dom.machine.cont_before_secret
    assert [e.length for e in dom.machine.injected_entries] == [len(PASSPHRASE)]
    assert lib.sent == []  # the SEV flow needs no monitor passthrough
    scan = LeakScan()
    scan.secret("disk passphrase", PASSPHRASE.encode())
    scan.file(str(events))
    out, err = capfd.readouterr()
    scan.text("stdout", out)
    scan.text("stderr", err)
    scan.check()


async def test_sev_refusal_through_libvirt_never_resumes(tmp_path):
    code, lib, dom, _events = await _sev_launch(
        tmp_path, hashlib.sha256(b"expected").digest(), hashlib.sha256(b"tampered").digest()
    )
    assert code == 1
    assert [c[0] for c in dom.calls] == ["launchSecurityInfo", "launchSecurityInfo", "destroy"]
    assert not dom.machine.cont_happened and dom.machine.injections == 0


# -- keyagent host --libvirt: several domains, one agent --------------------------------------


def test_host_mode_serves_several_domains_and_one_domains_end_touches_no_other(libvirtd, tmp_path):
    """``keyagent host --libvirt``: each ``[vm] domain`` file is one domain's
    sidecar in one process; a destroyed domain fails alone; a removed file
    stops its flows and leaves the domain as it is."""
    world = World(tmp_path)
    (tmp_path / "pass.txt").write_text(PASSPHRASE)
    conf, run = tmp_path / "conf", tmp_path / "run"
    conf.mkdir()
    run.mkdir(mode=0o700)
    names = {vm: libvirtd.create(domain_name()) for vm in ("h1", "h2", "h3")}
    for vm, name in names.items():
        (conf / f"{vm}.toml").write_text(
            f'[vm]\ndomain = "{name}"\nrun_dir = "{run / vm}"\n[secrets]\nmaster_key = "file"\n'
        )
    host_sock = tmp_path / "host.sock"
    scan = LeakScan()
    scan.secret("passphrase", PASSPHRASE.encode())

    def vms() -> dict:
        out = ctl(host_sock, "vms", "--json")
        assert out.returncode == 0, out.stderr
        return {v["name"]: v for v in json.loads(out.stdout)["vms"]}

    with ArgvWatcher() as argv:
        scan.argv = argv
        try:
            host = world.spawn(
                "host",
                [
                    "host",
                    "--libvirt",
                    libvirtd.uri,
                    "--config-dir",
                    str(conf),
                    "--control",
                    f"unix:{host_sock}",
                    "--event-log-dir",
                    str(tmp_path),
                    "--log-level",
                    "debug",
                ],
            )
            for vm in names:
                wait_for(
                    lambda vm=vm: (
                        ctl(run / vm / "control.sock", "ready").returncode == 0 or host.popen.poll() is not None
                    ),
                    timeout=30,
                    what=f"{vm}'s control socket",
                )
            assert host.popen.poll() is None, host.stderr
            out = ctl(
                run / "h1" / "control.sock", "secret", "add", "--id", "luks0", "--file", str(tmp_path / "pass.txt")
            )
            assert out.returncode == 0, out.stderr + host.stderr
            assert PASSPHRASE not in libvirtd.qmp(
                names["h1"], "qom-get", {"path": "/objects/luks0", "property": "data"}
            )

            libvirtd.virsh("destroy", names["h2"])
            wait_for(lambda: vms()["h2"]["state"] == "failed", timeout=20, what="h2 failed")
            assert vms()["h2"]["result"]["reason"].startswith("QEMU went away")

            (conf / "h3.toml").unlink()
            wait_for(lambda: "h3" not in vms(), timeout=10, what="h3 stopped")
            assert libvirtd.state(names["h3"]) == "paused"  # left as it was

            assert vms()["h1"]["state"] == "running"
            assert ctl(run / "h1" / "control.sock", "ready").returncode == 0
            host.popen.send_signal(signal.SIGTERM)
            assert host.wait(30) == 0, host.stderr
            assert libvirtd.state(names["h1"]) == "paused"
            assert sorted(p.name for p in run.rglob("*") if p.is_file() and p.name != ".lock") == []
        finally:
            world.close()
            for name in names.values():
                libvirtd.virsh("destroy", name, check=False)
    scan.text("host stderr", host.stderr)
    for vm in names:
        scan.file(str(tmp_path / f"{vm}.jsonl"))
    scan.file(str(libvirtd.log))
    scan.dirs.append(str(run))
    scan.check()
