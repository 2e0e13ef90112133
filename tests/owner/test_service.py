"""The guest owner's decision (pure) and its HTTP face (real TCP)."""

from __future__ import annotations

import base64
import io

import pytest

from agent.io.http import HttpServer, request_json
from agent.logs import setup_logging
from agent.owner.config import load_owner_config
from agent.owner.service import OwnerService, decide_secret
from agent.sev.guids import LUKS_KEY_GUID
from agent.sev.measurement import split_blob
from agent.sev.packet import open_packet
from agent.sev.secret_table import parse_secret_table

from .conftest import OTHER_DIGEST, PASSPHRASE, TEK, TIK

IV = bytes(range(100, 116))


@pytest.fixture
def config(owner_dir):
    return load_owner_config(owner_dir.toml)


def decide(config, body, attested=()):
    return decide_secret(config, body, attested=set(attested), iv=IV)


def open_release(decision, blob):
    header = base64.b64decode(decision.body["packet_header"])
    ciphertext = base64.b64decode(decision.body["secret"])
    measure, _ = split_blob(blob)
    return parse_secret_table(open_packet(TIK, TEK, measure, header, ciphertext))


# -- the decision ------------------------------------------------------------

def test_verified_launch_gets_a_packet_that_opens(config, owner_dir):
    d = decide(config, owner_dir.request())
    assert d.status == 200 and d.decision == "released"
    header = base64.b64decode(d.body["packet_header"])
    assert len(header) == 52 and header[4:20] == IV
    assert d.body["gpa"] == 8192
    assert open_release(d, owner_dir.blob()) == [(LUKS_KEY_GUID, PASSPHRASE)]
    assert d.attested == ("vm1", b"n" * 16)


def test_second_accepted_digest_also_verifies(config, owner_dir):
    blob = owner_dir.blob(digest=OTHER_DIGEST)
    body = owner_dir.request(measurement=base64.b64encode(blob).decode())
    assert decide(config, body).status == 200


def test_gpa_is_left_out_when_not_configured(owner_dir):
    owner_dir.toml.write_text(owner_dir.toml.read_text().replace("gpa = 8192\n", ""))
    d = decide(load_owner_config(owner_dir.toml), owner_dir.request())
    assert d.status == 200 and "gpa" not in d.body


def test_unknown_vm_is_404(config, owner_dir):
    d = decide(config, owner_dir.request(vm="vm2"))
    assert (d.status, d.body) == (404, {"error": "unknown vm 'vm2'"})


@pytest.mark.parametrize("body, words", [
    ([], "JSON object"),
    ({}, "'vm'"),
    ({"vm": 3}, "'vm'"),
])
def test_bad_request_shape_is_400(config, body, words):
    d = decide(config, body)
    assert d.status == 400 and words in d.body["error"]


@pytest.mark.parametrize("field, value, words", [
    ("api_major", None, "'api_major' is missing"),
    ("api_minor", "49", "'api_minor' must be an integer"),
    ("build_id", True, "'build_id' must be an integer"),
    ("build_id", 256, "0..255"),
    ("policy", -1, "'policy' must be in"),
    ("policy", 1 << 32, "'policy' must be in"),
    ("measurement", 12, "base64 string"),
    ("measurement", "not base64!", "not valid base64"),
    ("measurement", base64.b64encode(bytes(47)).decode(), "48 bytes, got 47"),
])
def test_bad_field_is_400(config, owner_dir, field, value, words):
    d = decide(config, owner_dir.request(**{field: value}))
    assert d.status == 400 and d.decision == "invalid"
    assert words in d.body["error"]


def test_policy_mismatch_is_403(config, owner_dir):
    blob = owner_dir.blob(policy=3)  # a valid MAC over the wrong policy
    d = decide(config, owner_dir.request(policy=3, measurement=base64.b64encode(blob).decode()))
    assert d.status == 403 and d.body["error"].startswith("policy mismatch")


def test_old_api_is_403(config, owner_dir):
    blob = owner_dir.blob(api=(1, 48, 21))
    d = decide(config, owner_dir.request(api_minor=48, measurement=base64.b64encode(blob).decode()))
    assert d.status == 403 and d.body["error"] == "policy mismatch: api 1.48 is older than 1.49"


def test_newer_api_major_passes_min_api(config, owner_dir):
    blob = owner_dir.blob(api=(2, 0, 21))
    d = decide(config, owner_dir.request(api_major=2, api_minor=0, measurement=base64.b64encode(blob).decode()))
    assert d.status == 200


def test_unaccepted_build_id_is_403(config, owner_dir):
    blob = owner_dir.blob(api=(1, 49, 20))
    d = decide(config, owner_dir.request(build_id=20, measurement=base64.b64encode(blob).decode()))
    assert d.status == 403 and "build id 20" in d.body["error"]


def test_wrong_digest_is_refused(config, owner_dir):
    blob = owner_dir.blob(digest=bytes(32))
    d = decide(config, owner_dir.request(measurement=base64.b64encode(blob).decode()))
    assert (d.status, d.body) == (403, {"error": "measurement does not match"})


