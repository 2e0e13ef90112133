"""What a flow asks the shell to do: the typed outputs of the sans-IO core.

A flow never performs I/O; it returns these and the runtime carries them
out, turning the outcome back into events.  Like events, they hold only
JSON-friendly values or :class:`Secret`, so a replay can compare the actions
it computes with the recorded ones field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.core.modes import LogLevel


@dataclass(frozen=True)
class SendQmp:
    """Execute a QMP command.  A :class:`Secret` value in ``args`` is sent as
    its base64 text and is redacted everywhere else."""

    tag: str
    command: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PostOwner:
    """POST JSON to the guest owner at ``path`` (relative to owner_url)."""

    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class ArmTimer:
    """Fire ``TimerFired(name)`` after ``seconds``; re-arming replaces it."""

    name: str
    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    name: str


@dataclass(frozen=True)
class Log:
    """One log line the shell writes for the flow (never secret fields)."""

    level: LogLevel
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finish:
    """The flow reached a final state: exit status and a one-line reason."""

    code: int
    reason: str


@dataclass(frozen=True)
class ControlReply:
    """Answer the control request ``req`` (HTTP status and JSON body)."""

    req: str
    status: int
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteKeyDir:
    """Create a fresh 0700 directory under run_dir holding these 0600 files.

    Values are :class:`Secret` (key material) or ``str`` (public data such as
    DH parameters).  The shell answers ``KeyDirReady`` or ``KeyDirFailed``.
    """

    name: str
    files: dict[str, Any]


@dataclass(frozen=True)
class RemoveKeyDir:
    """Remove the directory made for ``name`` and everything in it."""

    name: str


@dataclass(frozen=True)
class KeyringAdd:
    """Put ``key`` in the user keyring (readable by this uid, so by QEMU).

    The shell answers ``KeyringReady(name, serial)`` or ``KeyringFailed``.
    """

    name: str
    description: str
    key: Any  # Secret


@dataclass(frozen=True)
class KeyringDrop:
    """Revoke and unlink the key added for ``name``."""

    name: str


@dataclass(frozen=True)
class NoteLaunched:
    """Keep in the run_dir that the launch measured as ``measurement`` (base64,
    as QEMU reports it) got a secret its owner released for that measurement.

    Sent after the injection, before ``cont``: an agent started again over a
    running VM whose measurement is this one knows the launch needs nothing
    (:mod:`agent.app.resume_launch`).  The measurement is public (it goes to
    the owner in clear); no answer comes back."""

    measurement: str


Action = (
    SendQmp
    | PostOwner
    | ArmTimer
    | CancelTimer
    | Log
    | Finish
    | ControlReply
    | WriteKeyDir
    | RemoveKeyDir
    | KeyringAdd
    | KeyringDrop
    | NoteLaunched
)

ACTION_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        SendQmp,
        PostOwner,
        ArmTimer,
        CancelTimer,
        Log,
        Finish,
        ControlReply,
        WriteKeyDir,
        RemoveKeyDir,
        KeyringAdd,
        KeyringDrop,
        NoteLaunched,
    )
}
