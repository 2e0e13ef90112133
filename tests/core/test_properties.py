"""Property tests: every sans-IO flow against a random, hostile world.

A small model of the world (:class:`World`) plays QEMU, the guest owner, the
timers, the key store and the control socket.  At each step Hypothesis picks
what happens next: which outstanding command is answered (in any order; with
success, an error, or garbage), an asynchronous QMP event (known, unknown,
malformed), a timer firing (also one already cancelled, whose firing was in
flight), an owner answer, a key directory or keyring outcome, a control
request, or the monitor going away.  After the random steps the world may
answer everything cooperatively, then QMP disconnects.

The invariants, checked on the action stream as it is produced:

* ``cont`` is only sent after QEMU acknowledged ``sev-inject-launch-secret``,
  which is only sent after the owner released a packet; ``Finish(0)`` of the
  launch only after QEMU acknowledged ``cont``;
* every ``WriteKeyDir`` / ``KeyringAdd`` has its ``RemoveKeyDir`` /
  ``KeyringDrop``, emitted by the flow itself, at or before ``Finish``
  (unless the shell reported that the write failed); a name is never written
  twice while it is live;
* every control request gets exactly one reply by ``Finish``; a migration's
  starting request too;
* every run ends in ``Finish`` once QMP is gone (the launch even without it,
  when its timers fire), ``Finish`` is the last action, and nothing follows;
* a migration "completes" (``Finish(0)``) only if its ``migrate`` /
  ``migrate-incoming`` was sent; a ``Finish`` reason is one line;
* a timer firing after the flow cancelled it changes nothing;
* no secret's raw, hex or base64 form appears anywhere in the event log;
* ``keyagent replay --check`` over the event log of the run (written by the
  real :class:`EventLog`) passes: a fresh flow built from the recorded
  parameters produces exactly the recorded actions.

The default run uses a few hundred examples per flow; ``-m slow`` runs
10,000 each.  What the properties found is kept as plain tests at the end.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st

from agent.app.eventlog import EventLog
from agent.app.replay import check
from agent.common.secret import Secret
from agent.core.actions import (
    ArmTimer,
    CancelTimer,
    ControlReply,
    Finish,
    KeyringAdd,
    KeyringDrop,
    Log,
    PostOwner,
    RemoveKeyDir,
    SendQmp,
    WriteKeyDir,
)
from agent.core.codec import encode
from agent.core.events import (
    Adopted,
    ControlRequest,
    KeyDirFailed,
    KeyDirReady,
    KeyProvided,
    KeyringFailed,
    KeyringReady,
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
from agent.core.launch import LaunchParams, SevLaunchFlow
from agent.core.migration import MigrationFlow, MigrationParams
from agent.core.resume import ResumeFlow, ResumeParams
from agent.core.secret_objects import SecretsFlow, SecretsParams
from tests.leakscan import find

_COMMON = dict(
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FAST = settings(max_examples=250, **_COMMON)
SLOW = settings(max_examples=10_000, **_COMMON)

MAX_STEPS = 60

# -- JSON values QEMU (or something pretending to be QEMU) may send ------------------
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)

MIGRATION_STATUSES = (
    "none",
    "setup",
    "active",
    "completed",
    "failed",
    "cancelled",
    "cancelling",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover",
    "pre-switchover",
    "device",
    "wait-unplug",
    "colo",
    "x-status-from-2031",
)
EVENT_NAMES = (
    "RESUME",
    "STOP",
    "SHUTDOWN",
    "MIGRATION",
    "MIGRATION_PASS",
    "RTC_CHANGE",
    "BLOCK_JOB_COMPLETED",
    "X_FLOOD",
    "",
)


def secret_bytes(data, n: int = 32, purpose: str = "secret") -> bytes:
    """High-entropy bytes (so a leak scan has no false hits), chosen by Hypothesis."""
    seed = data.draw(st.integers(0, 2**32), label=f"{purpose} seed")
    out = b""
    while len(out) < n:
        out += hashlib.sha256(f"{purpose}:{seed}:{len(out)}".encode()).digest()
    return out[:n]


def good_result(data, command: str, hostility: int = 0):
    """A plausible answer; with ``hostility`` > 0 sometimes one that is subtly off."""

    def off() -> bool:
        return data.draw(st.integers(0, 9)) < hostility

    if command == "query-status":
        status = (
            data.draw(st.sampled_from(["prelaunch", "paused", "running", "inmigrate", "postmigrate", "weird"]))
            if off()
            else "prelaunch"
        )
        return {"status": status, "running": status == "running", "singlestep": False}
    if command == "query-sev":
        info = {
            "enabled": True,
            "api-major": 0,
            "api-minor": 24,
            "build-id": 15,
            "policy": data.draw(st.sampled_from([1, 0, 5, 7])),
            "handle": 1,
            "state": "launch-secret",
        }
        if off():
            info["state"] = data.draw(st.sampled_from(["launch-update", "running", "uninit", "x-new-state"]))
        if off():
            flaw = data.draw(st.sampled_from(["enabled", "api-major", "policy", "build-id"]))
            info[flaw] = data.draw(st.sampled_from([False, -1, "1", None, 2**70, True]))
        return info
    if command == "query-sev-launch-measure":
        n = data.draw(st.sampled_from([0, 32, 47, 49, 64])) if off() else 48
        text = base64.b64encode(secret_bytes(data, n, "measurement") if n else b"").decode()
        if off():
            text = data.draw(st.sampled_from(["%%%", text[:-1], text + "=", "", " " + text]))
        return {"data": text}
    if command == "query-migrate":
        return {
            "status": "failed",
            "error-desc": data.draw(st.sampled_from(["TLS handshake failed", "", "Connection reset by peer"])),
        }
    return {}


class World:
    """The flow's environment; records everything and checks the invariants."""

    def __init__(self, flow, data) -> None:
        self.flow = flow
        self.data = data
        self.events: list = []
        self.encoded_events: list[dict] = []  # as the event log records them
        self.encoded_outputs: list[list[dict]] = []
        self.outputs: list[list] = []
        self.outstanding: dict[str, SendQmp] = {}
        self.sent: dict[str, SendQmp] = {}
        self.acked: list[str] = []  # commands QEMU answered with success, in order
        self.answered: set[str] = set()
        self.armed: set[str] = set()
        self.stale: set[str] = set()  # fired while being cancelled/re-armed: may still arrive
        self.owner_posts = 0
        self.released = False
        self.key_dirs: dict[str, str] = {}  # name -> pending | ready | failed | removed
        self.keyring: dict[str, str] = {}
        self.requests: dict[str, int] = {}
        self.secrets: list[bytes] = []
        self.finished: Finish | None = None
        # 0: a well-behaved world (answers good, nobody disconnects mid-way)
        # ... 3: errors, garbage, stray events and disconnects are common.
        self.hostility = data.draw(st.integers(0, 3), label="hostility")
        # a restarted agent over the VM its predecessor launched (and noted)
        noted = getattr(flow.params, "launched", None)
        self.launched_vm = noted is not None and data.draw(st.booleans(), label="a launched VM")
        self._req = 0
        self._serial = 100

    def result(self, command: str, hostility: int = 0):
        """QEMU's good answer; for a launched VM, a running one with the noted measurement."""
        if self.launched_vm and command in ("query-status", "query-sev", "query-sev-launch-measure"):
            if command == "query-status":
                return {"status": "running", "running": True, "singlestep": False}
            if command == "query-sev":
                return {"enabled": True, "api-major": 0, "api-minor": 24, "build-id": 15, "policy": 1, "handle": 1,
                        "state": "running"}  # fmt: skip
            return {"data": self.flow.params.launched}
        return good_result(self.data, command, hostility)

    # -- feeding the flow ---------------------------------------------------------
    def feed(self, event) -> list:
        assert self.flow.finished is None, "the runtime never feeds a finished flow"
        self.events.append(event)
        if isinstance(event, ControlRequest):
            self.requests.setdefault(event.req, 0)
        if isinstance(event, QmpReply) and event.tag in self.sent and event.tag not in self.answered:
            self.acked.append(self.sent[event.tag].command)
        if isinstance(event, (QmpReply, QmpError)):
            self.answered.add(event.tag)
        stale_timer = isinstance(event, TimerFired) and event.name not in self.armed
        if isinstance(event, TimerFired):
            self.armed.discard(event.name)
            self.stale.discard(event.name)
        # As the runtime does: the event is recorded before the flow handles it
        # (a flow may wipe a key it was given once it has no more use for it).
        self.encoded_events.append(encode(event))
        out = self.flow.handle(event)
        assert isinstance(out, list)
        if stale_timer:
            assert out == [], f"a cancelled timer {event.name!r} still acted: {out}"
        self.outputs.append(out)
        self.encoded_outputs.append([encode(a) for a in out])  # recorded as they are made
        for action in out:
            self._saw(action)
        if self.finished is not None:
            assert self.flow.finished == self.finished
        else:
            assert self.flow.finished is None, "flow.finished set without a Finish action"
        return out

    def _saw(self, a) -> None:
        assert self.finished is None, f"{a!r} after Finish"
        if isinstance(a, SendQmp):
            assert a.tag not in self.sent, f"tag {a.tag} reused"
            self.sent[a.tag] = a
            self.outstanding[a.tag] = a
            if self.flow.kind == "sev-launch" and a.command in ("quit", "stop"):
                # a VM past its launch (LAUNCH_FINISH done) is never quit or stopped by the check
                assert not getattr(self.flow, "_past_launch", False), f"{a.command} sent to a VM past its launch"
            if a.command == "cont" and self.flow.kind == "sev-launch":
                assert "sev-inject-launch-secret" in self.acked, "cont before QEMU acknowledged the secret injection"
            if a.command == "sev-inject-launch-secret":
                assert self.released, "injection without a released packet"
                assert isinstance(a.args["secret"], Secret)
        elif isinstance(a, ArmTimer):
            if a.name in self.armed:
                self.stale.add(a.name)
            self.armed.add(a.name)
        elif isinstance(a, CancelTimer):
            if a.name in self.armed:
                self.stale.add(a.name)
            self.armed.discard(a.name)
        elif isinstance(a, PostOwner):
            self.owner_posts += 1
        elif isinstance(a, WriteKeyDir):
            assert self.key_dirs.get(a.name) not in ("pending", "ready"), f"key dir {a.name!r} written twice while live"
            self.key_dirs[a.name] = "pending"
            assert all(isinstance(v, (Secret, str)) for v in a.files.values())
        elif isinstance(a, RemoveKeyDir):
            self.key_dirs[a.name] = "removed"
        elif isinstance(a, KeyringAdd):
            assert self.keyring.get(a.name) not in ("pending", "ready"), (
                f"keyring key {a.name!r} added twice while live"
            )
            assert isinstance(a.key, Secret)
            self.keyring[a.name] = "pending"
        elif isinstance(a, KeyringDrop):
            self.keyring[a.name] = "removed"
        elif isinstance(a, ControlReply):
            if a.req not in self.requests:
                assert a.req == getattr(self.flow.params, "reply_to", None), f"reply to unknown request {a.req}"
                self.requests[a.req] = 0
            self.requests[a.req] += 1
            assert self.requests[a.req] == 1, f"request {a.req} answered twice"
            assert 100 <= a.status <= 599
        elif isinstance(a, Log):
            assert a.level in ("debug", "info", "warning", "error")
        elif isinstance(a, Finish):
            self.finished = a
            self._at_finish(a)

    def _at_finish(self, fin: Finish) -> None:
        assert fin.code in (0, 1)
        assert isinstance(fin.reason, str) and "\n" not in fin.reason
        left = {n: s for n, s in self.key_dirs.items() if s in ("pending", "ready")}
        assert not left, f"Finish with key dirs not removed by the flow: {left}"
        left = {n: s for n, s in self.keyring.items() if s in ("pending", "ready")}
        assert not left, f"Finish with keyring keys not dropped by the flow: {left}"
        unanswered = [r for r, n in self.requests.items() if n == 0]
        assert not unanswered, f"Finish with unanswered requests {unanswered}"
        reply_to = getattr(self.flow.params, "reply_to", None)
        adopted = getattr(self.flow.params, "adopted", False)  # its request died with the old agent
        if reply_to is not None and not adopted:
            assert self.requests.get(reply_to) == 1, "the starting request was never answered"
        if self.flow.kind == "sev-launch" and fin.code == 0:
            commands = {s.command for s in self.sent.values()}
            if "cont" in commands:
                assert self.acked[-1:] == ["cont"] and "sev-inject-launch-secret" in self.acked
            else:  # nothing to do: a running VM whose launch the run_dir noted
                assert self.flow.params.launched is not None and self.acked[-1:] == ["query-sev-launch-measure"]
                assert not commands & {"sev-inject-launch-secret", "quit", "stop"}
        if self.flow.kind == "migration" and fin.code == 0 and not adopted:
            # Only a migration that was started can have completed.
            assert {"migrate", "migrate-incoming"} & {s.command for s in self.sent.values()}
        if self.flow.kind == "resume" and fin.code == 0:
            assert self.acked and self.acked[0] == "query-status"

    # -- what the world can do next ------------------------------------------------
    def moves(self) -> list[tuple]:
        """What may happen next, weighted by repetition; progress first (shrinks to it)."""
        h = self.hostility
        m: list[tuple] = []
        m += [("answer", tag) for tag in sorted(self.outstanding)] * 6
        m += [("owner",)] * (6 * self.owner_posts)
        m += [("key-dir", n) for n, s in sorted(self.key_dirs.items()) if s == "pending"] * 6
        m += [("keyring", n) for n, s in sorted(self.keyring.items()) if s == "pending"] * 6
        m += [("timer", name) for name in sorted(self.armed)]
        m += [("stale-timer", name) for name in sorted(self.stale)]
        m += [("qmp-event",)] * (1 + h) + [("stray-reply",)] * min(h, 1)
        m += [("disconnect",)] * h
        m += self.extra_moves()
        return m

    def extra_moves(self) -> list[tuple]:
        kind = self.flow.kind
        if kind == "migration":
            return [("control", "cancel"), ("control", "junk"), ("key", "psk")][: self.hostility]
        if kind == "secrets":
            return [
                ("control", "add"),
                ("control", "add"),
                ("control", "remove"),
                ("control", "junk"),
                ("key", "master"),
            ][: 3 + self.hostility]
        return []

    def play(self, move: tuple) -> None:
        d = self.data
        what = move[0]
        if what == "disconnect":
            self.feed(QmpDisconnected(d.draw(st.sampled_from(["", "EOF", "QEMU closed"]))))
        elif what == "answer":
            send = self.outstanding.pop(move[1])
            how = "good"
            if d.draw(st.integers(0, 9)) < self.hostility:
                how = d.draw(st.sampled_from(["error", "garbage"]))
            if how == "good":
                self.feed(QmpReply(send.tag, self.result(send.command, self.hostility)))
            elif how == "garbage":
                self.feed(QmpReply(send.tag, d.draw(json_value)))
            else:
                cls = d.draw(
                    st.sampled_from(
                        ["GenericError", "GenericError", "CommandNotFound", "DeviceNotFound", "KVMMissingCap", "X-New"]
                    )
                )
                self.feed(
                    QmpError(
                        send.tag,
                        cls,
                        d.draw(
                            st.sampled_from(
                                [
                                    "SEV launch measurement is not available",
                                    "object 'x' already exists",
                                    "Duplicate ID",
                                    "",
                                    "multi\nline",
                                ]
                            )
                        ),
                    )
                )
        elif what == "stray-reply":
            tag = d.draw(st.sampled_from(sorted(self.sent) + ["nobody:1:x"]))
            if tag in self.outstanding:
                return
            self.feed(QmpReply(tag, d.draw(json_value)))
        elif what == "qmp-event":
            name = d.draw(st.sampled_from(EVENT_NAMES))
            if self.flow.kind == "migration" and d.draw(st.integers(0, 3)):
                name = "MIGRATION"  # what this flow lives on
            if name == "MIGRATION":
                payload = d.draw(
                    st.one_of(
                        st.builds(lambda s: {"status": s}, st.sampled_from(MIGRATION_STATUSES)),
                        st.dictionaries(st.sampled_from(["status", "x"]), json_value, max_size=2),
                    )
                )
            else:
                payload = d.draw(st.dictionaries(st.text(max_size=6), json_value, max_size=2))
            self.feed(QmpEvent(name, payload))
        elif what in ("timer", "stale-timer"):
            self.feed(TimerFired(move[1]))
        elif what == "owner":
            self.owner_posts -= 1
            how = "released"
            if d.draw(st.integers(0, 9)) < self.hostility:
                how = d.draw(st.sampled_from(["refused", "failed"]))
            if how == "released":
                self.released = True
                secret = secret_bytes(d, d.draw(st.sampled_from([32, 64, 100])), "owner")
                self.secrets.append(secret)
                gpa = d.draw(st.sampled_from([None, 0x7FFF0000]))
                self.feed(OwnerReleased(base64.b64encode(bytes(52)).decode(), Secret(secret), gpa))
            elif how == "refused":
                self.feed(OwnerRefused(d.draw(st.sampled_from([403, 404, 500])), "no"))
            else:
                self.feed(OwnerFailed("timed out after 30s talking to owner"))
        elif what == "key-dir":
            name = move[1]
            if d.draw(st.integers(0, 9)) >= self.hostility:
                self.key_dirs[name] = "ready"
                self.feed(KeyDirReady(name, f"/run/keyagent/vm1/key-{name}-1"))
            else:
                self.key_dirs[name] = "failed"
                self.feed(KeyDirFailed(name, "cannot write key files: No space left on device"))
        elif what == "keyring":
            name = move[1]
            if d.draw(st.integers(0, 9)) >= self.hostility:
                self.keyring[name] = "ready"
                self._serial += 1
                self.feed(KeyringReady(name, self._serial))
            else:
                self.keyring[name] = "failed"
                self.feed(KeyringFailed(name, "cannot add a keyring key: Disk quota exceeded"))
        elif what == "key":
            key = secret_bytes(d, 32, "key")
            self.secrets.append(key)
            self.feed(KeyProvided(move[1], Secret(key)))
        elif what == "control":
            self.feed(self.control_request(move[1]))
        else:  # pragma: no cover
            raise AssertionError(move)

    def control_request(self, verb: str) -> ControlRequest:
        self._req += 1
        req = f"ctl-test-{self._req}"
        if verb in ("add", "remove"):
            sid = self.data.draw(st.sampled_from(["s0", "s1", "luks-key"]))
            if verb == "remove":
                return ControlRequest(req, "remove", {"id": sid})
            ciphertext = secret_bytes(self.data, 48, "object")
            self.secrets.append(ciphertext)
            return ControlRequest(
                req, "add", {"id": sid, "iv": base64.b64encode(bytes(16)).decode(), "data": Secret(ciphertext)}
            )
        if verb == "junk":
            verb = self.data.draw(st.sampled_from(["status", "", "ADD", "migrate"]))
        return ControlRequest(req, verb, {})

    def cooperate(self) -> None:
        """Answer everything that is outstanding, well, until nothing is left."""
        for _ in range(200):
            if self.flow.finished is not None:
                return
            if self.outstanding:
                tag = sorted(self.outstanding)[0]
                send = self.outstanding.pop(tag)
                self.feed(QmpReply(tag, self.result(send.command)))
            elif any(s == "pending" for s in self.key_dirs.values()):
                name = next(n for n, s in self.key_dirs.items() if s == "pending")
                self.key_dirs[name] = "ready"
                self.feed(KeyDirReady(name, f"/run/keyagent/vm1/key-{name}-1"))
            elif any(s == "pending" for s in self.keyring.values()):
                name = next(n for n, s in self.keyring.items() if s == "pending")
                self.keyring[name] = "ready"
                self._serial += 1
                self.feed(KeyringReady(name, self._serial))
            elif self.owner_posts:
                self.play(("owner",))
            elif self.armed:
                self.feed(TimerFired(sorted(self.armed)[0]))
            else:
                return

    # -- after the run -----------------------------------------------------------
    def event_log(self, flow_id: str) -> list[dict]:
        """The run's event log as the runtime writes it, read back as records."""
        log = EventLog(None)
        log._file = io.StringIO()  # the real writer, in memory
        log.write("start", version="test", vm="vm1")
        log.flow(flow_id, self.flow)
        for event, out in zip(self.encoded_events, self.encoded_outputs):
            log.write("event", flow=flow_id, event=event)
            for action in out:
                log.write("action", flow=flow_id, action=action)
        log.write("exit", code=self.finished.code if self.finished else 0, reason="")
        return [json.loads(line) for line in log._file.getvalue().splitlines()]


