"""What happens to a flow: the typed inputs of the sans-IO core.

The shell (``agent.app.runtime`` and ``agent.io``) turns bytes, sockets, timers
and HTTP answers into these values; a flow sees nothing else.  Each is a
frozen dataclass of JSON-friendly fields (or :class:`Secret`), so the event
log can record it and ``keyagent replay`` can rebuild it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.common.secret import Secret


@dataclass(frozen=True)
class Start:
    """The flow was created; sent once, first."""


@dataclass(frozen=True)
class QmpConnected:
    """QMP greeting received and capabilities negotiated."""

    qemu_version: str = ""


@dataclass(frozen=True)
class QmpReply:
    """A successful ``return`` for the command sent with ``tag``."""

    tag: str
    result: Any = None


@dataclass(frozen=True)
class QmpError:
    """An ``error`` answer for the command sent with ``tag``."""

    tag: str
    error_class: str
    desc: str


@dataclass(frozen=True)
class QmpEvent:
    """An asynchronous QMP event (RESUME, STOP, SHUTDOWN, MIGRATION, ...)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QmpDisconnected:
    """The monitor connection is gone (QEMU quit or crashed, socket closed)."""

    reason: str = ""


@dataclass(frozen=True)
class TimerFired:
    """A timer armed with ``ArmTimer(name, ...)`` expired."""

    name: str


@dataclass(frozen=True)
class OwnerReleased:
    """The guest owner accepted the measurement and released a secret packet."""

    packet_header: str  # base64 of the 52-byte header (flags, IV, MAC): not secret
    secret: Secret  # the encrypted secret table, sent to QEMU as base64
    gpa: int | None = None


@dataclass(frozen=True)
class OwnerRefused:
    """The guest owner answered 4xx/5xx: it will not release the secret."""

    status: int
    error: str


@dataclass(frozen=True)
class OwnerFailed:
    """No usable answer: unreachable, timed out, or malformed."""

    reason: str


@dataclass(frozen=True)
class OwnerAnswered:
    """A 200 from the guest owner on a path other than /v1/secret (``/v1/mh/*``): its JSON body.

    Public data only (the flow parses it with :mod:`agent.protocol.owner`);
    refusals and failures on those paths are ``OwnerRefused``/``OwnerFailed``.
    """

    path: str
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlRequest:
    """A ``keyagent ctl`` verb for this flow; answer with ``ControlReply(req)``."""

    req: str
    verb: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyProvided:
    """Key material the shell obtained for the flow (opened cookie, key file, keyring)."""

    name: str
    key: Secret


@dataclass(frozen=True)
class KeyDirReady:
    """``WriteKeyDir(name, ...)`` is done: a fresh 0700 dir holding 0600 files."""

    name: str
    path: str


@dataclass(frozen=True)
class KeyDirFailed:
    """``WriteKeyDir`` failed (disk full, run_dir gone); nothing is left behind."""

    name: str
    reason: str


@dataclass(frozen=True)
class KeyringReady:
    """``KeyringAdd(name, ...)`` is done: the key is in the user keyring."""

    name: str
    serial: int


@dataclass(frozen=True)
class KeyringFailed:
    name: str
    reason: str


@dataclass(frozen=True)
class Adopted:
    """A restarted agent takes over what its predecessor left running in QEMU.

    Fed first, instead of :class:`Start`, to a flow created for something
    already under way (``agent.app.adopt``): every field is what QEMU said
    at the restart (and the run_dir path QEMU's own object names), never
    what the dead agent remembered, so a replay rebuilds the same flow.
    """

    status: str  # query-migrate's status ("none" when QEMU gave none)
    listening: bool = False  # a destination's migrate-incoming waits for its source
    key_dir: str = ""  # the key directory QEMU still reads (kept by the start-up sweep)
    creds: bool = False  # our tls-creds object exists
    tls_set: bool = False  # the tls-creds parameter names it


Event = (
    Start
    | QmpConnected
    | QmpReply
    | QmpError
    | QmpEvent
    | QmpDisconnected
    | TimerFired
    | OwnerReleased
    | OwnerRefused
    | OwnerFailed
    | OwnerAnswered
    | ControlRequest
    | KeyProvided
    | KeyDirReady
    | KeyDirFailed
    | KeyringReady
    | KeyringFailed
    | Adopted
)

EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        Start,
        QmpConnected,
        QmpReply,
        QmpError,
        QmpEvent,
        QmpDisconnected,
        TimerFired,
        OwnerReleased,
        OwnerRefused,
        OwnerFailed,
        OwnerAnswered,
        ControlRequest,
        KeyProvided,
        KeyDirReady,
        KeyDirFailed,
        KeyringReady,
        KeyringFailed,
        Adopted,
    )
}
