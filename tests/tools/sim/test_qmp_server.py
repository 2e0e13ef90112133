"""The simulator's QMP server, seen through a raw socket and through qemu.qmp."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os

import pytest
from qemu.qmp import ExecuteError, QMPClient

from agent.common.logs import setup_logging
from agent.sev.guids import LUKS_KEY_GUID
from agent.sev.measurement import verify_measurement
from agent.tools.sim.machine import SimConfig
from agent.tools.sim.qmp_server import Simulator
from tests.tools.sim.conftest import DIGEST, DISK_PASS, TEK, TIK, RawClient, make_config, new_guid, packet_for


async def measurement(client: RawClient) -> bytes:
    reply = await client.cmd("query-sev-launch-measure")
    return base64.b64decode(reply["return"]["data"])


# -- greeting and negotiation ---------------------------------------------


async def test_greeting_is_qemu_7_2_offering_oob(sim):
    c = await RawClient.connect(sim.path)
    assert c.greeting == {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"},
            "capabilities": ["oob"],
        }
    }
    assert c.raw_lines[0].endswith(b"}\r\n")
    await c.close()


async def test_commands_before_negotiation_are_refused_with_qemus_text(sim):
    c = await RawClient.connect(sim.path)
    for name in ("query-status", "no-such-command"):
        reply = await c.cmd(name, id=7)
        assert reply == {
            "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
            "id": 7,
        }
    await c.negotiate()
    assert (await c.cmd("query-status"))["return"]["status"] == "prelaunch"
    await c.close()


async def test_negotiating_twice_is_refused(client):
    reply = await client.cmd("qmp_capabilities")
    assert reply["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored",
    }


async def test_unknown_capability_is_refused(sim):
    c = await RawClient.connect(sim.path)
    reply = await c.cmd("qmp_capabilities", {"enable": ["bogus"]})
    assert reply["error"]["desc"] == "Parameter 'enable[0]' does not accept value 'bogus'"
    assert (await c.cmd("qmp_capabilities", {"enable": ["oob"]})) == {"return": {}}
    await c.close()


async def test_unknown_command_is_command_not_found_and_id_is_echoed(client):
    reply = await client.cmd("frobnicate", id={"any": ["json", 1]})
    assert reply == {
        "error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"},
        "id": {"any": ["json", 1]},
    }


async def test_exec_oob_is_refused_for_in_band_commands(sim):
    c = await RawClient.connect(sim.path)
    await c.send_raw(b'{"exec-oob": "query-status"}')
    assert (await c.recv())["error"]["desc"] == "QMP input member 'exec-oob' is unexpected"
    await c.cmd("qmp_capabilities", {"enable": ["oob"]})
    await c.send_raw(b'{"exec-oob": "query-status", "id": 1}')
    assert await c.recv() == {
        "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"},
        "id": 1,
    }
    await c.close()


# -- framing and malformed input ----------------------------------------


async def test_messages_without_newline_back_to_back_are_all_answered(client):
    await client.send_raw(
        b'{"execute":"query-status","id":1}{"execute":"query-sev","id":2}  {"execute":"query-version","id":3}'
    )
    replies = [await client.recv() for _ in range(3)]
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert all(line.endswith(b"\r\n") for line in client.raw_lines)


async def test_a_message_split_across_writes_is_reassembled(client):
    msg = b'{"execute": "query-status", "id": "split \\" } {"}'
    for i in range(len(msg)):
        await client.send_raw(msg[i : i + 1])
    reply = await client.recv()
    assert reply["id"] == 'split " } {'
    assert reply["return"]["status"] == "prelaunch"


@pytest.mark.parametrize(
    "raw, desc",
    [
        (b'{"execute": nope}', "JSON parse error, expecting value"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b"42 ", "QMP input must be a JSON object"),
        (b"}", "JSON parse error, expecting value"),
        (b'{"execute": "query-status", "bogus": 1}', "QMP input member 'bogus' is unexpected"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "query-status", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "query-status", "arguments": {"x": 1}}', "Parameter 'x' is unexpected"),
        (b'{"execute": "cont", "x": NaN}', "JSON parse error, invalid keyword 'NaN'"),
        (b'{"\xff": 1}', "JSON parse error, invalid UTF-8 sequence in string"),
    ],
)
async def test_malformed_input_gets_qemus_generic_error_and_the_session_goes_on(client, raw, desc):
    await client.send_raw(raw)
    reply = await client.recv()
    assert reply["error"] == {"class": "GenericError", "desc": desc}
    assert (await client.cmd("query-status", id="after"))["id"] == "after"


async def test_huge_input_is_refused_and_the_next_message_still_parses(sock_path):
    async with Simulator(make_config(), sock_path, max_message=4096) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        huge = b'{"execute": "query-status", "arguments": {"x": "' + b"A" * 20000 + b'"}}'
        await c.send_raw(huge + b'{"execute": "query-status", "id": "next"}')
        assert (await c.recv())["error"] == {"class": "GenericError", "desc": "JSON token size limit exceeded"}
        assert (await c.recv())["id"] == "next"
        deep = b"[" * 2000 + b"]" * 2000
        await c.send_raw(deep + b'{"execute": "query-status", "id": "deep"}')
        assert (await c.recv())["error"]["desc"] == "JSON nesting depth limit exceeded"
        assert (await c.recv())["id"] == "deep"
        await c.close()


# -- SEV queries ----------------------------------------------------------


async def test_query_sev_has_qemu_7_2_fields_and_no_sev_type(client):
    info = (await client.cmd("query-sev"))["return"]
    assert info == {
        "enabled": True,
        "api-major": 1,
        "api-minor": 55,
        "build-id": 21,
        "policy": 1,
        "state": "launch-secret",
        "handle": 1,
    }


async def test_sev_es_sets_policy_bit_2(sock_path):
    async with Simulator(make_config(sev_es=True), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        assert (await c.cmd("query-sev"))["return"]["policy"] == 0x5
        blob = await measurement(c)
        assert verify_measurement(blob, TIK, 1, 55, 21, 0x5, DIGEST)
        await c.close()


async def test_measurement_verifies_with_the_known_tik_and_digest(client):
    blob = await measurement(client)
    assert len(blob) == 48
    assert verify_measurement(blob, TIK, 1, 55, 21, 0x1, DIGEST)
    assert not verify_measurement(blob, TEK, 1, 55, 21, 0x1, DIGEST)
    assert not verify_measurement(blob, TIK, 1, 55, 21, 0x1, hashlib.sha256(b"other").digest())


async def test_measurement_uses_the_configured_nonce(sock_path):
    nonce = bytes(range(100, 116))
    async with Simulator(make_config(mnonce=nonce), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        assert (await measurement(c))[32:] == nonce
        await c.close()


async def test_measurement_is_not_available_before_the_delay(sock_path):
    now = [100.0]
    async with Simulator(make_config(measure_delay_s=2.0), sock_path, clock=lambda: now[0]) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        assert await c.cmd("query-sev-launch-measure") == {
            "error": {"class": "GenericError", "desc": "SEV launch measurement is not available"}
        }
        assert (await c.cmd("query-sev"))["return"]["state"] == "launch-update"
        header, secret = "A" * 72, "A" * 24
        reply = await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
        assert reply["error"]["desc"] == "SEV: Not in correct state. (LSECRET) 1"
        now[0] += 2.0
        blob = await measurement(c)
        assert verify_measurement(blob, TIK, 1, 55, 21, 1, DIGEST)
        assert (await c.cmd("query-sev"))["return"]["state"] == "launch-secret"
        await c.close()


async def test_query_sev_capabilities_has_the_7_2_members(client):
    caps = (await client.cmd("query-sev-capabilities"))["return"]
    assert set(caps) == {"pdh", "cert-chain", "cpu0-id", "cbitpos", "reduced-phys-bits"}
    base64.b64decode(caps["pdh"], validate=True)
    assert caps["reduced-phys-bits"] == 1


async def test_query_sev_capabilities_shows_the_platforms_pdh_and_chain(sim, client):
    from agent.sev.cert import Certificate, PlatformChain, verify_pdh_chain

    caps = (await client.cmd("query-sev-capabilities"))["return"]
    pdh = Certificate.from_bytes(base64.b64decode(caps["pdh"], validate=True))
    chain = PlatformChain.from_bytes(base64.b64decode(caps["cert-chain"], validate=True))
    verify_pdh_chain(pdh, chain)
    assert pdh == sim.machine.platform.pdh_cert


async def test_a_launch_session_gives_the_psp_the_owners_keys(sock_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.sev.session import create_session
    from agent.tools.sim.psp import Platform

    key = ec.generate_private_key(ec.SECP384R1())
    tik, tek = os.urandom(16), os.urandom(16)
    godh, session = create_session(
        Platform(key).pdh_cert, 0x5, nonce=os.urandom(16), tek=tek, tik=tik, iv=os.urandom(16)
    )
    config = SimConfig(digest=DIGEST, sev_es=True, pdh_private_key=key, session=(godh, session))
    assert "session" not in repr(config) and "pdh" not in repr(config)
    async with Simulator(config, sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        blob = await measurement(c)
        assert verify_measurement(blob, tik, 1, 55, 21, 0x5, DIGEST)
        header, secret = packet_for(blob, tik=tik, tek=tek)
        assert await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret}) == {"return": {}}
        assert sim.injections == 1 and sim.machine.table_valid is True
        await c.close()


def test_a_session_that_does_not_open_stops_the_machine_at_launch_start(sock_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.sev.session import create_session
    from agent.tools.sim.psp import FwError, Platform, SevRet

    key = ec.generate_private_key(ec.SECP384R1())
    godh, session = create_session(
        Platform(key).pdh_cert, 0x1, nonce=os.urandom(16), tek=TEK, tik=TIK, iv=os.urandom(16)
    )
    config = SimConfig(digest=DIGEST, sev_es=True, pdh_private_key=key, session=(godh, session))
    with pytest.raises(FwError) as info:
        Simulator(config, sock_path)  # policy 0x5 was not the session's
    assert info.value.code == SevRet.POLICY_FAILURE
    assert not os.path.exists(sock_path)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tik": TIK, "tek": TEK, "session": (b"g", b"s"), "pdh_private_key": object()}, "not both"),
        ({"session": (b"g", b"s")}, "PDH private key"),
        ({"session": b"gs", "pdh_private_key": object()}, "session must be"),
        ({}, "TIK must be 16 bytes"),
    ],
)
def test_sim_config_wants_keys_or_a_session(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SimConfig(digest=DIGEST, **kwargs)


async def test_query_commands_lists_the_sev_commands(client):
    names = {c["name"] for c in (await client.cmd("query-commands"))["return"]}
    assert {"qmp_capabilities", "query-sev", "sev-inject-launch-secret", "cont", "quit", "x-sim-query-secrets"} <= names


async def test_objects_are_added_listed_and_deleted_as_qemu_does_without_mh(client):
    """Every QEMU has object-add: the agent's master key reaches a plain SEV VM too."""
    key = {"qom-type": "secret", "id": "keyagent-master", "data": "AAAA", "format": "base64"}
    assert await client.cmd("object-add", key) == {"return": {}}
    again = await client.cmd("object-add", key)
    assert "duplicate property 'keyagent-master'" in again["error"]["desc"]
    listed = (await client.cmd("qom-list", {"path": "/objects"}))["return"]
    assert listed == [{"name": "type", "type": "string"}, {"name": "keyagent-master", "type": "child<secret>"}]
    assert "not found" in (await client.cmd("qom-list", {"path": "/machine/nothing"}))["error"]["desc"]
    assert await client.cmd("object-del", {"id": "keyagent-master"}) == {"return": {}}
    assert "not found" in (await client.cmd("object-del", {"id": "keyagent-master"}))["error"]["desc"]
    assert (await client.cmd("qom-list", {"path": "/objects"}))["return"] == [{"name": "type", "type": "string"}]


