"""The migration flow, both roles, driven event by event."""

from agent.common.secret import Secret
from agent.core.actions import ArmTimer, CancelTimer, ControlReply, Finish, RemoveKeyDir, SendQmp, WriteKeyDir
from agent.core.events import (
    ControlRequest,
    KeyDirFailed,
    KeyDirReady,
    KeyProvided,
    QmpDisconnected,
    QmpError,
    QmpEvent,
    QmpReply,
    Start,
    TimerFired,
)
from agent.core.migration import MigrationFlow, MigrationParams


def flow(role="source", **kw):
    f = MigrationFlow(
        MigrationParams(role=role, uri="tcp:127.0.0.1:4444", reply_to="ctl-1", creds_id="tls0", dest_deadline_s=5, **kw)
    )
    f.handle(Start())
    return f


def answer_all(f, out, replies=None):
    """Answer every SendQmp with success until the flow stops asking."""
    replies = replies or {}
    seen = []
    while True:
        sends = [a for a in out if isinstance(a, SendQmp)]
        seen += out
        if not sends:
            return seen
        s = sends[-1]
        reply = replies.get(s.command, {})
        if isinstance(reply, QmpError):
            out = f.handle(QmpError(s.tag, reply.error_class, reply.desc))
        else:
            out = f.handle(QmpReply(s.tag, reply))


def cmds(actions):
    return [a.command for a in actions if isinstance(a, SendQmp)]


def start(f):
    out = f.handle(KeyProvided("psk", Secret(bytes(range(32)))))
    (write,) = out
    assert isinstance(write, WriteKeyDir)
    return write, answer_all(f, f.handle(KeyDirReady("tls", "/run/vm/key-tls-1")))


def test_source_removes_its_key_file_right_after_object_add():
    f = flow("source")
    write, seen = start(f)
    assert set(write.files) == {"keys.psk"}
    assert len(write.files["keys.psk"]) == 0  # written by the shell, then wiped
    assert cmds(seen) == ["object-add", "migrate-set-capabilities", "migrate-set-parameters", "migrate"]
    add = next(a for a in seen if isinstance(a, SendQmp))
    assert add.args == {"qom-type": "tls-creds-psk", "id": "tls0", "dir": "/run/vm/key-tls-1", "endpoint": "client"}
    assert seen.index(RemoveKeyDir("tls")) < [i for i, a in enumerate(seen) if isinstance(a, SendQmp)][1]
    assert ControlReply("ctl-1", 200, {"status": "started"}) in seen


def test_destination_keeps_the_key_until_a_final_status_and_then_cleans_up():
    f = flow("destination")
    write, seen = start(f)
    assert set(write.files) == {"keys.psk", "dh-params.pem"}
    assert "BEGIN DH PARAMETERS" in write.files["dh-params.pem"]
    assert RemoveKeyDir("tls") not in seen
    assert cmds(seen)[-1] == "migrate-incoming"
    assert ArmTimer("deadline", 5) in seen
    assert f.handle(QmpEvent("MIGRATION", {"status": "active"}))[-1] == CancelTimer("deadline")
    out = answer_all(f, f.handle(QmpEvent("MIGRATION", {"status": "completed"})))
    assert out.index(RemoveKeyDir("tls")) == 1
    assert cmds(out) == ["migrate-set-parameters", "object-del"]
    assert out[-1] == Finish(0, "migration completed")
    assert f.result() == {"status": "completed"}


def test_multifd_sets_the_capability_and_channels():
    f = flow("source", multifd=True, multifd_channels=4)
    _w, seen = start(f)
    caps = next(a for a in seen if isinstance(a, SendQmp) and a.command == "migrate-set-capabilities")
    assert {"capability": "multifd", "state": True} in caps.args["capabilities"]
    params = next(a for a in seen if isinstance(a, SendQmp) and a.command == "migrate-set-parameters")
    assert params.args == {"tls-creds": "tls0", "multifd-channels": 4}


def test_unknown_statuses_are_progress():
    f = flow("source")
    start(f)
    assert not any(
        isinstance(a, (Finish, SendQmp)) for a in f.handle(QmpEvent("MIGRATION", {"status": "wait-unplug-2031"}))
    )
    assert f.status == "wait-unplug-2031"


