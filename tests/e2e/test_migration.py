"""TLS-PSK migration between two real QEMU 7.2 (TCG) processes, each with its agent.

After every case: no key files under either run_dir, no tls-creds-psk object
left, ``tls-creds`` empty, and the PSK in no stderr (debug), event log or argv.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time

import pytest

from tests.e2e.harness import KEYAGENT, World, ctl, ctl_json, free_port, host_identity, trusting_hosts, wait_for
from tests.e2e.qemu import BOOT_ADDR, MARKER_OFFSET, QEMU, Qemu, boot_image
from tests.leakscan import ArgvWatcher, LeakScan

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


VM = "vm1"  # one VM, migrating: the same name on both sides (the hand-over binds it)


class Host:
    def __init__(self, world: World, name: str, qemu: Qemu, *extra: str) -> None:
        self.name, self.qemu = name, qemu
        self.run_dir = world.tmp / f"{name}-run"
        self.control = self.run_dir / "control.sock"
        self.event_log = world.tmp / f"{name}-events.jsonl"
        self.world = world
        self.extra = extra
        self.start_agent()

    def start_agent(self):
        self.agent = self.world.spawn(
            f"{self.name}-agent{len(self.world.procs)}",
            [
                "run",
                "--qmp",
                f"unix:{self.qemu.agent_qmp}",
                "--vm-name",
                VM,
                "--vm-run-dir",
                str(self.run_dir),
                "--event-log",
                str(self.event_log),
                "--log-level",
                "debug",
                *self.extra,
            ],
        )
        wait_for(lambda: ctl(self.control, "status").returncode == 0, what=f"{self.name} agent")
        return self.agent

    def replay_check(self) -> subprocess.CompletedProcess:
        """``keyagent replay --check`` of this agent's event log (the last agent's)."""
        return subprocess.run(
            [*KEYAGENT, "replay", "--check", str(self.event_log)], capture_output=True, text=True, timeout=60
        )

    def key_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.run_dir)) for p in self.run_dir.rglob("*") if p.name != "control.sock")

    def assert_clean(self):
        from agent.io import keyring

        assert self.key_files() == [], f"{self.name}: key material left: {self.key_files()}"
        if keyring.usable() is None:
            assert keyring.find(f"keyagent:{VM}:") == [], "a keyring key was left"
        if self.qemu.popen.poll() is None:
            assert self.qemu.tls_objects() == []
            assert self.qemu.tls_creds() == ""


@pytest.fixture
def pair(tmp_path):
    world = World(tmp_path)
    marker = b"KEYAGENT-MARKER-" + os.urandom(12).hex().encode()
    boot_image(tmp_path / "src.img", marker)
    (tmp_path / "dst.img").write_bytes(bytes(1024 * 1024))  # the destination never reads it
    src_q = Qemu(tmp_path, "src", tmp_path / "src.img")
    dst_q = Qemu(tmp_path, "dst", tmp_path / "dst.img", incoming=True)
    scan = LeakScan()
    src_id, dst_id = trusting_hosts(tmp_path, "src-host", "dst-host")
    for ident in (src_id, dst_id):
        scan.secret(f"host key {ident.name}", ident.seed())
    qemus = [src_q, dst_q]
    with ArgvWatcher() as argv:
        scan.argv = argv
        try:
            src = Host(world, "src", src_q, *src_id.flags())
            dst = Host(world, "dst", dst_q, "--migration-dest-deadline-s", "4", *dst_id.flags())
            src.identity, dst.identity = src_id, dst_id
            world.marker, world.scan, world.src, world.dst = marker, scan, src, dst
            yield world
        finally:
            world.close()
            for q in qemus:
                q.stop()
    for proc in world.procs:
        scan.text(f"{proc.name} stderr", proc.stderr)
        scan.text(f"{proc.name} stdout", proc.stdout)
    for h in (world.src, world.dst):
        if h.event_log.exists():
            scan.file(str(h.event_log))
        scan.dirs.append(str(h.run_dir))
    scan.check()


def boot_source(world):
    src = world.src.qemu
    src.qmp("cont")
    wait_for(
        lambda: world.marker in src.read_memory(BOOT_ADDR, 512, world.tmp),
        timeout=20,
        what="the guest to boot and hold its marker",
    )


def capture_psk(host: Host, scan: LeakScan) -> None:
    """Read the agent's keys.psk while it exists, so the leak scan knows the PSK."""
    files = list(host.run_dir.glob("key-*/keys.psk"))
    assert files, "destination key file missing while listening"
    user, hexkey = files[0].read_text().strip().split(":")
    assert user == "qemu"
    scan.secret("PSK", bytes.fromhex(hexkey))
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert oct(files[0].parent.stat().st_mode & 0o777) == "0o700"