def test_wrong_tik_is_refused(config, owner_dir):
    blob = owner_dir.blob(tik=bytes(16))
    d = decide(config, owner_dir.request(measurement=base64.b64encode(blob).decode()))
    assert (d.status, d.body) == (403, {"error": "measurement does not match"})


def test_claimed_version_differing_from_measured_is_refused(config, owner_dir):
    # MAC made over build 21, request claims build 22 (also accepted by policy).
    d = decide(config, owner_dir.request(build_id=22))
    assert d.status == 403 and d.body["error"] == "measurement does not match"


def test_tampered_measurement_is_refused(config, owner_dir):
    blob = bytearray(owner_dir.blob())
    blob[0] ^= 1
    d = decide(config, owner_dir.request(measurement=base64.b64encode(bytes(blob)).decode()))
    assert d.status == 403


def test_replayed_launch_is_409(config, owner_dir):
    d = decide(config, owner_dir.request(), attested=[("vm1", b"n" * 16)])
    assert (d.status, d.body) == (409, {"error": "launch already attested"})


def test_forged_request_with_used_nonce_is_403_not_409(config, owner_dir):
    blob = owner_dir.blob(digest=bytes(32))  # same nonce, bad MAC
    d = decide(config, owner_dir.request(measurement=base64.b64encode(blob).decode()),
               attested=[("vm1", b"n" * 16)])
    assert d.status == 403


def test_audit_fields_hold_no_key_material(config, owner_dir):
    d = decide(config, owner_dir.request())
    text = repr(d.audit) + repr(d)
    for form in secret_forms():
        assert form not in text
    assert d.audit["mnonce"] == (b"n" * 16).hex()
    assert d.audit["api"] == "1.49" and d.audit["build"] == 21 and d.audit["policy"] == 1


def secret_forms() -> list[str]:
    forms = []
    for raw in (PASSPHRASE, TIK, TEK):
        forms += [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()]
    forms.append(PASSPHRASE.decode())
    return forms


# -- over HTTP ---------------------------------------------------------------

@pytest.fixture
async def owner_url(config):
    server = HttpServer(OwnerService(config).handle)
    host, port = await server.start_tcp("127.0.0.1", 0)
    yield f"http://{host}:{port}"
    await server.close()


async def test_http_release_then_replay(owner_url, owner_dir):
    status, body = await request_json("POST", owner_url + "/v1/secret", owner_dir.request(), timeout=5)
    assert status == 200
    header = base64.b64decode(body["packet_header"])
    measure, _ = split_blob(owner_dir.blob())
    table = open_packet(TIK, TEK, measure, header, base64.b64decode(body["secret"]))
    assert parse_secret_table(table) == [(LUKS_KEY_GUID, PASSPHRASE)]

    status, body = await request_json("POST", owner_url + "/v1/secret", owner_dir.request(), timeout=5)
    assert (status, body) == (409, {"error": "launch already attested"})

    # a fresh launch (new nonce) is served again
    status, _ = await request_json("POST", owner_url + "/v1/secret", owner_dir.request(b"m" * 16), timeout=5)
    assert status == 200


async def test_each_release_uses_a_fresh_iv(owner_url, owner_dir):
    ivs = set()
    for nonce in (b"a" * 16, b"b" * 16):
        _, body = await request_json("POST", owner_url + "/v1/secret", owner_dir.request(nonce), timeout=5)
        ivs.add(base64.b64decode(body["packet_header"])[4:20])
    assert len(ivs) == 2


async def test_http_refusal(owner_url, owner_dir):
    status, body = await request_json("POST", owner_url + "/v1/secret",
                                      owner_dir.request(vm="nope"), timeout=5)
    assert status == 404 and "error" in body


async def test_http_bad_json_is_400(owner_url):
    import asyncio

    host, port = owner_url[len("http://"):].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/secret HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{nope")
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400 ") and b"not valid JSON" in reply


async def test_session_is_501(owner_url):
    assert await request_json("POST", owner_url + "/v1/session", {"vm": "vm1"}, timeout=5) == \
        (501, {"error": "session not implemented yet"})


async def test_healthz(owner_url):
    status, body = await request_json("GET", owner_url + "/healthz", None, timeout=5)
    assert status == 200 and body["status"] == "ok"


async def test_unknown_path_and_wrong_method(owner_url):
    assert (await request_json("GET", owner_url + "/v2/x", None, timeout=5))[0] == 404
    assert (await request_json("GET", owner_url + "/v1/secret", None, timeout=5))[0] == 405


async def test_one_audit_line_per_decision_without_secrets(owner_url, owner_dir):
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        await request_json("POST", owner_url + "/v1/secret", owner_dir.request(), timeout=5)
        await request_json("POST", owner_url + "/v1/secret", owner_dir.request(), timeout=5)
        await request_json("POST", owner_url + "/v1/secret", owner_dir.request(policy=7), timeout=5)
    finally:
        setup_logging("info")
    lines = [ln for ln in buf.getvalue().splitlines() if "owner decision" in ln]
    assert len(lines) == 3
    assert '"decision": "released"' in lines[0] and '"status": 409' in lines[1]
    assert "policy mismatch" in lines[2]
    for form in secret_forms():
        assert form not in buf.getvalue()
    assert "<redacted>" not in buf.getvalue()  # never logged at all, not just scrubbed