# -- injection ------------------------------------------------------------


async def test_good_packet_is_accepted_and_visible_in_x_sim_query_secrets(sim, client):
    header, secret = packet_for(await measurement(client))
    assert await client.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret}) == {"return": {}}
    secrets = (await client.cmd("x-sim-query-secrets"))["return"]
    assert secrets == {
        "injected": True,
        "table-valid": True,
        "secret-visible": True,
        "entries": [
            {"guid": str(LUKS_KEY_GUID), "length": len(DISK_PASS), "sha256": hashlib.sha256(DISK_PASS).hexdigest()}
        ],
    }
    assert sim.injected_entries[0].guid == LUKS_KEY_GUID
    raw = b"".join(client.raw_lines)
    assert DISK_PASS not in raw and base64.b64encode(DISK_PASS) not in raw


async def test_packet_at_an_explicit_gpa_is_accepted(client):
    header, secret = packet_for(await measurement(client), [(new_guid(), b"a"), (new_guid(), b"b" * 40)])
    reply = await client.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret, "gpa": 0x100000})
    assert reply == {"return": {}}
    entries = (await client.cmd("x-sim-query-secrets"))["return"]["entries"]
    assert [e["length"] for e in entries] == [1, 40]


async def test_bad_mac_is_refused_with_qemus_error_and_nothing_changes(sim, client):
    header, secret = packet_for(await measurement(client))
    raw = bytearray(base64.b64decode(header))
    raw[-1] ^= 1  # flip a MAC bit
    reply = await client.cmd(
        "sev-inject-launch-secret", {"packet-header": base64.b64encode(raw).decode(), "secret": secret}
    )
    assert reply == {
        "error": {"class": "GenericError", "desc": "SEV: failed to inject secret ret=-5 fw_error=11 'Bad measurement'"}
    }
    state = (await client.cmd("x-sim-query-state"))["return"]
    assert state["injections"] == 0 and state["sev-state"] == "launch-secret" and state["status"] == "prelaunch"
    assert (await client.cmd("x-sim-query-secrets"))["return"] == {
        "injected": False,
        "table-valid": None,
        "secret-visible": None,
        "entries": [],
    }
    assert sim.injected_entries == []


