"""The SEV launch flow, driven event by event with no I/O."""

import base64

import pytest

from agent.common.secret import Secret
from agent.core.actions import ArmTimer, CancelTimer, Finish, Log, NoteLaunched, PostOwner, SendQmp
from agent.core.events import (
    OwnerFailed,
    OwnerRefused,
    OwnerReleased,
    QmpDisconnected,
    QmpError,
    QmpEvent,
    QmpReply,
    Start,
    TimerFired,
)
from agent.core.launch import LaunchParams, SevLaunchFlow, State

MEASUREMENT = base64.b64encode(bytes(range(48))).decode()
HEADER = base64.b64encode(bytes(52)).decode()
SEV_INFO = {
    "enabled": True,
    "api-major": 1,
    "api-minor": 55,
    "build-id": 21,
    "policy": 1,
    "state": "launch-secret",
    "handle": 1,
}


def sends(actions):
    return [a for a in actions if isinstance(a, SendQmp)]


def only_send(actions) -> SendQmp:
    (send,) = sends(actions)
    return send


def finish_of(actions):
    fins = [a for a in actions if isinstance(a, Finish)]
    return fins[0] if fins else None


class Driver:
    """Plays QEMU and the owner for a flow, answering the last command sent."""

    def __init__(self, **params):
        self.flow = SevLaunchFlow(LaunchParams(vm="vm1", **params))
        self.last: SendQmp | None = None
        self.actions = []

    def feed(self, event):
        out = self.flow.handle(event)
        self.actions.extend(out)
        s = sends(out)
        if s:
            self.last = s[-1]
        return out

    def reply(self, result=None):
        return self.feed(QmpReply(self.last.tag, result if result is not None else {}))

    def error(self, desc, cls="GenericError"):
        return self.feed(QmpError(self.last.tag, cls, desc))

    def to_owner(self):
        self.feed(Start())
        self.reply({"status": "prelaunch", "running": False})
        self.reply(SEV_INFO)
        return self.reply({"data": MEASUREMENT})

    def commands(self):
        return [a.command for a in self.actions if isinstance(a, SendQmp)]


def released():
    return OwnerReleased(packet_header=HEADER, secret=Secret(b"\x01" * 64), gpa=None)


def test_good_path_injects_then_continues_and_finishes_zero():
    d = Driver()
    out = d.to_owner()
    post = [a for a in out if isinstance(a, PostOwner)][0]
    assert post.path == "/v1/secret"
    assert post.body == {
        "vm": "vm1",
        "measurement": MEASUREMENT,
        "api_major": 1,
        "api_minor": 55,
        "build_id": 21,
        "policy": 1,
    }
    inject = only_send(d.feed(released()))
    assert inject.command == "sev-inject-launch-secret"
    assert inject.args["packet-header"] == HEADER
    assert isinstance(inject.args["secret"], Secret)
    assert "gpa" not in inject.args
    injected = d.reply()
    assert only_send(injected).command == "cont"
    # the run_dir's note for a restarted agent comes before cont (agent.app.resume_launch)
    assert injected.index(NoteLaunched(MEASUREMENT)) < injected.index(only_send(injected))
    out = d.reply()
    assert finish_of(out) == Finish(0, "launched: secret injected, VM running")
    assert CancelTimer("deadline") in out
    assert d.commands() == ["query-status", "query-sev", "query-sev-launch-measure", "sev-inject-launch-secret", "cont"]


def test_gpa_from_owner_is_passed_to_qemu():
    d = Driver()
    d.to_owner()
    inject = only_send(d.feed(OwnerReleased(HEADER, Secret(b"x" * 16), gpa=0x80C000)))
    assert inject.args["gpa"] == 0x80C000


def test_start_arms_the_deadline():
    d = Driver(timeout_s=7)
    out = d.feed(Start())
    assert out[0] == ArmTimer("deadline", 7)


