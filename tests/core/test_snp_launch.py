"""The SEV-SNP launch check flow (agent.core.snp_launch), event by event with no I/O."""

import pytest

from agent.core.actions import Finish, SendQmp
from agent.core.events import QmpDisconnected, QmpError, QmpEvent, QmpReply, Start, TimerFired
from agent.core.registry import FLOW_KINDS
from agent.core.snp_launch import SnpLaunchFlow, SnpLaunchParams

POLICY = 0x30000
SNP_INFO = {
    "enabled": True,
    "api-major": 1,
    "api-minor": 55,
    "build-id": 21,
    "state": "launch-update",
    "sev-type": "sev-snp",
    "snp-policy": POLICY,
}


class Driver:
    def __init__(self, **params):
        self.flow = SnpLaunchFlow(SnpLaunchParams(vm="vm1", policy=POLICY, **params))
        self.last: SendQmp | None = None
        self.actions = []

    def feed(self, event):
        out = self.flow.handle(event)
        self.actions.extend(out)
        sent = [a for a in out if isinstance(a, SendQmp)]
        if sent:
            self.last = sent[-1]
        return out

    def reply(self, result=None):
        return self.feed(QmpReply(self.last.tag, result if result is not None else {}))

    @property
    def commands(self):
        return [a.command for a in self.actions if isinstance(a, SendQmp)]

    @property
    def finish(self):
        fins = [a for a in self.actions if isinstance(a, Finish)]
        return fins[0] if fins else None


def test_the_snp_guest_asked_for_is_resumed():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    d.reply(SNP_INFO)
    d.reply({})
    assert d.commands == ["query-status", "query-sev", "cont"]
    assert d.finish.code == 0


@pytest.mark.parametrize(
    "info, words",
    [
        ({**SNP_INFO, "snp-policy": 0x30001}, "SNP policy 0x30001 differs"),
        (
            {k: v for k, v in SNP_INFO.items() if k not in ("sev-type", "snp-policy")} | {"policy": 1, "handle": 1},
            "no sev-type",
        ),
        ({**SNP_INFO, "sev-type": "sev"}, "not sev-snp"),
        ({**SNP_INFO, "enabled": False}, "not enabled"),
        ({**SNP_INFO, "state": "running"}, "not launch-update"),
        ({"enabled": True, "sev-type": "sev-snp", "state": "launch-update"}, "no snp-policy"),
    ],
)
def test_any_other_guest_is_quit_never_resumed(info, words):
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    d.reply(info)
    assert d.commands[-1] == "quit" and "cont" not in d.commands
    d.reply({})
    assert d.finish.code == 1 and words in d.finish.reason


def test_query_sev_error_quits():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    d.feed(QmpError(d.last.tag, "GenericError", "SEV feature is not available"))
    assert d.commands[-1] == "quit"
    d.feed(TimerFired("quit"))
    assert d.finish.code == 1 and "SEV feature is not available" in d.finish.reason


def test_already_running_is_too_late():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "running"})
    assert d.finish.code == 1 and "too late" in d.finish.reason and "cont" not in d.commands


def test_resume_by_someone_else_is_refused():
    d = Driver()
    d.feed(Start())
    d.feed(QmpEvent("RESUME"))
    assert d.commands[-1] == "quit"
    d.feed(QmpDisconnected("closed"))
    assert d.finish.code == 1 and "resumed by someone else" in d.finish.reason


def test_deadline_quits():
    d = Driver(timeout_s=2)
    d.feed(Start())
    d.feed(TimerFired("deadline"))
    assert d.commands[-1] == "quit"


def test_flow_is_registered_for_replay():
    assert FLOW_KINDS["snp-launch"] is SnpLaunchFlow
    flow = SnpLaunchFlow.from_params({"vm": "vm1", "policy": POLICY, "timeout_s": 3.0})
    assert flow.params.policy == POLICY


def test_qemu_gone_at_cont_is_the_psp_refusing_launch_finish():
    d = Driver()
    d.feed(Start())
    d.reply({"status": "prelaunch"})
    d.reply(SNP_INFO)
    d.feed(QmpDisconnected("closed"))
    assert d.finish.code == 1 and "SNP_LAUNCH_FINISH" in d.finish.reason


def test_the_sev_flow_names_an_snp_guest_instead_of_calling_it_malformed():
    from agent.core.launch import LaunchParams, SevLaunchFlow

    flow = SevLaunchFlow(LaunchParams(vm="vm1"))
    first = [a for a in flow.handle(Start()) if isinstance(a, SendQmp)][0]
    second = [a for a in flow.handle(QmpReply(first.tag, {"status": "prelaunch"})) if isinstance(a, SendQmp)][0]
    out = flow.handle(QmpReply(second.tag, SNP_INFO))
    assert [a.command for a in out if isinstance(a, SendQmp)] == ["quit"]
    assert "configure [snp]" in flow._failure
