"""Every kind of flow, by the ``flow_kind`` the event log records.

An explicit table instead of registration as an import side effect: replay
(``agent.app.replay``), its drawings and the tests rebuild a recorded flow
from its kind and parameters through :data:`FLOW_KINDS`, and a new flow is
one line here.
"""

from __future__ import annotations

from typing import Any

from agent.core.flow import Flow
from agent.core.launch import SevLaunchFlow
from agent.core.mh import MhPeerFlow
from agent.core.migration import MigrationFlow
from agent.core.resume import ResumeFlow
from agent.core.secret_objects import SecretsFlow
from agent.core.snp_launch import SnpLaunchFlow

FLOW_KINDS: dict[str, type[Flow[Any]]] = {
    cls.kind: cls for cls in (SevLaunchFlow, MigrationFlow, ResumeFlow, SecretsFlow, SnpLaunchFlow, MhPeerFlow)
}
