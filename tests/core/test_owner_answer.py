"""The owner's HTTP answer becomes a release, a refusal, or a failure."""

import base64

import pytest

from agent.core.events import OwnerFailed, OwnerRefused, OwnerReleased
from agent.core.owner_answer import parse_owner_answer

HEADER = base64.b64encode(bytes(52)).decode()
SECRET = base64.b64encode(b"s" * 32).decode()


def test_release_carries_the_secret_as_a_secret():
    ev = parse_owner_answer(200, {"packet_header": HEADER, "secret": SECRET, "gpa": 4096})
    assert isinstance(ev, OwnerReleased)
    assert ev.secret.reveal() == b"s" * 32
    assert ev.gpa == 4096
    assert "sss" not in repr(ev)


def test_refusal_keeps_the_owners_error_on_one_line():
    ev = parse_owner_answer(403, {"error": "measurement\ndoes not match"})
    assert ev == OwnerRefused(403, "measurement does not match")


def test_refusal_without_an_error_names_the_status():
    assert parse_owner_answer(500, None) == OwnerRefused(500, "HTTP 500")


@pytest.mark.parametrize(
    "status, body, words",
    [
        (200, None, "not a JSON object"),
        (200, [], "not a JSON object"),
        (200, {"secret": SECRET}, "packet_header is not base64"),
        (200, {"packet_header": "AAAA", "secret": SECRET}, "packet_header is 3 bytes"),
        (200, {"packet_header": HEADER, "secret": "%%%"}, "secret is not base64"),
        (200, {"packet_header": HEADER, "secret": ""}, "secret is empty"),
        (200, {"packet_header": HEADER, "secret": 5}, "secret is not base64"),
        (200, {"packet_header": HEADER, "secret": SECRET, "gpa": -1}, "gpa"),
        (200, {"packet_header": HEADER, "secret": SECRET, "gpa": True}, "gpa"),
        (200, {"packet_header": HEADER, "secret": SECRET, "gpa": "1"}, "gpa"),
        (200, {"packet_header": HEADER, "secret": base64.b64encode(bytes(70000)).decode()}, "more than"),
        (302, {}, "unexpected HTTP status 302"),
    ],
)
def test_malformed_answers_fail(status, body, words):
    ev = parse_owner_answer(status, body)
    assert isinstance(ev, OwnerFailed)
    assert words in ev.reason
    assert "\n" not in ev.reason
