"""The guest owner's decision (pure) and its HTTP face (real TCP)."""

from __future__ import annotations

import base64
import io
import json

import pytest

from agent.common.logs import setup_logging
from agent.io.http import HttpServer, request_json
from agent.owner.config import OwnerConfig, load_owner_config
from agent.owner.service import OwnerService, decide_secret
from agent.sev.guids import LUKS_KEY_GUID
from agent.sev.measurement import split_blob
from agent.sev.packet import open_packet
from agent.sev.secret_table import parse_secret_table

from .conftest import OTHER_DIGEST, PASSPHRASE, TEK, TIK
from .rawhttp import post_raw

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


@pytest.mark.parametrize(
    "body, words",
    [
        ([], "JSON object"),
        ({}, "'vm'"),
        ({"vm": 3}, "'vm'"),
    ],
)
def test_bad_request_shape_is_400(config, body, words):
    d = decide(config, body)
    assert d.status == 400 and words in d.body["error"]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("api_major", None, "'api_major' is missing"),
        ("api_minor", "49", "'api_minor' must be an integer"),
        ("build_id", True, "'build_id' must be an integer"),
        ("build_id", 256, "0..255"),
        ("policy", -1, "'policy' must be in"),
        ("policy", 1 << 32, "'policy' must be in"),
        ("measurement", 12, "base64 string"),
        ("measurement", "not base64!", "not valid base64"),
        ("measurement", base64.b64encode(bytes(47)).decode(), "48 bytes, got 47"),
    ],
)
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


def test_the_same_blob_again_gets_the_same_answer_resent(config, owner_dir):
    first = decide(config, owner_dir.request())
    again = decide_secret(
        config, owner_dir.request(), attested={first.attested}, iv=bytes(16), released={first.released: first.release}
    )
    assert (again.status, again.decision) == (200, "resent")
    assert again.body == first.body and again.release is first.release
    assert again.attested is None and again.session is None
    assert again.audit["measurement_sha256"] == first.audit["measurement_sha256"]


@pytest.mark.parametrize("over", [{"vm": "vm2"}, {"build_id": 22}])
def test_a_released_blob_asked_with_other_fields_is_409(config, owner_dir, over):
    first = decide(config, owner_dir.request())
    if "vm" in over:  # a second VM, so the request gets past "unknown vm"
        config.vms["vm2"] = config.vms["vm1"]
    d = decide_secret(
        config, owner_dir.request(**over), attested={first.attested}, iv=IV, released={first.released: first.release}
    )
    assert (d.status, d.body) == (409, {"error": "launch already attested"})


def test_a_released_blob_is_still_checked_against_the_policy(config, owner_dir):
    first = decide(config, owner_dir.request())
    d = decide_secret(
        config, owner_dir.request(policy=7), attested=set(), iv=IV, released={first.released: first.release}
    )
    assert d.status == 403 and d.body["error"].startswith("policy mismatch")


def test_forged_request_with_used_nonce_is_403_not_409(config, owner_dir):
    blob = owner_dir.blob(digest=bytes(32))  # same nonce, bad MAC
    d = decide(config, owner_dir.request(measurement=base64.b64encode(blob).decode()), attested=[("vm1", b"n" * 16)])
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


async def test_http_release_then_the_same_bytes_again(owner_url, owner_dir):
    status, raw = await post_raw(owner_url + "/v1/secret", owner_dir.request())
    assert status == 200
    body = json.loads(raw)
    header = base64.b64decode(body["packet_header"])
    measure, _ = split_blob(owner_dir.blob())
    table = open_packet(TIK, TEK, measure, header, base64.b64decode(body["secret"]))
    assert parse_secret_table(table) == [(LUKS_KEY_GUID, PASSPHRASE)]

    assert await post_raw(owner_url + "/v1/secret", owner_dir.request()) == (200, raw)
    status, body = await request_json("POST", owner_url + "/v1/secret", owner_dir.request(build_id=22), timeout=5)
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
    status, body = await request_json("POST", owner_url + "/v1/secret", owner_dir.request(vm="nope"), timeout=5)
    assert status == 404 and "error" in body


