"""What a restarted agent meets in the simulator: a repeated LAUNCH_SECRET,
and the test-only hold that lets a test kill an agent at an exact step."""

from __future__ import annotations

import base64

from agent.tools.sim.qmp_server import Simulator
from tests.tools.sim.conftest import RawClient, make_config, packet_for


async def blob_of(client: RawClient) -> bytes:
    return base64.b64decode((await client.cmd("query-sev-launch-measure"))["return"]["data"])


async def test_the_same_packet_twice_in_lsecret_is_accepted_like_the_psp_does(sim, client):
    header, secret = packet_for(await blob_of(client))
    args = {"packet-header": header, "secret": secret}
    assert await client.cmd("sev-inject-launch-secret", args) == {"return": {}}
    assert await client.cmd("sev-inject-launch-secret", args) == {"return": {}}
    state = (await client.cmd("x-sim-query-state"))["return"]
    assert state["sev-state"] == "launch-secret" and state["injections"] == 2 and state["status"] == "prelaunch"
    assert (await client.cmd("x-sim-query-secrets"))["return"]["table-valid"] is True


async def test_a_held_command_is_neither_run_nor_answered_until_its_client_goes(sock_path):
    async with Simulator(make_config(), sock_path) as sim:
        sim.hold_once = {"cont"}
        first = await RawClient.connect(sock_path)
        await first.negotiate()
        await first.send_raw(b'{"execute": "cont"}')
        try:
            await first.recv(timeout=0.3)
            raise AssertionError("a held command was answered")
        except TimeoutError:
            pass
        assert sim.status == "prelaunch"
        await first.send_raw(b'{"execute": "query-status"}')  # ignored too
        await first.close()

        second = await RawClient.connect(sock_path)
        await second.negotiate()
        assert (await second.cmd("query-status"))["return"]["status"] == "prelaunch"
        event = await second.cmd("cont")  # held once only: RESUME, then the reply
        assert event["event"] == "RESUME" and await second.recv() == {"return": {}}
        await second.close()
