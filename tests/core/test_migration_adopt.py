"""The migration flow taken over by a restarted agent (``Adopted`` instead of ``Start``)."""

from agent.core.actions import ArmTimer, CancelTimer, ControlReply, Finish, RemoveKeyDir, SendQmp
from agent.core.codec import decode_event, encode
from agent.core.events import Adopted, ControlRequest, QmpDisconnected, QmpEvent, QmpReply, TimerFired
from agent.core.migration import MigrationFlow, MigrationParams


def adopted(role="destination"):
    return MigrationFlow(
        MigrationParams(
            role=role, uri="", reply_to="", creds_id="keyagent-tls-migrate-1", dest_deadline_s=5, adopted=True
        )
    )


def cmds(actions):
    return [a.command for a in actions if isinstance(a, SendQmp)]


def answer_all(f, out, replies=None):
    replies = replies or {}
    seen = list(out)
    while True:
        sends = [a for a in out if isinstance(a, SendQmp)]
        if not sends:
            return seen
        s = sends[-1]
        out = f.handle(QmpReply(s.tag, replies.get(s.command, {})))
        seen += out


LIVE = {"creds": True, "tls_set": True}


def test_a_destination_still_listening_keeps_its_key_dir_rearms_the_deadline_and_looks_again():
    f = adopted("destination")
    out = f.handle(Adopted("none", listening=True, key_dir="/run/vm/key-tls-1", **LIVE))
    assert ArmTimer("deadline", 5) in out
    assert RemoveKeyDir("tls") not in out
    assert cmds(out) == ["query-migrate"]
    assert not any(isinstance(a, ControlReply) for a in out)  # nobody asked this agent
    assert answer_all(f, out, {"query-migrate": {"socket-address": []}}) == out  # still listening: nothing to do
    assert f.handle(QmpEvent("MIGRATION", {"status": "active"}))[-1] == CancelTimer("deadline")
    done = answer_all(f, f.handle(QmpEvent("MIGRATION", {"status": "completed"})))
    assert RemoveKeyDir("tls") in done
    assert cmds(done) == ["migrate-set-parameters", "object-del"]
    assert done[-1] == Finish(0, "migration completed")
    assert not any(isinstance(a, ControlReply) for a in done)


def test_an_active_source_is_followed_to_its_end_and_cleaned_up_like_its_own():
    f = adopted("source")
    out = f.handle(Adopted("active", **LIVE))
    assert not any(isinstance(a, ArmTimer) for a in out)
    out = answer_all(f, out, {"query-migrate": {"status": "active"}})
    assert f.finished is None
    done = answer_all(f, f.handle(QmpEvent("MIGRATION", {"status": "completed"})))
    assert cmds(done) == ["migrate-set-parameters", "object-del"]
    assert done[-1] == Finish(0, "migration completed")
    assert f.result() == {"status": "completed"}


def test_a_status_that_changed_before_the_flow_existed_is_seen_by_its_own_query():
    f = adopted("source")
    done = answer_all(f, f.handle(Adopted("active", **LIVE)), {"query-migrate": {"status": "completed"}})
    assert cmds(done) == ["query-migrate", "migrate-set-parameters", "object-del"]
    assert done[-1] == Finish(0, "migration completed")


def test_a_migration_that_ended_while_no_agent_watched_is_cleaned_up_at_once():
    for status in ("completed", "cancelled", "failed"):
        f = adopted("destination")
        out = answer_all(f, f.handle(Adopted(status, **LIVE)), {"query-migrate": {"error-desc": "boom"}})
        assert not any(isinstance(a, ArmTimer) for a in out)
        assert cmds(out) == (["query-migrate"] if status == "failed" else []) + ["migrate-set-parameters", "object-del"]
        assert out[-1].code == (0 if status == "completed" else 1)
        assert RemoveKeyDir("tls") not in out  # the sweep took the dir: nothing reads it


def test_a_setup_the_old_agent_never_finished_is_undone():
    f = adopted("source")
    out = answer_all(f, f.handle(Adopted("none", creds=True, tls_set=False)))
    assert cmds(out) == ["object-del"]
    assert out[-1] == Finish(1, "the previous agent stopped before the migration started")


def test_an_adopted_destination_that_never_goes_active_tears_down_by_its_deadline():
    f = adopted("destination")
    answer_all(f, f.handle(Adopted("setup", key_dir="/run/vm/key-tls-1", **LIVE)))
    out = answer_all(f, f.handle(TimerFired("deadline")))
    assert RemoveKeyDir("tls") in out
    assert out[-1].code == 1 and "no final migration status" in out[-1].reason


def test_an_adopted_migration_can_be_cancelled_and_loses_its_dir_with_qmp():
    f = adopted("source")
    answer_all(f, f.handle(Adopted("active", **LIVE)), {"query-migrate": {"status": "active"}})
    out = f.handle(ControlRequest("ctl-9", "cancel"))
    assert cmds(out) == ["migrate_cancel"] and ControlReply("ctl-9", 200, {"status": "cancelling"}) in out
    g = adopted("destination")
    g.handle(Adopted("active", key_dir="/run/vm/key-tls-1", **LIVE))
    out = g.handle(QmpDisconnected("gone"))
    assert RemoveKeyDir("tls") in out and out[-1].code == 1


def test_adopted_is_ignored_by_a_flow_that_was_not_created_to_adopt():
    f = MigrationFlow(MigrationParams(role="source", uri="tcp:a:1", reply_to="ctl-1", creds_id="t"))
    assert f.handle(Adopted("active", **LIVE)) == []


def test_adopted_round_trips_through_the_event_log_codec():
    event = Adopted("setup", listening=True, key_dir="/run/vm/key-tls-1", creds=True, tls_set=True)
    assert decode_event(encode(event)) == event
    # An old recorded flow without the field is still rebuilt.
    params = MigrationFlow(MigrationParams(role="source", uri="u", reply_to="r", creds_id="c")).params_json()
    params.pop("adopted")
    assert MigrationFlow.from_params(params).params.adopted is False