def test_source_failure_asks_qemu_for_its_error_text():
    f = flow("source")
    start(f)
    out = answer_all(
        f,
        f.handle(QmpEvent("MIGRATION", {"status": "failed"})),
        {"query-migrate": {"status": "failed", "error-desc": "TLS handshake failed"}},
    )
    assert cmds(out) == ["query-migrate", "migrate-set-parameters", "object-del"]
    assert out[-1] == Finish(1, "TLS handshake failed")


def until_migrate(f):
    """Up to the source's migrate sent and not yet answered."""
    f.handle(KeyProvided("psk", Secret(bytes(range(32)))))
    out = f.handle(KeyDirReady("tls", "/run/vm/key-tls-1"))
    while cmds(out) != ["migrate"]:
        (send,) = [a for a in out if isinstance(a, SendQmp)]
        out = f.handle(QmpReply(send.tag, {}))
    return out[-1]


def test_a_failed_status_before_migrates_answer_leaves_the_request_to_that_answer():
    """A wrong PSK fails the handshake at once: QEMU's MIGRATION "failed" may
    reach us before the answer to migrate.  The request is answered as if
    they came the other way round ("started"), the status tells the rest."""
    f = flow("source")
    migrate = until_migrate(f)
    out = f.handle(QmpEvent("MIGRATION", {"status": "failed"}))
    assert not any(isinstance(a, ControlReply) for a in out) and cmds(out) == []
    out = answer_all(
        f,
        f.handle(QmpReply(migrate.tag, {})),
        {"query-migrate": {"status": "failed", "error-desc": "TLS handshake failed"}},
    )
    assert [a for a in out if isinstance(a, ControlReply)] == [ControlReply("ctl-1", 200, {"status": "started"})]
    assert cmds(out) == ["query-migrate", "migrate-set-parameters", "object-del"]
    assert out[-1] == Finish(1, "TLS handshake failed") and f.result()["status"] == "failed"


def test_a_failed_status_then_an_error_answer_to_migrate_answers_the_request_with_that_error():
    """QEMU sets "failed" (the event) and then answers migrate with the error
    when the connection fails at once (qmp_migrate: migrate_fd_error, then the error)."""
    f = flow("source")
    migrate = until_migrate(f)
    f.handle(QmpEvent("MIGRATION", {"status": "failed"}))
    out = answer_all(f, f.handle(QmpError(migrate.tag, "GenericError", "Connection refused")))
    (reply,) = [a for a in out if isinstance(a, ControlReply)]
    assert reply.status == 500 and reply.body == {"error": "migrate failed: Connection refused"}
    assert out[-1].code == 1 and f.result()["status"] == "failed"


def test_a_cancel_while_migrate_is_out_still_answers_the_start_request_at_once():
    f = flow("source")
    until_migrate(f)
    out = f.handle(ControlRequest("ctl-2", "cancel", {}))
    assert ControlReply("ctl-1", 500, {"error": "cancelled by request"}) in out


def test_destination_deadline_tears_down():
    f = flow("destination")
    start(f)
    out = answer_all(f, f.handle(TimerFired("deadline")))
    assert RemoveKeyDir("tls") in out and out[-1].code == 1
    assert "no final migration status within 5s" in out[-1].reason
    assert f.final_status == "failed"


def test_failed_setup_step_answers_the_request_and_undoes_what_was_done():
    f = flow("destination")
    f.handle(KeyProvided("psk", Secret(b"k" * 32)))
    out = answer_all(
        f,
        f.handle(KeyDirReady("tls", "/d")),
        {"migrate-incoming": QmpError("", "GenericError", "Failed to bind socket")},
    )
    reply = next(a for a in out if isinstance(a, ControlReply))
    assert reply.status == 500 and "Failed to bind socket" in reply.body["error"]
    assert cmds(out)[-2:] == ["migrate-set-parameters", "object-del"]
    assert RemoveKeyDir("tls") in out and out[-1].code == 1


