"""`keyagent owner ...` as a user runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
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
from tests.executable import KEYAGENT
from tests.sev import vectors as v

from .conftest import API, DIGEST, PASSPHRASE, POLICY, TEK, TIK


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*KEYAGENT, "owner", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


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
    return [
        "verify",
        "--tik",
        str(owner_dir.tik),
        "--measurement",
        base64.b64encode(blob).decode(),
        "--api-major",
        str(API[0]),
        "--api-minor",
        str(API[1]),
        "--build-id",
        str(API[2]),
        "--policy",
        str(policy),
        "--digest",
        digest.hex(),
    ]


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
    proc = run(
        "verify",
        "--tik",
        str(tik),
        "--measurement",
        v.SEVCTL_BLOB_GIVEN,
        "--api-major",
        str(major),
        "--api-minor",
        str(minor),
        "--build-id",
        str(build),
        "--policy",
        hex(v.SEVCTL_MEASURE_POLICY),
        "--digest",
        v.SEVCTL_DIGEST_GIVEN.hex(),
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "change, words",
    [
        ({"--measurement": "@@@"}, "--measurement is not valid base64"),
        ({"--measurement": base64.b64encode(bytes(40)).decode()}, "48 bytes, got 40"),
        ({"--digest": "abcd"}, "32 bytes"),
        ({"--api-minor": "300"}, "--api-minor must be in 0..255"),
        ({"--build-id": "x"}, "invalid int value"),
        ({"--tik": "/nonexistent/tik.bin"}, "does not exist"),
    ],
)
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
    proc = run(
        "package",
        "--tik",
        str(owner_dir.tik),
        "--tek",
        str(owner_dir.tek),
        "--measurement",
        base64.b64encode(blob).decode(),
        "--secret",
        f"luks-key={owner_dir.secret}",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"packet_header", "secret"}
    measure, _ = split_blob(blob)
    table = open_packet(TIK, TEK, measure, base64.b64decode(out["packet_header"]), base64.b64decode(out["secret"]))
    assert parse_secret_table(table) == [(LUKS_KEY_GUID, PASSPHRASE)]
    assert proc.stderr == ""


def test_package_matches_the_sevctl_vector(tmp_path):
    (tmp_path / "tik1.bin").write_bytes(v.SEVCTL_SECRET_TIK)
    (tmp_path / "tek1.bin").write_bytes(v.SEVCTL_SECRET_TEK)
    (tmp_path / "secret1.txt").write_bytes(v.SEVCTL_SECRET1[1])
    (tmp_path / "secret2.txt").write_bytes(v.SEVCTL_SECRET2[1])
    proc = run(
        "package",
        "--tik",
        "tik1.bin",
        "--tek",
        "tek1.bin",
        "--measurement",
        base64.b64encode(v.SEVCTL_SECRET_BLOB).decode(),
        "--secret",
        f"{v.SEVCTL_SECRET1[0]}=secret1.txt",
        "--secret",
        f"{v.SEVCTL_SECRET2[0]}=secret2.txt",
        "--iv",
        base64.b64encode(v.SEVCTL_SECRET_IV).decode(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"packet_header": v.SEVCTL_HEADER_TWO, "secret": v.SEVCTL_PAYLOAD_TWO}


def package_args(owner_dir) -> list[str]:
    return [
        "package",
        "--tik",
        str(owner_dir.tik),
        "--tek",
        str(owner_dir.tek),
        "--measurement",
        base64.b64encode(owner_dir.blob()).decode(),
        "--secret",
        f"luks-key={owner_dir.secret}",
    ]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"--secret": "luks-kee=x"}, "unknown GUID alias 'luks-kee'"),
        ({"--secret": "luks-key"}, "GUID=FILE"),
        ({"--secret": "luks-key=/nonexistent/pass"}, "does not exist"),
        ({"--measurement": "AAAA"}, "48 bytes, got 3"),
        ({"--measurement": "A"}, "not valid base64"),
        ({"--tek": "/nonexistent/tek"}, "does not exist"),
    ],
)
def test_package_bad_input_is_usage_error(owner_dir, change, words):
    args = package_args(owner_dir)
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    assert_usage_error(run(*args), words)


def test_package_bad_iv_is_usage_error(owner_dir):
    assert_usage_error(
        run(*package_args(owner_dir), "--iv", base64.b64encode(bytes(8)).decode()), "--iv must be 16 bytes"
    )


def test_package_wrong_tek_length_is_usage_error(owner_dir):
    owner_dir.tek.write_bytes(bytes(17))
    proc = run(*package_args(owner_dir))
    assert_usage_error(proc, "TEK")
    for form in leak_forms():
        assert form not in proc.stderr


# -- session, parser ----------------------------------------------------------


@pytest.fixture
def platform_files(tmp_path):
    """A simulated platform's PDH and chain, written as QEMU reports them (base64)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.tools.sim.amd import shared_amd
    from agent.tools.sim.psp import Platform

    key = ec.generate_private_key(ec.SECP384R1())
    platform = Platform(key)
    shared_amd().write_roots(str(tmp_path / "roots"))  # the simulator's AMD signed the chain's CEK
    (tmp_path / "pdh.b64").write_text(base64.b64encode(platform.pdh_cert.to_bytes()).decode() + "\n")
    (tmp_path / "pdh.bin").write_bytes(platform.pdh_cert.to_bytes())
    (tmp_path / "chain.b64").write_text(base64.b64encode(platform.chain.to_bytes()).decode())
    (tmp_path / "chain.bin").write_bytes(platform.chain.to_bytes())
    other = Platform()
    (tmp_path / "other-chain.b64").write_text(base64.b64encode(other.chain.to_bytes()).decode())
    (tmp_path / "pek.bin").write_bytes(platform.chain.pek.to_bytes())
    c = platform.chain
    (tmp_path / "swapped-chain.bin").write_bytes(c.oca.to_bytes() + c.pek.to_bytes() + c.cek.to_bytes())
    (tmp_path / "short.b64").write_text(base64.b64encode(bytes(2000)).decode())
    (tmp_path / "short.bin").write_bytes(bytes(2000))
    (tmp_path / "junk.b64").write_text("not@base64!")
    return tmp_path, key


