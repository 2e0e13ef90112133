"""The kernel keyring through syscalls, and secret references."""

import os

import pytest

from agent.errors import UsageError
from agent.io import keyring
from agent.io.secretref import resolve

KEYRING_PROBLEM = keyring.usable()
needs_keyring = pytest.mark.skipif(KEYRING_PROBLEM is not None, reason=KEYRING_PROBLEM or "")


@needs_keyring
def test_add_search_read_revoke_roundtrip():
    desc = f"keyagent-test-{os.getpid()}"
    serial = keyring.add_key(desc, b"\x00binary key\xff")
    try:
        assert keyring.search(desc) == serial
        assert bytes(keyring.read(serial)) == b"\x00binary key\xff"
        assert resolve(f"keyring:{desc}").reveal() == b"\x00binary key\xff"
    finally:
        keyring.revoke(serial)
        keyring.unlink(serial)
    with pytest.raises(OSError):
        keyring.search(desc)


@needs_keyring
def test_unknown_keyring_reference_is_one_line():
    with pytest.raises(UsageError, match="keyring:keyagent-no-such-key"):
        resolve("keyring:keyagent-no-such-key")


def test_file_reference_reads_raw_bytes(tmp_path):
    p = tmp_path / "k"
    p.write_bytes(b"key\n")
    assert resolve(f"file:{p}").reveal() == b"key\n"


@pytest.mark.parametrize("setup, words", [
    (lambda p: None, "No such file"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: p.write_bytes(b"x" * 70000), "larger than"),
])
def test_bad_key_files_are_refused(tmp_path, setup, words):
    p = tmp_path / "k"
    setup(p)
    with pytest.raises(UsageError, match=words):
        resolve(f"file:{p}")


def test_symlinked_key_file_is_refused(tmp_path):
    (tmp_path / "real").write_bytes(b"k")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UsageError):
        resolve(f"file:{tmp_path / 'link'}")


@pytest.mark.parametrize("ref, words", [
    ("nothing", "must be file:PATH"), ("s3:bucket", "unknown secret reference scheme"),
    ("libvirt:not-a-uuid", "is not a UUID"),
])
def test_bad_references(ref, words):
    with pytest.raises(UsageError, match=words):
        resolve(ref)