@pytest.mark.parametrize("which", ["tik", "tek-and-tik", "measure"])
async def test_packet_built_with_other_keys_or_measure_is_refused(client, which):
    blob = await measurement(client)
    other = os.urandom(16)
    if which == "tik":
        header, secret = packet_for(blob, tik=other)
    elif which == "tek-and-tik":
        header, secret = packet_for(blob, tik=other, tek=other)
    else:
        header, secret = packet_for(os.urandom(48))
    reply = await client.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
    assert reply["error"]["desc"].endswith("fw_error=11 'Bad measurement'")


async def test_packet_with_the_right_tik_but_wrong_tek_is_injected_as_garbage(client):
    # The MAC only covers the ciphertext: the PSP cannot tell; the guest can.
    header, secret = packet_for(await measurement(client), tek=os.urandom(16))
    assert await client.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret}) == {"return": {}}
    assert (await client.cmd("x-sim-query-secrets"))["return"] == {
        "injected": True,
        "table-valid": False,
        "secret-visible": True,
        "entries": [],
    }


@pytest.mark.parametrize(
    "arguments, desc",
    [
        ({"secret": "AAAA"}, "Parameter 'packet-header' is missing"),
        ({"packet-header": "AAAA"}, "Parameter 'secret' is missing"),
        ({"packet-header": 1, "secret": "AAAA"}, "Invalid parameter type for 'packet-header', expected: string"),
        ({"packet-header": "AAAA", "secret": "AAAA", "gpa": "0x1000"}, "Parameter 'gpa' expects uint64"),
        ({"packet-header": "AAAA", "secret": "AAAA", "extra": 1}, "Parameter 'extra' is unexpected"),
        ({"packet-header": "", "secret": "AAAA"}, "SEV: Failed to decode sequence header"),
        ({"packet-header": "AAAA", "secret": "!!"}, "SEV: Failed to decode data"),
        (
            {"packet-header": "AAAA", "secret": "A" * 24},
            "SEV: failed to inject secret ret=-5 fw_error=4 'Buffer too small'",
        ),
        (
            {"packet-header": "A" * 72, "secret": "A" * 24, "gpa": 1 << 40},
            "SEV: Failed to calculate guest address: No memory is mapped at address 0x10000000000",
        ),
    ],
)
async def test_bad_injection_arguments_get_qemus_errors(client, arguments, desc):
    reply = await client.cmd("sev-inject-launch-secret", arguments)
    assert reply["error"] == {"class": "GenericError", "desc": desc}
    assert (await client.cmd("x-sim-query-state"))["return"]["injections"] == 0


