"""The JSON log lines structlog writes: their shape, their order, the scrubber."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from agent.common.logs import get_logger, setup_logging
from agent.common.secret import Secret

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def lines():
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        setup_logging("info")


def test_bound_fields_come_first_then_the_call_fields_event_level_and_utc_timestamp(lines):
    get_logger("keyagent", vm="v1").bind(flow="launch").warning("hello", a=1, b=b"xy", c=(1, 2), d=None)
    (line,) = lines()
    assert list(line) == ["vm", "flow", "a", "b", "c", "d", "event", "level", "timestamp"]
    assert line["event"] == "hello" and line["level"] == "warning"
    assert line["b"] == "b'xy'" and line["c"] == [1, 2] and line["d"] is None
    assert STAMP.match(line["timestamp"])


def test_a_call_field_overrides_a_bound_one_in_its_place(lines):
    get_logger("x", k=1, j=2).info("chain", k=3)
    assert list(lines()[0].items())[:2] == [("k", 3), ("j", 2)]


def test_a_level_below_the_configured_one_writes_nothing(lines):
    log = get_logger("keyagent")
    log.debug("hidden")
    logging.getLogger("qemu.qmp").debug("hidden too")
    assert lines() == []


def test_a_library_record_names_its_logger_and_is_scrubbed():
    secret = Secret(b"a-live-secret-value-1234")
    buf = io.StringIO()
    setup_logging("debug", stream=buf)
    try:
        logging.getLogger("qemu.qmp").debug("sent %s", "a-live-secret-value-1234")
        get_logger("keyagent").info("ours", text="a-live-secret-value-1234", secret=secret, nested={"x": ["y", secret]})
    finally:
        setup_logging("info")
    foreign, ours = (json.loads(line) for line in buf.getvalue().splitlines())
    assert list(foreign) == ["event", "level", "timestamp", "logger"]
    assert foreign["event"] == "sent <redacted>" and foreign["logger"] == "qemu.qmp"
    assert ours["text"] == "<redacted>"
    assert ours["secret"] == secret.to_log() == ours["nested"]["x"][1]
    assert "a-live-secret-value-1234" not in buf.getvalue()


def test_a_library_exception_keeps_its_type_and_a_scrubbed_message(lines):
    secret = Secret(b"another-live-secret-5678")  # live while it is referenced
    try:
        raise ValueError("boom another-live-secret-5678")
    except ValueError:
        logging.getLogger("lib").exception("failed")
    (line,) = lines()
    assert line["event"] == "failed: ValueError: boom <redacted>" and line["level"] == "error"
    del secret


def test_the_scrub_leaves_no_form_of_any_live_secret_whatever_their_number():
    import base64
    import os

    from agent.common.logs import scrub

    keys = [Secret(os.urandom(32)) for _ in range(50)]
    short = Secret(os.urandom(5))  # forms of another length
    forms = [f for s in [*keys, short] for f in (s.hex(), s.hex().upper(), s.b64())]
    text = "x" + "+".join(forms) + base64.b64encode(os.urandom(40)).decode() + keys[3].hex()[:-1] + " tail"
    out = scrub(text)
    assert not any(f in out for f in forms)
    assert out.startswith("x<redacted>+") and out.endswith(keys[3].hex()[:-1] + " tail")
    assert out.count("<redacted>") == len(forms)


def test_the_scrub_takes_a_text_secret_anywhere_and_overlapping_forms_leave_nothing():
    from agent.common.logs import scrub

    passphrase = Secret(b"correct horse battery staple")
    key = Secret(bytes.fromhex("00112233445566778899aabbccddeeff"))
    overlapping = key.hex()[:8] + key.hex() + key.hex()[8:]
    assert (
        scrub(f"a correct horse battery staple and {overlapping}")
        == f"a <redacted> and {key.hex()[:8]}<redacted>{key.hex()[8:]}"
    )
    assert scrub("nothing secret here") == "nothing secret here"
    del passphrase