@pytest.mark.parametrize(
    "event, words",
    [
        (OwnerRefused(403, "measurement does not match"), "guest owner refused"),
        (OwnerFailed("connection refused to 127.0.0.1:1"), "connection refused"),
        (OwnerFailed("malformed owner answer: secret is not base64"), "malformed"),
    ],
)
def test_owner_refusal_quits_and_never_continues(event, words):
    d = Driver()
    d.to_owner()
    quit_ = only_send(d.feed(event))
    assert quit_.command == "quit"
    fin = finish_of(d.reply())
    assert fin.code == 1 and words in fin.reason
    assert "cont" not in d.commands()


def test_pause_on_refusal_leaves_the_vm_paused():
    d = Driver(on_refusal="pause")
    d.to_owner()
    out = d.feed(OwnerRefused(403, "no"))
    assert sends(out) == []
    assert finish_of(out).code == 1
    assert "left paused" in finish_of(out).reason


def test_running_vm_is_too_late_and_is_not_touched():
    d = Driver()
    d.feed(Start())
    out = d.reply({"status": "running", "running": True})
    assert finish_of(out) == Finish(1, "too late to attest: the VM is already running")
    assert d.commands() == ["query-status"]


OTHER_LAUNCH = base64.b64encode(bytes(range(1, 49))).decode()
RUNNING_SEV = {**SEV_INFO, "state": "running"}


def restarted_over_a_running_vm(noted, measurement=MEASUREMENT, status="running"):
    d = Driver(launched=noted)
    d.feed(Start())
    d.reply({"status": status, "running": status == "running"})
    d.reply(RUNNING_SEV)
    return d, d.reply({"data": measurement})


def test_a_running_vm_whose_launch_the_run_dir_noted_needs_nothing():
    d, out = restarted_over_a_running_vm(MEASUREMENT)
    fin = finish_of(out)
    assert fin.code == 0 and fin.reason.startswith("already launched")
    assert d.commands() == ["query-status", "query-sev", "query-sev-launch-measure"]


def test_a_paused_vm_past_its_launch_whose_launch_was_noted_is_left_paused():
    d, out = restarted_over_a_running_vm(MEASUREMENT, status="paused")
    assert finish_of(out).code == 0 and "cont" not in d.commands()


def test_a_running_vm_with_a_note_from_another_launch_is_too_late_and_not_touched():
    d, out = restarted_over_a_running_vm(OTHER_LAUNCH)
    assert finish_of(out) == Finish(1, "too late to attest: the VM is already running")
    assert d.commands() == ["query-status", "query-sev", "query-sev-launch-measure"]


@pytest.mark.parametrize("answer", [{"data": "!!"}, {"data": base64.b64encode(bytes(16)).decode()}, {}])
def test_a_running_vm_with_a_malformed_measurement_is_too_late(answer):
    d = Driver(launched=MEASUREMENT)
    d.feed(Start())
    d.reply({"status": "running"})
    d.reply(RUNNING_SEV)
    out = d.reply(answer)
    assert finish_of(out).code == 1 and "quit" not in d.commands()


def test_a_running_vm_is_never_quit_when_checking_its_note_fails():
    d = Driver(launched=MEASUREMENT)
    d.feed(Start())
    d.reply({"status": "running"})
    d.reply(RUNNING_SEV)
    out = d.error("SEV launch measurement is not available")
    assert finish_of(out).code == 1 and sends(out) == []
    d2 = Driver(launched=MEASUREMENT)
    d2.feed(Start())
    d2.reply({"status": "running"})
    out = d2.feed(TimerFired("deadline"))
    assert finish_of(out).code == 1 and sends(out) == []


def test_a_prelaunch_vm_is_attested_again_whatever_the_note_says():
    d = Driver(launched=OTHER_LAUNCH)
    out = d.to_owner()
    assert any(isinstance(a, PostOwner) for a in out)


