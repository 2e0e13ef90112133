"""`keyagent hostkey init|show`, the public key format and the trusted-hosts directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from agent.app.config import load_config
from agent.app.sidecar import check_host_keys
from agent.common.errors import UsageError
from agent.crypto import hostkey
from tests.hostkeys import make_host

KEYAGENT = [sys.executable, "-m", "agent.cli"]


def keyagent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KEYAGENT, *args], capture_output=True, text=True, timeout=60)


def test_init_writes_a_0600_key_and_prints_its_public_line_once(tmp_path):
    path = tmp_path / "host.key"
    out = keyagent("hostkey", "init", str(path))
    assert out.returncode == 0, out.stderr
    line = out.stdout
    assert line.endswith("\n") and line.count("\n") == 1
    assert hostkey.parse_public(line, "stdout")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    shown = keyagent("hostkey", "show", str(path))
    assert shown.returncode == 0 and shown.stdout == line


def test_init_never_overwrites(tmp_path):
    path = tmp_path / "host.key"
    path.write_text("precious")
    out = keyagent("hostkey", "init", str(path))
    assert out.returncode == 2 and "never overwritten" in out.stderr
    assert out.stderr.count("\n") == 1
    assert path.read_text() == "precious"


def test_init_does_not_follow_a_symlink(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    out = keyagent("hostkey", "init", str(tmp_path / "link"))
    assert out.returncode == 2
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    "content,mode,words",
    [
        (None, 0o600, "No such file"),
        ("hello\n", 0o600, "not a PKCS#8 PEM"),
        ("-----BEGIN PRIVATE KEY-----\nMAo=\n-----END PRIVATE KEY-----\n", 0o600, "not an Ed25519"),
        ("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n", 0o600, "not valid base64"),
        ("GOOD", 0o640, "readable by group or others"),
    ],
)
def test_show_refuses_bad_key_files_with_one_line(tmp_path, content, mode, words):
    path = tmp_path / "host.key"
    if content == "GOOD":
        hostkey.init(str(path))
    elif content is not None:
        path.write_text(content)
    if path.exists():
        os.chmod(path, mode)
    out = keyagent("hostkey", "show", str(path))
    assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1


def test_an_openssl_style_pkcs8_ed25519_key_is_accepted(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path = tmp_path / "k.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(path, 0o600)
    hostkey.check_private(str(path))
    assert hostkey.public_raw(hostkey.load_private(str(path))) == hostkey.public_raw(key)


@pytest.mark.parametrize(
    "text,words",
    [
        ("ssh-ed25519 AAAA", "not a host public key"),
        ("keyagent-host-ed25519 !!", "not valid base64"),
        ("keyagent-host-ed25519 AAAA", "3 bytes, expected 32"),
        ("keyagent-host-ed25519 " + "A" * 43 + "=\nx", "one line"),
        ("keyagent-host-ed25519  " + "A" * 43 + "=", "not a host public key"),
    ],
)
def test_bad_public_keys_are_one_line_errors(text, words):
    with pytest.raises(hostkey.HostKeyError, match=words) as err:
        hostkey.parse_public(text, "f")
    assert "\n" not in str(err.value)


def test_trusted_hosts_are_named_by_their_files_and_dotfiles_are_skipped(tmp_path):
    a, b = make_host(tmp_path, "a"), make_host(tmp_path, "b")
    a.trust(b)
    (a.trusted / ".b.swp").write_text("junk")
    assert a.trusted_map() == {hostkey.parse_public(b.public, "b"): "b"}


def test_a_trusted_hosts_dir_others_can_write_is_refused(tmp_path):
    a = make_host(tmp_path, "a")
    os.chmod(a.trusted, 0o777)
    with pytest.raises(hostkey.HostKeyError, match="writable by group or others"):
        a.trusted_map()


def test_a_bad_file_in_trusted_hosts_is_refused(tmp_path):
    a = make_host(tmp_path, "a")
    (a.trusted / "junk").write_text("not a key\n")
    with pytest.raises(hostkey.HostKeyError, match="junk: not a host public key"):
        a.trusted_map()


def test_the_agent_checks_host_keys_at_start(tmp_path):
    a = make_host(tmp_path, "a")
    check_host_keys(load_config(None, {"migration_host_key": str(a.key), "migration_trusted_hosts": str(a.trusted)}))
    with pytest.raises(UsageError, match="go together"):
        check_host_keys(load_config(None, {"migration_host_key": str(a.key)}))
    os.chmod(a.key, 0o644)
    with pytest.raises(UsageError, match="readable by group or others"):
        check_host_keys(
            load_config(None, {"migration_host_key": str(a.key), "migration_trusted_hosts": str(a.trusted)})
        )


def test_host_key_paths_in_a_config_file_are_relative_to_it(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[migration]\nhost_key = "host.key"\ntrusted_hosts = "trusted"\noffer_lifetime_s = 30\n')
    c = load_config(str(cfg))
    assert c.migration_host_key == str(tmp_path / "host.key")
    assert c.migration_trusted_hosts == str(tmp_path / "trusted")
    assert c.migration_offer_lifetime_s == 30.0


def test_keyagent_run_with_a_bad_host_key_exits_2_before_anything_is_created(tmp_path):
    a = make_host(tmp_path, "a")
    os.chmod(a.key, 0o644)
    run_dir = tmp_path / "run"
    out = keyagent("run", "--qmp", f"unix:{tmp_path}/qmp.sock", "--vm-run-dir", str(run_dir), *a.flags())
    assert out.returncode == 2 and "readable by group or others" in out.stderr
    assert not run_dir.exists()


def test_checking_host_keys_at_start_does_not_load_cryptography(tmp_path):
    """An idle sidecar must not pay for cryptography (~7 MB RSS) because host keys are set."""
    a = make_host(tmp_path, "a")
    code = (
        "import sys\n"
        "from agent.app.config import load_config\n"
        "from agent.app.sidecar import check_host_keys\n"
        f"check_host_keys(load_config(None, {{'migration_host_key': {str(a.key)!r}, "
        f"'migration_trusted_hosts': {str(a.trusted)!r}}}))\n"
        "assert not [m for m in sys.modules if m.startswith('cryptography')]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