async def test_debian_stock_firmware_area_takes_the_secret_at_gpa_0_and_hides_it(sock_path):
    # OVMF.fd 2022.11 (Debian): the secret-block entry is base 0 size 0.  QEMU
    # 7.2 injects at gpa 0 and reports success; the guest never sees a table.
    async with Simulator(make_config(secret_gpa=0, secret_size=0), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        header, secret = packet_for(await measurement(c))
        assert await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret}) == {"return": {}}
        secrets = (await c.cmd("x-sim-query-secrets"))["return"]
        assert secrets["injected"] is True and secrets["table-valid"] is True
        assert secrets["secret-visible"] is False
        assert (await c.cmd("cont"))["event"] == "RESUME"  # QEMU sends RESUME before the reply
        assert await c.recv() == {"return": {}}
        state = (await c.cmd("x-sim-query-state"))["return"]
        assert state["status"] == "running" and state["secret-visible"] is False
        await c.close()


async def test_secret_at_the_owners_gpa_is_visible_even_when_the_table_entry_is_empty(sock_path):
    # The owner knows the measured firmware's area and answers its gpa.
    async with Simulator(make_config(secret_gpa=0x80C000, secret_size=0xC00), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        header, secret = packet_for(await measurement(c))
        reply = await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret, "gpa": 0x80C000})
        assert reply == {"return": {}}
        assert (await c.cmd("x-sim-query-secrets"))["return"]["secret-visible"] is True
        await c.close()


