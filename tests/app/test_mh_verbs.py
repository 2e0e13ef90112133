"""``ctl migrate mh-target`` and the source's report, in the agent's assembly (docs/mh.md)."""

from __future__ import annotations

import asyncio

import pytest

from agent.app.config import load_config
from agent.app.verbs.migrate import ControlError, MigrationControl
from agent.common.logs import get_logger
from agent.core.mh import MhPeerFlow
from agent.core.migration import MigrationFlow


class Host:
    """Just enough of the FlowHost for the verbs: flows are recorded, requests answered at once."""

    def __init__(self, **flags: str) -> None:
        self.cfg = load_config(None, {"vm_name": "vm1", **flags})
        self.log = get_logger("test")
        self.run_dir = "/nonexistent-run-dir"
        self.started: dict = {}

    def new_request(self):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result((200, {"status": "ok"}))
        return "req-1", fut

    def start_flow(self, flow_id, flow) -> None:
        self.started[flow_id] = flow

    def feed(self, flow_id, event) -> None:
        pass

    def flows(self):
        return dict(self.started)


async def test_mh_target_needs_sev_mh():
    with pytest.raises(ControlError) as err:
        await MigrationControl(Host(sev_owner_url="http://127.0.0.1:1")).mh_target({})
    assert err.value.status == 400 and "[sev] mh = true" in str(err.value)


async def test_mh_target_starts_the_peer_flow_for_this_vm():
    host = Host(sev_owner_url="http://127.0.0.1:1", sev_mh="true")
    status, body = await MigrationControl(host).mh_target({})
    (flow,) = host.started.values()
    assert status == 200 and isinstance(flow, MhPeerFlow) and flow.params.vm == "vm1"


@pytest.mark.parametrize(("flags", "reports"), [({"sev_mh": "true"}, True), ({}, False)])
async def test_only_an_mh_source_reports_its_end(flags, reports):
    from agent.common.secret import Secret

    host = Host(sev_owner_url="http://127.0.0.1:1", **flags)
    ctl = MigrationControl(host)
    ctl.source_psk = Secret(bytes(32))
    await ctl.start({"uri": "tcp:127.0.0.1:4444"})
    (flow,) = [f for f in host.started.values() if isinstance(f, MigrationFlow)]
    assert (flow.params.mh_vm == "vm1") is reports
