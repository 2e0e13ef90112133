"""The runtime's key store: key files under the run_dir and keyring keys.

It owns the lifetime of every copy of key material it makes: a key
directory lives from ``WriteKeyDir`` until ``RemoveKeyDir``, a keyring key
from ``KeyringAdd`` until ``KeyringDrop``, and in any case no longer than
the flow that asked for it (``forget``) or the runtime (``close``).  A copy
that failed half-way (a directory with some files, a key added but not
usable) is removed before the failure is reported.

The :class:`Secret` values a flow hands over are read in place
(``Secret.view``: no copy on the Python heap) and not wiped here: their
owner may need them again (the master key serves every ``secret add``), and
the flow that produced a one-time value wipes it itself (``keys.psk``).
"""

from __future__ import annotations

from typing import Any, assert_never

from agent.app.runtime_base import Feed
from agent.common.secret import Secret
from agent.core.actions import KeyringAdd, KeyringDrop, RemoveKeyDir, WriteKeyDir
from agent.core.events import KeyDirFailed, KeyDirReady, KeyringFailed, KeyringReady

KeyAction = WriteKeyDir | RemoveKeyDir | KeyringAdd | KeyringDrop


class KeyStore:
    def __init__(self, feed: Feed, run_dir: str | None, log: Any) -> None:
        self._feed = feed
        self.run_dir = run_dir
        self._log = log
        # Key directories by (flow, name), keyring serials by (flow, name).
        self.key_dirs: dict[tuple[str, str], str] = {}
        self.keyring_keys: dict[tuple[str, str], int] = {}

    def run(self, flow_id: str, action: KeyAction) -> None:
        match action:
            case WriteKeyDir():
                self.write_dir(flow_id, action)
            case RemoveKeyDir(name=name):
                self.remove_dir(flow_id, name)
            case KeyringAdd():
                self.keyring_add(flow_id, action)
            case KeyringDrop(name=name):
                self.keyring_drop(flow_id, name)
            case _:
                assert_never(action)

    # -- key directories --------------------------------------------------------
    def write_dir(self, flow_id: str, action: WriteKeyDir) -> None:
        from agent.io.rundir import make_key_dir, remove_key_dir

        if not self.run_dir:
            self._feed(flow_id, KeyDirFailed(action.name, "no run_dir configured for key files"))
            return
        path = None
        try:
            path = make_key_dir(self.run_dir, action.name)
            self.key_dirs[(flow_id, action.name)] = path
            for fname, value in action.files.items():
                _write_one(path, fname, value)
        except OSError as exc:
            if path is not None:
                remove_key_dir(path)
                self.key_dirs.pop((flow_id, action.name), None)
            self._feed(flow_id, KeyDirFailed(action.name, f"cannot write key files: {exc.strerror}"))
            return
        self._log.debug("key directory written", flow=flow_id, dir=path, files=sorted(action.files))
        self._feed(flow_id, KeyDirReady(action.name, path))

    def adopt_dir(self, flow_id: str, name: str, path: str) -> None:
        """A key directory a restarted agent found QEMU still reading
        (``agent.app.adopt``): the flow's own from now on, removed as if
        this runtime had written it."""
        self.key_dirs[(flow_id, name)] = path
        self._log.debug("key directory adopted", flow=flow_id, dir=path)

    def remove_dir(self, flow_id: str, name: str) -> None:
        from agent.io.rundir import remove_key_dir

        path = self.key_dirs.pop((flow_id, name), None)
        if path is not None:
            remove_key_dir(path)
            self._log.debug("key directory removed", flow=flow_id, dir=path)

    # -- keyring --------------------------------------------------------------------
    def keyring_add(self, flow_id: str, action: KeyringAdd) -> None:
        from agent.io import keyring

        serial = None
        try:
            with action.key.view() as payload:
                serial = keyring.add_key(action.description, payload)
            # Possessor: all; user (QEMU runs as this uid): view, read, search.
            keyring.setperm(
                serial, keyring.KEY_POS_ALL | keyring.KEY_USR_VIEW | keyring.KEY_USR_READ | keyring.KEY_USR_SEARCH
            )
        except OSError as exc:
            if serial is not None:  # added but not usable: it must not stay
                _revoke_and_unlink(serial)
            self._feed(flow_id, KeyringFailed(action.name, f"cannot add a keyring key: {exc.strerror}"))
            return
        self.keyring_keys[(flow_id, action.name)] = serial
        self._log.debug("keyring key added", flow=flow_id, description=action.description, serial=serial)
        self._feed(flow_id, KeyringReady(action.name, serial))

    def keyring_drop(self, flow_id: str, name: str) -> None:
        serial = self.keyring_keys.pop((flow_id, name), None)
        if serial is None:
            return
        _revoke_and_unlink(serial)
        self._log.debug("keyring key dropped", flow=flow_id, serial=serial)

    # -- lifetime -------------------------------------------------------------------
    def forget(self, flow_id: str) -> None:
        """Whatever path the flow took, none of its key material outlives it."""
        self._drop_all(flow_id)

    def close(self) -> None:
        self._drop_all(None)

    def _drop_all(self, flow_id: str | None) -> None:
        for fid, name in [k for k in self.key_dirs if flow_id is None or k[0] == flow_id]:
            self.remove_dir(fid, name)
        for fid, name in [k for k in self.keyring_keys if flow_id is None or k[0] == flow_id]:
            self.keyring_drop(fid, name)


def _write_one(directory: str, fname: str, value: Any) -> None:
    """One 0600 file: a Secret from its own buffer, anything else (public
    data such as DH parameters) as its text."""
    from agent.io.rundir import write_key_file

    if isinstance(value, Secret):
        with value.view() as data:
            write_key_file(directory, fname, data)
    else:
        write_key_file(directory, fname, str(value).encode())


def _revoke_and_unlink(serial: int) -> None:
    from agent.io import keyring

    for step in (keyring.revoke, keyring.unlink):
        try:
            step(serial)
        except OSError:
            pass
