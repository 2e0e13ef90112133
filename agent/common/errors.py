"""The two kinds of failure the command line distinguishes.

Exit status 2 is bad usage or bad configuration (``UsageError``), exit status
1 is a flow that was refused or failed (``FlowFailed``).  Both carry a
one-line reason that never holds secret bytes.
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