def run_world(data, flow, first: list, secrets: tuple = (), ready_dirs: tuple = ()) -> World:
    world = World(flow, data)
    world.secrets += secrets
    for name in ready_dirs:  # a key dir the flow owns from its start (adopted after a restart)
        world.key_dirs[name] = "ready"
    for event in first:
        world.feed(event)
    steps = data.draw(st.integers(0, MAX_STEPS), label="steps")
    for _ in range(steps):
        if flow.finished is not None:
            break
        world.play(data.draw(st.sampled_from(world.moves()), label="move"))
    if data.draw(st.integers(0, 3), label="cooperate"):
        world.cooperate()
        if flow.kind in ("sev-launch", "resume"):
            # Answers and its own timers end these flows, QMP or not.
            assert flow.finished is not None, "a launch that got every answer did not end"
    if flow.finished is None:
        world.feed(QmpDisconnected("EOF"))
    assert flow.finished is not None, "still running after QMP was lost"
    note_event(f"{flow.kind} Finish({flow.finished.code}) after {', '.join(sorted(set(world.acked)))}")
    assert world.finished is not None and world.outputs[-1][-1] == world.finished
    # The event log holds no secret in any form, and replays exactly.
    records = world.event_log("f1")
    blob = json.dumps(records).encode()
    for secret in world.secrets:
        assert find(secret, blob) is None, "a secret reached the event log"
    assert check(json.loads(json.dumps(records))).startswith("replay check passed")
    # And the replayed flow (params through JSON) gives the very same encoded actions.
    from agent.core.codec import decode_event

    again = type(flow).from_params(json.loads(json.dumps(flow.params_json())))
    for event, out in zip(world.encoded_events, world.encoded_outputs):
        replayed = again.handle(decode_event(json.loads(json.dumps(event))))
        assert [encode(a) for a in replayed] == out
    return world


