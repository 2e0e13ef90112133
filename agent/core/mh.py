"""SEV fast migration, the source agent's step: hand the target MH's public key to the source VM.

``keyagent ctl migrate mh-target`` (docs/mh.md)::

    agent (source)                     guest owner                 QEMU (source)
      |-- POST /v1/mh/target {vm} ------->|                            |
      |<- {public_key, tag} --------------|   (409: no target attested) |
      |-- x-mh-set-peer-key {public-key, tag} ------------------------>|
      |<- {} / error ---------------------------------------------------|
      |   ControlReply, Finish

The key and the tag are public: the hypervisor may carry them, and the
source MH uses the key only if the tag verifies under the confirmation key
it derives itself (:mod:`agent.sev.mh`).  QEMU has no channel to the MH
yet; the simulator offers ``x-mh-set-peer-key`` (:data:`PEER_KEY_COMMAND`),
and that one ``SendQmp`` is the step a real channel replaces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from agent.core.actions import Action, ControlReply, Log, PostOwner, SendQmp
from agent.core.events import (
    Event,
    OwnerAnswered,
    OwnerFailed,
    OwnerRefused,
    QmpDisconnected,
    QmpError,
    QmpReply,
    Start,
    TimerFired,
)
from agent.core.flow import Flow
from agent.protocol.base import b64encode
from agent.protocol.owner import MH_TARGET_PATH, MhTargetAnswer, MhTargetRequest, ProtocolError

#: the simulator's stand-in for a channel from the host to the source MH
PEER_KEY_COMMAND = "x-mh-set-peer-key"


class State(enum.Enum):
    ASK_OWNER = "ask-owner"
    SET_PEER = "set-peer"
    DONE = "done"


@dataclass(frozen=True)
class MhPeerParams:
    vm: str
    reply_to: str  # the control request to answer
    timeout_s: float = 30.0


class MhPeerFlow(Flow[MhPeerParams]):
    kind = "mh-peer"
    Params = MhPeerParams

    def __init__(self, params: MhPeerParams) -> None:
        super().__init__(params)
        self.state = State.ASK_OWNER
        self._pending: str | None = None
        self._key_id = ""

    def handle(self, event: Event) -> list[Action]:
        if self.state is State.DONE:
            return []
        if isinstance(event, Start):
            body = MhTargetRequest(vm=self.params.vm).encode()
            return [
                self.arm("deadline", self.params.timeout_s),
                Log("info", "asking the guest owner for the migration target's MH key"),
                PostOwner(MH_TARGET_PATH, body),
            ]
        if isinstance(event, QmpDisconnected):
            return self._fail(502, "QMP connection lost")
        if isinstance(event, TimerFired) and event.name == "deadline":
            return self._fail(504, f"timed out after {self.params.timeout_s:g}s")
        if self.state is State.ASK_OWNER:
            if isinstance(event, OwnerRefused):
                return self._fail(409 if event.status == 409 else 502, f"guest owner refused: {event.error}")
            if isinstance(event, OwnerFailed):
                return self._fail(502, f"guest owner: {event.reason}")
            if isinstance(event, OwnerAnswered):
                return self._answered(event.body)
        if self.state is State.SET_PEER and isinstance(event, (QmpReply, QmpError)) and event.tag == self._pending:
            if isinstance(event, QmpError):
                return self._fail(502, f"{PEER_KEY_COMMAND} failed: {event.desc}")
            self.state = State.DONE
            result = {"status": "peer key set", "target_key": self._key_id}
            return [
                Log("info", "source MH has the target's public key", {"target_key": self._key_id}),
                ControlReply(self.params.reply_to, 200, result),
                *self.finish(0, "peer key set"),
            ]
        return []

    def _answered(self, body: dict[str, Any]) -> list[Action]:
        try:
            answer = MhTargetAnswer.parse(body)
        except ProtocolError as exc:
            return self._fail(502, f"malformed owner answer: {exc.reason}")
        if answer.vm != self.params.vm:
            return self._fail(502, "malformed owner answer: it names another vm")
        self.state = State.SET_PEER
        self._key_id = _key_id(answer.public_key)
        self._pending = self.next_tag(PEER_KEY_COMMAND)
        args = {"public-key": b64encode(answer.public_key), "tag": b64encode(answer.tag)}
        return [SendQmp(self._pending, PEER_KEY_COMMAND, args)]

    def _fail(self, status: int, reason: str) -> list[Action]:
        self.state = State.DONE
        return [
            Log("error", "MH peer key not set", {"error": reason}),
            ControlReply(self.params.reply_to, status, {"error": reason}),
            *self.finish(1, reason),
        ]

    def result(self) -> dict[str, Any]:
        return {"state": self.state.value, "target_key": self._key_id}


def _key_id(public: bytes) -> str:
    """agent.sev.mh.key_id, without loading cryptography into the core."""
    import hashlib

    return hashlib.sha256(public).hexdigest()[:16]