@pytest.mark.parametrize(
    "gpa, size, visible", [(0x100000, 0xC00, False), (0x80C000, 0x10, False), (0x80C000, 0xC00, True)]
)
async def test_secret_is_visible_only_at_the_base_of_an_area_it_fits(sock_path, gpa, size, visible):
    async with Simulator(make_config(secret_gpa=0x80C000, secret_size=size), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        header, secret = packet_for(await measurement(c))
        reply = await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret, "gpa": gpa})
        assert reply == {"return": {}}  # QEMU checks neither
        assert (await c.cmd("x-sim-query-secrets"))["return"]["secret-visible"] is visible
        await c.close()


async def test_without_a_secret_area_gpa_must_be_given(sock_path):
    async with Simulator(make_config(secret_gpa=None), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        header, secret = packet_for(await measurement(c))
        reply = await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
        assert reply["error"]["desc"] == "SEV: no secret area found in OVMF, gpa must be specified."
        ok = await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret, "gpa": 0x80C000})
        assert ok == {"return": {}}
        await c.close()


# -- run state and events -------------------------------------------------


async def test_cont_after_a_secret_runs_the_vm_and_sends_resume(sim, client):
    header, secret = packet_for(await measurement(client))
    await client.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
    event = await client.cmd("cont")  # QEMU sends RESUME before the reply
    assert event["event"] == "RESUME" and "data" not in event
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert await client.recv() == {"return": {}}
    assert (await client.cmd("query-status"))["return"] == {"status": "running", "singlestep": False, "running": True}
    state = (await client.cmd("x-sim-query-state"))["return"]
    assert state == {
        "status": "running",
        "sev-state": "running",
        "injections": 1,
        "refused-injections": 0,
        "cont": True,
        "injected-before-cont": True,
        "cont-before-secret": False,
        "secret-visible": True,
    }
    reply = await client.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
    assert reply["error"]["desc"] == "SEV: Not in correct state. (LSECRET) 3"
    assert sim.cont_before_secret is False


async def test_cont_without_a_secret_runs_like_qemu_and_is_recorded(sim, client):
    assert (await client.cmd("cont"))["event"] == "RESUME"
    await client.recv()
    assert sim.status == "running" and sim.sev_state == "running"
    assert sim.cont_before_secret is True
    assert (await client.cmd("x-sim-query-state"))["return"]["cont-before-secret"] is True


async def test_stop_only_stops_a_running_vm(client):
    assert await client.cmd("stop") == {"return": {}}  # prelaunch: no change, no event
    assert (await client.cmd("query-status"))["return"]["status"] == "prelaunch"
    await client.cmd("cont")
    await client.recv()
    assert (await client.cmd("stop"))["event"] == "STOP"
    assert await client.recv() == {"return": {}}
    assert (await client.cmd("query-status"))["return"]["status"] == "paused"
    assert (await client.cmd("cont"))["event"] == "RESUME"
    await client.recv()


