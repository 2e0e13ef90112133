"""SEV / SEV-ES launch attestation, as a sans-IO state machine.

The sequence, as the design draws it::

    agent                         QEMU (-S, sev-guest)         guest owner
      |-- query-status ------------->|                             |
      |<- prelaunch/paused ----------|   (running: too late, exit 1)
      |-- query-sev ---------------->|                             |
      |<- api, build, policy, state -|                             |
      |-- query-sev-launch-measure ->|   (not available yet: retry until the deadline)
      |<- MEASURE || MNONCE ---------|                             |
      |-- POST /v1/secret ------------------------------------------>|
      |<- packet_header, secret, gpa -------------------------------|  (4xx/5xx: refused)
      |-- sev-inject-launch-secret ->|                             |
      |   NoteLaunched (run_dir)     |                             |
      |-- cont --------------------->|                             |
      |   Finish(0)                  |                             |

Every other path fails: one log line, then ``quit`` (``on_refusal=quit``) or
the VM left paused (``pause``), and ``Finish(1)``.  ``cont`` is only ever sent
after a successful injection, so a VM that needed a secret is never resumed
without one.  If somebody else resumes the VM before that, the flow stops
(or quits) it at once.

Crash-only: an agent started again over the same VM runs this same flow.  A
VM still at ``prelaunch`` (killed while waiting for the owner, after its
release, after the injection) is attested again from the start; the owner
answers the same measurement with the same packet, and LAUNCH_SECRET may be
repeated in the PSP's LSECRET state.  A VM already running is too late to
attest, unless the run_dir's note (``LaunchParams.launched``, written through
``NoteLaunched`` after an injection) names the measurement QEMU still
reports: then that launch got its verified secret and needs nothing::

      |-- query-status -> running ; query-sev -> state running
      |-- query-sev-launch-measure -> the noted one?  Finish(0) : too late, Finish(1)
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass
from typing import Any

from agent.core.actions import Action, Log, NoteLaunched, PostOwner, SendQmp
from agent.core.events import (
    Event,
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
from agent.core.flow import Flow
from agent.core.modes import OnRefusal
from agent.protocol.owner import SECRET_PATH, SecretRequest
from agent.sev.sizes import MEASUREMENT_LEN

SEV_ES_POLICY_BIT = 0x4
QUIT_GRACE_S = 5.0

TOO_LATE = "too late to attest: the VM is already running"


class State(enum.Enum):
    IDLE = "idle"
    QUERY_STATUS = "query-status"
    QUERY_SEV = "query-sev"
    MEASURE = "measure"
    ASK_OWNER = "ask-owner"
    INJECT = "inject"
    RESUME = "resume"
    CHECK_LAUNCHED = "check-launched"
    QUITTING = "quitting"
    DONE = "done"
    FAILED = "failed"


# The states as module constants: an Enum member looked up on its class goes
# through EnumType's __getattr__ hook (about 60 ns on Python 3.11, five times
# a global), and the flow compares its state on every event.
IDLE = State.IDLE
QUERY_STATUS = State.QUERY_STATUS
QUERY_SEV = State.QUERY_SEV
MEASURE = State.MEASURE
ASK_OWNER = State.ASK_OWNER
INJECT = State.INJECT
RESUME = State.RESUME
CHECK_LAUNCHED = State.CHECK_LAUNCHED
QUITTING = State.QUITTING
DONE = State.DONE
FAILED = State.FAILED


WAITING_FOR = {
    QUERY_STATUS: "the VM status",
    QUERY_SEV: "query-sev",
    MEASURE: "the launch measurement",
    ASK_OWNER: "the guest owner",
    INJECT: "the secret injection",
    RESUME: "cont",
    CHECK_LAUNCHED: "the launch measurement",
}

#: the state a command sent without one puts the flow in (_send)
_STATE_AFTER = {
    "query-status": QUERY_STATUS,
    "query-sev": QUERY_SEV,
    "query-sev-launch-measure": MEASURE,
    "cont": RESUME,
}
#: the command a failure in each state names (_command_for_state)
_COMMAND_OF = {
    QUERY_STATUS: "query-status",
    QUERY_SEV: "query-sev",
    MEASURE: "query-sev-launch-measure",
    INJECT: "sev-inject-launch-secret",
    RESUME: "cont",
    CHECK_LAUNCHED: "query-sev-launch-measure",
}


@dataclass(frozen=True)
class LaunchParams:
    vm: str
    timeout_s: float = 30.0
    on_refusal: OnRefusal = "quit"
    retry_s: float = 0.1
    #: SEV fast migration (docs/mh.md): the VM this launch is the migration target of
    migrating_from: str | None = None
    #: the measurement (base64) a previous agent noted in the run_dir after
    #: injecting its verified secret (agent.app.resume_launch), if any
    launched: str | None = None


class SevLaunchFlow(Flow[LaunchParams]):
    kind = "sev-launch"
    wanted_events = frozenset({"RESUME", "SHUTDOWN"})
    Params = LaunchParams

    def __init__(self, params: LaunchParams) -> None:
        super().__init__(params)
        self.state = IDLE
        self.pending: str | None = None  # tag of the command we wait for
        self.sev: dict[str, Any] = {}
        self._failure: str | None = None
        self._measurement: str | None = None  # QEMU's base64 text, once read
        # LAUNCH_FINISH has run (the VM is or was running): never quit or stop it
        self._past_launch = False

    # -- the happy path, step by step ----------------------------------------
    def handle(self, event: Event) -> list[Action]:
        state = self.state
        if state is DONE or state is FAILED:
            return []
        # Most events are answers to our commands: those first, by exact
        # type (events are final dataclasses), as the branch below takes them.
        if type(event) is QmpReply:
            if state is QUITTING:
                return self._quitting(event)
            if event.tag != self.pending:
                return []  # a late answer to a command we no longer wait for
            self.pending = None
            return self._reply(event.result)
        if isinstance(event, Start):
            return [self.arm("deadline", self.params.timeout_s), *self._send("query-status")]
        if isinstance(event, QmpDisconnected):
            return self._lost(event.reason)
        if self.state is QUITTING:
            return self._quitting(event)
        if isinstance(event, TimerFired):
            return self._timer(event.name)
        if isinstance(event, QmpEvent):
            return self._qmp_event(event)
        if isinstance(event, (QmpReply, QmpError)):
            if event.tag != self.pending:
                return []  # a late answer to a command we no longer wait for
            self.pending = None
            if isinstance(event, QmpError):
                return self._qmp_error(event)
            return self._reply(event.result)
        if isinstance(event, (OwnerReleased, OwnerRefused, OwnerFailed)):
            if self.state is not ASK_OWNER:
                return []
            return self._owner(event)
        return []

    def _reply(self, result: Any) -> list[Action]:
        if self.state is QUERY_STATUS:
            return self._on_status(result)
        if self.state is QUERY_SEV:
            return self._on_query_sev(result)
        if self.state is MEASURE:
            return self._on_measurement(result)
        if self.state is INJECT:
            assert self._measurement is not None  # read before the owner was asked
            return [Log("info", "launch secret injected"), NoteLaunched(self._measurement), *self._send("cont")]
        if self.state is CHECK_LAUNCHED:
            return self._on_launched_measurement(result)
        if self.state is RESUME:
            self.state = DONE
            return [
                Log("info", "VM resumed after attestation"),
                *self.finish(0, "launched: secret injected, VM running"),
            ]
        return []

    def _on_status(self, result: Any) -> list[Action]:
        status = result.get("status") if isinstance(result, dict) else None
        if status == "running":
            if self.params.launched is None:
                return self._too_late()
            self._past_launch = True  # a previous agent noted a launch: is it this one?
            return self._send("query-sev")
        if status not in ("prelaunch", "paused"):
            return self._fail(f"cannot attest a VM in status {status!r}")
        return self._send("query-sev")

    def _on_query_sev(self, result: Any) -> list[Action]:
        if not isinstance(result, dict) or result.get("enabled") is not True:
            return self._fail("SEV is not enabled for this VM")
        if result.get("sev-type") == "sev-snp":  # QEMU 9.1+: an SNP guest takes no launch secret
            return self._fail("the guest is SEV-SNP: it takes no launch secret (configure [snp], not [sev])")
        fields = {}
        for key in ("api-major", "api-minor", "build-id", "policy"):
            value = result.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return self._fail(f"malformed query-sev answer: {key} is not an unsigned integer")
            fields[key] = value
        sev_state = result.get("state")
        if sev_state == "running" or self._past_launch:
            self._past_launch = True
            if self.params.launched is None or sev_state != "running":
                return self._too_late({"sev_state": sev_state})
            return self._send("query-sev-launch-measure", state=CHECK_LAUNCHED)
        self.sev = fields
        info = {
            "api": f"{fields['api-major']}.{fields['api-minor']}",
            "build_id": fields["build-id"],
            "policy": fields["policy"],
            "sev_es": bool(fields["policy"] & SEV_ES_POLICY_BIT),
            "sev_state": sev_state,
        }
        return [Log("info", "SEV guest found", info), *self._send("query-sev-launch-measure")]

    def _on_measurement(self, result: Any) -> list[Action]:
        data = result.get("data") if isinstance(result, dict) else None
        try:
            blob = base64.b64decode(data, validate=True) if isinstance(data, str) else b""
        except (binascii.Error, ValueError):
            blob = b""
        if len(blob) != MEASUREMENT_LEN:
            return self._fail(f"malformed launch measurement from QEMU (expected {MEASUREMENT_LEN} bytes, base64)")
        self.state = ASK_OWNER
        self._measurement = data
        request = SecretRequest(
            vm=self.params.vm,
            measurement=blob,
            api_major=self.sev["api-major"],
            api_minor=self.sev["api-minor"],
            build_id=self.sev["build-id"],
            policy=self.sev["policy"],
            migrating_from=self.params.migrating_from,
        )
        return [
            Log("info", "asking the guest owner to verify the measurement"),
            PostOwner(SECRET_PATH, request.encode()),
        ]

    def _on_launched_measurement(self, result: Any) -> list[Action]:
        """A running VM: the launch a previous agent noted, or too late?"""
        data = result.get("data") if isinstance(result, dict) else None
        assert self.params.launched is not None  # only asked with a note
        try:
            blob = base64.b64decode(data, validate=True) if isinstance(data, str) else b""
            noted = base64.b64decode(self.params.launched, validate=True)
        except (binascii.Error, ValueError):
            blob, noted = b"", b"\0"
        import hmac  # only a restarted agent gets here: hmac stays off every sidecar's start-up

        if len(blob) != MEASUREMENT_LEN or not hmac.compare_digest(blob, noted):
            return self._too_late({"noted_launch": "another launch"})
        self.state = DONE
        reason = "already launched: a previous agent injected the verified secret, VM running"
        return [Log("info", reason), *self.finish(0, reason)]

    def _too_late(self, fields: dict[str, Any] | None = None) -> list[Action]:
        self.state = FAILED
        return [Log("error", TOO_LATE, fields or {}), *self.finish(1, TOO_LATE)]

    def _owner(self, event: OwnerReleased | OwnerRefused | OwnerFailed) -> list[Action]:
        if isinstance(event, OwnerRefused):
            return self._fail(f"guest owner refused: {event.error} (HTTP {event.status})")
        if isinstance(event, OwnerFailed):
            return self._fail(f"guest owner: {event.reason}")
        args: dict[str, Any] = {"packet-header": event.packet_header, "secret": event.secret}
        if event.gpa is not None:
            args["gpa"] = event.gpa
        return [
            Log("info", "guest owner released the launch secret"),
            *self._send("sev-inject-launch-secret", args, INJECT),
        ]

    # -- everything else ----------------------------------------------------
    def _qmp_error(self, event: QmpError) -> list[Action]:
        if self.state is MEASURE and event.error_class == "GenericError":
            # QEMU: "SEV launch measurement is not available" until LAUNCH_MEASURE.
            return [
                Log("debug", "launch measurement not available yet, retrying", {"error": event.desc}),
                self.arm("retry", self.params.retry_s),
            ]
        return self._fail(f"{self._command_for_state()} failed: {event.desc}")

    def _timer(self, name: str) -> list[Action]:
        if name == "retry" and self.state is MEASURE and self.pending is None:
            return self._send("query-sev-launch-measure")
        if name == "deadline":
            what = WAITING_FOR.get(self.state, self.state.value)
            return self._fail(f"timed out after {self.params.timeout_s:g}s waiting for {what}")
        return []

    def _qmp_event(self, event: QmpEvent) -> list[Action]:
        if event.name == "SHUTDOWN":
            self.state = FAILED
            reason = "QEMU shut down before the launch completed"
            return [Log("error", reason), *self.finish(1, reason)]
        if event.name == "RESUME" and self.state is not RESUME:
            # Someone else ran the VM before it got its secret: never let it run.
            return self._fail("the VM was resumed by someone else before attestation", stop_first=True)
        return []

    def _send(self, command: str, args: dict[str, Any] | None = None, state: State | None = None) -> list[Action]:
        tag = self.next_tag(command)
        self.pending = tag
        self.state = state or _STATE_AFTER[command]
        return [SendQmp(tag, command, args or {})]

    def _command_for_state(self) -> str:
        return _COMMAND_OF.get(self.state, self.state.value)

    def _fail(self, reason: str, stop_first: bool = False) -> list[Action]:
        """Refuse: one clear log line, then quit QEMU or leave it paused."""
        self._failure = reason
        if self._past_launch:  # the VM already ran: nothing to refuse, nothing to quit
            self.state = FAILED
            return [Log("error", reason), *self.finish(1, reason)]
        actions: list[Action] = [Log("error", reason, {"on_refusal": self.params.on_refusal})]
        if self.params.on_refusal == "quit":
            self.state = QUITTING
            tag = self.next_tag("quit")
            self.pending = tag
            return [*actions, self.arm("quit", QUIT_GRACE_S), SendQmp(tag, "quit", {})]
        if stop_first:
            actions.append(SendQmp(self.next_tag("stop"), "stop", {}))
        self.state = FAILED
        return [*actions, *self.finish(1, f"{reason} (VM left paused)")]

    def _quitting(self, event: Event) -> list[Action]:
        done = (isinstance(event, (QmpReply, QmpError)) and event.tag == self.pending) or (
            isinstance(event, TimerFired) and event.name == "quit"
        )
        if not done:
            return []
        self.state = FAILED
        return self.finish(1, self._failure or "refused")

    def _lost(self, reason: str) -> list[Action]:
        was = self.state
        self.state = FAILED
        if was is QUITTING:
            return self.finish(1, self._failure or "refused")
        what = WAITING_FOR.get(was, was.value)
        text = f"QMP connection lost while waiting for {what}"
        if reason:
            text += f": {reason}"
        return [Log("error", text), *self.finish(1, text)]
