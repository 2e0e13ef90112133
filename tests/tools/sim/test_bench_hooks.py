"""The simulator's benchmark hooks: ``x-sim-reset`` and ``x-sim-query-clients``."""

from __future__ import annotations

import base64
import time

from tests.tools.sim.conftest import RawClient, packet_for


async def _cmd(client: RawClient, name: str, arguments: dict | None = None) -> dict:
    """The reply to one command, skipping events (RESUME comes before cont's reply)."""
    reply = await client.cmd(name, arguments)
    while "event" in reply:
        reply = await client.recv()
    return reply


async def _launch(client: RawClient) -> bytes:
    blob = base64.b64decode((await _cmd(client, "query-sev-launch-measure"))["return"]["data"])
    header, secret = packet_for(blob)
    assert await _cmd(client, "sev-inject-launch-secret", {"packet-header": header, "secret": secret}) == {"return": {}}
    assert await _cmd(client, "cont") == {"return": {}}
    return blob


async def test_reset_holds_the_vm_at_prelaunch_again_with_a_fresh_mnonce(sim, client):
    first = await _launch(client)
    assert sim.status == "running"
    assert await _cmd(client, "x-sim-reset") == {"return": {}}
    state = (await _cmd(client, "x-sim-query-state"))["return"]
    assert state["status"] == "prelaunch" and state["injections"] == 0 and state["cont"] is False
    second = await _launch(client)
    assert second[32:] != first[32:]  # MNONCE
    assert sim.status == "running" and not sim.cont_before_secret


async def test_reset_is_a_new_qemu_without_the_objects_of_the_last(client):
    """A bench round's agent must find what a fresh QEMU holds: no master key."""
    key = {"qom-type": "secret", "id": "keyagent-master", "data": "AAAA"}
    assert await _cmd(client, "object-add", key) == {"return": {}}
    assert await _cmd(client, "x-sim-reset") == {"return": {}}
    assert (await _cmd(client, "qom-list", {"path": "/objects"}))["return"] == [{"name": "type", "type": "string"}]
    assert await _cmd(client, "object-add", key) == {"return": {}}


async def test_query_clients_shows_when_each_connection_negotiated_and_resumed(sim, client):
    before = time.monotonic()
    other = await RawClient.connect(sim.path)
    await other.negotiate()
    await _launch(other)
    await other.close()
    clients = (await _cmd(client, "x-sim-query-clients"))["return"]
    assert [c["client"] for c in clients] == [1, 2]
    mine, theirs = clients
    assert mine["cont"] is None and mine["closed"] is None
    assert before <= theirs["connected"] <= theirs["negotiated"] <= theirs["cont"] <= time.monotonic()
