"""``keyagent simulate`` as a process: starts, answers, quits, refuses bad usage."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

from agent.sev.measurement import verify_measurement
from agent.tools.sim.machine import DEFAULT_DIGEST
from tests.executable import KEYAGENT
from tests.tools.sim.conftest import DIGEST, TEK, TIK


@pytest.fixture
def keys(tmp_path):
    tik, tek = tmp_path / "tik.bin", tmp_path / "tek.bin"
    tik.write_bytes(TIK)
    tek.write_bytes(TEK)
    return str(tik), str(tek)


def start(sock_path: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{sock_path}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    line = proc.stdout.readline()
    assert line, proc.stderr.read().decode()
    ready = json.loads(line)
    assert ready["ready"] is True and ready["qmp"] == f"unix:{sock_path}"
    return proc


class SyncQmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def recv(self) -> dict:
        return json.loads(self.file.readline())

    def cmd(self, name: str, arguments: dict | None = None) -> dict:
        msg = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        return self.recv()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise
    return proc.returncode, err.decode()


def assert_no_keys(text: str) -> None:
    for key in (TIK, TEK):
        assert key.hex() not in text and base64.b64encode(key).decode() not in text


def test_simulate_serves_the_given_keys_and_exits_0_after_quit(sock_path, keys):
    proc = start(sock_path, "--sev", "--tik", keys[0], "--tek", keys[1], "--digest", DIGEST.hex())
    qmp = SyncQmp(sock_path)
    blob = base64.b64decode(qmp.cmd("query-sev-launch-measure")["return"]["data"])
    assert verify_measurement(blob, TIK, 1, 55, 21, 1, DIGEST)
    assert qmp.cmd("quit") == {"return": {}}
    assert qmp.recv()["event"] == "SHUTDOWN"
    qmp.close()
    code, err = finish(proc)
    assert code == 0, err
    assert not os.path.exists(sock_path)
    assert '"command": "quit"' in err
    assert_no_keys(err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_simulator_cleanly(sock_path, keys, sig):
    proc = start(sock_path, "--tik", keys[0], "--tek", keys[1])
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    proc.send_signal(sig)
    code, err = finish(proc)
    assert code == 0, err
    assert not os.path.exists(sock_path)


def test_generated_keys_are_written_0600_and_are_the_ones_in_use(sock_path, tmp_path):
    out = tmp_path / "keys"
    proc = start(sock_path, "--keys-out", str(out))
    try:
        tik = (out / "tik.bin").read_bytes()
        assert len(tik) == 16 and len((out / "tek.bin").read_bytes()) == 16
        for name in ("tik.bin", "tek.bin"):
            assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600
        qmp = SyncQmp(sock_path)
        blob = base64.b64decode(qmp.cmd("query-sev-launch-measure")["return"]["data"])
        assert verify_measurement(blob, tik, 1, 55, 21, 1, DEFAULT_DIGEST)
        qmp.close()
    finally:
        proc.terminate()
    code, err = finish(proc)
    assert code == 0
    assert tik.hex() not in err


def test_sev_es_running_and_no_secret_area_flags(sock_path, keys):
    proc = start(
        sock_path,
        "--sev-es",
        "--running",
        "--no-secret-area",
        "--policy",
        "0x3",
        "--api-major",
        "2",
        "--api-minor",
        "3",
        "--build-id",
        "4",
        "--tik",
        keys[0],
        "--tek",
        keys[1],
    )
    qmp = SyncQmp(sock_path)
    info = qmp.cmd("query-sev")["return"]
    assert (info["policy"], info["api-major"], info["api-minor"], info["build-id"], info["state"]) == (
        7,
        2,
        3,
        4,
        "running",
    )
    assert qmp.cmd("query-status")["return"]["status"] == "running"
    reply = qmp.cmd("sev-inject-launch-secret", {"packet-header": "AAAA", "secret": "AAAA"})
    assert reply["error"]["desc"] == "SEV: no secret area found in OVMF, gpa must be specified."
    qmp.cmd("quit")
    qmp.close()
    assert finish(proc)[0] == 0


def _inject_without_gpa(qmp: SyncQmp) -> dict:
    from agent.sev.guids import LUKS_KEY_GUID
    from agent.sev.measurement import split_blob
    from agent.sev.packet import build_packet
    from agent.sev.secret_table import build_secret_table

    blob = base64.b64decode(qmp.cmd("query-sev-launch-measure")["return"]["data"])
    header, secret = build_packet(
        TIK, TEK, split_blob(blob)[0], build_secret_table([(LUKS_KEY_GUID, b"pass")]), bytes(16)
    )
    return qmp.cmd(
        "sev-inject-launch-secret",
        {"packet-header": base64.b64encode(header).decode(), "secret": base64.b64encode(secret).decode()},
    )


@pytest.mark.parametrize("how", ["--secret-area", "--firmware"])
def test_debian_stock_firmware_takes_the_secret_at_gpa_0_unseen(sock_path, keys, tmp_path, how):
    from agent.sev.ovmf import Area, synthetic_image

    fw = tmp_path / "OVMF.fd"
    fw.write_bytes(synthetic_image(secret_area=Area(0, 0), hashes_area=Area(0, 0)))
    proc = start(sock_path, how, "0,0" if how == "--secret-area" else str(fw), "--tik", keys[0], "--tek", keys[1])
    qmp = SyncQmp(sock_path)
    assert _inject_without_gpa(qmp) == {"return": {}}  # QEMU 7.2 reports success
    secrets = qmp.cmd("x-sim-query-secrets")["return"]
    assert secrets["injected"] is True and secrets["secret-visible"] is False
    qmp.cmd("quit")
    qmp.close()
    assert finish(proc)[0] == 0


def test_firmware_flag_reads_a_real_secret_area(sock_path, keys):
    from tests.sev.vectors import SEVCTL_DATA, SEVCTL_OVMF_NAME

    proc = start(sock_path, "--firmware", str(SEVCTL_DATA / SEVCTL_OVMF_NAME), "--tik", keys[0], "--tek", keys[1])
    qmp = SyncQmp(sock_path)
    assert _inject_without_gpa(qmp) == {"return": {}}
    assert qmp.cmd("x-sim-query-secrets")["return"]["secret-visible"] is True
    qmp.cmd("quit")
    qmp.close()
    assert finish(proc)[0] == 0


def test_measure_delay_flag(sock_path, keys):
    proc = start(sock_path, "--measure-delay", "0.5", "--tik", keys[0], "--tek", keys[1])
    qmp = SyncQmp(sock_path)
    assert qmp.cmd("query-sev-launch-measure")["error"]["desc"] == "SEV launch measurement is not available"
    time.sleep(0.6)
    assert "return" in qmp.cmd("query-sev-launch-measure")
    qmp.cmd("quit")
    qmp.close()
    assert finish(proc)[0] == 0


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--tik", "{short}", "--tek", "{tek}"], "must hold exactly 16 raw bytes, found 5"),
        (["--tik", "{long}", "--tek", "{tek}"], "must hold exactly 16 raw bytes, found more than 16"),
        (["--tik", "{missing}", "--tek", "{tek}"], "cannot read"),
        (["--tik", "{tik}"], "--tik and --tek go together"),
        (["--tik", "{tik}", "--tek", "{tek}", "--keys-out", "{dir}"], "--keys-out only applies"),
        (["--digest", "zz"], "--digest must be hex"),
        (["--digest", "abcd"], "--digest must be 32 bytes"),
        (["--policy", "lots"], "--policy must be an integer"),
        (["--policy", "0x100000000"], "--policy must be 0..4294967295"),
        (["--api-major", "256"], "--api-major must be 0..255"),
        (["--measure-delay", "-1"], "--measure-delay must be >= 0"),
        (["--measure-delay", "soon"], "--measure-delay must be a number"),
        (["--sev", "--sev-es"], "not allowed with argument"),
        (["--keys-out", "{file}"], "exists and is not a directory"),
        (["--secret-area", "0x80c000"], "--secret-area must be GPA,SIZE"),
        (["--secret-area", "0x80c000,big"], "--secret-area SIZE must be an integer"),
        (["--secret-area", "0,0", "--no-secret-area"], "not allowed with argument"),
        (["--firmware", "{missing}"], "cannot read --firmware"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(sock_path, tmp_path, keys, args, reason):
    (tmp_path / "short.bin").write_bytes(b"12345")
    (tmp_path / "long.bin").write_bytes(bytes(17))
    (tmp_path / "plain").write_text("x")
    subst = {
        "short": str(tmp_path / "short.bin"),
        "long": str(tmp_path / "long.bin"),
        "tik": keys[0],
        "tek": keys[1],
        "missing": str(tmp_path / "nope.bin"),
        "dir": str(tmp_path),
        "file": str(tmp_path / "plain"),
    }
    argv = [a.format(**subst) for a in args]
    proc = subprocess.run(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{sock_path}", *argv], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyagent") and reason in lines[0], proc.stderr
    assert not os.path.exists(sock_path)


@pytest.mark.parametrize(
    "qmp, reason",
    [
        ("tcp:localhost:4444", "--qmp must be unix:PATH"),
        ("unix:", "--qmp must be unix:PATH"),
        ("unix:/nonexistent-dir/q.sock", "does not exist"),
        ("unix:/" + "x" * 120, "longer than 107 bytes"),
    ],
)
def test_bad_qmp_address_exits_2(qmp, reason):
    proc = subprocess.run([*KEYAGENT, "simulate", "--qmp", qmp], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_path_that_is_not_a_socket_is_left_alone(sock_path):
    with open(sock_path, "w") as f:
        f.write("precious")
    proc = subprocess.run(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{sock_path}"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "exists and is not a socket" in proc.stderr
    assert open(sock_path).read() == "precious"


def test_keys_are_never_overwritten(sock_path, tmp_path):
    out = tmp_path / "keys"
    out.mkdir()
    (out / "tek.bin").write_bytes(b"old")
    proc = subprocess.run(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{sock_path}", "--keys-out", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "tek.bin").read_bytes() == b"old"
    assert not (out / "tik.bin").exists()  # the half-written pair was removed


# -- the simulator as the platform: PDH, chain, launch session ---------------


def write_pdh_key(path, curve=None) -> object:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(curve or ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(path, 0o600)
    return key


def session_files(tmp_path, key, policy: int = 1) -> tuple[str, str]:
    from agent.sev.session import create_session
    from agent.tools.sim.psp import Platform

    godh, session = create_session(
        Platform(key).pdh_cert, policy, nonce=os.urandom(16), tek=TEK, tik=TIK, iv=os.urandom(16)
    )
    (tmp_path / "godh.b64").write_bytes(base64.b64encode(godh) + b"\n")
    (tmp_path / "session.b64").write_bytes(base64.b64encode(session))
    return str(tmp_path / "godh.b64"), str(tmp_path / "session.b64")


def test_pdh_and_chain_outputs_are_what_query_sev_capabilities_shows(sock_path, tmp_path):
    from agent.sev.cert import Certificate, PlatformChain, verify_pdh_chain

    key = write_pdh_key(tmp_path / "pdh.pem")
    pdh_out, chain_out = tmp_path / "pdh.b64", tmp_path / "chain.b64"
    proc = start(
        sock_path, "--pdh-key", str(tmp_path / "pdh.pem"), "--pdh-out", str(pdh_out), "--cert-chain-out", str(chain_out)
    )
    qmp = SyncQmp(sock_path)
    caps = qmp.cmd("query-sev-capabilities")["return"]
    assert base64.b64decode(pdh_out.read_bytes()) == base64.b64decode(caps["pdh"])
    assert base64.b64decode(chain_out.read_bytes()) == base64.b64decode(caps["cert-chain"])
    pdh = Certificate.from_bytes(base64.b64decode(caps["pdh"]))
    verify_pdh_chain(pdh, PlatformChain.from_bytes(base64.b64decode(caps["cert-chain"])))
    assert pdh.public_key().public_numbers() == key.public_key().public_numbers()
    qmp.cmd("quit")
    qmp.close()
    assert finish(proc)[0] == 0


def test_a_launch_session_replaces_tik_and_tek(sock_path, tmp_path):
    key = write_pdh_key(tmp_path / "pdh.pem")
    godh, session = session_files(tmp_path, key, policy=0x5)
    proc = start(
        sock_path,
        "--sev-es",
        "--pdh-key",
        str(tmp_path / "pdh.pem"),
        "--dh-cert-file",
        godh,
        "--session-file",
        session,
        "--digest",
        DIGEST.hex(),
    )
    qmp = SyncQmp(sock_path)
    blob = base64.b64decode(qmp.cmd("query-sev-launch-measure")["return"]["data"])
    assert verify_measurement(blob, TIK, 1, 55, 21, 0x5, DIGEST)
    qmp.cmd("quit")
    qmp.close()
    code, err = finish(proc)
    assert code == 0, err
    assert_no_keys(err)


def test_a_session_that_does_not_open_exits_2_like_qemu(sock_path, tmp_path):
    key = write_pdh_key(tmp_path / "pdh.pem")
    godh, session = session_files(tmp_path, key, policy=0x1)
    proc = subprocess.run(
        [
            *KEYAGENT,
            "simulate",
            "--qmp",
            f"unix:{sock_path}",
            "--sev-es",
            "--pdh-key",
            str(tmp_path / "pdh.pem"),
            "--dh-cert-file",
            godh,
            "--session-file",
            session,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LAUNCH_START failed: fw_error=7 'Policy is not allowed'" in lines[0]
    assert not os.path.exists(sock_path)
    assert_no_keys(proc.stderr)


def test_a_session_for_another_pdh_exits_2(sock_path, tmp_path):
    write_pdh_key(tmp_path / "pdh.pem")
    other = write_pdh_key(tmp_path / "other.pem")
    godh, session = session_files(tmp_path, other)
    proc = subprocess.run(
        [
            *KEYAGENT,
            "simulate",
            "--qmp",
            f"unix:{sock_path}",
            "--pdh-key",
            str(tmp_path / "pdh.pem"),
            "--dh-cert-file",
            godh,
            "--session-file",
            session,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "wrap MAC does not match" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--dh-cert-file", "{godh}"], "--dh-cert-file and --session-file go together"),
        (["--session-file", "{session}"], "--dh-cert-file and --session-file go together"),
        (["--dh-cert-file", "{godh}", "--session-file", "{session}"], "--session-file needs --pdh-key"),
        (
            [
                "--pdh-key",
                "{pem}",
                "--dh-cert-file",
                "{godh}",
                "--session-file",
                "{session}",
                "--tik",
                "{tik}",
                "--tek",
                "{tek}",
            ],
            "--session-file replaces --tik/--tek",
        ),
        (["--pdh-key", "{pem}", "--dh-cert-file", "{plain}", "--session-file", "{session}"], "is not valid base64"),
        (["--pdh-key", "{pem}", "--dh-cert-file", "{godh}", "--session-file", "{missing}"], "cannot read"),
        (["--pdh-key", "{plain}"], "is not an unencrypted PEM private key"),
        (["--pdh-key", "{p256}"], "is not an EC key on P-384"),
        (["--pdh-key", "{missing}"], "--pdh-key: cannot read"),
        (["--pdh-out", "/nonexistent-dir/pdh.b64"], "--pdh-out: cannot write"),
    ],
)
def test_bad_platform_arguments_exit_2_with_one_line(sock_path, tmp_path, keys, args, reason):
    from cryptography.hazmat.primitives.asymmetric import ec

    key = write_pdh_key(tmp_path / "pdh.pem")
    write_pdh_key(tmp_path / "p256.pem", ec.SECP256R1())
    godh, session = session_files(tmp_path, key)
    (tmp_path / "plain").write_text("not base64 or PEM: @@@")
    subst = {
        "pem": str(tmp_path / "pdh.pem"),
        "p256": str(tmp_path / "p256.pem"),
        "godh": godh,
        "session": session,
        "plain": str(tmp_path / "plain"),
        "missing": str(tmp_path / "nope"),
        "tik": keys[0],
        "tek": keys[1],
    }
    argv = [a.format(**subst) for a in args]
    proc = subprocess.run(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{sock_path}", *argv], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyagent") and reason in lines[0], proc.stderr
    assert not os.path.exists(sock_path)


def test_amd_roots_out_holds_the_root_the_chain_verifies_to(sock_path, tmp_path):
    from agent.sev.ca import builtin_roots, load_roots_dir, verify_platform
    from agent.sev.cert import Certificate, PlatformChain

    roots_dir, cek_out = tmp_path / "roots", tmp_path / "cek.b64"
    proc = start(sock_path, "--amd-roots-out", str(roots_dir), "--cek-out", str(cek_out))
    qmp = SyncQmp(sock_path)
    caps = qmp.cmd("query-sev-capabilities")["return"]
    qmp.cmd("quit")
    qmp.close()
    assert finish(proc)[0] == 0
    assert sorted(p.name for p in roots_dir.iterdir()) == ["sim-ark.cert", "sim-ask.cert"]
    pdh = Certificate.from_bytes(base64.b64decode(caps["pdh"]))
    chain = PlatformChain.from_bytes(base64.b64decode(caps["cert-chain"]))
    assert base64.b64decode(cek_out.read_bytes()) == chain.cek.to_bytes()
    (root,) = load_roots_dir(roots_dir)
    assert root.ark.modulus_bits == root.ask.modulus_bits == 4096  # as Rome and later
    assert verify_platform(pdh, chain, (root,)).product == "sim"
    with pytest.raises(ValueError, match="CEK is not signed by any trusted AMD ASK"):
        verify_platform(pdh, chain, builtin_roots())


def test_amd_roots_out_that_is_a_file_is_a_usage_error(sock_path, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{sock_path}", "--amd-roots-out", str(tmp_path / "file")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "--amd-roots-out" in proc.stderr and "is not a directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(sock_path)
