"""SEV fast migration in the agent's flows (docs/mh.md): the peer-key step and the source's report."""

from __future__ import annotations

import base64

import pytest

from agent.common.secret import Secret
from agent.core.actions import ControlReply, Finish, PostOwner, SendQmp, WriteKeyDir
from agent.core.events import (
    KeyDirReady,
    KeyProvided,
    OwnerAnswered,
    OwnerFailed,
    OwnerRefused,
    QmpError,
    QmpEvent,
    QmpReply,
    Start,
    TimerFired,
)
from agent.core.launch import LaunchParams, SevLaunchFlow
from agent.core.mh import PEER_KEY_COMMAND, MhPeerFlow, MhPeerParams
from agent.core.migration import MigrationFlow, MigrationParams
from agent.core.registry import FLOW_KINDS

PUBLIC = bytes(range(32))
TAG = bytes(range(32, 64))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def drive(f, out):
    """Answer every SendQmp with success until the flow stops asking; all actions seen."""
    seen = []
    while True:
        seen += out
        sends = [a for a in out if isinstance(a, SendQmp)]
        if not sends:
            return seen
        out = f.handle(QmpReply(sends[-1].tag, {}))


def migration(role="source", mh_vm="vm1"):
    f = MigrationFlow(
        MigrationParams(role=role, uri="tcp:127.0.0.1:4444", reply_to="ctl-1", creds_id="tls0", mh_vm=mh_vm)
    )
    f.handle(Start())
    (write,) = f.handle(KeyProvided("psk", Secret(bytes(32))))
    assert isinstance(write, WriteKeyDir)
    drive(f, f.handle(KeyDirReady("tls", "/run/vm/key-tls-1")))
    return f


# -- the source reports the end of the migration --------------------------------------------


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_the_source_reports_the_final_status_after_cleanup_and_then_finishes(status):
    f = migration()
    out = drive(f, f.handle(QmpEvent("MIGRATION", {"status": status})))
    posts = [a for a in out if isinstance(a, PostOwner)]
    assert posts == [PostOwner("/v1/mh/complete", {"vm": "vm1", "status": status})]
    assert not any(isinstance(a, Finish) for a in out)  # waits for the owner
    end = f.handle(OwnerAnswered("/v1/mh/complete", {"vm": "vm1", "status": status, "retired": "source"}))
    assert isinstance(end[-1], Finish) and end[-1].code == (0 if status == "completed" else 1)


@pytest.mark.parametrize("answer", [OwnerRefused(409, "no migration in flight"), OwnerFailed("owner unreachable")])
def test_a_failed_report_is_a_warning_and_the_migrations_result_stands(answer):
    f = migration()
    drive(f, f.handle(QmpEvent("MIGRATION", {"status": "completed"})))
    end = f.handle(answer)
    assert any(getattr(a, "level", None) == "warning" for a in end)
    assert end[-1] == Finish(0, "migration completed")


def test_no_report_without_mh_or_on_the_destination():
    for f in (migration(mh_vm=None), migration(role="destination")):
        out = drive(f, f.handle(QmpEvent("MIGRATION", {"status": "completed"})))
        assert not any(isinstance(a, PostOwner) for a in out)
        assert isinstance(out[-1], Finish)


# -- the incoming launch asks with migrating_from -------------------------------------------------


def test_an_incoming_mh_launch_sends_migrating_from():
    f = SevLaunchFlow(LaunchParams(vm="vm1", migrating_from="vm1"))
    f.state = f.state.MEASURE
    f.sev = {"api-major": 1, "api-minor": 55, "build-id": 21, "policy": 1}
    (_log, post) = f._on_measurement({"data": b64(bytes(48))})
    assert isinstance(post, PostOwner) and post.body["migrating_from"] == "vm1"
    plain = SevLaunchFlow(LaunchParams(vm="vm1"))
    plain.sev = f.sev
    assert "migrating_from" not in plain._on_measurement({"data": b64(bytes(48))})[1].body


# -- ctl migrate mh-target ---------------------------------------------------------------------


def peer_flow():
    f = MhPeerFlow(MhPeerParams(vm="vm1", reply_to="ctl-7", timeout_s=5))
    out = f.handle(Start())
    assert PostOwner("/v1/mh/target", {"vm": "vm1"}) in out
    return f


def test_the_target_key_goes_to_the_source_vm_in_one_qmp_command():
    f = peer_flow()
    (send,) = f.handle(OwnerAnswered("/v1/mh/target", {"vm": "vm1", "public_key": b64(PUBLIC), "tag": b64(TAG)}))
    assert send.command == PEER_KEY_COMMAND and send.args == {"public-key": b64(PUBLIC), "tag": b64(TAG)}
    out = f.handle(QmpReply(send.tag, {}))
    reply = next(a for a in out if isinstance(a, ControlReply))
    assert reply.status == 200 and reply.body["status"] == "peer key set"
    assert out[-1] == Finish(0, "peer key set")


@pytest.mark.parametrize(
    ("event", "status"),
    [
        (OwnerRefused(409, "no migration of this vm is in flight"), 409),
        (OwnerFailed("owner unreachable: refused"), 502),
        (OwnerAnswered("/v1/mh/target", {"vm": "vm1", "public_key": "AAAA", "tag": b64(TAG)}), 502),
        (OwnerAnswered("/v1/mh/target", {"vm": "vm2", "public_key": b64(PUBLIC), "tag": b64(TAG)}), 502),
        (TimerFired("deadline"), 504),
    ],
)
def test_no_peer_key_without_a_good_owner_answer(event, status):
    f = peer_flow()
    out = f.handle(event)
    assert not any(isinstance(a, SendQmp) for a in out)
    assert next(a for a in out if isinstance(a, ControlReply)).status == status
    assert out[-1].code == 1


def test_the_vm_refusing_the_key_fails_the_request():
    f = peer_flow()
    (send,) = f.handle(OwnerAnswered("/v1/mh/target", {"vm": "vm1", "public_key": b64(PUBLIC), "tag": b64(TAG)}))
    out = f.handle(QmpError(send.tag, "GenericError", "MH: the peer key's tag does not verify"))
    assert next(a for a in out if isinstance(a, ControlReply)).status == 502


def test_the_peer_flow_is_replayable_by_kind():
    assert FLOW_KINDS["mh-peer"] is MhPeerFlow
    f = FLOW_KINDS["mh-peer"].from_params(peer_flow().params_json())
    assert isinstance(f, MhPeerFlow)


def test_a_malformed_answer_to_the_report_is_a_warning():
    f = migration()
    drive(f, f.handle(QmpEvent("MIGRATION", {"status": "completed"})))
    end = f.handle(OwnerAnswered("/v1/mh/complete", {"vm": "vm1", "retired": "everything"}))
    assert end[0].level == "warning" and "malformed" in end[0].message
    assert end[-1] == Finish(0, "migration completed")