def test_measurement_not_available_is_retried_until_available():
    d = Driver(retry_s=0.5)
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    d.reply(SEV_INFO)
    out = d.error("SEV launch measurement is not available")
    assert ArmTimer("retry", 0.5) in out and not sends(out)
    again = only_send(d.feed(TimerFired("retry")))
    assert again.command == "query-sev-launch-measure"
    out = d.reply({"data": MEASUREMENT})
    assert any(isinstance(a, PostOwner) for a in out)


def test_deadline_while_waiting_for_the_owner_quits():
    d = Driver(timeout_s=3)
    d.to_owner()
    out = d.feed(TimerFired("deadline"))
    assert only_send(out).command == "quit"
    fin = finish_of(d.reply())
    assert fin.reason == "timed out after 3s waiting for the guest owner"
    # A late answer from the owner changes nothing.
    assert d.feed(released()) == []


def test_qmp_error_on_inject_quits():
    d = Driver()
    d.to_owner()
    d.feed(released())
    out = d.error("SEV: failed to inject secret")
    assert only_send(out).command == "quit"
    assert "sev-inject-launch-secret failed" in finish_of(d.reply()).reason
    assert "cont" not in d.commands()


def test_disconnect_finishes_one_without_commands():
    d = Driver()
    d.to_owner()
    out = d.feed(QmpDisconnected("EOF"))
    assert sends(out) == []
    assert finish_of(out).code == 1
    assert "QMP connection lost while waiting for the guest owner" in finish_of(out).reason


def test_sev_disabled_is_refused():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    out = d.reply(
        {"enabled": False, "api-major": 0, "api-minor": 0, "build-id": 0, "policy": 0, "state": "uninit", "handle": 0}
    )
    assert only_send(out).command == "quit"


def test_query_sev_error_is_refused():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    d.error("SEV feature is not available")
    assert d.commands()[-1] == "quit"


def test_malformed_measurement_is_refused():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    d.reply(SEV_INFO)
    out = d.reply({"data": "bm90IDQ4IGJ5dGVz"})
    assert only_send(out).command == "quit"


def test_sev_es_takes_the_same_path():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    out = d.reply({**SEV_INFO, "policy": 0x5})
    log = [a for a in out if isinstance(a, Log)][0]
    assert log.fields["sev_es"] is True
    d.reply({"data": MEASUREMENT})
    d.feed(released())
    d.reply()
    assert finish_of(d.reply()).code == 0


def test_resume_by_someone_else_before_the_secret_quits_the_vm():
    d = Driver()
    d.to_owner()
    out = d.feed(QmpEvent("RESUME", {}))
    assert only_send(out).command == "quit"
    assert "resumed by someone else" in finish_of(d.reply()).reason


def test_resume_by_someone_else_with_pause_stops_the_vm():
    d = Driver(on_refusal="pause")
    d.to_owner()
    out = d.feed(QmpEvent("RESUME", {}))
    assert only_send(out).command == "stop"
    assert finish_of(out).code == 1


def test_shutdown_during_attestation_finishes_one():
    d = Driver()
    d.to_owner()
    out = d.feed(QmpEvent("SHUTDOWN", {"guest": False, "reason": "host-signal"}))
    assert finish_of(out).code == 1


def test_stale_reply_is_ignored():
    d = Driver()
    d.feed(Start())
    assert d.flow.handle(QmpReply("other-tag", {"status": "running"})) == []
    assert d.flow.state is State.QUERY_STATUS


def test_quit_that_never_answers_finishes_on_grace_timer():
    d = Driver()
    d.to_owner()
    d.feed(OwnerRefused(403, "no"))
    fin = finish_of(d.feed(TimerFired("quit")))
    assert fin.code == 1 and "guest owner refused: no" in fin.reason


def test_finished_flow_ignores_everything():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "running"})
    assert d.feed(QmpEvent("RESUME")) == []
    assert d.feed(TimerFired("deadline")) == []
