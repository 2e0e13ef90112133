"""Our own lines' path (structlog's, not the standard library's): the level
checked first, the configuration read at every line, the timestamp, errors."""

from __future__ import annotations

import datetime
import io
import json
import logging
import random
import threading

import pytest

from agent.common.logs import get_logger, iso_utc, setup_logging
from agent.common.secret import Secret


@pytest.fixture
def reset_logging():
    yield
    setup_logging("info")


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_the_timestamp_is_what_datetime_isoformat_writes_whole_seconds_included():
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    rng = random.Random(3)
    instants = [1_796_000_000 * 10**9 + rng.randrange(10**12) for _ in range(2000)]
    instants += [1_796_000_000 * 10**9, 1_796_000_000 * 10**9 + 999, 1_796_000_000 * 10**9 + 999_999_999, 0]
    for ns in sorted(instants):
        expected = (epoch + datetime.timedelta(microseconds=ns // 1000)).isoformat().replace("+00:00", "Z")
        assert iso_utc(ns) == expected


def test_a_logger_used_before_logging_is_set_up_again_follows_the_new_level_and_stream(reset_logging):
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", stream=first)
    log = get_logger("keyagent.cached", vm="v1")
    log.info("one")
    log.debug("hidden")
    setup_logging("debug", stream=second)
    log.debug("two")
    assert [line["event"] for line in _lines(first)] == ["one"]
    assert [(line["event"], line["level"], line["vm"]) for line in _lines(second)] == [("two", "debug", "v1")]


def test_a_line_below_the_level_renders_nothing_of_its_fields(reset_logging):
    rendered = []

    class Field:
        def __structlog__(self):
            rendered.append(1)
            return "field"

    buf = io.StringIO()
    setup_logging("warning", stream=buf)
    log = get_logger("keyagent")
    log.info("dropped", field=Field())
    log.debug("dropped too", field=Field())
    assert rendered == [] and buf.getvalue() == ""
    log.error("kept", field=Field())
    assert rendered == [1] and _lines(buf)[0]["field"] == "field"


def test_a_value_json_has_no_form_for_is_its_repr_scrubbed():
    secret = Secret(b"an-unrendered-secret-42")

    class Holder:
        def __repr__(self):
            return "Holder(an-unrendered-secret-42)"

    buf = io.StringIO()
    setup_logging("info", stream=buf)
    try:
        get_logger("keyagent").info("held", holder=Holder(), raw=b"an-unrendered-secret-42")
    finally:
        setup_logging("info")
    (line,) = _lines(buf)
    assert line["holder"] == "Holder(<redacted>)" and line["raw"] == "b'<redacted>'"
    del secret


def test_a_line_that_cannot_be_rendered_is_dropped_with_a_note_and_the_caller_goes_on(reset_logging, capsys):
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    log = get_logger("keyagent")
    log.info("bad", fields={(1, 2): "a tuple is no JSON key"})
    log.info("next")
    assert [line["event"] for line in _lines(buf)] == ["next"]
    err = capsys.readouterr().err
    assert err.startswith("--- Logging error ---\nTypeError: ") and "a tuple is no JSON key" not in err


def test_a_stream_that_fails_is_noted_and_the_caller_goes_on(reset_logging, capsys):
    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    setup_logging("info", stream=Broken())
    get_logger("keyagent").info("lost")
    assert capsys.readouterr().err == "--- Logging error ---\nBrokenPipeError: [Errno 32] Broken pipe\n"


def test_our_lines_and_library_lines_from_threads_stay_whole_lines(reset_logging):
    buf = io.StringIO()
    setup_logging("info", stream=buf)
    ours = get_logger("keyagent", vm="v1")
    theirs = logging.getLogger("qemu.qmp")

    def write(n: int) -> None:
        for i in range(300):
            ours.info("ours", n=n, i=i, pad="x" * 200)
            theirs.info("theirs %d %d %s", n, i, "y" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = _lines(buf)
    assert len(lines) == 4 * 300 * 2
    assert sum(1 for line in lines if line.get("logger") == "qemu.qmp") == 4 * 300
