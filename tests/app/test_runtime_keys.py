"""The key store: key directories and keyring keys, and how long they live."""

from __future__ import annotations

import os
import stat

import pytest

from agent.app.runtime_keys import KeyStore
from agent.common.secret import Secret
from agent.core.actions import KeyringAdd, KeyringDrop, RemoveKeyDir, WriteKeyDir
from agent.core.events import KeyDirFailed, KeyDirReady, KeyringFailed, KeyringReady
from tests.app.runtime_fakes import Fed, QuietLog


def _store(run_dir) -> tuple[KeyStore, Fed]:
    fed = Fed()
    return KeyStore(fed, str(run_dir) if run_dir else None, QuietLog()), fed


def test_a_key_directory_is_private_and_holds_each_file_0600(tmp_path):
    keys, fed = _store(tmp_path)
    psk = Secret(b"qemu:" + b"ab" * 32 + b"\n")
    keys.run("migrate", WriteKeyDir("tls", {"keys.psk": psk, "dh-params.pem": "-----BEGIN DH-----\n"}))
    ((flow, ready),) = fed
    assert flow == "migrate" and isinstance(ready, KeyDirReady) and ready.name == "tls"
    assert stat.S_IMODE(os.stat(ready.path).st_mode) == 0o700
    for name, content in (("keys.psk", psk.reveal()), ("dh-params.pem", b"-----BEGIN DH-----\n")):
        path = os.path.join(ready.path, name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert open(path, "rb").read() == content
    assert len(psk) == len(b"qemu:") + 64 + 1  # the flow that made it wipes it, not the store
    keys.run("migrate", RemoveKeyDir("tls"))
    assert not os.path.exists(ready.path) and keys.key_dirs == {}


def test_without_a_run_dir_no_key_file_is_written():
    keys, fed = _store(None)
    keys.run("secrets", WriteKeyDir("master", {"master.key": Secret(bytes(32))}))
    assert fed == [("secrets", KeyDirFailed("master", "no run_dir configured for key files"))]


def test_a_write_that_fails_half_way_leaves_no_directory(tmp_path, monkeypatch):
    from agent.io import rundir

    real, written = rundir.write_key_file, []

    def write_key_file(directory, name, data):
        if written:
            raise OSError(28, "No space left on device")
        written.append(directory)
        return real(directory, name, data)

    monkeypatch.setattr(rundir, "write_key_file", write_key_file)
    keys, fed = _store(tmp_path)
    keys.run("migrate", WriteKeyDir("tls", {"a": Secret(b"1"), "b": Secret(b"2")}))
    assert fed == [("migrate", KeyDirFailed("tls", "cannot write key files: No space left on device"))]
    assert not os.path.exists(written[0]) and keys.key_dirs == {}


def test_forget_removes_only_that_flows_directories_and_close_removes_the_rest(tmp_path):
    keys, fed = _store(tmp_path)
    for flow in ("f1", "f2"):
        keys.run(flow, WriteKeyDir("k", {"key": Secret(b"x")}))
    (_, d1), (_, d2) = fed
    keys.forget("f1")
    assert not os.path.exists(d1.path) and os.path.exists(d2.path)
    keys.close()
    assert not os.path.exists(d2.path) and keys.key_dirs == {}


class FakeKeyring:
    def __init__(self, fail_setperm: bool = False) -> None:
        self.keys: dict[int, tuple[str, bytes]] = {}
        self.revoked: list[int] = []
        self.fail_setperm = fail_setperm

    def install(self, monkeypatch) -> None:
        from agent.io import keyring

        for name in ("add_key", "setperm", "revoke", "unlink"):
            monkeypatch.setattr(keyring, name, getattr(self, name))

    def add_key(self, description, payload):
        serial = 100 + len(self.keys) + len(self.revoked)
        self.keys[serial] = (description, bytes(payload))
        return serial

    def setperm(self, serial, perm):
        if self.fail_setperm:
            raise OSError(13, "Permission denied")

    def revoke(self, serial):
        self.revoked.append(serial)

    def unlink(self, serial):
        del self.keys[serial]


def test_a_keyring_key_is_added_from_the_secret_in_place_and_dropped(tmp_path, monkeypatch):
    ring = FakeKeyring()
    ring.install(monkeypatch)
    keys, fed = _store(tmp_path)
    master = Secret(bytes(range(32)))
    keys.run("secrets", KeyringAdd("master", "keyagent:vm1:master", master))
    assert fed == [("secrets", KeyringReady("master", 100))]
    assert ring.keys[100] == ("keyagent:vm1:master", bytes(range(32)))
    assert master.reveal() == bytes(range(32))  # the verb still needs it for every secret add
    keys.run("secrets", KeyringDrop("master"))
    keys.run("secrets", KeyringDrop("master"))  # twice: nothing left to drop
    assert ring.keys == {} and ring.revoked == [100]


def test_a_keyring_key_that_cannot_be_made_usable_does_not_stay(tmp_path, monkeypatch):
    ring = FakeKeyring(fail_setperm=True)
    ring.install(monkeypatch)
    keys, fed = _store(tmp_path)
    keys.run("secrets", KeyringAdd("master", "keyagent:vm1:master", Secret(bytes(32))))
    assert fed == [("secrets", KeyringFailed("master", "cannot add a keyring key: Permission denied"))]
    assert ring.keys == {} and ring.revoked == [100] and keys.keyring_keys == {}


@pytest.mark.parametrize("ending", ["forget", "close"])
def test_a_flows_keyring_keys_do_not_outlive_it(tmp_path, monkeypatch, ending):
    ring = FakeKeyring()
    ring.install(monkeypatch)
    keys, _ = _store(tmp_path)
    keys.run("secrets", KeyringAdd("master", "keyagent:vm1:master", Secret(bytes(32))))
    keys.run("other", KeyringAdd("k", "keyagent:vm1:k", Secret(bytes(32))))
    if ending == "forget":
        keys.forget("secrets")
        assert list(ring.keys) == [101]
    else:
        keys.close()
        assert ring.keys == {}
