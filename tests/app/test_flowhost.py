"""The control verbs need only a FlowHost: a small fake stands in for the sidecar."""

from __future__ import annotations

import asyncio
import types
from types import MappingProxyType

import pytest

from agent.app.flowhost import FlowHost
from agent.app.metrics import Metrics
from agent.app.verbs.migrate import MigrationControl
from agent.app.verbs.secrets import FLOW_ID, SecretsControl
from agent.common.errors import ControlError
from agent.common.logs import get_logger
from agent.core.events import KeyProvided


class FakeHost:
    """Records what the verbs ask of it; no runtime, no QEMU."""

    def __init__(self, run_dir: str | None = None) -> None:
        self.cfg = types.SimpleNamespace(vm_name="vm1", secrets_master_key="file")
        self.log = get_logger("test")
        self.metrics = Metrics()
        self.run_dir = run_dir
        self._flows: dict = {}
        self.fed: list = []

    def start_flow(self, flow_id, flow):
        self._flows[flow_id] = flow

    def feed(self, flow_id, event):
        self.fed.append((flow_id, event))

    def new_request(self):
        return "req-1", asyncio.get_running_loop().create_future()

    async def finished(self, flow_id):
        return None

    def flows(self):
        return MappingProxyType(self._flows)


def test_the_fake_host_is_a_flowhost():
    host: FlowHost = FakeHost()
    assert host.flows() == {}


def test_secrets_start_gives_the_flow_a_fresh_32_byte_master_key():
    host = FakeHost()
    secrets = SecretsControl(host)
    secrets.start()
    assert host.flows()[FLOW_ID].kind == "secrets"
    [(flow_id, event)] = host.fed
    assert flow_id == FLOW_ID and isinstance(event, KeyProvided) and event.name == "master"
    assert len(event.key) == 32 and event.key is secrets.master


async def test_a_secret_request_without_the_secrets_flow_is_unavailable():
    with pytest.raises(ControlError) as err:
        await SecretsControl(FakeHost()).remove({"id": "luks0"})
    assert err.value.status == 503


async def test_a_migration_without_a_run_dir_is_refused_before_any_flow_starts():
    host = FakeHost(run_dir=None)
    with pytest.raises(ControlError) as err:
        await MigrationControl(host).start({"uri": "tcp:127.0.0.1:4444"})
    assert err.value.status == 409 and "no run_dir" in err.value.error
    assert host.flows() == {} and host.fed == []
