"""Events and actions survive the event log, secrets as their length only."""

import pytest

from agent.common.secret import Secret
from agent.core.actions import Finish, SendQmp
from agent.core.codec import CodecError, decode_action, decode_event, encode
from agent.core.events import OwnerReleased, QmpReply


def test_a_secret_is_recorded_as_its_length_and_read_back_as_zeros():
    ev = OwnerReleased("AAAA", Secret(b"top secret bytes"), None)
    rec = encode(ev)
    assert rec == {"type": "OwnerReleased", "packet_header": "AAAA", "secret": {"redacted": 16}, "gpa": None}
    back = decode_event(rec)
    assert back.secret.reveal() == bytes(16)
    assert encode(back) == rec


def test_nested_secrets_in_qmp_arguments_are_redacted():
    act = SendQmp("t1", "object-add", {"props": {"data": Secret(b"x" * 9)}})
    assert encode(act)["args"] == {"props": {"data": {"redacted": 9}}}


def test_roundtrip_of_plain_values():
    assert decode_event(encode(QmpReply("t", {"a": [1, 2]}))) == QmpReply("t", {"a": [1, 2]})
    assert decode_action(encode(Finish(1, "no"))) == Finish(1, "no")


def test_raw_bytes_are_refused_so_nothing_unlabelled_is_written():
    with pytest.raises(TypeError):
        encode(QmpReply("t", b"\x00"))


@pytest.mark.parametrize(
    "record",
    [
        {"type": "Nope"},
        {"type": "QmpReply"},
        {"type": "QmpReply", "tag": "t", "bogus": 1},
        [],
        {"type": "OwnerReleased", "packet_header": "", "secret": {"redacted": -1}},
    ],
)
def test_bad_records_raise_codec_error(record):
    with pytest.raises(CodecError):
        decode_event(record)
