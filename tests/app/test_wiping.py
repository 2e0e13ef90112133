"""Key material is wiped where the agent is done with it (README: "Secrets are held in bytearrays")."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

from agent.app.eventlog import EventLog
from agent.app.runtime import Runtime
from agent.app.sidecar import Sidecar
from agent.common.secret import Secret
from agent.core.actions import WriteKeyDir
from agent.core.events import KeyDirFailed, KeyDirReady


def _runtime(run_dir) -> Runtime:
    return Runtime(qmp=None, event_log=EventLog(None), run_dir=str(run_dir))


def test_runtime_writes_key_files_but_leaves_the_secrets_to_their_owners(tmp_path):
    # The master key of `master_key = "file"` goes through WriteKeyDir and is
    # needed afterwards for every `secret add`: the runtime must not wipe it.
    async def go():
        rt = _runtime(tmp_path)
        master = Secret(bytes(range(32)))
        rt._do("secrets", WriteKeyDir("master", {"master.key": master}))
        _, event = rt._queue.get_nowait()
        assert isinstance(event, KeyDirReady)
        assert open(os.path.join(event.path, "master.key"), "rb").read() == bytes(range(32))
        assert master.reveal() == bytes(range(32))
        rt.close()

    asyncio.run(go())


def test_keys_psk_line_is_wiped_at_the_flows_next_event():
    from agent.core.events import KeyProvided, Start
    from agent.core.migration import MigrationFlow, MigrationParams

    flow = MigrationFlow(
        MigrationParams(role="destination", uri="tcp:127.0.0.1:4444", reply_to="ctl-1", creds_id="tls0")
    )
    flow.handle(Start())
    (write,) = flow.handle(KeyProvided("psk", Secret(bytes(32))))
    line = write.files["keys.psk"]
    assert len(line) == len(b"qemu:") + 64 + 1  # until the shell has written it
    flow.handle(KeyDirReady("tls", "/run/keyagent/vm1/key-tls-1"))
    assert len(line) == 0


def test_keys_psk_line_is_wiped_when_the_write_failed_too():
    from agent.core.events import KeyProvided, Start
    from agent.core.migration import MigrationFlow, MigrationParams

    flow = MigrationFlow(MigrationParams(role="source", uri="tcp:127.0.0.1:4444", reply_to="ctl-1", creds_id="tls0"))
    flow.handle(Start())
    (write,) = flow.handle(KeyProvided("psk", Secret(bytes(32))))
    flow.handle(KeyDirFailed("tls", "cannot write key files: No space left on device"))
    assert len(write.files["keys.psk"]) == 0


def test_agent_exit_wipes_the_master_key_offers_and_an_unused_sealed_psk():
    from agent.app.verbs.migrate import MigrationControl, PendingOffer

    master, offer, psk = Secret(bytes(32)), Secret(b"o" * 32), Secret(b"p" * 32)
    migration = MigrationControl.__new__(MigrationControl)  # the state only: no agent behind it
    migration.offers = {b"id": PendingOffer(offer=None, private=offer, made=0.0)}
    migration.source_psk = psk
    holder = SimpleNamespace(secrets=SimpleNamespace(master=master), migration=migration)
    Sidecar.wipe_held_keys(holder)
    assert (len(master), len(offer), len(psk)) == (0, 0, 0)
    assert holder.migration.offers == {} and holder.migration.source_psk is None