async def test_running_state_models_a_vm_launched_before_the_agent(sock_path):
    async with Simulator(make_config(state="running"), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.negotiate()
        assert (await c.cmd("query-status"))["return"]["status"] == "running"
        assert (await c.cmd("query-sev"))["return"]["state"] == "running"
        assert "return" in await c.cmd("query-sev-launch-measure")
        await c.close()


async def test_events_reach_every_negotiated_client_and_no_other(sim, client):
    other = await RawClient.connect(sim.path)
    await other.negotiate()
    shy = await RawClient.connect(sim.path)  # never negotiates
    await client.cmd("cont")
    assert (await other.recv())["event"] == "RESUME"
    # the un-negotiated client gets nothing but its own reply
    reply = await shy.cmd("query-status")
    assert reply["error"]["class"] == "CommandNotFound"
    await other.close()
    await shy.close()


async def test_quit_sends_shutdown_and_closes_every_client(sim, client):
    other = await RawClient.connect(sim.path)
    await other.negotiate()
    assert await client.cmd("quit", id="q") == {"return": {}, "id": "q"}
    shutdown = await client.recv()
    assert shutdown["event"] == "SHUTDOWN"
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert (await other.recv())["event"] == "SHUTDOWN"
    assert await asyncio.wait_for(client.reader.read(), 5) == b""
    await asyncio.wait_for(sim.wait_closed(), 5)
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(sim.path)
    await other.close()


async def test_leaving_the_context_removes_the_socket(sock_path):
    async with Simulator(make_config(), sock_path):
        assert os.path.exists(sock_path)
    assert not os.path.exists(sock_path)


async def test_a_stale_socket_is_replaced_but_a_regular_file_is_not(sock_path):
    async with Simulator(make_config(), sock_path):
        pass
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)  # a stale socket nobody listens on
    s.close()
    async with Simulator(make_config(), sock_path) as sim:
        c = await RawClient.connect(sim.path)
        await c.close()
    with open(sock_path, "w") as f:
        f.write("not a socket")
    with pytest.raises(FileExistsError):
        async with Simulator(make_config(), sock_path):
            pass
    assert open(sock_path).read() == "not a socket"


# -- qemu.qmp as the client ------------------------------------------------


async def test_qemu_qmp_client_drives_a_whole_launch(sim):
    qmp = QMPClient("sim-test")
    await qmp.connect(sim.path)
    try:
        info = await qmp.execute("query-sev")
        assert info["state"] == "launch-secret"
        blob = base64.b64decode((await qmp.execute("query-sev-launch-measure"))["data"])
        assert verify_measurement(
            blob, TIK, info["api-major"], info["api-minor"], info["build-id"], info["policy"], DIGEST
        )
        with pytest.raises(ExecuteError) as refused:
            zero_header = base64.b64encode(bytes(52)).decode()
            await qmp.execute(
                "sev-inject-launch-secret",
                {"packet-header": zero_header, "secret": base64.b64encode(bytes(16)).decode()},
            )
        assert "fw_error=11 'Bad measurement'" in str(refused.value)
        header, secret = packet_for(blob)
        await qmp.execute("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
        with qmp.listener() as listener:
            await qmp.execute("cont")
            event = await asyncio.wait_for(listener.get(), 5)
        assert event["event"] == "RESUME"
        assert (await qmp.execute("query-status"))["status"] == "running"
        with qmp.listener() as listener:
            await qmp.execute("quit")
            event = await asyncio.wait_for(listener.get(), 5)
        assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-qmp-quit"
    finally:
        try:
            await qmp.disconnect()
        except Exception:
            pass
    await asyncio.wait_for(sim.wait_closed(), 5)
    assert sim.cont_before_secret is False


async def test_two_qemu_qmp_clients_share_one_vm(sim):
    a, b = QMPClient("a"), QMPClient("b")
    await a.connect(sim.path)
    await b.connect(sim.path)
    try:
        await a.execute("cont")
        assert (await b.execute("query-status"))["status"] == "running"
    finally:
        await a.disconnect()
        await b.disconnect()


# -- logs -------------------------------------------------------------------


async def test_logs_name_commands_but_never_keys_or_secrets(sock_path):
    stream = io.StringIO()
    setup_logging("debug", stream=stream)
    try:
        async with Simulator(make_config(), sock_path) as sim:
            c = await RawClient.connect(sim.path)
            await c.negotiate()
            header, secret = packet_for(await measurement(c))
            await c.cmd("sev-inject-launch-secret", {"packet-header": header, "secret": secret})
            bad = bytearray(base64.b64decode(header))
            bad[20] ^= 1
            await c.cmd("sev-inject-launch-secret", {"packet-header": base64.b64encode(bad).decode(), "secret": secret})
            await c.cmd("cont")
            await c.close()
    finally:
        setup_logging("info")
    text = stream.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    commands = [r["command"] for r in records if r.get("event") == "sim.command"]
    assert commands == [
        "qmp_capabilities",
        "query-sev-launch-measure",
        "sev-inject-launch-secret",
        "sev-inject-launch-secret",
        "cont",
    ]
    assert any(r.get("event") == "sim.secret_refused" and r.get("fw_error") == 11 for r in records)
    for form in (
        TIK.hex(),
        TEK.hex(),
        base64.b64encode(TIK).decode(),
        base64.b64encode(TEK).decode(),
        header,
        secret,
        DISK_PASS.hex(),
    ):
        assert form not in text
    assert "sev test passphrase" not in text
