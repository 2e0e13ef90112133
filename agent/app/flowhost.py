"""The narrow interfaces the control server and its verbs see of the sidecar.

The verbs (:mod:`agent.app.verbs`) start flows, feed them, ask for a request
id that a flow's ``ControlReply`` answers, and learn when a flow finished;
the control server (:mod:`agent.app.control`) asks for a status, the
metrics and the table of verbs.  Neither reaches into the sidecar or its
runtime: :class:`agent.app.sidecar.Sidecar` satisfies both protocols, and a
test can hand them a small fake instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.app.config import Config
    from agent.app.metrics import Metrics
    from agent.core.events import Event
    from agent.core.flow import Flow

#: (method, path) -> handler(args); a handler returns a body, or (status, body).
VerbTable = Mapping[tuple[str, str], Callable[[dict], Any]]


class FlowHost(Protocol):
    """What a control verb may use of the process that runs the flows."""

    cfg: Config
    log: Any
    metrics: Metrics
    #: the VM's run_dir, where the runtime writes key files (None: not configured)
    run_dir: str | None

    def start_flow(self, flow_id: str, flow: Flow) -> None:
        """Start ``flow`` under ``flow_id`` (the verbs name their flows)."""

    def feed(self, flow_id: str, event: Event) -> None:
        """Give the flow one event (``KeyProvided``, ``ControlRequest``)."""

    def new_request(self) -> tuple[str, asyncio.Future[tuple[int, dict]]]:
        """A request id for a flow's ``ControlReply``, and the future it resolves."""

    def finished(self, flow_id: str) -> Awaitable[None]:
        """Wait until the flow has finished."""

    def flows(self) -> Mapping[str, Flow]:
        """The flows started so far, oldest first (read only)."""


class ControlHost(Protocol):
    """What the control server needs: a status, the metrics, the verbs."""

    metrics: Metrics

    def status(self) -> dict:
        """``GET /v1/status``'s body."""

    def control_verbs(self) -> VerbTable:
        """The POST verbs by (method, path)."""
