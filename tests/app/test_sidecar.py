"""agent.app.sidecar: what is not covered through the CLI and the e2e tests."""

from __future__ import annotations

from agent.app.sidecar import Sidecar
from agent.core.migration import MigrationFlow
from agent.core.snp_launch import SnpLaunchFlow


def test_the_qmp_events_the_sidecar_asks_for_are_the_lazily_imported_flows_own():
    # The sidecar names them so that it need not import those flows before one starts.
    assert Sidecar.MIGRATION_EVENTS == MigrationFlow.wanted_events
    assert Sidecar.SNP_LAUNCH_EVENTS == SnpLaunchFlow.wanted_events