async def test_http_bad_json_is_400(owner_url):
    import asyncio

    host, port = owner_url[len("http://") :].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/secret HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\n{nope"
    )
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400 ") and b"not valid JSON" in reply


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
@pytest.mark.parametrize("path", ["/v1/secret", "/v1/session"])
async def test_a_post_body_that_is_not_application_json_is_415(owner_url, owner_dir, path, content_type):
    import asyncio
    import json

    host, port = owner_url[len("http://") :].split(":")
    body = json.dumps(owner_dir.request()).encode()
    header = f"Content-Type: {content_type}\r\n".encode() if content_type else b""
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: x\r\n"
        + header
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 415 ") and b"request body must be application/json" in reply


async def test_application_json_with_a_charset_is_accepted(owner_url, owner_dir):
    import asyncio
    import json

    host, port = owner_url[len("http://") :].split(":")
    body = json.dumps(owner_dir.request()).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/secret HTTP/1.1\r\nHost: x\r\nContent-Type: Application/JSON; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")


async def test_session_for_a_vm_without_sessions_is_403(owner_url):
    status, body = await request_json(
        "POST", owner_url + "/v1/session", {"vm": "vm1", "pdh": "AAAA", "policy": 1}, timeout=5
    )
    assert status == 403 and "does not take launch sessions" in body["error"]


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
    assert '"decision": "released"' in lines[0] and '"decision": "resent"' in lines[1]
    assert "policy mismatch" in lines[2]
    for form in secret_forms():
        assert form not in buf.getvalue()
    assert "<redacted>" not in buf.getvalue()  # never logged at all, not just scrubbed


# -- launch sessions (POST /v1/session, then /v1/secret) ------------------------

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.common.secret import Secret  # noqa: E402
from agent.owner.service import MAX_PENDING_SESSIONS, SessionMaterial, decide_session  # noqa: E402
from agent.sev.measurement import measurement_blob  # noqa: E402
from agent.sev.session import open_session  # noqa: E402
from agent.tools.sim.amd import shared_amd  # noqa: E402
from agent.tools.sim.psp import Platform  # noqa: E402

from .conftest import API, DIGEST, POLICY, write_owner_dir  # noqa: E402

TIK2 = bytes(range(200, 216))
TEK2 = bytes(range(216, 232))
PDH_KEY = ec.generate_private_key(ec.SECP384R1())
PLATFORM = Platform(PDH_KEY)


def material(tik: bytes = TIK2, tek: bytes = TEK2) -> SessionMaterial:
    return SessionMaterial(
        tek=Secret(tek),
        tik=Secret(tik),
        nonce=bytes(range(16)),
        iv=bytes(range(16, 32)),
        godh_private=ec.generate_private_key(ec.SECP384R1()),
    )


def write_session_config(tmp_path, vm2_extra: str = "", head: str = "") -> OwnerConfig:
    """owner.toml with vm2 taking sessions; by default trusting the simulator's own AMD root."""
    d = write_owner_dir(tmp_path)
    if not head:
        shared_amd().write_roots(str(tmp_path / "roots"))
        head = '[platform]\namd_roots = "roots"\n'
    d.toml.write_text(
        head
        + d.toml.read_text()
        + f"""
[vm.vm2]
session = true
policy = {POLICY}
digest = "{DIGEST.hex()}"
{vm2_extra}
[[vm.vm2.secret]]
guid = "luks-key"
file = "vm1-disk.pass"
"""
    )
    return load_owner_config(d.toml)


@pytest.fixture
def session_config(tmp_path):
    return write_session_config(tmp_path)


def session_request(platform: Platform = PLATFORM, **over) -> dict:
    body = {
        "vm": "vm2",
        "pdh": base64.b64encode(platform.pdh_cert.to_bytes()).decode(),
        "cert_chain": base64.b64encode(platform.chain.to_bytes()).decode(),
        "policy": POLICY,
    }
    body.update(over)
    return body


