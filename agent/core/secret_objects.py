"""The per-VM master key and the encrypted ``secret`` objects under it.

QEMU's documented practice: one master key per QEMU from a CSPRNG, handed
over through the kernel keyring (``secret_keyring``) or a file QEMU reads
once; every other secret passed inline as AES-256-CBC ciphertext under that
key, with a fresh IV each, so nothing readable ever appears in
``object-add`` arguments, logs or bug reports.

Master key, keyring mode::

    <- KeyProvided(master)
    -> KeyringAdd(master)            (user keyring: QEMU runs as our uid)
    <- KeyringReady(serial)
    -> object-add secret_keyring id=keyagent-master serial=N
    -> KeyringDrop(master)           (QEMU read it at object-add)

File mode is the same with ``WriteKeyDir`` / ``object-add secret file=... format=raw``
/ ``RemoveKeyDir``.  Then each ``secret add`` (already encrypted by the shell,
which holds the master key and the randomness) is one ``object-add secret``
with ``data``, ``keyid``, ``iv`` and ``format=base64``.  Requests that arrive
before the master key is in QEMU wait for it.

A restarted agent (``agent.app.adopt``) finds the master key of its killed
predecessor already in QEMU: that object is left alone (its key died with
the old process, and QEMU holds it, not a file).  ``lazy_master`` then adds
this agent's own master key, under a fresh ``master_id``, only when the
first ``secret add`` needs it; ``in_qemu`` names the secret objects that
were already there, so ``secret remove`` still finds them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, cast

from agent.common.secret import Secret
from agent.core.actions import Action, ControlReply, KeyringAdd, KeyringDrop, Log, RemoveKeyDir, SendQmp, WriteKeyDir
from agent.core.events import (
    ControlRequest,
    Event,
    KeyDirFailed,
    KeyDirReady,
    KeyProvided,
    KeyringFailed,
    KeyringReady,
    QmpDisconnected,
    QmpError,
    QmpEvent,
    QmpReply,
    Start,
)
from agent.core.flow import Flow
from agent.core.modes import MasterKeyMode

MASTER = "master"


class State(enum.Enum):
    WAIT_KEY = "wait-key"
    IDLE = "idle"  # lazy_master: our master key is added at the first request
    STORING = "storing"  # keyring add / key file write
    ADDING_MASTER = "adding-master"
    READY = "ready"
    BROKEN = "broken"  # no master key in QEMU: every add is refused
    DONE = "done"


@dataclass(frozen=True)
class SecretsParams:
    vm: str
    mode: MasterKeyMode = "keyring"
    master_id: str = "keyagent-master"
    # ``keyagent launch`` put the master key on QEMU's command line already.
    preloaded: bool = False
    # A restarted agent: the predecessor's master key is in QEMU; add ours
    # (``master_id``) only when a secret needs it.
    lazy_master: bool = False
    in_qemu: tuple[str, ...] = ()  # secret objects already in QEMU at the restart


class SecretsFlow(Flow[SecretsParams]):
    kind = "secrets"
    wanted_events = frozenset({"SHUTDOWN"})
    Params = SecretsParams

    def __init__(self, params: SecretsParams) -> None:
        super().__init__(params)
        self.state = State.WAIT_KEY
        self.problem = ""
        # ids of secret objects we added (and those a predecessor added, adopted)
        self.objects: set[str] = {i for i in params.in_qemu if not i.startswith("keyagent-master")}
        self.waiting: list[ControlRequest] = []
        self.pending: dict[str, tuple[str, ControlRequest | None]] = {}  # tag -> (what, request)
        self.adding: set[str] = set()
        self._key: Secret | None = None  # lazy_master: the key, until a request needs it

    def handle(self, event: Event) -> list[Action]:
        if self.state is State.DONE:
            return []
        if isinstance(event, Start):
            return []
        if isinstance(event, QmpDisconnected) or (isinstance(event, QmpEvent) and event.name == "SHUTDOWN"):
            return self._gone()
        if isinstance(event, KeyProvided) and event.name == MASTER and self.state is State.WAIT_KEY:
            if self.params.preloaded:
                self.state = State.READY
                return [Log("info", "master key given to QEMU on its command line", {"id": self.params.master_id})]
            if self.params.lazy_master:
                self.state, self._key = State.IDLE, event.key
                return [
                    Log(
                        "info",
                        "a master key is already in QEMU: left alone; ours is added when a secret needs it",
                        {"id": self.params.master_id, "secret_objects": len(self.objects)},
                    )
                ]
            return self._store(event.key)
        if isinstance(event, KeyringReady) and self.state is State.STORING:
            return self._add_master({"qom-type": "secret_keyring", "id": self.params.master_id, "serial": event.serial})
        if isinstance(event, KeyDirReady) and self.state is State.STORING:
            return self._add_master(
                {"qom-type": "secret", "id": self.params.master_id, "file": f"{event.path}/master.key", "format": "raw"}
            )
        if isinstance(event, (KeyringFailed, KeyDirFailed)) and self.state is State.STORING:
            return self._broken(event.reason, [])
        if isinstance(event, (QmpReply, QmpError)):
            return self._answer(event)
        if isinstance(event, ControlRequest):
            return self._request(event)
        return []

    # -- the master key ---------------------------------------------------------------
    def _store(self, key: Secret) -> list[Action]:
        self.state = State.STORING
        if self.params.mode == "keyring":
            return [KeyringAdd(MASTER, f"keyagent:{self.params.vm}:master", key)]
        return [WriteKeyDir(MASTER, {"master.key": key})]

    def _add_master(self, props: dict[str, Any]) -> list[Action]:
        self.state = State.ADDING_MASTER
        tag = self.next_tag("object-add")
        self.pending[tag] = ("master", None)
        return [SendQmp(tag, "object-add", props)]

    def _master_added(self, event: QmpReply | QmpError) -> list[Action]:
        # QEMU read the key at object-add (or failed to): the copy goes either way.
        drop: list[Action] = [KeyringDrop(MASTER) if self.params.mode == "keyring" else RemoveKeyDir(MASTER)]
        if isinstance(event, QmpError):
            return self._broken(f"QEMU refused the master key: {event.desc}", drop)
        self.state = State.READY
        actions = [
            *drop,
            Log("info", "master key handed to QEMU", {"mode": self.params.mode, "id": self.params.master_id}),
        ]
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            actions += self._request(request)
        return actions

    def _broken(self, reason: str, actions: list[Action]) -> list[Action]:
        self.state = State.BROKEN
        self.problem = reason
        out = [*actions, Log("error", "no master key: secret objects are unavailable", {"reason": reason})]
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            out.append(ControlReply(request.req, 503, {"error": f"no master key: {reason}"}))
        return out

    # -- secret objects ---------------------------------------------------------------
    def _request(self, request: ControlRequest) -> list[Action]:
        if self.state in (State.WAIT_KEY, State.STORING, State.ADDING_MASTER):
            self.waiting.append(request)
            return []
        if self.state is State.IDLE and request.verb == "add":
            assert self._key is not None  # set with IDLE
            self.waiting.append(request)
            return self._store(self._key)
        if self.state is State.BROKEN:
            return [ControlReply(request.req, 503, {"error": f"no master key: {self.problem}"})]
        sid = cast(str, request.args.get("id"))  # the verb checked it (agent.app.verbs.secrets)
        if request.verb == "add":
            if sid in self.objects or sid in self.adding:
                return [ControlReply(request.req, 409, {"error": f"secret {sid!r} already exists"})]
            self.adding.add(sid)
            props = {
                "qom-type": "secret",
                "id": sid,
                "data": request.args["data"],
                "keyid": self.params.master_id,
                "iv": request.args["iv"],
                "format": "base64",
            }
            tag = self.next_tag("object-add")
            self.pending[tag] = ("add", request)
            return [SendQmp(tag, "object-add", props)]
        if request.verb == "remove":
            if sid not in self.objects:
                return [ControlReply(request.req, 404, {"error": f"no secret {sid!r} added by this agent"})]
            tag = self.next_tag("object-del")
            self.pending[tag] = ("remove", request)
            return [SendQmp(tag, "object-del", {"id": sid})]
        return [ControlReply(request.req, 400, {"error": f"unknown verb {request.verb!r}"})]

    def _answer(self, event: QmpReply | QmpError) -> list[Action]:
        entry = self.pending.pop(event.tag, None)
        if entry is None:
            return []
        what, request = entry
        if what == "master":
            return self._master_added(event)
        assert request is not None  # only the master key's entry has none
        sid = cast(str, request.args.get("id"))  # the verb checked it (agent.app.verbs.secrets)
        if what == "add":
            self.adding.discard(sid)
            if isinstance(event, QmpError):
                status = 409 if "already exists" in event.desc or "duplicate" in event.desc.lower() else 500
                return [ControlReply(request.req, status, {"error": event.desc})]
            self.objects.add(sid)
            return [
                Log("info", "secret object added", {"id": sid}),
                ControlReply(request.req, 200, {"id": sid, "status": "added"}),
            ]
        if isinstance(event, QmpError):
            return [ControlReply(request.req, 500, {"error": event.desc})]
        self.objects.discard(sid)
        return [
            Log("info", "secret object removed", {"id": sid}),
            ControlReply(request.req, 200, {"id": sid, "status": "removed"}),
        ]

    def _gone(self) -> list[Action]:
        actions: list[Action] = []
        if self.state is State.STORING or self.state is State.ADDING_MASTER:
            actions.append(KeyringDrop(MASTER) if self.params.mode == "keyring" else RemoveKeyDir(MASTER))
        for request in self.waiting:
            actions.append(ControlReply(request.req, 503, {"error": "QEMU is gone"}))
        for _what, pending in self.pending.values():
            if pending is not None:
                actions.append(ControlReply(pending.req, 503, {"error": "QEMU is gone"}))
        self.waiting, self.pending = [], {}
        self.state = State.DONE
        return [*actions, *self.finish(0, "QEMU is gone")]
