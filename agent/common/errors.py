"""The one exception tree of keyagent.

Every failure this code raises on purpose is a :class:`KeyagentError`; its
reason is one line and never holds secret bytes.  The command line turns it
into an exit status: 2 for bad usage or configuration (:class:`UsageError`),
1 for everything else.  Below the root there is one branch per side, so a
handler can say whose failure it expects::

    KeyagentError
    ├── UsageError            bad command line, config or input file (exit 2)
    ├── FlowFailed            a flow was refused or failed (exit 1)
    ├── AgentError            the sidecar's own failures
    │   ├── MonitorError      QEMU's monitor (QMP or libvirt)
    │   │   ├── QmpCommandError   QEMU answered a command with an error
    │   │   └── MonitorGone       the monitor connection is lost (or never came)
    │   └── ControlError      a control-socket request refused (HTTP status)
    ├── OwnerError            the guest owner's failures
    └── SimError              the SEV simulator's failures
        └── SimQmpError       the simulated QEMU's error reply

Format errors of pure parsers stay ``ValueError`` subclasses: they are data
errors that the caller translates.  :class:`SevFormatError` is the one of
``agent.sev`` (an image, a kernel command line, a vCPU signature that cannot
be measured); the command line turns it into exit status 2, as a usage
error.
"""

from __future__ import annotations


class KeyagentError(Exception):
    exit_code = 1

    def __init__(self, reason: str) -> None:
        super().__init__(reason.splitlines()[0] if reason else "failed")

    @property
    def reason(self) -> str:
        return str(self)


class UsageError(KeyagentError):
    """Bad command line, bad config, bad input file: exit 2."""

    exit_code = 2


class FlowFailed(KeyagentError):
    """A flow was refused or failed: exit 1."""

    exit_code = 1


# -- the agent ------------------------------------------------------------------------


class AgentError(KeyagentError):
    """A failure of the sidecar (or launcher) itself."""


class MonitorError(AgentError):
    """Something went wrong on QEMU's monitor."""


class QmpCommandError(MonitorError):
    """QEMU answered a command with an error; ``error_class``/``desc`` are
    QEMU's words, never our arguments (which may hold secrets)."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class MonitorGone(MonitorError):
    """The monitor connection is lost, or could not be made."""


class ControlError(AgentError):
    """A control-socket request refused: ``status`` is its HTTP status."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


# -- the guest owner ------------------------------------------------------------------


class OwnerError(KeyagentError):
    """A failure of the reference guest owner."""


# -- the simulator --------------------------------------------------------------------


class SimError(KeyagentError):
    """A failure of the SEV simulator."""


class SimQmpError(SimError):
    """The simulated QEMU's error reply: QMP ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


# -- pure formats ---------------------------------------------------------------------


class SevFormatError(ValueError):
    """SEV input that cannot be measured or built (``agent.sev``); the
    command line reports it as a usage error (exit 2)."""
