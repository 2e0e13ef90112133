"""The owner protocol: what one side encodes, the other parses, field for field."""

from __future__ import annotations

import base64

import pytest

from agent.common.secret import Secret
from agent.protocol.owner import (
    MAX_SECRET_LEN,
    ProtocolError,
    SecretAnswer,
    SecretRequest,
    SessionAnswer,
    SessionRequest,
    refusal_reason,
)

BLOB = bytes(range(48))


def _request() -> SecretRequest:
    return SecretRequest(vm="vm1", measurement=BLOB, api_major=1, api_minor=55, build_id=21, policy=5)


def test_secret_request_round_trips():
    assert SecretRequest.parse(_request().encode()) == _request()


def test_secret_request_wire_names_are_the_owners():
    assert _request().encode() == {
        "vm": "vm1",
        "measurement": base64.b64encode(BLOB).decode(),
        "api_major": 1,
        "api_minor": 55,
        "build_id": 21,
        "policy": 5,
    }


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"vm": ""}, "field 'vm' must be a non-empty string"),
        ({"api_major": None}, "field 'api_major' is missing"),
        ({"build_id": True}, "field 'build_id' must be an integer"),
        ({"policy": 1 << 32}, "field 'policy' must be in 0..4294967295"),
        ({"measurement": 7}, "field 'measurement' must be a base64 string"),
        ({"measurement": "!!"}, "field 'measurement' is not valid base64"),
        ({"measurement": "AAAA"}, "measurement must be 48 bytes, got 3"),
    ],
)
def test_secret_request_names_its_first_fault(change, reason):
    body = {**_request().encode(), **change}
    with pytest.raises(ProtocolError) as err:
        SecretRequest.parse(body)
    assert err.value.reason == reason


def test_secret_request_fault_keeps_what_was_parsed_before_it():
    with pytest.raises(ProtocolError) as err:
        SecretRequest.parse({**_request().encode(), "measurement": "!!"})
    assert err.value.partial["vm"] == "vm1" and err.value.partial["policy"] == 5


def test_secret_request_that_is_not_an_object_is_refused():
    with pytest.raises(ProtocolError, match="request body must be a JSON object"):
        SecretRequest.parse([1])


def test_secret_answer_round_trips_without_showing_the_secret():
    answer = SecretAnswer(packet_header=bytes(52), secret=Secret(b"wrapped"), gpa=0x800000)
    again = SecretAnswer.parse(answer.encode())
    assert (again.packet_header, again.secret.reveal(), again.gpa) == (bytes(52), b"wrapped", 0x800000)
    assert "wrapped" not in repr(again)


def test_secret_answer_without_gpa_leaves_it_out():
    assert "gpa" not in SecretAnswer(packet_header=bytes(52), secret=Secret(b"x")).encode()


@pytest.mark.parametrize(
    "body, reason",
    [
        ([], "body is not a JSON object"),
        ({"packet_header": "AAAA", "secret": "AAAA"}, "packet_header is 3 bytes, expected 52"),
        ({"packet_header": base64.b64encode(bytes(52)).decode(), "secret": ""}, "secret is empty"),
        (
            {
                "packet_header": base64.b64encode(bytes(52)).decode(),
                "secret": base64.b64encode(bytes(MAX_SECRET_LEN + 1)).decode(),
            },
            f"secret is {MAX_SECRET_LEN + 1} bytes, more than {MAX_SECRET_LEN}",
        ),
        (
            {"packet_header": base64.b64encode(bytes(52)).decode(), "secret": "AAAA", "gpa": -1},
            "gpa is not an unsigned 64-bit integer",
        ),
    ],
)
def test_malformed_secret_answer_names_its_fault(body, reason):
    with pytest.raises(ProtocolError) as err:
        SecretAnswer.parse(body)
    assert err.value.reason == reason


def test_session_request_round_trips_with_and_without_a_chain():
    for chain in (None, b"chain"):
        request = SessionRequest(vm="vm1", pdh=b"pdh", policy=1, cert_chain=chain)
        assert SessionRequest.parse(request.encode()) == request


def test_session_request_takes_an_empty_chain_as_none():
    body = {**SessionRequest(vm="vm1", pdh=b"pdh", policy=1).encode(), "cert_chain": ""}
    assert SessionRequest.parse(body).cert_chain is None


def test_session_request_with_a_bad_pdh_names_it():
    with pytest.raises(ProtocolError, match="field 'pdh' is not valid base64") as err:
        SessionRequest.parse({"vm": "vm1", "policy": 1, "pdh": "!!"})
    assert err.value.partial == {"vm": "vm1", "policy": 1}


def test_session_answer_round_trips_and_refuses_an_empty_field():
    answer = SessionAnswer(godh=b"g", session=b"s")
    assert SessionAnswer.parse(answer.encode()) == answer
    with pytest.raises(ProtocolError, match="session is not base64"):
        SessionAnswer.parse({"godh": "Zw==", "session": ""})


def test_refusal_reason_is_one_line_or_the_status():
    assert refusal_reason(403, {"error": "no\nway"}) == "no way"
    assert refusal_reason(500, "oops") == "HTTP 500"
    assert refusal_reason(404, {"error": "  "}) == "HTTP 404"
