"""SEV-SNP launch check, as a sans-IO state machine: is this the guest that was asked for?

With SNP nothing is injected: the guest attests itself to its owner later.  What
the host agent owes the owner is that the VM it resumes is the SNP guest the
configuration describes, not a plain VM or an SEV guest that a changed QEMU
command line (or an old QEMU that ignored the object) made instead::

    agent                               QEMU >= 9.1 (-S, sev-snp-guest)
      |-- query-status ------------------->|
      |<- prelaunch / paused --------------|   (running: too late, exit 1)
      |-- query-sev ---------------------->|
      |<- sev-type "sev-snp", snp-policy,  |   anything else: quit, Finish(1)
      |   state "launch-update" -----------|
      |-- cont --------------------------->|   QEMU runs SNP_LAUNCH_FINISH (ID block)
      |   Finish(0)

``query-sev`` is QEMU 9.1's flat union ``SevInfo`` (qapi/misc-target.json):
``sev-type`` ``"sev-snp"`` carries ``snp-policy`` (uint64); QEMU 7.2 has no
``sev-type`` at all.  Every refusal is one log line, then ``quit`` and
``Finish(1)``: the VM never runs.  A RESUME before ours (someone else ran it)
is a refusal too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.core.actions import Action, Log, SendQmp
from agent.core.events import Event, QmpDisconnected, QmpError, QmpEvent, QmpReply, Start, TimerFired
from agent.core.flow import Flow

QUIT_GRACE_S = 5.0
TOO_LATE = "too late to check the SNP launch: the VM is already running"


@dataclass(frozen=True)
class SnpLaunchParams:
    vm: str
    policy: int
    timeout_s: float = 30.0


class SnpLaunchFlow(Flow[SnpLaunchParams]):
    kind = "snp-launch"
    wanted_events = frozenset({"RESUME", "SHUTDOWN"})
    Params = SnpLaunchParams

    def __init__(self, params: SnpLaunchParams) -> None:
        super().__init__(params)
        self.step = "idle"  # query-status | query-sev | cont | quit | done
        self.pending: str | None = None
        self._failure: str | None = None

    def _send(self, command: str) -> list[Action]:
        self.step = command
        self.pending = self.next_tag(command)
        return [SendQmp(self.pending, command, {})]

    def handle(self, event: Event) -> list[Action]:
        if self.finished is not None:
            return []
        if isinstance(event, Start):
            return [self.arm("deadline", self.params.timeout_s), *self._send("query-status")]
        if isinstance(event, QmpDisconnected):
            if self.step == "quit":
                return self.finish(1, self._failure or "refused")
            if self.step == "cont":
                text = (
                    "QEMU went away at cont: the PSP refuses SNP_LAUNCH_FINISH there (e.g. an ID "
                    "block for another launch digest or policy) and QEMU exits"
                )
            else:
                text = f"QMP connection lost during {self.step}" + (f": {event.reason}" if event.reason else "")
            return [Log("error", text), *self.finish(1, text)]
        if self.step == "quit":
            done = (isinstance(event, (QmpReply, QmpError)) and event.tag == self.pending) or (
                isinstance(event, TimerFired) and event.name == "quit"
            )
            return self.finish(1, self._failure or "refused") if done else []
        if isinstance(event, TimerFired):
            if event.name == "deadline":
                return self._fail(f"timed out after {self.params.timeout_s:g}s waiting for {self.step}")
            return []
        if isinstance(event, QmpEvent):
            if event.name == "SHUTDOWN":
                reason = "QEMU shut down before the SNP launch was checked"
                return [Log("error", reason), *self.finish(1, reason)]
            if event.name == "RESUME" and self.step != "cont":
                return self._fail("the VM was resumed by someone else before its SNP launch was checked")
            return []
        if not isinstance(event, (QmpReply, QmpError)) or event.tag != self.pending:
            return []
        self.pending = None
        if isinstance(event, QmpError):
            return self._fail(f"{self.step} failed: {event.desc}")
        result = event.result
        if self.step == "query-status":
            status = result.get("status") if isinstance(result, dict) else None
            if status == "running":
                return [Log("error", TOO_LATE), *self.finish(1, TOO_LATE)]
            if status not in ("prelaunch", "paused"):
                return self._fail(f"cannot check an SNP launch in VM status {status!r}")
            return self._send("query-sev")
        if self.step == "query-sev":
            problem = self.check_query_sev(result)
            if problem is not None:
                return self._fail(f"not the SNP guest asked for: {problem}")
            return [
                Log("info", "SNP guest checked: resuming it", {"policy": f"{self.params.policy:#x}"}),
                *self._send("cont"),
            ]
        if self.step == "cont":
            self.step = "done"
            return [
                Log("info", "VM resumed after the SNP launch check"),
                *self.finish(0, "launched: SNP guest checked, VM running"),
            ]
        return []

    def check_query_sev(self, result: Any) -> str | None:
        """Why ``query-sev``'s answer is not the SNP guest asked for, or None."""
        if not isinstance(result, dict) or result.get("enabled") is not True:
            return "SEV is not enabled for this VM"
        if "sev-type" not in result:
            return "QEMU reports no sev-type (SEV-SNP needs QEMU 9.1 or later)"
        if result.get("sev-type") != "sev-snp":
            return f"QEMU started a {str(result.get('sev-type'))[:32]!r} guest, not sev-snp"
        policy = result.get("snp-policy")
        if isinstance(policy, bool) or not isinstance(policy, int):
            return "query-sev has no snp-policy"
        if policy != self.params.policy:
            return f"SNP policy {policy:#x} differs from the configured {self.params.policy:#x}"
        if result.get("state") != "launch-update":
            return f"SNP guest in state {str(result.get('state'))[:32]!r}, not launch-update"
        return None

    def _fail(self, reason: str) -> list[Action]:
        """Refuse: one log line, then quit QEMU (the VM never runs)."""
        self._failure = reason
        self.step = "quit"
        self.pending = self.next_tag("quit")
        return [Log("error", reason), self.arm("quit", QUIT_GRACE_S), SendQmp(self.pending, "quit", {})]