def test_key_dir_failure_is_answered_with_nothing_to_undo():
    f = flow("source")
    f.handle(KeyProvided("psk", Secret(b"k" * 32)))
    out = f.handle(KeyDirFailed("tls", "cannot write key files: No space left on device"))
    assert cmds(out) == []
    assert next(a for a in out if isinstance(a, ControlReply)).status == 500
    assert out[-1].code == 1


def test_cancel_on_the_source_asks_qemu_then_follows_events():
    f = flow("source")
    start(f)
    out = f.handle(ControlRequest("ctl-2", "cancel", {}))
    assert cmds(out) == ["migrate_cancel"]
    assert ControlReply("ctl-2", 200, {"status": "cancelling"}) in out
    f.handle(QmpReply(out[1].tag, {}))
    out = answer_all(f, f.handle(QmpEvent("MIGRATION", {"status": "cancelled"})))
    assert out[-1].code == 1 and f.final_status == "cancelled"


def test_cancel_on_the_destination_tears_down_at_once():
    f = flow("destination")
    start(f)
    out = answer_all(f, f.handle(ControlRequest("ctl-2", "cancel", {})))
    assert ControlReply("ctl-2", 200, {"status": "cancelled"}) in out
    assert RemoveKeyDir("tls") in out and f.final_status == "cancelled"


def test_qmp_lost_removes_the_key_dir():
    f = flow("destination")
    start(f)
    out = f.handle(QmpDisconnected("EOF"))
    assert RemoveKeyDir("tls") in out and out[-1].code == 1


def test_a_request_after_the_end_is_refused():
    f = flow("destination")
    start(f)
    f.handle(QmpDisconnected(""))
    (reply,) = f.handle(ControlRequest("ctl-9", "cancel", {}))
    assert reply.status == 409


def test_stop_while_a_setup_command_is_out_undoes_it_when_it_answers():
    f = flow("destination")
    f.handle(KeyProvided("psk", Secret(b"k" * 32)))
    (add,) = f.handle(KeyDirReady("tls", "/d"))
    out = f.handle(ControlRequest("ctl-2", "cancel", {}))
    assert cmds(out) == []  # object-add still out
    out = answer_all(f, f.handle(QmpReply(add.tag, {})))
    assert cmds(out) == ["object-del"]
    assert out[-1].code == 1


def test_postcopy_switches_once_active_and_follows_postcopy_statuses():
    f = flow("source", postcopy=True)
    _w, seen = start(f)
    caps = next(a for a in seen if isinstance(a, SendQmp) and a.command == "migrate-set-capabilities")
    assert {"capability": "postcopy-ram", "state": True} in caps.args["capabilities"]
    out = f.handle(QmpEvent("MIGRATION", {"status": "active"}))
    assert cmds(out) == ["migrate-start-postcopy"]
    assert cmds(f.handle(QmpEvent("MIGRATION", {"status": "active"}))) == []  # asked once
    assert f.handle(QmpEvent("MIGRATION", {"status": "postcopy-active"}))[-1].fields == {"status": "postcopy-active"}
    out = answer_all(f, f.handle(QmpEvent("MIGRATION", {"status": "completed"})))
    assert out[-1] == Finish(0, "migration completed")


def test_a_refused_postcopy_switch_is_logged_and_precopy_goes_on():
    f = flow("source", postcopy=True)
    start(f)
    (switch,) = [a for a in f.handle(QmpEvent("MIGRATION", {"status": "active"})) if isinstance(a, SendQmp)]
    (log,) = f.handle(QmpError(switch.tag, "GenericError", "Postcopy is not enabled"))
    assert log.level == "warning" and f.finished is None


# -- wiping: the PSK lives in memory only until its keys.psk line exists --------


def test_psk_is_wiped_once_its_keys_psk_line_is_made():
    f = flow("destination")
    psk = Secret(bytes(range(32)))
    (write,) = f.handle(KeyProvided("psk", psk))
    assert len(psk) == 0  # wiped
    assert write.files["keys.psk"].reveal() == b"qemu:" + bytes(range(32)).hex().encode() + b"\n"


def test_psk_that_arrives_when_the_flow_cannot_use_it_is_wiped():
    f = flow("source")
    f.handle(QmpDisconnected("EOF"))
    late = Secret(bytes(32))
    assert f.handle(KeyProvided("psk", late)) == []
    assert len(late) == 0
