"""`keyagent owner ...` as a user runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import select
import signal
import subprocess
import time

import pytest

from agent.io.http import request_json
from agent.sev.guids import LUKS_KEY_GUID
from agent.sev.measurement import split_blob
from agent.sev.packet import open_packet
from agent.sev.secret_table import parse_secret_table
from tests.sev import vectors as v

from .conftest import API, DIGEST, PASSPHRASE, POLICY, TEK, TIK

KEYAGENT = "/tmp/venv/bin/keyagent"


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([KEYAGENT, "owner", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def assert_usage_error(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("keyagent: error: ")
    assert words in lines[0]
    assert "Traceback" not in proc.stderr


def leak_forms() -> list[str]:
    forms = [PASSPHRASE.decode()]
    for raw in (PASSPHRASE, TIK, TEK):
        forms += [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()]
    return forms


# -- verify -------------------------------------------------------------------

def verify_args(owner_dir, blob: bytes, digest: bytes = DIGEST, policy: int = POLICY) -> list[str]:
    return ["verify", "--tik", str(owner_dir.tik), "--measurement", base64.b64encode(blob).decode(),
            "--api-major", str(API[0]), "--api-minor", str(API[1]), "--build-id", str(API[2]),
            "--policy", str(policy), "--digest", digest.hex()]


def test_verify_accepts_a_good_measurement(owner_dir):
    proc = run(*verify_args(owner_dir, owner_dir.blob()))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["valid"] is True


def test_verify_refuses_a_wrong_digest(owner_dir):
    proc = run(*verify_args(owner_dir, owner_dir.blob(), digest=bytes(32)))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "keyagent: error: measurement does not match"


def test_verify_refuses_a_wrong_policy(owner_dir):
    proc = run(*verify_args(owner_dir, owner_dir.blob(), policy=3))
    assert proc.returncode == 1


def test_verify_matches_the_sevctl_vector(tmp_path):
    tik = tmp_path / "tik1.bin"
    tik.write_bytes(v.SEVCTL_MEASURE_TIK)
    major, minor, build = v.SEVCTL_MEASURE_API
    proc = run("verify", "--tik", str(tik), "--measurement", v.SEVCTL_BLOB_GIVEN,
               "--api-major", str(major), "--api-minor", str(minor), "--build-id", str(build),
               "--policy", hex(v.SEVCTL_MEASURE_POLICY), "--digest", v.SEVCTL_DIGEST_GIVEN.hex())
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("change, words", [
    ({"--measurement": "@@@"}, "--measurement is not valid base64"),
    ({"--measurement": base64.b64encode(bytes(40)).decode()}, "48 bytes, got 40"),
    ({"--digest": "abcd"}, "32 bytes"),
    ({"--api-minor": "300"}, "--api-minor must be in 0..255"),
    ({"--build-id": "x"}, "invalid int value"),
    ({"--tik": "/nonexistent/tik.bin"}, "does not exist"),
])
def test_verify_bad_input_is_usage_error(owner_dir, change, words):
    args = verify_args(owner_dir, owner_dir.blob())
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    assert_usage_error(run(*args), words)


def test_verify_short_tik_is_usage_error(owner_dir):
    owner_dir.tik.write_bytes(b"x" * 15)
    assert_usage_error(run(*verify_args(owner_dir, owner_dir.blob())), "16 raw bytes")


def test_verify_without_digest_is_usage_error(owner_dir):
    args = verify_args(owner_dir, owner_dir.blob())[:-2]
    assert_usage_error(run(*args), "--digest")


def test_verify_with_firmware_instead_of_digest(owner_dir):
    measure = pytest.importorskip("agent.owner.measure")
    from agent.sev.digest import launch_digest

    firmware = owner_dir.root / "OVMF.fd"
    firmware.write_bytes(b"\x90" * 4096)
    blob = owner_dir.blob(digest=launch_digest(firmware.read_bytes()))
    args = verify_args(owner_dir, blob)[:-2] + ["--firmware", str(firmware)]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert measure is not None


def test_verify_digest_and_firmware_together_is_usage_error(owner_dir):
    pytest.importorskip("agent.owner.measure")
    args = verify_args(owner_dir, owner_dir.blob()) + ["--firmware", str(owner_dir.tik)]
    assert_usage_error(run(*args), "not both")


# -- package ------------------------------------------------------------------

def test_package_output_opens_with_open_packet(owner_dir):
    blob = owner_dir.blob()
    proc = run("package", "--tik", str(owner_dir.tik), "--tek", str(owner_dir.tek),
               "--measurement", base64.b64encode(blob).decode(),
               "--secret", f"luks-key={owner_dir.secret}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"packet_header", "secret"}
    measure, _ = split_blob(blob)
    table = open_packet(TIK, TEK, measure, base64.b64decode(out["packet_header"]),
                        base64.b64decode(out["secret"]))
    assert parse_secret_table(table) == [(LUKS_KEY_GUID, PASSPHRASE)]
    assert proc.stderr == ""


def test_package_matches_the_sevctl_vector(tmp_path):
    (tmp_path / "tik1.bin").write_bytes(v.SEVCTL_SECRET_TIK)
    (tmp_path / "tek1.bin").write_bytes(v.SEVCTL_SECRET_TEK)
    (tmp_path / "secret1.txt").write_bytes(v.SEVCTL_SECRET1[1])
    (tmp_path / "secret2.txt").write_bytes(v.SEVCTL_SECRET2[1])
    proc = run("package", "--tik", "tik1.bin", "--tek", "tek1.bin",
               "--measurement", base64.b64encode(v.SEVCTL_SECRET_BLOB).decode(),
               "--secret", f"{v.SEVCTL_SECRET1[0]}=secret1.txt",
               "--secret", f"{v.SEVCTL_SECRET2[0]}=secret2.txt",
               "--iv", base64.b64encode(v.SEVCTL_SECRET_IV).decode(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"packet_header": v.SEVCTL_HEADER_TWO, "secret": v.SEVCTL_PAYLOAD_TWO}


def package_args(owner_dir) -> list[str]:
    return ["package", "--tik", str(owner_dir.tik), "--tek", str(owner_dir.tek),
            "--measurement", base64.b64encode(owner_dir.blob()).decode(),
            "--secret", f"luks-key={owner_dir.secret}"]


@pytest.mark.parametrize("change, words", [
    ({"--secret": "luks-kee=x"}, "unknown GUID alias 'luks-kee'"),
    ({"--secret": "luks-key"}, "GUID=FILE"),
    ({"--secret": "luks-key=/nonexistent/pass"}, "does not exist"),
    ({"--measurement": "AAAA"}, "48 bytes, got 3"),
    ({"--measurement": "A"}, "not valid base64"),
    ({"--tek": "/nonexistent/tek"}, "does not exist"),
])
def test_package_bad_input_is_usage_error(owner_dir, change, words):
    args = package_args(owner_dir)
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    assert_usage_error(run(*args), words)


def test_package_bad_iv_is_usage_error(owner_dir):
    assert_usage_error(run(*package_args(owner_dir), "--iv", base64.b64encode(bytes(8)).decode()),
                       "--iv must be 16 bytes")


def test_package_wrong_tek_length_is_usage_error(owner_dir):
    owner_dir.tek.write_bytes(bytes(17))
    proc = run(*package_args(owner_dir))
    assert_usage_error(proc, "TEK")
    for form in leak_forms():
        assert form not in proc.stderr


# -- session, parser ----------------------------------------------------------

def test_session_is_not_implemented_yet():
    assert_usage_error(run("session", "--pdh", "x"), "owner session is not implemented yet")


def test_owner_without_subcommand_is_usage_error():
    assert_usage_error(run(), "OWNER_COMMAND")


# -- serve --------------------------------------------------------------------

def read_listening(proc: subprocess.Popen, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line:
                return json.loads(line)["listening"]
        if proc.poll() is not None:
            break
    raise AssertionError(f"no listening line; stderr: {proc.stderr.read() if proc.poll() is not None else ''}")


def test_serve_answers_and_stops_on_sigterm(owner_dir):
    proc = subprocess.Popen([KEYAGENT, "owner", "serve", "--config", str(owner_dir.toml),
                             "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = read_listening(proc)
        assert url.startswith("http://127.0.0.1:")

        async def talk():
            first = await request_json("POST", url + "/v1/secret", owner_dir.request(), timeout=10)
            again = await request_json("POST", url + "/v1/secret", owner_dir.request(), timeout=10)
            wrong = await request_json("POST", url + "/v1/secret", owner_dir.request(policy=7), timeout=10)
            return first, again, wrong

        (s1, b1), (s2, _), (s3, _) = asyncio.run(talk())
        assert (s1, s2, s3) == (200, 409, 403)
        measure, _ = split_blob(owner_dir.blob())
        table = open_packet(TIK, TEK, measure, base64.b64decode(b1["packet_header"]),
                            base64.b64decode(b1["secret"]))
        assert parse_secret_table(table) == [(LUKS_KEY_GUID, PASSPHRASE)]

        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.count("owner decision") == 3
    for form in leak_forms():
        assert form not in stderr, form
        assert form not in stdout
    assert "<redacted>" not in stderr


def test_serve_stops_on_sigint(owner_dir):
    proc = subprocess.Popen([KEYAGENT, "owner", "serve", "--config", str(owner_dir.toml),
                             "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_listening(proc)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def test_serve_bad_config_is_usage_error(owner_dir):
    owner_dir.tik.write_bytes(b"short")
    assert_usage_error(run("serve", "--config", str(owner_dir.toml), "--listen", "127.0.0.1:0"),
                       "16 raw bytes")


def test_serve_bad_toml_is_usage_error(tmp_path):
    (tmp_path / "owner.toml").write_text("[vm\n")
    assert_usage_error(run("serve", "--config", str(tmp_path / "owner.toml"), "--listen", "127.0.0.1:0"),
                       "not valid TOML")


@pytest.mark.parametrize("listen", ["8443", "127.0.0.1:", "127.0.0.1:99999", "host:port"])
def test_serve_bad_listen_is_usage_error(owner_dir, listen):
    assert_usage_error(run("serve", "--config", str(owner_dir.toml), "--listen", listen), "--listen")


def test_serve_port_in_use_is_usage_error(owner_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_usage_error(run("serve", "--config", str(owner_dir.toml), "--listen", f"127.0.0.1:{port}"),
                           "cannot listen")