# -- the flows ---------------------------------------------------------------------------


def launch_flow(data) -> SevLaunchFlow:
    # A restarted agent's run_dir note: none, or a measurement the world may
    # (same seed) or may not report.
    noted = data.draw(st.sampled_from([None, None, "note"]), label="launch note")
    return SevLaunchFlow(
        LaunchParams(
            vm="vm1",
            timeout_s=data.draw(st.sampled_from([30.0, 0.5])),
            on_refusal=data.draw(st.sampled_from(["quit", "pause"])),
            retry_s=0.1,
            launched=base64.b64encode(secret_bytes(data, 48, "measurement")).decode() if noted else None,
        )
    )


def migration_flow(data) -> MigrationFlow:
    return MigrationFlow(
        MigrationParams(
            role=data.draw(st.sampled_from(["source", "destination"])),
            uri="tcp:127.0.0.1:4444",
            reply_to="ctl-start",
            creds_id="keyagent-tls-migrate-1",
            multifd=data.draw(st.booleans()),
            multifd_channels=2,
            dest_deadline_s=60.0,
        )
    )


def secrets_flow(data) -> SecretsFlow:
    return SecretsFlow(
        SecretsParams(
            vm="vm1",
            mode=data.draw(st.sampled_from(["keyring", "file"])),
            preloaded=data.draw(st.sampled_from([False, False, True])),
        )
    )