def vm2_secret_request(tik: bytes = TIK2, mnonce: bytes = b"s" * 16, digest: bytes = DIGEST) -> dict:
    blob = measurement_blob(tik, API[0], API[1], API[2], POLICY, digest, mnonce)
    return {
        "vm": "vm2",
        "measurement": base64.b64encode(blob).decode(),
        "api_major": API[0],
        "api_minor": API[1],
        "build_id": API[2],
        "policy": POLICY,
    }


def test_session_opens_on_the_platform_with_the_owners_keys(session_config):
    d = decide_session(session_config, session_request(), material=material())
    assert d.status == 200 and set(d.body) == {"godh", "session"}
    tek, tik = open_session(PDH_KEY, base64.b64decode(d.body["godh"]), base64.b64decode(d.body["session"]), POLICY)
    assert (tik, tek) == (TIK2, TEK2)
    assert d.session.chain_verified is True and d.session.tik.reveal() == TIK2
    assert d.audit["session"] == d.session.id and d.audit["chain_verified"] is True
    assert d.audit["platform"] == d.session.trust == "amd:sim"
    text = repr(d) + repr(d.audit) + repr(d.session)
    for raw in (TIK2, TEK2):
        assert raw.hex() not in text and base64.b64encode(raw).decode() not in text


def test_made_up_pdh_without_a_chain_gets_no_session(session_config):
    d = decide_session(session_config, session_request(Platform(), cert_chain=None), material=material())
    assert d.status == 403 and d.session is None
    assert d.body["error"].startswith("platform not verified: no cert_chain")


@pytest.mark.parametrize(
    "over, status, words",
    [
        ({"vm": "nope"}, 404, "unknown vm 'nope'"),
        ({"vm": "vm1"}, 403, "does not take launch sessions"),
        ({"policy": 3}, 403, "policy mismatch"),
        ({"policy": "1"}, 400, "'policy' must be an integer"),
        ({"policy": -1}, 400, "'policy' must be in"),
        ({"pdh": "@@"}, 400, "'pdh' is not valid base64"),
        ({"pdh": None}, 400, "'pdh' must be a non-empty base64 string"),
        ({"pdh": base64.b64encode(bytes(2083)).decode()}, 400, "pdh: SEV certificate must be 2084 bytes, got 2083"),
        ({"pdh": base64.b64encode(PLATFORM.chain.pek.to_bytes()).decode()}, 400, "not PDH"),
        ({"cert_chain": "%%"}, 400, "'cert_chain' is not valid base64"),
        ({"cert_chain": base64.b64encode(bytes(100)).decode()}, 400, "must be 6252 bytes"),
        (
            {"cert_chain": base64.b64encode(Platform().chain.to_bytes()).decode()},
            403,
            "platform not verified: PDH certificate is not signed by the chain's PEK",
        ),
    ],
)
def test_bad_session_requests_are_refused(session_config, over, status, words):
    d = decide_session(session_config, session_request(**over), material=material())
    assert d.status == status and words in d.body["error"], d.body
    assert d.session is None


def test_session_body_must_be_an_object(session_config):
    assert decide_session(session_config, [1], material=material()).status == 400


def test_pending_session_verifies_the_launch_and_is_used_up(session_config):
    made = decide_session(session_config, session_request(), material=material()).session
    d = decide_secret(session_config, vm2_secret_request(), attested=set(), iv=IV, sessions={"vm2": [made]})
    assert d.status == 200 and d.session is made and d.released is not None
    assert d.audit["keys"] == f"session {made.id}"
    measure, _ = split_blob(base64.b64decode(vm2_secret_request()["measurement"]))
    table = open_packet(
        TIK2, TEK2, measure, base64.b64decode(d.body["packet_header"]), base64.b64decode(d.body["secret"])
    )
    assert parse_secret_table(table) == [(LUKS_KEY_GUID, PASSPHRASE)]