def test_session_files_open_on_the_platform(platform_files):
    import stat

    from agent.sev.session import open_session

    d, key = platform_files
    out = d / "out"
    proc = run(
        "session",
        "--pdh",
        str(d / "pdh.b64"),
        "--cert-chain",
        str(d / "chain.b64"),
        "--amd-roots",
        str(d / "roots"),
        "--policy",
        "0x5",
        "--out-dir",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["chain_verified"] is True and shown["policy"] == 5 and shown["platform"] == "amd:sim"
    assert sorted(os.listdir(out)) == ["godh.b64", "session.b64", "tek.bin", "tik.bin"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600
    tik, tek = (out / "tik.bin").read_bytes(), (out / "tek.bin").read_bytes()
    assert len(tik) == len(tek) == 16 and tik != tek
    godh = base64.b64decode((out / "godh.b64").read_text(), validate=False)
    session = base64.b64decode((out / "session.b64").read_text())
    assert (len(godh), len(session)) == (2084, 128)
    assert open_session(key, godh, session, 5) == (tek, tik)
    for raw in (tik, tek):
        for form in (raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()):
            assert form not in proc.stdout and form not in proc.stderr


def test_session_takes_a_raw_pdh_and_raw_chain(platform_files):
    d, _ = platform_files
    proc = run(
        "session",
        "--pdh",
        str(d / "pdh.bin"),
        "--cert-chain",
        str(d / "chain.bin"),
        "--amd-roots",
        str(d / "roots"),
        "--policy",
        "1",
        "--out-dir",
        str(d / "out"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["chain_verified"] is True


def test_session_without_a_chain_is_refused_unless_the_platform_is_waved_through(platform_files):
    d, _ = platform_files
    proc = run("session", "--pdh", str(d / "pdh.b64"), "--policy", "1", "--out-dir", str(d / "out"))
    assert_usage_error(proc, "--cert-chain is needed to verify the platform to AMD")
    assert not (d / "out").exists()
    proc = run(
        "session", "--pdh", str(d / "pdh.b64"), "--policy", "1", "--out-dir", str(d / "out"), "--unverified-platform"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["chain_verified"] is False and "owner platform unchecked" in proc.stderr


def test_session_for_a_self_made_chain_is_refused_by_the_builtin_roots(platform_files):
    d, _ = platform_files
    proc = run(
        "session",
        "--pdh",
        str(d / "pdh.b64"),
        "--cert-chain",
        str(d / "chain.b64"),
        "--policy",
        "1",
        "--out-dir",
        str(d / "out"),
    )
    assert_usage_error(proc, "platform not verified: CEK is not signed by any trusted AMD ASK")
    assert not (d / "out").exists()


def test_session_for_a_real_rome_platform_verifies_to_the_builtin_roots(tmp_path):
    from tests.sev.amd_chains import real_certs

    c = real_certs("rome")
    (tmp_path / "pdh.bin").write_bytes(c["pdh"])
    (tmp_path / "chain.bin").write_bytes(c["pek"] + c["oca"] + c["cek"])
    proc = run(
        "session",
        "--pdh",
        str(tmp_path / "pdh.bin"),
        "--cert-chain",
        str(tmp_path / "chain.bin"),
        "--policy",
        "1",
        "--out-dir",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["platform"] == "amd:rome"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--pdh", "short.bin"], "--pdh {d}/short.bin: neither 2084 raw bytes nor valid base64"),
        (["--pdh", "short.b64"], "must hold 2084 bytes (raw or base64), holds 2000"),
        (["--pdh", "junk.b64"], "neither 2084 raw bytes nor valid base64"),
        (["--pdh", "missing"], "does not exist"),
        (["--pdh", "pek.bin"], "--pdh: certificate has usage 0x1002, not PDH (0x1003)"),
        (
            ["--cert-chain", "other-chain.b64"],
            "platform not verified: PDH certificate is not signed by the chain's PEK",
        ),
        (["--amd-roots", "nope"], "--amd-roots: cannot read AMD roots directory"),
        (["--amd-roots", "pdh.b64"], "--amd-roots: cannot read AMD roots directory"),
        (["--cert-chain", "swapped-chain.bin"], "certificate 1 of the chain has usage 0x1001, not PEK"),
        (["--cert-chain", "pdh.b64"], "--cert-chain"),
        (["--cert-chain", "junk.b64"], "neither 6252 raw bytes nor valid base64"),
        (["--policy", "lots"], "invalid"),
        (["--policy", "0x100000000"], "--policy must be a 32-bit value"),
        (["--out-dir", "pdh.bin"], "exists and is not a directory"),
    ],
)
def test_session_bad_input_is_usage_error(platform_files, args, words):
    d, _ = platform_files
    argv = {
        "--pdh": "pdh.b64",
        "--policy": "1",
        "--out-dir": "out",
        "--cert-chain": "chain.b64",
        "--amd-roots": "roots",
    }
    argv.update(dict(zip(args[::2], args[1::2])))
    flat = [x for k, v in argv.items() for x in (k, v if k == "--policy" else str(d / v))]
    proc = run("session", *flat)
    assert_usage_error(proc, words.format(d=d))
    assert not (d / "out").exists()


def test_session_never_overwrites_a_key_file(platform_files):
    d, _ = platform_files
    (d / "out").mkdir()
    (d / "out" / "tek.bin").write_bytes(b"old key")
    proc = run(
        "session", "--pdh", str(d / "pdh.b64"), "--policy", "1", "--out-dir", str(d / "out"), "--unverified-platform"
    )
    assert_usage_error(proc, "tek.bin already exists; not overwriting it")
    assert (d / "out" / "tek.bin").read_bytes() == b"old key"
    assert sorted(p.name for p in (d / "out").iterdir()) == ["tek.bin"]


def test_session_refuses_a_symlink_in_place_of_a_key_file(platform_files):
    d, _ = platform_files
    (d / "out").mkdir()
    (d / "out" / "tik.bin").symlink_to(d / "elsewhere")
    proc = run(
        "session", "--pdh", str(d / "pdh.b64"), "--policy", "1", "--out-dir", str(d / "out"), "--unverified-platform"
    )
    assert_usage_error(proc, "tik.bin already exists")
    assert not (d / "elsewhere").exists()


def test_session_needs_its_options():
    assert_usage_error(run("session", "--pdh", "x"), "required")


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
    proc = subprocess.Popen(
        [*KEYAGENT, "owner", "serve", "--config", str(owner_dir.toml), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = read_listening(proc)
        assert url.startswith("http://127.0.0.1:")

        async def talk():
            first = await request_json("POST", url + "/v1/secret", owner_dir.request(), timeout=10)
            again = await request_json("POST", url + "/v1/secret", owner_dir.request(), timeout=10)
            wrong = await request_json("POST", url + "/v1/secret", owner_dir.request(policy=7), timeout=10)
            return first, again, wrong

        (s1, b1), (s2, b2), (s3, _) = asyncio.run(talk())
        assert (s1, s2, s3) == (200, 200, 403) and b2 == b1  # the same blob again: the same answer
        measure, _ = split_blob(owner_dir.blob())
        table = open_packet(TIK, TEK, measure, base64.b64decode(b1["packet_header"]), base64.b64decode(b1["secret"]))
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
    proc = subprocess.Popen(
        [*KEYAGENT, "owner", "serve", "--config", str(owner_dir.toml), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    assert_usage_error(run("serve", "--config", str(owner_dir.toml), "--listen", "127.0.0.1:0"), "16 raw bytes")


def test_serve_bad_toml_is_usage_error(tmp_path):
    (tmp_path / "owner.toml").write_text("[vm\n")
    assert_usage_error(
        run("serve", "--config", str(tmp_path / "owner.toml"), "--listen", "127.0.0.1:0"), "not valid TOML"
    )


@pytest.mark.parametrize("listen", ["8443", "127.0.0.1:", "127.0.0.1:99999", "host:port"])
def test_serve_bad_listen_is_usage_error(owner_dir, listen):
    assert_usage_error(run("serve", "--config", str(owner_dir.toml), "--listen", listen), "--listen")


def test_serve_port_in_use_is_usage_error(owner_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_usage_error(
            run("serve", "--config", str(owner_dir.toml), "--listen", f"127.0.0.1:{port}"), "cannot listen"
        )


# -- bad input, every subcommand: exit 2, one line, no traceback ---------------


@pytest.fixture
def bad_inputs(owner_dir):
    """Files for the bad-input table: keys of the wrong length, firmware without a table."""
    from agent.sev.ovmf import synthetic_image

    root = owner_dir.root
    (root / "tik15.bin").write_bytes(bytes(15))
    (root / "tek17.bin").write_bytes(bytes(17))
    (root / "fw-no-table.fd").write_bytes(synthetic_image(footer=False))
    (root / "fw-no-hashes.fd").write_bytes(synthetic_image())
    (root / "vmlinuz").write_bytes(b"MZ" + b"k" * 100)
    return owner_dir


def _toml_with(owner_dir, old: str, new: str) -> str:
    path = owner_dir.root / "bad.toml"
    text = owner_dir.toml.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return str(path)


BLOB_B64 = base64.b64encode(bytes(48)).decode()
SHORT_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "case, argv, words",
    [
        (
            "verify: TIK too short",
            [
                "verify",
                "--tik",
                "{r}/tik15.bin",
                "--measurement",
                BLOB_B64,
                "--api-major",
                "1",
                "--api-minor",
                "49",
                "--build-id",
                "21",
                "--policy",
                "1",
                "--digest",
                "ab" * 32,
            ],
            "must hold 16 raw bytes, it holds 15",
        ),
        (
            "verify: short measurement",
            [
                "verify",
                "--tik",
                "{r}/keys/vm1_tik.bin",
                "--measurement",
                SHORT_B64,
                "--api-major",
                "1",
                "--api-minor",
                "49",
                "--build-id",
                "21",
                "--policy",
                "1",
                "--digest",
                "ab" * 32,
            ],
            "--measurement must be 48 bytes, got 32",
        ),
        (
            "verify: no firmware table",
            [
                "verify",
                "--tik",
                "{r}/keys/vm1_tik.bin",
                "--measurement",
                BLOB_B64,
                "--api-major",
                "1",
                "--api-minor",
                "49",
                "--build-id",
                "21",
                "--policy",
                "1",
                "--firmware",
                "{r}/fw-no-table.fd",
                "--kernel",
                "{r}/vmlinuz",
            ],
            "no OVMF GUID table footer",
        ),
        (
            "package: TIK too short",
            [
                "package",
                "--tik",
                "{r}/tik15.bin",
                "--tek",
                "{r}/keys/vm1_tek.bin",
                "--measurement",
                BLOB_B64,
                "--secret",
                "luks-key={r}/vm1-disk.pass",
            ],
            "TIK file {r}/tik15.bin must hold 16 raw bytes, it holds 15",
        ),
        (
            "package: TEK too long",
            [
                "package",
                "--tik",
                "{r}/keys/vm1_tik.bin",
                "--tek",
                "{r}/tek17.bin",
                "--measurement",
                BLOB_B64,
                "--secret",
                "luks-key={r}/vm1-disk.pass",
            ],
            "TEK file {r}/tek17.bin must hold 16 raw bytes, it holds 17",
        ),
        (
            "package: short measurement",
            [
                "package",
                "--tik",
                "{r}/keys/vm1_tik.bin",
                "--tek",
                "{r}/keys/vm1_tek.bin",
                "--measurement",
                SHORT_B64,
                "--secret",
                "luks-key={r}/vm1-disk.pass",
            ],
            "--measurement must be 48 bytes, got 32",
        ),
        (
            "package: bad iv base64",
            [
                "package",
                "--tik",
                "{r}/keys/vm1_tik.bin",
                "--tek",
                "{r}/keys/vm1_tek.bin",
                "--measurement",
                BLOB_B64,
                "--secret",
                "luks-key={r}/vm1-disk.pass",
                "--iv",
                "!!!!",
            ],
            "--iv is not valid base64",
        ),
        (
            "package: unknown alias",
            [
                "package",
                "--tik",
                "{r}/keys/vm1_tik.bin",
                "--tek",
                "{r}/keys/vm1_tek.bin",
                "--measurement",
                BLOB_B64,
                "--secret",
                "disk-key={r}/vm1-disk.pass",
            ],
            "unknown GUID alias 'disk-key'",
        ),
        (
            "measure: no firmware table",
            ["measure", "--firmware", "{r}/fw-no-table.fd", "--kernel", "{r}/vmlinuz"],
            "no OVMF GUID table footer",
        ),
        (
            "measure: no hashes table",
            ["measure", "--firmware", "{r}/fw-no-hashes.fd", "--kernel", "{r}/vmlinuz"],
            "firmware cannot measure a kernel: its GUID table has no SEV hashes-table entry",
        ),
        (
            "serve: TEK too long",
            ["serve", "--config", "@tek", "--listen", "127.0.0.1:0"],
            "must hold 16 raw bytes, it holds 17",
        ),
        (
            "serve: unknown alias",
            ["serve", "--config", "@alias", "--listen", "127.0.0.1:0"],
            "unknown GUID alias 'luks-kee'",
        ),
        (
            "serve: no firmware table",
            ["serve", "--config", "@fw", "--listen", "127.0.0.1:0"],
            "cannot compute the launch digest",
        ),
        ("serve: short digest", ["serve", "--config", "@digest", "--listen", "127.0.0.1:0"], "32 bytes"),
    ],
)
def test_bad_input_of_every_subcommand_is_one_line_exit_2(bad_inputs, case, argv, words):
    d = bad_inputs
    tomls = {
        "@tek": lambda: _toml_with(d, 'tek = "keys/vm1_tek.bin"', 'tek = "tek17.bin"'),
        "@alias": lambda: _toml_with(d, 'guid = "luks-key"', 'guid = "luks-kee"'),
        "@fw": lambda: _toml_with(
            d, f'digest = ["{DIGEST.hex()}", "{"cd" * 32}"]', 'firmware = "fw-no-table.fd"\nkernel = "vmlinuz"'
        ),
        "@digest": lambda: _toml_with(d, f'"{DIGEST.hex()}", ', '"abcd", '),
    }
    argv = [tomls[a]() if a in tomls else a.format(r=d.root) for a in argv]
    proc = run(*argv)
    assert_usage_error(proc, words.format(r=d.root))
    for form in leak_forms():
        assert form not in proc.stderr


# -- platform: the pin and whether AMD vouches ---------------------------------------


@pytest.mark.parametrize("product", ["naples", "rome"])
def test_platform_prints_the_pin_of_a_real_chain_and_its_product(tmp_path, product):
    import hashlib

    from tests.sev.amd_chains import real_certs

    c = real_certs(product)
    (tmp_path / "pdh.b64").write_text(base64.b64encode(c["pdh"]).decode())
    (tmp_path / "chain.bin").write_bytes(c["pek"] + c["oca"] + c["cek"])
    proc = run("platform", "--pdh", str(tmp_path / "pdh.b64"), "--cert-chain", str(tmp_path / "chain.bin"))
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["pdh_sha256"] == hashlib.sha256(c["pdh"]).hexdigest() and shown["verified"] == f"amd:{product}"


def test_platform_without_a_chain_still_prints_the_pin_and_exits_1(platform_files):
    d, _ = platform_files
    proc = run("platform", "--pdh", str(d / "pdh.b64"))
    assert proc.returncode == 1
    shown = json.loads(proc.stdout)
    assert len(shown["pdh_sha256"]) == 64 and shown["verified"] is None
    assert shown["reason"].startswith("platform not verified: no --cert-chain")
    proc = run(
        "platform", "--pdh", str(d / "pdh.b64"), "--cert-chain", str(d / "chain.b64"), "--amd-roots", str(d / "roots")
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["verified"] == "amd:sim"


def test_platform_bad_input_is_usage_error(platform_files):
    d, _ = platform_files
    assert_usage_error(run("platform", "--pdh", str(d / "pek.bin")), "--pdh: certificate has usage 0x1002")
    assert_usage_error(
        run("platform", "--pdh", str(d / "pdh.b64"), "--cert-chain", str(d / "swapped-chain.bin")),
        "certificate 1 of the chain has usage 0x1001, not PEK",
    )
    assert_usage_error(
        run("platform", "--pdh", str(d / "pdh.b64"), "--amd-roots", str(d / "nope")),
        "--amd-roots: cannot read AMD roots directory",
    )


# -- serve under pressure: slow peers, few file descriptors, stopping -------------


def start_owner(owner_dir, *extra: str, nofile: int | None = None) -> tuple[subprocess.Popen, str]:
    def limit_fds():  # in the child, before exec
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [*KEYAGENT, "owner", "serve", "--config", str(owner_dir.toml), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_fds if nofile else None,
    )
    return proc, read_listening(proc)


def stop_owner(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr


def slow_connections(url: str, count: int) -> list:
    """``count`` connections that each sent the start of a request and then nothing."""
    import socket

    port = int(url.rsplit(":", 1)[1])
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/secret HTTP/1.1\r\nHost: owner\r\n")
        socks.append(s)
    return socks


def good_client_answer_time(url: str, owner_dir) -> float:
    """Seconds until a well-behaved client gets its answer (it retries its connect)."""
    start = time.monotonic()
    status, _ = asyncio.run(request_json("POST", url + "/v1/secret", owner_dir.request(), timeout=30))
    assert status == 200
    return time.monotonic() - start


def assert_json_lines_only(stderr: str) -> None:
    for line in stderr.strip().splitlines():
        json.loads(line)  # a traceback or a multi-line message is not JSON
    assert "Traceback" not in stderr and "CancelledError" not in stderr


def test_serve_slow_connections_over_the_cap_keep_a_good_client_out_only_briefly(owner_dir):
    proc, url = start_owner(owner_dir, "--max-connections", "50", "--request-timeout", "1")
    socks = slow_connections(url, 260)
    try:
        took = good_client_answer_time(url, owner_dir)
    finally:
        for s in socks:
            s.close()
    code, stderr = stop_owner(proc)
    assert code == 0
    # 260 slow peers, 50 at a time, each cut off after 1 s: about 6 s, not minutes.
    assert took < 15, took
    assert stderr.count("connection limit reached") == 1
    assert stderr.count("408") == 0  # answers go to peers, not into the log
    assert_json_lines_only(stderr)


def test_serve_out_of_file_descriptors_backs_off_and_logs_once(owner_dir):
    # A cap above the fd limit: accept() fails with EMFILE until slow peers are cut off.
    proc, url = start_owner(owner_dir, "--max-connections", "1000", "--request-timeout", "1", nofile=256)
    socks = slow_connections(url, 260)
    try:
        took = good_client_answer_time(url, owner_dir)
    finally:
        for s in socks:
            s.close()
    code, stderr = stop_owner(proc)
    assert code == 0
    assert took < 15, took
    assert stderr.count("accept() failed") == 1, stderr[-2000:]
    assert "EMFILE" in stderr
    assert "out of system resource" not in stderr  # asyncio's own per-retry message
    assert len(stderr.splitlines()) < 20
    assert_json_lines_only(stderr)


def test_serve_stops_at_once_and_quietly_with_connections_open(owner_dir):
    import socket

    proc, url = start_owner(owner_dir)
    port = int(url.rsplit(":", 1)[1])
    socks = slow_connections(url, 3)  # mid-request
    idle = socket.create_connection(("127.0.0.1", port))  # says nothing
    keep = socket.create_connection(("127.0.0.1", port))  # one answer, then idle keep-alive
    keep.sendall(b"GET /nope HTTP/1.1\r\nHost: owner\r\n\r\n")
    assert keep.recv(65536).startswith(b"HTTP/1.1 404 ")
    # Pipelined requests whose answers are never read: the owner's sends block.
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", port))
    hog.setblocking(False)
    try:
        for _ in range(20000):
            hog.send(b"GET /nope HTTP/1.1\r\nHost: owner\r\n\r\n")
    except BlockingIOError:
        pass  # the owner stopped reading: its answers fill both buffers
    socks.append(hog)
    time.sleep(0.5)
    try:
        start = time.monotonic()
        code, stderr = stop_owner(proc)
        took = time.monotonic() - start
    finally:
        for s in (*socks, idle, keep):
            s.close()
    assert code == 0 and took < 5
    assert_json_lines_only(stderr)
    assert stderr.strip().splitlines()[-1].count("owner stopped") == 1


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-connections", "0"], "--max-connections: must be in 1..1000000"),
        (["--max-connections", "many"], "--max-connections: must be an integer"),
        (["--request-timeout", "nan"], "--request-timeout: must be a finite number of seconds above 0"),
        (["--request-timeout", "-1"], "--request-timeout: must be a finite number of seconds above 0"),
    ],
)
def test_serve_bad_limits_are_usage_errors(owner_dir, flags, words):
    assert_usage_error(run("serve", "--config", str(owner_dir.toml), "--listen", "127.0.0.1:0", *flags), words)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_serve_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):

    path = tmp_path / "owner.toml"
    if kind == "fifo":
        os.mkfifo(path)  # open() would wait for a writer for ever
    else:
        path = "/dev/zero"  # read() would fill memory
    proc = subprocess.run(
        [*KEYAGENT, "owner", "serve", "--config", str(path), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=20,
        preexec_fn=limit_memory,
    )
    assert_usage_error(proc, "is not a regular file")


def limit_memory() -> None:
    """In the child: 2 GiB of address space, so that a regression that reads
    /dev/zero fails there instead of filling this shared machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_serve_refuses_two_vms_with_the_same_tik(owner_dir):
    text = owner_dir.toml.read_text()
    second = text.replace("[vm.vm1]", "[vm.vm2]").replace("vm.vm1.secret", "vm.vm2.secret")
    (owner_dir.root / "vm2_tek.bin").write_bytes(bytes(range(100, 116)))
    second = second.replace('tek = "keys/vm1_tek.bin"', 'tek = "vm2_tek.bin"')
    owner_dir.toml.write_text(text + second)
    proc = run("serve", "--config", str(owner_dir.toml), "--listen", "127.0.0.1:0")
    assert_usage_error(proc, "vm.vm2 TIK is the same key as vm.vm1 TIK")
    for form in leak_forms():
        assert form not in proc.stderr