def test_both_agents_load_the_handovers_crypto_once_started_not_inside_the_migration(pair):
    """migration_fixed_ms: cryptography (its Rust extension) is mapped before the first request."""

    def loaded(host: Host) -> bool:
        with open(f"/proc/{host.agent.popen.pid}/maps") as f:
            return "_rust.abi3.so" in f.read()

    for host in (pair.src, pair.dst):
        wait_for(lambda host=host: loaded(host), timeout=10, what=f"{host.name} agent to preload cryptography")


@pytest.mark.parametrize("mode", ["sealed", "psk-file"])
@pytest.mark.parametrize("variant", ["single", "multifd", "postcopy"])
def test_migration_completes_and_the_guest_memory_travels(pair, mode, variant):
    src, dst, tmp = pair.src, pair.dst, pair.tmp
    boot_source(pair)
    uri = f"tcp:127.0.0.1:{free_port()}"
    extra = {"single": [], "multifd": ["--multifd"], "postcopy": ["--postcopy"]}[variant]
    if variant == "postcopy":
        # Slow precopy down, so that the switch to postcopy happens before
        # precopy could finish (postcopy itself has no cap by default).
        src.qemu.qmp("migrate-set-parameters", {"max-bandwidth": 64 * 1024})
    if mode == "sealed":
        offer = ctl_json(dst.control, "migrate", "prepare")["offer"]
        cookie = ctl_json(src.control, "migrate", "begin", "--offer", offer)["cookie"]
        assert (
            ctl_json(dst.control, "migrate", "accept", "--cookie", cookie, "--uri", uri, *extra)["status"]
            == "listening"
        )
        capture_psk(dst, pair.scan)
        start = ["migrate", "start", "--uri", uri, *extra]
    else:
        psk = os.urandom(32)
        pair.scan.secret("PSK", psk)
        (tmp / "psk.bin").write_bytes(psk)
        assert (
            ctl_json(dst.control, "migrate", "accept", "--psk-file", str(tmp / "psk.bin"), "--uri", uri, *extra)[
                "status"
            ]
            == "listening"
        )
        start = ["migrate", "start", "--psk-file", str(tmp / "psk.bin"), "--uri", uri, *extra]
    assert ctl_json(src.control, *start)["status"] == "started"
    # The source's key directory went right after object-add.
    assert src.key_files() == []
    done = ctl(src.control, "migrate", "wait", "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "completed"
    assert json.loads(ctl(dst.control, "migrate", "wait", "--timeout", "30").stdout)["status"] == "completed"
    if variant == "postcopy":
        events = src.event_log.read_text()
        assert "migrate-start-postcopy" in events and '"postcopy-active"' in events
    memory = dst.qemu.read_memory(BOOT_ADDR, 512, tmp)
    assert memory[MARKER_OFFSET : MARKER_OFFSET + len(pair.marker)] == pair.marker
    src.assert_clean()
    dst.assert_clean()


def test_mismatched_keys_fail_and_the_destination_tears_down_by_its_deadline(pair):
    src, dst, tmp = pair.src, pair.dst, pair.tmp
    (tmp / "a.bin").write_bytes(os.urandom(32))
    (tmp / "b.bin").write_bytes(os.urandom(32))
    pair.scan.secret("PSK a", (tmp / "a.bin").read_bytes())
    pair.scan.secret("PSK b", (tmp / "b.bin").read_bytes())
    uri = f"tcp:127.0.0.1:{free_port()}"
    ctl_json(dst.control, "migrate", "accept", "--psk-file", str(tmp / "a.bin"), "--uri", uri)
    began = time.monotonic()
    ctl_json(src.control, "migrate", "start", "--psk-file", str(tmp / "b.bin"), "--uri", uri)
    out = ctl(src.control, "migrate", "wait", "--timeout", "30")
    assert out.returncode == 1
    assert json.loads(out.stdout)["status"] == "failed"
    src.assert_clean()
    out = ctl(dst.control, "migrate", "wait", "--timeout", "30")
    assert out.returncode == 1
    result = json.loads(out.stdout)
    assert result["status"] == "failed" and "no final migration status" in result["error"]
    assert time.monotonic() - began < 4 + 10
    dst.assert_clean()


def test_cancel_during_the_migration_cleans_both_sides(pair):
    src, dst, tmp = pair.src, pair.dst, pair.tmp
    boot_source(pair)
    # Slow the source down so that there is a migration to cancel.
    src.qemu.qmp("migrate-set-parameters", {"max-bandwidth": 64 * 1024})
    psk = os.urandom(32)
    pair.scan.secret("PSK", psk)
    (tmp / "psk.bin").write_bytes(psk)
    uri = f"tcp:127.0.0.1:{free_port()}"
    ctl_json(dst.control, "migrate", "accept", "--psk-file", str(tmp / "psk.bin"), "--uri", uri)
    ctl_json(src.control, "migrate", "start", "--psk-file", str(tmp / "psk.bin"), "--uri", uri)
    wait_for(lambda: src.qemu.qmp("query-migrate").get("status") == "active", what="active")
    assert ctl_json(src.control, "migrate", "cancel")["status"] == "cancelling"
    out = ctl(src.control, "migrate", "wait", "--timeout", "30")
    assert json.loads(out.stdout)["status"] == "cancelled" and out.returncode == 1
    # The broken stream fails the incoming side: QEMU 7.2 exits ("load of
    # migration failed"), and its agent cleans up and follows it.
    assert dst.qemu.popen.wait(timeout=30) != 0
    assert dst.agent.wait(timeout=30) == 0
    src.assert_clean()
    dst.assert_clean()


def kill_agent(host: Host) -> None:
    host.agent.popen.send_signal(signal.SIGKILL)
    host.agent.popen.wait()


def psk_file(pair) -> str:
    psk = os.urandom(32)
    pair.scan.secret("PSK", psk)
    (pair.tmp / "psk.bin").write_bytes(psk)
    return str(pair.tmp / "psk.bin")


def slow_migration(pair) -> str:
    """A migration held at 64 KiB/s, under way (active) on both sides."""
    src, dst = pair.src, pair.dst
    boot_source(pair)
    src.qemu.qmp("migrate-set-parameters", {"max-bandwidth": 64 * 1024})
    key, uri = psk_file(pair), f"tcp:127.0.0.1:{free_port()}"
    ctl_json(dst.control, "migrate", "accept", "--psk-file", key, "--uri", uri)
    ctl_json(src.control, "migrate", "start", "--psk-file", key, "--uri", uri)
    wait_for(lambda: src.qemu.qmp("query-migrate").get("status") == "active", what="active")
    return uri


def adopted_flows(host: Host) -> dict:
    return {k: v for k, v in ctl_json(host.control, "status")["flows"].items() if v["kind"] == "migration"}


def marker_arrived(pair) -> None:
    memory = pair.dst.qemu.read_memory(BOOT_ADDR, 512, pair.tmp)
    assert memory[MARKER_OFFSET : MARKER_OFFSET + len(pair.marker)] == pair.marker


@pytest.mark.parametrize("killed", ["source", "destination"])
def test_agent_killed_mid_migration_adopts_it_on_restart_and_cleans_up_after_it_completes(pair, killed):
    src, dst = pair.src, pair.dst
    slow_migration(pair)
    host = src if killed == "source" else dst
    kill_agent(host)
    if killed == "destination":
        (dir_,) = {p.parent for p in dst.run_dir.glob("key-tls-*/keys.psk")}  # QEMU still reads it
    agent = host.start_agent()
    assert adopted_flows(host) == {"migrate-1": {"kind": "migration", "state": "migrating"}}
    if killed == "destination":
        assert dir_.is_dir() and "swept" not in agent.stderr  # kept: the migration is live
    else:
        assert src.key_files() == []
    assert src.qemu.tls_objects() == ["keyagent-tls-migrate-1"]
    src.qemu.qmp("migrate-set-parameters", {"max-bandwidth": 1 << 30})
    for side in (src, dst):
        done = ctl(side.control, "migrate", "wait", "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout) == {"status": "completed", "migration": "migrate-1"}
    marker_arrived(pair)
    src.assert_clean()
    dst.assert_clean()
    check = host.replay_check()
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("variant", ["single", "multifd", "postcopy"])
def test_destination_killed_while_listening_keeps_only_the_live_key_dir_and_the_migration_then_runs(pair, variant):
    """Every TLS handshake (each multifd channel, postcopy's) happens after the
    restart: the kept keys.psk is what GnuTLS reads."""
    src, dst, tmp = pair.src, pair.dst, pair.tmp
    boot_source(pair)
    key, uri = psk_file(pair), f"tcp:127.0.0.1:{free_port()}"
    extra = {"single": [], "multifd": ["--multifd"], "postcopy": ["--postcopy"]}[variant]
    if variant == "postcopy":
        src.qemu.qmp("migrate-set-parameters", {"max-bandwidth": 64 * 1024})
    ctl_json(dst.control, "migrate", "accept", "--psk-file", key, "--uri", uri, *extra)
    (live,) = {p.parent.name for p in dst.run_dir.glob("key-tls-*/keys.psk")}
    kill_agent(dst)
    # A wreck no migration reads: an older key dir and a stray keys.psk.
    stale = dst.run_dir / "key-tls-0123456789ab"
    stale.mkdir(mode=0o700)
    (stale / "keys.psk").write_text("qemu:" + "ab" * 32)
    pair.scan.secret("stale PSK", bytes.fromhex("ab" * 32))
    agent = dst.start_agent()
    assert "swept stale key material" in agent.stderr
    assert sorted(p.name for p in dst.run_dir.glob("key-*")) == [live]
    assert adopted_flows(dst)["migrate-1"]["state"] == "migrating"
    ctl_json(src.control, "migrate", "start", "--psk-file", key, "--uri", uri, *extra)
    for side in (src, dst):
        done = ctl(side.control, "migrate", "wait", "--timeout", "60")
        assert json.loads(done.stdout)["status"] == "completed", done.stdout + done.stderr
    if variant == "postcopy":  # the adopted flow followed the postcopy phase
        assert '"postcopy-active"' in dst.event_log.read_text()
    marker_arrived(pair)
    src.assert_clean()
    dst.assert_clean()
    assert not (tmp / "dst-run" / live).exists()


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
def test_source_agent_killed_then_the_migration_ends_meanwhile_is_cleaned_up_at_restart(pair, ending):
    src, dst = pair.src, pair.dst
    slow_migration(pair)
    kill_agent(src)
    if ending == "cancelled":
        src.qemu.qmp("migrate_cancel")
    else:  # the destination dies: the source's migration fails
        dst.qemu.popen.kill()
    wait_for(lambda: src.qemu.qmp("query-migrate").get("status") == ending, timeout=30, what=ending)
    assert src.qemu.tls_objects() == ["keyagent-tls-migrate-1"]  # nobody cleaned up yet
    src.start_agent()
    out = ctl(src.control, "migrate", "wait", "--timeout", "30")
    assert json.loads(out.stdout)["status"] == ending and out.returncode == 1
    src.assert_clean()
    # The broken stream fails the incoming side (or it was killed): its QEMU
    # is gone, and its agent follows it out, clean.
    assert dst.qemu.popen.wait(timeout=30) != 0
    assert dst.agent.wait(timeout=30) == 0
    dst.assert_clean()


@pytest.mark.parametrize("side", ["source", "destination"])
def test_agent_killed_during_the_setup_is_undone_at_restart(pair, side):
    """Killed between object-add and migrate: QEMU holds our creds object (and
    tls-creds names it), a key dir is on disk, nothing migrates."""
    host = pair.src if side == "source" else pair.dst
    kill_agent(host)
    key_dir = host.run_dir / "key-tls-0123456789ab"
    key_dir.mkdir(mode=0o700)
    (key_dir / "keys.psk").write_text("qemu:" + "cd" * 32)
    pair.scan.secret("setup PSK", bytes.fromhex("cd" * 32))
    endpoint = "client" if side == "source" else "server"
    host.qemu.qmp(
        "object-add",
        {"qom-type": "tls-creds-psk", "id": "keyagent-tls-migrate-4", "dir": str(key_dir), "endpoint": endpoint},
    )
    host.qemu.qmp("migrate-set-parameters", {"tls-creds": "keyagent-tls-migrate-4"})
    host.start_agent()
    out = ctl(host.control, "migrate", "wait", "--timeout", "30")
    result = json.loads(out.stdout)
    assert result["migration"] == "migrate-4" and result["status"] == "failed" and out.returncode == 1
    assert "stopped before the migration started" in result["error"]
    host.assert_clean()
    assert not key_dir.exists()


def test_destination_agent_killed_then_the_source_cancels_the_restarted_agent_follows_qemu_out(pair):
    src, dst = pair.src, pair.dst
    slow_migration(pair)
    kill_agent(dst)
    dst.start_agent()
    assert ctl_json(src.control, "migrate", "cancel")["status"] == "cancelling"
    out = ctl(src.control, "migrate", "wait", "--timeout", "30")
    assert json.loads(out.stdout)["status"] == "cancelled"
    assert dst.qemu.popen.wait(timeout=30) != 0
    assert dst.agent.wait(timeout=30) == 0
    src.assert_clean()
    dst.assert_clean()


# -- the carrier between the hosts ------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def one_line_refusal(out: subprocess.CompletedProcess, words: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert words in out.stderr and out.stderr.count("\n") == 1, out.stderr


def carrier_key(pair):
    from agent.crypto.hostkey import load_private

    return load_private(str(host_identity(pair.tmp, "carrier").key))


def test_a_carrier_that_swaps_the_offer_gets_no_cookie(pair):
    from agent.crypto import seal

    src, dst = pair.src, pair.dst
    own = seal.make_offer(carrier_key(pair), VM, os.urandom(16), os.urandom(32))
    one_line_refusal(ctl(src.control, "migrate", "begin", "--offer", own), "unknown destination")
    # The destination's real offer, with the carrier's HPKE key put in.
    real = bytearray(base64.b64decode(ctl_json(dst.control, "migrate", "prepare")["offer"]))
    real[20:52] = base64.b64decode(own)[20:52]
    one_line_refusal(ctl(src.control, "migrate", "begin", "--offer", b64(bytes(real))), "signature does not verify")
    # Nothing was sealed: the source has no PSK to migrate with.
    one_line_refusal(ctl(src.control, "migrate", "start", "--uri", f"tcp:127.0.0.1:{free_port()}"), "no PSK")
    src.assert_clean()
    dst.assert_clean()


def test_a_cookie_forged_with_the_carriers_key_plants_no_psk(pair):
    from agent.crypto import seal

    src, dst = pair.src, pair.dst
    uri = f"tcp:127.0.0.1:{free_port()}"
    offer = ctl_json(dst.control, "migrate", "prepare")["offer"]
    forged = seal.seal(seal.parse_offer(offer), VM, os.urandom(32), carrier_key(pair))
    one_line_refusal(ctl(dst.control, "migrate", "accept", "--cookie", forged, "--uri", uri), "unknown source")
    dst.assert_clean()
    # The refusal spent nothing: the real cookie for the same offer still opens.
    cookie = ctl_json(src.control, "migrate", "begin", "--offer", offer)["cookie"]
    assert ctl_json(dst.control, "migrate", "accept", "--cookie", cookie, "--uri", uri)["status"] == "listening"
    capture_psk(dst, pair.scan)
    ctl(dst.control, "migrate", "cancel")
    ctl(dst.control, "migrate", "wait", "--timeout", "30")
    dst.assert_clean()


def test_tampered_and_replayed_cookies_are_refused(pair):
    src, dst = pair.src, pair.dst
    uri = f"tcp:127.0.0.1:{free_port()}"
    offer = ctl_json(dst.control, "migrate", "prepare")["offer"]
    cookie = ctl_json(src.control, "migrate", "begin", "--offer", offer)["cookie"]
    raw = bytearray(base64.b64decode(cookie))
    raw[-70] ^= 1  # in the sealed PSK
    one_line_refusal(
        ctl(dst.control, "migrate", "accept", "--cookie", b64(bytes(raw)), "--uri", uri), "signature does not verify"
    )
    dst.assert_clean()
    assert ctl_json(dst.control, "migrate", "accept", "--cookie", cookie, "--uri", uri)
    capture_psk(dst, pair.scan)
    ctl(dst.control, "migrate", "cancel")
    ctl(dst.control, "migrate", "wait", "--timeout", "30")
    one_line_refusal(ctl(dst.control, "migrate", "accept", "--cookie", cookie, "--uri", uri), "no pending offer")
    dst.assert_clean()


def test_hosts_that_do_not_trust_each_other_hand_over_nothing(pair):
    """Trust is read at each request: a host removed from trusted_hosts counts at once."""
    src, dst = pair.src, pair.dst
    uri = f"tcp:127.0.0.1:{free_port()}"
    dst.identity.distrust(src.identity)
    offer = ctl_json(dst.control, "migrate", "prepare")["offer"]
    cookie = ctl_json(src.control, "migrate", "begin", "--offer", offer)["cookie"]
    one_line_refusal(ctl(dst.control, "migrate", "accept", "--cookie", cookie, "--uri", uri), "unknown source")
    src.identity.distrust(dst.identity)
    offer = ctl_json(dst.control, "migrate", "prepare")["offer"]
    one_line_refusal(ctl(src.control, "migrate", "begin", "--offer", offer), "unknown destination")
    src.assert_clean()
    dst.assert_clean()


def test_accept_with_a_bad_option_then_the_corrected_retry_listens(pair):
    src, dst = pair.src, pair.dst
    uri = f"tcp:127.0.0.1:{free_port()}"
    offer = ctl_json(dst.control, "migrate", "prepare")["offer"]
    cookie = ctl_json(src.control, "migrate", "begin", "--offer", offer)["cookie"]
    bad = ctl(
        dst.control, "migrate", "accept", "--cookie", cookie, "--uri", uri, "--multifd", "--multifd-channels", "0"
    )
    assert bad.returncode == 2 and "multifd_channels" in bad.stderr
    dst.assert_clean()
    assert ctl_json(dst.control, "migrate", "accept", "--cookie", cookie, "--uri", uri)["status"] == "listening"
    capture_psk(dst, pair.scan)
    ctl(dst.control, "migrate", "cancel")
    ctl(dst.control, "migrate", "wait", "--timeout", "30")
    dst.assert_clean()
