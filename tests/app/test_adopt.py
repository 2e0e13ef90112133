"""The start-up inspection of a restarted agent (agent.app.adopt) against a scripted QEMU."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent.app import adopt
from agent.common.errors import FlowFailed
from agent.io.rundir import make_key_dir, migration_key_dirs, prepare_run_dir, sweep_stale_keys
from tests.app.runtime_fakes import COMMAND_FAILED, LOST, FakeMonitor


class Qemu(FakeMonitor):
    """Answers qom-get per object and property."""

    def __init__(self, answers: dict, props: dict[tuple[str, str], object] | None = None) -> None:
        super().__init__(answers)
        self.props = props or {}

    async def execute(self, command, args=None):
        if command == "qom-get":
            self.sent.append((command, args))
            value = self.props.get((args["path"].rsplit("/", 1)[1], args["property"]), COMMAND_FAILED)
            if isinstance(value, BaseException):
                raise value
            return value
        return await super().execute(command, args)


def objects(*pairs):
    return [{"name": "type", "type": "string"}, *({"name": n, "type": f"child<{t}>"} for n, t in pairs)]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def run_dir(tmp_path):
    return prepare_run_dir(str(tmp_path / "run"))


def test_a_fresh_qemu_has_nothing_to_take_over(run_dir):
    async def go():
        return await adopt.inspect(Qemu({"qom-list": objects(), "query-migrate": {}}), run_dir)

    found = run(go())
    assert found.migrations == [] and found.keep == [] and not found.master


def test_without_a_creds_object_of_ours_qemu_is_asked_nothing_about_migrations(run_dir):
    async def go():
        q = Qemu(
            {
                "qom-list": objects(("keyagent-master", "secret_keyring"), ("other-tls", "tls-creds-psk")),
                "query-migrate-parameters": {"tls-creds": "other-tls"},
                "query-migrate": {"status": "active"},
            }
        )
        return q, await adopt.inspect(q, run_dir)

    q, found = run(go())
    assert [command for command, _ in q.sent] == ["qom-list"]
    assert found.migrations == [] and found.keep == [] and found.master


def test_a_listening_destination_keeps_the_key_dir_qemu_names_and_no_other(run_dir):
    live = make_key_dir(run_dir, "tls")
    other = make_key_dir(run_dir, "tls")

    async def go():
        q = Qemu(
            {
                "qom-list": objects(("keyagent-tls-migrate-3", "tls-creds-psk"), ("keyagent-master", "secret")),
                "query-migrate-parameters": {"tls-creds": "keyagent-tls-migrate-3"},
                "query-migrate": {"socket-address": [{"type": "inet"}]},  # QEMU 7.2 listening: no status
            },
            {("keyagent-tls-migrate-3", "endpoint"): "server", ("keyagent-tls-migrate-3", "dir"): live},
        )
        return await adopt.inspect(q, run_dir)

    found = run(go())
    (m,) = found.migrations
    assert (m.flow_id, m.role, m.live) == ("migrate-3", "destination", True)
    assert (m.event.status, m.event.listening, m.event.key_dir, m.event.tls_set) == ("none", True, live, True)
    assert found.keep == [os.path.basename(live)] and found.master
    assert sweep_stale_keys(run_dir, keep=found.keep) == [os.path.basename(other)]
    assert os.path.isdir(live)


@pytest.mark.parametrize(
    "named",
    ["/etc", "/var/lib/elsewhere/key-tls-1", "RUN/key-master-1", "RUN/key-tls-missing", "RUN/../x/key-tls-1"],
)
def test_a_dir_qemu_names_outside_our_migration_key_dirs_is_never_kept(run_dir, named):
    make_key_dir(run_dir, "master")

    async def go():
        q = Qemu(
            {
                "qom-list": objects(("keyagent-tls-migrate-1", "tls-creds-psk")),
                "query-migrate-parameters": {"tls-creds": "keyagent-tls-migrate-1"},
                "query-migrate": {"status": "active"},
            },
            {
                ("keyagent-tls-migrate-1", "endpoint"): "server",
                ("keyagent-tls-migrate-1", "dir"): named.replace("RUN", run_dir),
            },
        )
        return await adopt.inspect(q, run_dir)

    found = run(go())
    assert found.keep == [] and found.migrations[0].event.key_dir == ""


def test_a_source_never_keeps_a_dir_and_an_ended_migration_keeps_none(run_dir):
    d = make_key_dir(run_dir, "tls")

    async def go(endpoint, status):
        q = Qemu(
            {
                "qom-list": objects(("keyagent-tls-migrate-1", "tls-creds-psk")),
                "query-migrate-parameters": {"tls-creds": "keyagent-tls-migrate-1"},
                "query-migrate": {"status": status},
            },
            {("keyagent-tls-migrate-1", "endpoint"): endpoint, ("keyagent-tls-migrate-1", "dir"): d},
        )
        return await adopt.inspect(q, run_dir)

    src = run(go("client", "active"))
    assert src.keep == [] and src.migrations[0].role == "source" and src.migrations[0].live
    done = run(go("server", "completed"))
    assert done.keep == [] and not done.migrations[0].live


def test_leftover_objects_of_ours_become_flows_that_undo_them_and_the_current_one_comes_last(run_dir):
    async def go():
        q = Qemu(
            {
                "qom-list": objects(
                    ("keyagent-tls-migrate-2", "tls-creds-psk"),
                    ("keyagent-tls-migrate-1", "tls-creds-psk"),
                    ("libvirt-tls", "tls-creds-psk"),  # not ours: left alone
                    ("luks0", "secret"),
                ),
                "query-migrate-parameters": {"tls-creds": "keyagent-tls-migrate-2"},
                "query-migrate": {"status": "active"},
            },
            {("keyagent-tls-migrate-2", "endpoint"): "client", ("keyagent-tls-migrate-1", "endpoint"): "client"},
        )
        return await adopt.inspect(q, run_dir)

    found = run(go())
    assert [(m.flow_id, m.event.status, m.event.tls_set) for m in found.migrations] == [
        ("migrate-1", "none", False),
        ("migrate-2", "active", True),
    ]
    assert found.secret_ids == ["luks0"] and not found.master


def test_a_monitor_that_does_not_answer_is_a_one_line_failure(run_dir):
    async def go():
        q = Qemu({})
        q.hold = asyncio.Event()
        return await adopt.inspect(q, run_dir, timeout=0.05)

    with pytest.raises(FlowFailed, match="did not answer the start-up inspection"):
        run(go())


def test_a_monitor_lost_during_the_inspection_is_reported_as_such(run_dir):
    async def go():
        return await adopt.inspect(Qemu({"qom-list": LOST}), run_dir)

    with pytest.raises(type(LOST)):
        run(go())


def test_the_claim_sweep_defers_only_migration_key_dirs(run_dir):
    tls, master = make_key_dir(run_dir, "tls"), make_key_dir(run_dir, "master")
    open(os.path.join(tls, "keys.psk"), "w").close()
    open(os.path.join(run_dir, "keys.psk"), "w").close()
    removed = sweep_stale_keys(run_dir, keep=migration_key_dirs(run_dir))
    assert removed == sorted([os.path.basename(master), "keys.psk"])
    assert os.path.exists(os.path.join(tls, "keys.psk"))


@pytest.mark.parametrize("deferred", [["key-tls-x"], None])
def test_the_take_over_sweeps_what_the_claim_kept_for_it(run_dir, deferred):
    from types import SimpleNamespace

    from agent.app.eventlog import EventLog
    from tests.app.runtime_fakes import QuietLog

    stale = make_key_dir(run_dir, "tls")
    host = SimpleNamespace(run_dir=run_dir, log=QuietLog(), deferred_key_dirs=deferred)

    async def go():
        return await adopt.take_over(host, Qemu({"qom-list": objects()}), EventLog(None))

    run(go())
    assert not os.path.exists(stale)  # no live migration names it: swept


def test_when_the_claim_kept_nothing_the_take_over_has_nothing_to_sweep(run_dir, monkeypatch):
    from types import SimpleNamespace

    from agent.app.eventlog import EventLog
    from agent.io import rundir
    from tests.app.runtime_fakes import QuietLog

    swept = []
    monkeypatch.setattr(rundir, "sweep_stale_keys", lambda *a, **k: swept.append(a) or [])
    host = SimpleNamespace(run_dir=run_dir, log=QuietLog(), deferred_key_dirs=[])

    async def go():
        return await adopt.take_over(host, Qemu({"qom-list": objects()}), EventLog(None))

    run(go())
    assert swept == []