def launch_property(data) -> None:
    run_world(data, launch_flow(data), [Start()])


def resume_property(data) -> None:
    run_world(data, ResumeFlow(ResumeParams(vm="vm1")), [Start()])


def migration_property(data) -> None:
    flow = migration_flow(data)
    key = secret_bytes(data)
    first = [Start()] + ([KeyProvided("psk", Secret(key))] if data.draw(st.integers(0, 5)) else [])
    run_world(data, flow, first, (key,))


def adopted_migration_property(data) -> None:
    flow = MigrationFlow(
        MigrationParams(
            role=data.draw(st.sampled_from(["source", "destination"])),
            uri="",
            reply_to="",
            creds_id="keyagent-tls-migrate-1",
            dest_deadline_s=60.0,
            adopted=True,
        )
    )
    status = data.draw(st.sampled_from(["none", "setup", "active", "postcopy-active", "completed", "failed", "x"]))
    live = status not in ("completed", "failed", "cancelled")
    key_dir = "/run/vm/key-tls-1" if live and flow.params.role == "destination" and data.draw(st.booleans()) else ""
    event = Adopted(
        status, listening=data.draw(st.booleans()), key_dir=key_dir, creds=True, tls_set=data.draw(st.booleans())
    )
    run_world(data, flow, [event], ready_dirs=("tls",) if key_dir else ())