def test_session_vm_without_a_pending_session_is_409(session_config):
    d = decide_secret(session_config, vm2_secret_request(), attested=set(), iv=IV, sessions={})
    assert (d.status, d.body) == (409, {"error": "no launch session for this vm: POST /v1/session first"})


def test_session_launch_with_the_wrong_digest_matches_no_session(session_config):
    made = decide_session(session_config, session_request(), material=material()).session
    d = decide_secret(
        session_config, vm2_secret_request(digest=bytes(32)), attested=set(), iv=IV, sessions={"vm2": [made]}
    )
    assert (d.status, d.body) == (403, {"error": "no launch session matches this measurement"})
    assert d.audit["pending"] == 1


def test_a_launch_of_another_session_matches_no_pending_session(session_config):
    made = decide_session(session_config, session_request(), material=material()).session
    d = decide_secret(
        session_config, vm2_secret_request(tik=bytes(16)), attested=set(), iv=IV, sessions={"vm2": [made]}
    )
    assert (d.status, d.body) == (403, {"error": "no launch session matches this measurement"})


async def test_session_then_secret_then_replay_over_http(session_config):
    service = OwnerService(session_config, session_material=material)
    server = HttpServer(service.handle)
    host, port = await server.start_tcp("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        status, body = await request_json("POST", url + "/v1/session", session_request(), timeout=5)
        assert status == 200
        assert open_session(PDH_KEY, base64.b64decode(body["godh"]), base64.b64decode(body["session"]), POLICY) == (
            TEK2,
            TIK2,
        )
        assert len(service.sessions["vm2"]) == 1
        kept = service.sessions["vm2"][0]
        first = await request_json("POST", url + "/v1/secret", vm2_secret_request(), timeout=5)
        assert first[0] == 200
        assert service.sessions["vm2"] == [] and len(kept.tik) == 0 and len(kept.tek) == 0  # wiped
        again = await request_json("POST", url + "/v1/secret", vm2_secret_request(), timeout=5)
        assert again == first  # the session is used up; the same blob gets the same answer
        # another launch with the used-up session's keys: nothing left to verify it with
        other = await request_json("POST", url + "/v1/secret", vm2_secret_request(mnonce=b"o" * 16), timeout=5)
        assert other[0] == 409 and "POST /v1/session first" in other[1]["error"]
    finally:
        setup_logging("info")
        await server.close()
    lines = [ln for ln in buf.getvalue().splitlines() if "owner decision" in ln]
    assert len(lines) == 4
    assert '"decision": "session"' in lines[0] and '"chain_verified": true' in lines[0]
    assert '"platform": "amd:sim"' in lines[0]
    for raw in (TIK2, TEK2, PASSPHRASE):
        for form in (raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()):
            assert form not in buf.getvalue()


async def test_a_full_platform_gets_429_and_its_waiting_sessions_stay(session_config):
    keys = iter([bytes([i]) * 16 for i in range(1, MAX_PENDING_SESSIONS + 8)])
    service = OwnerService(session_config, session_material=lambda: material(tik=next(keys)))
    server = HttpServer(service.handle)
    host, port = await server.start_tcp("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    try:
        for _ in range(MAX_PENDING_SESSIONS):
            assert (await request_json("POST", url + "/v1/session", session_request(), timeout=5))[0] == 200
        status, body = await request_json("POST", url + "/v1/session", session_request(), timeout=5)
        assert status == 429 and "too many launch sessions pending for this vm and platform" in body["error"]
        assert len(service.sessions["vm2"]) == MAX_PENDING_SESSIONS
        # the oldest is still there and still verifies its launch
        oldest = await request_json("POST", url + "/v1/secret", vm2_secret_request(tik=bytes([1]) * 16), timeout=5)
        assert oldest[0] == 200
        assert len(service.sessions["vm2"]) == MAX_PENDING_SESSIONS - 1
        # one place is free again
        assert (await request_json("POST", url + "/v1/session", session_request(), timeout=5))[0] == 200
    finally:
        await server.close()


async def test_flooding_sessions_from_other_platforms_does_not_displace_a_waiting_launch(session_config):
    from tests.sev.amd_chains import real_certs

    service = OwnerService(session_config)  # fresh keys each: the flood cannot know them
    server = HttpServer(service.handle)
    host, port = await server.start_tcp("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    try:
        status, body = await request_json("POST", url + "/v1/session", session_request(), timeout=5)
        assert status == 200
        tek, tik = open_session(PDH_KEY, base64.b64decode(body["godh"]), base64.b64decode(body["session"]), POLICY)
        # the flood: other verified platforms, made-up ones, a real Rome chain (this owner
        # trusts only the simulator's root)
        rome = real_certs("rome")
        flood = [session_request(Platform()) for _ in range(2 * MAX_PENDING_SESSIONS)]
        flood += [session_request(Platform(), cert_chain=None)] * 3
        flood += [
            session_request(
                pdh=base64.b64encode(rome["pdh"]).decode(),
                cert_chain=base64.b64encode(rome["pek"] + rome["oca"] + rome["cek"]).decode(),
            )
        ]
        statuses = [(await request_json("POST", url + "/v1/session", f, timeout=5))[0] for f in flood]
        assert statuses == [200] * (2 * MAX_PENDING_SESSIONS) + [403] * 4
        launch = await request_json("POST", url + "/v1/secret", vm2_secret_request(tik=tik), timeout=5)
        assert launch[0] == 200
        measure, _ = split_blob(base64.b64decode(vm2_secret_request(tik=tik)["measurement"]))
        table = open_packet(
            tik, tek, measure, base64.b64decode(launch[1]["packet_header"]), base64.b64decode(launch[1]["secret"])
        )
        assert parse_secret_table(table) == [(LUKS_KEY_GUID, PASSPHRASE)]
    finally:
        await server.close()


async def test_pending_sessions_expire_only_by_age(session_config):
    from agent.owner.service import PENDING_SESSION_TTL_S

    now = [1000.0]
    service = OwnerService(session_config, session_material=material, clock=lambda: now[0])
    server = HttpServer(service.handle)
    host, port = await server.start_tcp("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    try:
        assert (await request_json("POST", url + "/v1/session", session_request(), timeout=5))[0] == 200
        kept = service.sessions["vm2"][0]
        now[0] += PENDING_SESSION_TTL_S + 1
        other = await request_json("POST", url + "/v1/secret", vm2_secret_request(), timeout=5)
        assert other[0] == 409 and "POST /v1/session first" in other[1]["error"]
        assert service.sessions["vm2"] == [] and len(kept.tik) == 0
    finally:
        await server.close()


# -- which platforms the owner trusts --------------------------------------------

from agent.sev.ca import PRODUCTS  # noqa: E402
from tests.sev.amd_chains import REAL_PRODUCTS, flip, real_certs  # noqa: E402


def real_request(product: str, **over) -> dict:
    c = real_certs(product)
    body = {
        "vm": "vm2",
        "pdh": base64.b64encode(c["pdh"]).decode(),
        "cert_chain": base64.b64encode(c["pek"] + c["oca"] + c["cek"]).decode(),
        "policy": POLICY,
    }
    body.update(over)
    return body


@pytest.mark.parametrize("product", REAL_PRODUCTS)
def test_real_amd_platform_gets_a_session_with_the_builtin_roots(tmp_path, product):
    config = write_session_config(tmp_path, head="# AMD's own roots, built in\n")
    assert config.amd_roots_source == "built-in" and [r.product for r in config.amd_roots] == list(PRODUCTS)
    d = decide_session(config, real_request(product), material=material())
    assert d.status == 200 and d.session.trust == f"amd:{product}" and d.audit["platform"] == f"amd:{product}"


@pytest.mark.parametrize("product", REAL_PRODUCTS)
@pytest.mark.parametrize("cert", ["pdh", "pek", "oca", "cek"])
def test_real_chain_with_one_bit_flipped_gets_no_session(tmp_path, product, cert):
    config = write_session_config(tmp_path, head="# built-in roots\n")
    c = real_certs(product)
    for bit in (0x10 * 8 + 3, 0x200 * 8, 0x414 * 8 + 77 * 8 + 1):  # key usage area, key, first signature
        damaged = dict(c, **{cert: flip(c[cert], bit)})
        body = real_request(
            product,
            pdh=base64.b64encode(damaged["pdh"]).decode(),
            cert_chain=base64.b64encode(damaged["pek"] + damaged["oca"] + damaged["cek"]).decode(),
        )
        d = decide_session(config, body, material=material())
        assert d.session is None and d.status in (400, 403), (cert, bit, d.body)
        if d.status == 403:
            assert d.body["error"].startswith("platform not verified: "), d.body


def test_real_chain_from_a_product_the_owner_does_not_trust_gets_no_session(tmp_path):
    from importlib import resources

    roots = tmp_path / "naples-only"
    roots.mkdir()
    for kind in ("ark", "ask"):
        (roots / f"naples-{kind}.cert").write_bytes(
            (resources.files("agent.sev") / "roots" / f"naples-{kind}.cert").read_bytes()
        )
    config = write_session_config(tmp_path, head='[platform]\namd_roots = "naples-only"\n')
    assert decide_session(config, real_request("naples"), material=material()).status == 200
    d = decide_session(config, real_request("rome"), material=material())
    assert (
        d.status == 403
        and d.body["error"] == "platform not verified: CEK is signed by an ASK of a kind no trusted root has"
    )


def test_self_made_chain_gets_no_session_from_an_owner_trusting_amd(tmp_path):
    config = write_session_config(tmp_path, head="# built-in roots\n")
    d = decide_session(config, session_request(), material=material())
    assert (d.status, d.body["error"]) == (403, "platform not verified: CEK is not signed by any trusted AMD ASK")


def test_pek_signed_by_the_oca_but_not_the_cek_gets_no_session(session_config):
    from dataclasses import replace

    from agent.sev.cert import Signature

    chain = PLATFORM.chain
    only_oca = replace(chain, pek=replace(chain.pek, sig2=Signature()))
    d = decide_session(
        session_config, session_request(cert_chain=base64.b64encode(only_oca.to_bytes()).decode()), material=material()
    )
    assert (d.status, d.body["error"]) == (
        403,
        "platform not verified: PEK certificate is not signed by the chain's CEK",
    )


def test_pinned_platform_needs_no_chain_and_others_are_refused(tmp_path):
    import hashlib

    pin = hashlib.sha256(PLATFORM.pdh_cert.to_bytes()).hexdigest()
    config = write_session_config(
        tmp_path, f'platform = "pinned"\npdh_sha256 = ["{"00" * 32}", "{pin}"]', head="# no roots needed\n"
    )
    d = decide_session(config, session_request(cert_chain=None), material=material())
    assert d.status == 200 and d.session.trust == "pinned"
    other = Platform()
    d = decide_session(config, session_request(other), material=material())
    assert d.status == 403
    assert d.body["error"] == (
        f"platform not verified: PDH sha256 "
        f"{hashlib.sha256(other.pdh_cert.to_bytes()).hexdigest()} is not pinned for this vm"
    )


async def test_platform_any_takes_every_pdh_and_warns_at_start_and_per_session(tmp_path):
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        config = write_session_config(tmp_path, 'platform = "any"', head="# demo\n")
        service = OwnerService(config, session_material=material)
        assert buf.getvalue().count("owner platform unchecked") == 1
        server = HttpServer(service.handle)
        host, port = await server.start_tcp("127.0.0.1", 0)
        try:
            status, _ = await request_json(
                "POST", f"http://{host}:{port}/v1/session", session_request(Platform(), cert_chain=None), timeout=5
            )
        finally:
            await server.close()
    finally:
        setup_logging("info")
    assert status == 200
    assert buf.getvalue().count("owner platform unchecked") == 2
    assert '"platform": "any"' in buf.getvalue()
