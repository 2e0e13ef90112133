"""Encrypted migration with TLS-PSK: the key's whole life on one host.

Source (``migrate start``)::

    agent                                QEMU (source)
      | <- KeyProvided(psk)                 |
      |-- WriteKeyDir keys.psk ------------>|  (run_dir/key-tls-*/keys.psk, 0600)
      |-- object-add tls-creds-psk client ->|  QEMU reads keys.psk now ...
      |-- RemoveKeyDir                      |  ... so the file goes at once
      |-- migrate-set-capabilities events, multifd
      |-- migrate-set-parameters tls-creds
      |-- migrate uri ------------------->  |  -> ControlReply "started"
      |<- MIGRATION setup/active/.../completed|failed|cancelled
      |-- migrate-set-parameters tls-creds "" ; object-del ; Finish

Destination (``migrate accept``) is the same, but ``endpoint=server`` with a
``dh-params.pem`` beside ``keys.psk`` (else QEMU blocks generating DH
parameters), ``migrate-incoming`` instead of ``migrate``, and the key
directory stays until a final MIGRATION status: GnuTLS reads the file again
at every handshake (multifd channels, postcopy).  A wrong PSK gives the
destination no event at all, so it runs on a deadline (and ``migrate
cancel``) until the migration is active, then tears down the same way.

Every ending (completed, failed, cancelled, deadline, a failed step, QMP
gone) removes the key directory, deletes the object and resets
``tls-creds`` to "" (else the next migration fails).

Adopted (``adopted=True``, a restarted agent over a migration its killed
predecessor began; ``agent.app.adopt``, ``docs/crash-only-adopt.md``): the
first event is :class:`Adopted` instead of ``Start``, carrying what QEMU
said at the restart (status, whether a destination still listens, the key
directory its creds object reads, whether our object and ``tls-creds`` are
set).  No key, no request to answer::

      |<- Adopted(status, listening, key_dir, creds, tls_set)
      |   final status, or nothing ever started: clean up at once
      |   otherwise: MIGRATING (a destination not yet active re-arms its deadline)
      |-- query-migrate             (a status that changed before this flow
      |<- MIGRATION ...              was there to see the event)
      |-- the same cleanup as above; Finish

SEV fast migration (``mh_vm`` set, source only, docs/mh.md): once cleaned
up, the source reports the final status to the guest owner (``POST
/v1/mh/complete``), which retires the source's MH key (completed) or the
target's (failed, cancelled), and finishes when the owner answered (the
owner executor bounds the wait).  A refused or failed report is a warning:
the migration's own result stands.  A migration whose end is unknown (QMP
lost) is not reported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from agent.common.secret import Secret
from agent.core.actions import Action, ControlReply, Log, PostOwner, RemoveKeyDir, SendQmp, WriteKeyDir
from agent.core.dhparams import ffdhe2048_pem
from agent.core.events import (
    Adopted,
    ControlRequest,
    Event,
    KeyDirFailed,
    KeyDirReady,
    KeyProvided,
    OwnerAnswered,
    OwnerFailed,
    OwnerRefused,
    QmpDisconnected,
    QmpError,
    QmpEvent,
    QmpReply,
    Start,
    TimerFired,
)
from agent.core.flow import Flow
from agent.core.modes import LogLevel, MigrationRole
from agent.protocol.owner import MH_COMPLETE_PATH, MhCompleteAnswer, MhCompleteRequest, ProtocolError

FINAL = ("completed", "failed", "cancelled")
KEY_DIR = "tls"
PSK_USERNAME = b"qemu"


class State(enum.Enum):
    WAIT_KEY = "wait-key"
    WRITE_KEY = "write-key"
    SETUP = "setup"  # object-add, capabilities, parameters, migrate/migrate-incoming
    MIGRATING = "migrating"
    CLEANUP = "cleanup"
    REPORT = "report"  # an MH VM's source: telling the owner how it ended
    DONE = "done"


# The states as module constants: an Enum member looked up on its class goes
# through EnumType's __getattr__ hook (about 60 ns on Python 3.11, five times
# a global), and the flow compares its state on every event.
WAIT_KEY = State.WAIT_KEY
WRITE_KEY = State.WRITE_KEY
SETUP = State.SETUP
MIGRATING = State.MIGRATING
CLEANUP = State.CLEANUP
REPORT = State.REPORT
DONE = State.DONE


@dataclass(frozen=True)
class MigrationParams:
    role: MigrationRole
    uri: str
    reply_to: str  # the control request that started it (answered when it is under way)
    creds_id: str
    multifd: bool = False
    multifd_channels: int = 2
    postcopy: bool = False  # both sides: postcopy-ram; the source switches once active
    dest_deadline_s: float = 60.0
    adopted: bool = False  # taken over after a restart: starts with Adopted, not Start
    #: SEV fast migration: the VM whose end the source reports to the owner (None: not an MH VM)
    mh_vm: str | None = None


_HEX_DIGITS = b"0123456789abcdef"


def psk_file_line(psk: Secret) -> Secret:
    """``keys.psk``: ``username:hexkey``, no trailing space or CR (QEMU does not trim).

    Built in a bytearray that is zeroed after use: ``bytes.hex()`` would
    leave an immutable hex copy of the key behind.
    """
    line = bytearray(PSK_USERNAME + b":")
    with psk.view() as raw:
        for byte in raw:
            line.append(_HEX_DIGITS[byte >> 4])
            line.append(_HEX_DIGITS[byte & 15])
    line += b"\n"
    try:
        return Secret(line)
    finally:
        line[:] = bytes(len(line))


class MigrationFlow(Flow[MigrationParams]):
    kind = "migration"
    wanted_events = frozenset({"MIGRATION", "SHUTDOWN"})
    Params = MigrationParams

    def __init__(self, params: MigrationParams) -> None:
        super().__init__(params)
        self.state = WAIT_KEY
        self._line: Secret | None = None  # keys.psk, until the shell has written it
        self.status = "none"  # QEMU's last MIGRATION status
        self.error = ""
        self.final_status: str | None = None
        self._steps: list[tuple[str, dict[str, Any]]] = []
        self._pending: str | None = None
        self._replied = False
        self._creds_added = False
        self._tls_set = False
        self._dir = False
        self._cancel_req: str | None = None
        self._cleanup: list[tuple[str, dict[str, Any]]] = []
        self._leftover: str | None = None  # a setup command still out when we stopped
        self._deadline_live = False  # the destination's deadline is armed, not cancelled
        self._postcopy_asked = False
        self._postcopy_tag: str | None = None
        self._follow_tag: str | None = None  # an adopted flow's own query-migrate

    @property
    def source(self) -> bool:
        return bool(self.params.role == "source")

    # -- the sequence ------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        if self._line is not None:
            # The shell wrote keys.psk while carrying out WriteKeyDir, before
            # it fed us anything else: the file is the line's only home now.
            self._line.wipe()
            self._line = None
        if self.state is DONE:
            return self._late(event)
        if type(event) is QmpEvent and self.state is not REPORT:
            # Most events are QEMU's MIGRATION events: taken before the
            # branches below (none of which takes them), by exact type
            # (events are final dataclasses).
            return self._qmp_event(event)
        if isinstance(event, Start):
            fields = {
                "role": self.params.role,
                "uri": self.params.uri,
                "multifd": self.params.multifd,
                "postcopy": self.params.postcopy,
            }
            return [Log("info", "migration prepared, waiting for the key", fields)]
        if isinstance(event, Adopted):
            return self._adopt(event) if self.params.adopted and self.state is WAIT_KEY else []
        if self.state is REPORT:
            return self._report_answer(event)
        if isinstance(event, QmpDisconnected):
            return self._lost(event.reason)
        if isinstance(event, ControlRequest):
            return self._control(event)
        if isinstance(event, KeyProvided):
            if self.state is WAIT_KEY:
                return self._write_key(event.key)
            event.key.wipe()  # a key that came too late is nobody's
            return []
        if isinstance(event, KeyDirReady) and self.state is WRITE_KEY:
            self._dir = True
            return self._setup(event.path)
        if isinstance(event, KeyDirFailed) and self.state is WRITE_KEY:
            self._dir = False  # the shell left nothing behind
            return self._abort(f"cannot write the PSK: {event.reason}")
        if isinstance(event, (QmpReply, QmpError)):
            if isinstance(event, QmpError) and event.tag == self._postcopy_tag:
                return [Log("warning", "could not switch to postcopy; precopy goes on", {"error": event.desc})]
            if event.tag == self._follow_tag and event.tag is not None:
                self._follow_tag = None
                return self._followed(event)
            if event.tag != self._pending:
                return []
            self._pending = None
            if self.state is CLEANUP:
                return self._cleanup_step(event)
            if isinstance(event, QmpError):
                return self._abort(f"{self._last_command} failed: {event.desc}")
            return self._setup_step(event.result)
        if isinstance(event, QmpEvent):
            return self._qmp_event(event)
        if isinstance(event, TimerFired) and event.name == "deadline":
            return self._deadline()
        return []

    def _write_key(self, psk: Secret) -> list[Action]:
        self.state = WRITE_KEY
        # The directory may exist from now on: an ending before KeyDirReady
        # (QMP lost, cancel) must remove it too.
        self._dir = True
        self._line = psk_file_line(psk)
        psk.wipe()  # the line is all that is needed of it, and only until it is written
        files: dict[str, Any] = {"keys.psk": self._line}
        if not self.source:
            files["dh-params.pem"] = ffdhe2048_pem()
        return [WriteKeyDir(KEY_DIR, files)]

    def _setup(self, key_dir: str) -> list[Action]:
        self.state = SETUP
        p = self.params
        creds = {
            "qom-type": "tls-creds-psk",
            "id": p.creds_id,
            "dir": key_dir,
            "endpoint": "client" if self.source else "server",
        }
        caps = [{"capability": "events", "state": True}, {"capability": "multifd", "state": p.multifd}]
        if p.postcopy:
            caps.append({"capability": "postcopy-ram", "state": True})
        params: dict[str, Any] = {"tls-creds": p.creds_id}
        if p.multifd:
            params["multifd-channels"] = p.multifd_channels
        self._steps = [
            ("object-add", creds),
            ("migrate-set-capabilities", {"capabilities": caps}),
            ("migrate-set-parameters", params),
            ("migrate", {"uri": p.uri}) if self.source else ("migrate-incoming", {"uri": p.uri}),
        ]
        return self._next_step()

    def _next_step(self) -> list[Action]:
        return self._send(*self._steps.pop(0))

    def _send(self, command: str, args: dict[str, Any]) -> list[Action]:
        """The one command this flow waits for next (setup or cleanup)."""
        self._last_command = command
        self._pending = self.next_tag(command)
        return [SendQmp(self._pending, command, args)]

    def _setup_step(self, _result: Any) -> list[Action]:
        actions: list[Action] = []
        done = self._last_command
        if done == "object-add":
            self._creds_added = True
            if self.source:
                # QEMU read keys.psk at object-add: the file has nothing left to do.
                self._dir = False
                actions.append(RemoveKeyDir(KEY_DIR))
        elif done == "migrate-set-parameters":
            self._tls_set = True
        if self._steps:
            return [*actions, *self._next_step()]
        # migrate / migrate-incoming accepted: the migration is under way.
        self.state = MIGRATING
        if not self.source:
            actions.append(self.arm("deadline", self.params.dest_deadline_s))
            self._deadline_live = True
        self._replied = True
        word = "started" if self.source else "listening"
        return [
            *actions,
            Log("info", f"migration {word}", {"uri": self.params.uri}),
            ControlReply(self.params.reply_to, 200, {"status": word}),
        ]

    # -- adopted after a restart ---------------------------------------------------
    def _adopt(self, event: Adopted) -> list[Action]:
        """Take over from what QEMU says; the shell kept ``key_dir`` for us."""
        self._replied = True  # the request that started it died with the old agent
        self._creds_added = event.creds
        self._tls_set = event.tls_set
        self._dir = bool(event.key_dir)
        self.status = event.status
        fields: dict[str, Any] = {
            "role": self.params.role,
            "status": event.status,
            "listening": event.listening,
            "key_dir_kept": bool(event.key_dir),
        }
        actions: list[Action] = [Log("info", "adopting the migration a previous agent began", fields)]
        if event.status in FINAL:
            # It ended while no agent watched: clean up at once.
            return [*actions, *self._finish_with(event.status, "")]
        if event.status == "none" and not event.listening:
            # Killed during the setup, before migrate / migrate-incoming: nothing runs.
            return [*actions, *self._abort("the previous agent stopped before the migration started")]
        self.state = MIGRATING
        if not self.source and event.status in ("none", "setup"):
            # Not yet active: a wrong PSK would leave it waiting for ever.
            actions.append(self.arm("deadline", self.params.dest_deadline_s))
            self._deadline_live = True
        # The status may have moved on between the shell's look and this flow's
        # birth, when no flow was there to take the MIGRATION event: look again.
        self._follow_tag = self.next_tag("query-migrate")
        return [*actions, SendQmp(self._follow_tag, "query-migrate", {})]

    def _followed(self, event: QmpReply | QmpError) -> list[Action]:
        if self.state is not MIGRATING or not isinstance(event, QmpReply):
            return []
        status = event.result.get("status") if isinstance(event.result, dict) else None
        if not isinstance(status, str) or status == self.status:
            return []
        return self._on_status(status)

    # -- QEMU tells us how it goes ---------------------------------------------------
    def _qmp_event(self, event: QmpEvent) -> list[Action]:
        if event.name == "SHUTDOWN":
            return self._lost("QEMU shut down")
        status = event.data.get("status") if isinstance(event.data, dict) else None
        if not isinstance(status, str):
            return []
        return self._on_status(status)

    def _on_status(self, status: str) -> list[Action]:
        self.status = status
        actions: list[Action] = [Log("info", "migration status", {"status": status})]
        if status == "active" and not self.source and self._deadline_live:
            # The handshake worked.  A firing already on its way must not end
            # the migration now: _deadline() checks the flag.
            self._deadline_live = False
            actions.append(_cancel("deadline"))
        if (
            status == "active"
            and self.source
            and self.params.postcopy
            and not self._postcopy_asked
            and self.state is MIGRATING
        ):
            # Switch to postcopy at once: the destination runs the guest and
            # pulls the rest.  Its answer is not waited for: MIGRATION events
            # (postcopy-active, completed or failed) tell how it went.
            self._postcopy_asked = True
            self._postcopy_tag = self.next_tag("migrate-start-postcopy")
            actions.append(SendQmp(self._postcopy_tag, "migrate-start-postcopy", {}))
        # A final status counts once our migrate / migrate-incoming is out (it
        # may come before that command's answer); before, it can only be an
        # earlier migration's, and must not end (or "complete") this one.
        started = self.state is MIGRATING or (
            self.state is SETUP and self._last_command in ("migrate", "migrate-incoming")
        )
        if status in FINAL and started:
            return [*actions, *self._finish_with(status, "")]
        return actions  # every other status, known today or not, is progress

    def _deadline(self) -> list[Action]:
        if self.state is not MIGRATING or not self._deadline_live:
            return []
        return self._finish_with(
            "failed",
            f"no final migration status within {self.params.dest_deadline_s:g}s (wrong PSK, or the source gave up)",
        )

    def _control(self, event: ControlRequest) -> list[Action]:
        if event.verb != "cancel":
            return [ControlReply(event.req, 400, {"error": f"unknown verb {event.verb!r}"})]
        if self.state is CLEANUP:
            return [ControlReply(event.req, 200, {"status": "cancelling"})]
        if self.source and self.state is MIGRATING:
            self._cancel_req = event.req
            tag = self.next_tag("migrate_cancel")
            # Not a setup step: the answer only tells us QEMU took the request.
            return [
                Log("info", "cancelling the migration"),
                SendQmp(tag, "migrate_cancel", {}),
                ControlReply(event.req, 200, {"status": "cancelling"}),
            ]
        return [
            ControlReply(event.req, 200, {"status": "cancelled"}),
            *self._finish_with("cancelled", "cancelled by request"),
        ]

    # -- endings ---------------------------------------------------------------------
    def _abort(self, reason: str) -> list[Action]:
        return self._finish_with("failed", reason)

    def _finish_with(self, status: str, reason: str) -> list[Action]:
        """Tear down in order; Finish when the last cleanup command answers."""
        self.final_status = status
        self.error = reason
        actions: list[Action] = []
        if not self._replied and not (not reason and self._status_before_answer()):
            self._replied = True
            actions.append(ControlReply(self.params.reply_to, 500, {"error": reason or f"migration {status}"}))
        if self._dir:
            self._dir = False
            actions.append(RemoveKeyDir(KEY_DIR))
        self._cleanup = []
        if status == "failed" and not reason:
            self._cleanup.append(("query-migrate", {}))  # for QEMU's error text
        if self._tls_set:
            self._cleanup.append(("migrate-set-parameters", {"tls-creds": ""}))
        if self._creds_added:
            self._cleanup.append(("object-del", {"id": self.params.creds_id}))
        self.state = CLEANUP
        if self._pending is not None:
            # A setup command is still out; its answer will drive the cleanup.
            self._leftover = self._last_command
            return actions
        return [*actions, *self._cleanup_next()]

    def _status_before_answer(self) -> bool:
        """QEMU's final status came while our migrate / migrate-incoming was
        still out (its event may reach us before the command's answer).  The
        request is answered by the command's answer, as it would have been
        had the two come the other way round: accepted, "started" (the
        status then tells the rest); refused, its error."""
        return (
            self.state is SETUP and self._pending is not None and self._last_command in ("migrate", "migrate-incoming")
        )

    def _answer_after_status(self, command: str, event: QmpReply | QmpError) -> list[Action]:
        self._replied = True
        if isinstance(event, QmpError):
            self.error = f"{command} failed: {event.desc}"
            return [ControlReply(self.params.reply_to, 500, {"error": self.error})]
        word = "started" if self.source else "listening"
        return [
            Log("info", f"migration {word}", {"uri": self.params.uri}),
            ControlReply(self.params.reply_to, 200, {"status": word}),
        ]

    def _cleanup_next(self) -> list[Action]:
        if not self._cleanup:
            return self._done()
        return self._send(*self._cleanup.pop(0))

    def _cleanup_step(self, event: QmpReply | QmpError) -> list[Action]:
        actions: list[Action] = []
        ok = isinstance(event, QmpReply)
        if self._leftover is not None:
            # The answer to the setup command that was out when we decided to
            # stop: undo what it did, first.
            leftover, self._leftover = self._leftover, None
            if not self._replied and leftover in ("migrate", "migrate-incoming"):
                actions += self._answer_after_status(leftover, event)
            if ok and leftover == "object-add":
                self._creds_added = True
                self._cleanup.append(("object-del", {"id": self.params.creds_id}))
            elif ok and leftover == "migrate-set-parameters":
                self._tls_set = True
                self._cleanup.insert(0, ("migrate-set-parameters", {"tls-creds": ""}))
            elif ok and leftover == "migrate" and self.final_status != "failed":
                self._cleanup.insert(0, ("migrate_cancel", {}))
            return [*actions, *self._cleanup_next()]
        command = self._last_command
        if command == "query-migrate" and isinstance(event, QmpReply):
            desc = event.result.get("error-desc") if isinstance(event.result, dict) else None
            if isinstance(desc, str) and desc:
                self.error = desc
        elif command == "migrate-set-parameters" and ok:
            self._tls_set = False
        elif command == "object-del" and ok:
            self._creds_added = False
        if isinstance(event, QmpError) and command != "query-migrate":
            actions.append(Log("warning", "cleanup step failed", {"command": command, "error": event.desc}))
        return [*actions, *self._cleanup_next()]

    def _done(self) -> list[Action]:
        status = self.final_status or "failed"
        vm = self.params.mh_vm
        if self.source and vm is not None and status in FINAL and self.state is not REPORT:
            self.state = REPORT
            body = MhCompleteRequest(vm=vm, status=status).encode()
            return [
                Log("info", "reporting the migration's end to the guest owner", body),
                PostOwner(MH_COMPLETE_PATH, body),
            ]
        self.state = DONE
        reason = self.error or f"migration {status}"
        fields: dict[str, Any] = {"status": status}
        if self.error:
            fields["error"] = self.error
        level: LogLevel = "info" if status == "completed" else "error"
        return [
            Log(level, "migration finished", fields),
            *self.finish(0 if status == "completed" else 1, reason if status != "completed" else "migration completed"),
        ]

    def _report_answer(self, event: Event) -> list[Action]:
        """REPORT: the owner's answer to /v1/mh/complete; then the usual ending."""
        if isinstance(event, ControlRequest):
            return [ControlReply(event.req, 200, {"status": "finishing"})]
        if isinstance(event, KeyProvided):
            event.key.wipe()
            return []
        if isinstance(event, OwnerAnswered):
            try:
                retired = MhCompleteAnswer.parse(event.body).retired
            except ProtocolError as exc:
                log = Log("warning", "malformed owner answer to the MH report", {"error": exc.reason})
            else:
                log = Log("info", "guest owner retired an MH key", {"retired": retired})
        elif isinstance(event, OwnerRefused):
            log = Log("warning", "guest owner refused the MH report", {"status": event.status, "error": event.error})
        elif isinstance(event, OwnerFailed):
            log = Log("warning", "MH report did not reach the guest owner", {"error": event.reason})
        else:
            return []
        return [log, *self._done()]

    def _lost(self, reason: str) -> list[Action]:
        self.final_status = self.final_status or "failed"
        if not self.error:
            self.error = f"QMP connection lost: {reason}" if reason else "QMP connection lost"
        actions: list[Action] = []
        if not self._replied:
            self._replied = True
            actions.append(ControlReply(self.params.reply_to, 500, {"error": self.error}))
        if self._dir:
            self._dir = False
            actions.append(RemoveKeyDir(KEY_DIR))
        self.state = DONE
        return [
            *actions,
            Log("error", "migration finished", {"status": self.final_status, "error": self.error}),
            *self.finish(1, self.error),
        ]

    def _late(self, event: Event) -> list[Action]:
        if isinstance(event, KeyProvided):
            event.key.wipe()
            return []
        if isinstance(event, ControlRequest):
            return [
                ControlReply(event.req, 409, {"error": "the migration has already ended", "status": self.final_status})
            ]
        return []

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.final_status or self.status}
        if self.error:
            out["error"] = self.error
        return out


def _cancel(name: str) -> Action:
    from agent.core.actions import CancelTimer

    return CancelTimer(name)