def secrets_property(data) -> None:
    flow = secrets_flow(data)
    key = secret_bytes(data)
    first = [Start()] + ([KeyProvided("master", Secret(key))] if data.draw(st.integers(0, 5)) else [])
    run_world(data, flow, first, (key,))


@FAST
@given(st.data())
def test_launch_never_resumes_without_an_injected_secret(data):
    launch_property(data)


@FAST
@given(st.data())
def test_resume_flow_always_finishes(data):
    resume_property(data)


@FAST
@given(st.data())
def test_migration_removes_its_key_dir_on_every_path(data):
    migration_property(data)


@FAST
@given(st.data())
def test_adopted_migration_removes_its_kept_key_dir_on_every_path(data):
    adopted_migration_property(data)


@FAST
@given(st.data())
def test_secrets_flow_drops_the_master_copy_on_every_path(data):
    secrets_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_launch_never_resumes_without_an_injected_secret_10k(data):
    launch_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_resume_flow_always_finishes_10k(data):
    resume_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_migration_removes_its_key_dir_on_every_path_10k(data):
    migration_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_adopted_migration_removes_its_kept_key_dir_on_every_path_10k(data):
    adopted_migration_property(data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_secrets_flow_drops_the_master_copy_on_every_path_10k(data):
    secrets_property(data)


# -- regressions: what the properties found, kept as plain examples ----------------------


def _migration(role: str) -> MigrationFlow:
    flow = MigrationFlow(MigrationParams(role=role, uri="tcp:127.0.0.1:4444", reply_to="ctl-1", creds_id="tls0"))
    flow.handle(Start())
    return flow


@pytest.mark.parametrize("role", ["source", "destination"])
@pytest.mark.parametrize(
    "ending", [QmpDisconnected("EOF"), ControlRequest("ctl-2", "cancel", {}), QmpEvent("SHUTDOWN", {})]
)
def test_migration_ending_before_the_key_dir_is_ready_still_removes_it(role, ending):
    # The shell creates the directory when it carries out WriteKeyDir; an
    # ending that overtakes KeyDirReady left it to the runtime's safety net.
    flow = _migration(role)
    (write,) = flow.handle(KeyProvided("psk", Secret(bytes(32))))
    assert isinstance(write, WriteKeyDir)
    out = flow.handle(ending)
    assert RemoveKeyDir("tls") in out
    assert flow.finished is not None


def test_migration_key_dir_that_failed_is_not_removed_again():
    flow = _migration("source")
    flow.handle(KeyProvided("psk", Secret(bytes(32))))
    out = flow.handle(KeyDirFailed("tls", "cannot write key files: No space left on device"))
    assert not any(isinstance(a, RemoveKeyDir) for a in out)
    assert flow.finished is not None and flow.finished.code == 1


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_a_final_status_before_migrate_is_sent_does_not_end_the_migration(status):
    # Found as: source, KeyDirReady, MIGRATION {"status": "completed"} while
    # object-add was out -> Finish(0) "migration completed" for a migration
    # that was never started (an orchestrator would then drop the source VM).
    flow = _migration("source")
    flow.handle(KeyProvided("psk", Secret(bytes(32))))
    (add,) = flow.handle(KeyDirReady("tls", "/run/vm/key-tls-1"))
    assert add.command == "object-add"
    assert not any(isinstance(a, (Finish, SendQmp)) for a in flow.handle(QmpEvent("MIGRATION", {"status": status})))
    assert flow.finished is None
    steps = flow.handle(QmpReply(add.tag, {}))
    while flow.finished is None and (sends := [a for a in steps if isinstance(a, SendQmp)]):
        steps = flow.handle(QmpReply(sends[-1].tag, {}))
    assert flow.state.value == "migrating"


def test_a_final_status_right_after_migrate_is_sent_counts():
    # QEMU may emit the final MIGRATION event before the migrate command returns.
    flow = _migration("source")
    flow.handle(KeyProvided("psk", Secret(bytes(32))))
    steps = flow.handle(KeyDirReady("tls", "/run/vm/key-tls-1"))
    while (send := [a for a in steps if isinstance(a, SendQmp)][-1]).command != "migrate":
        steps = flow.handle(QmpReply(send.tag, {}))
    out = flow.handle(QmpEvent("MIGRATION", {"status": "failed"}))
    assert out and flow.state.value == "cleanup"


def test_a_multi_line_qemu_error_gives_a_one_line_finish_reason():
    flow = SevLaunchFlow(LaunchParams(vm="vm1", on_refusal="pause"))
    (_arm, send) = flow.handle(Start())
    out = flow.handle(QmpError(send.tag, "GenericError", "multi\nline\r\nerror"))
    assert out[-1] == Finish(1, "query-status failed: multi line error (VM left paused)")


def test_a_deadline_already_firing_when_the_migration_became_active_is_ignored():
    # Found by the 10k run: destination MIGRATING, MIGRATION "active" (the flow
    # cancels the deadline), then the TimerFired that was already queued: the
    # flow tore down a migration whose handshake had worked.
    flow = _migration("destination")
    flow.handle(KeyProvided("psk", Secret(bytes(32))))
    steps = flow.handle(KeyDirReady("tls", "/run/vm/key-tls-1"))
    while flow.state.value != "migrating":
        steps = flow.handle(QmpReply([a for a in steps if isinstance(a, SendQmp)][-1].tag, {}))
    assert ArmTimer("deadline", 60.0) in steps
    assert CancelTimer("deadline") in flow.handle(QmpEvent("MIGRATION", {"status": "active"}))
    assert flow.handle(TimerFired("deadline")) == []
    assert flow.state.value == "migrating" and flow.finished is None
