"""Sealed PSK hand-over: opens once, with its own offer's key, unchanged."""

import base64
import os

import pytest

from agent import seal


def offer():
    priv, oid = os.urandom(32), os.urandom(16)
    return priv, oid, seal.make_offer(priv, oid)


def test_cookie_opens_with_the_offers_key():
    priv, oid, off = offer()
    psk = os.urandom(32)
    cookie = seal.seal(off, psk, os.urandom(32), os.urandom(12))
    assert seal.cookie_offer_id(cookie) == oid
    assert seal.unseal(cookie, priv, oid) == psk


def test_the_carrier_cannot_read_the_psk():
    _priv, _oid, off = offer()
    psk = os.urandom(32)
    cookie = base64.b64decode(seal.seal(off, psk, os.urandom(32), os.urandom(12)))
    assert psk not in cookie and psk.hex().encode() not in cookie


@pytest.mark.parametrize("position", [0, 4, 20, 52, 64, -1])
def test_any_changed_byte_is_refused(position):
    priv, oid, off = offer()
    raw = bytearray(base64.b64decode(seal.seal(off, b"k" * 32, os.urandom(32), os.urandom(12))))
    raw[position] ^= 0x01
    with pytest.raises(seal.SealError):
        seal.unseal(base64.b64encode(bytes(raw)).decode(), priv, oid)


def test_cookie_for_another_offer_is_refused():
    priv, oid, _off = offer()
    _p2, _o2, other = offer()
    cookie = seal.seal(other, b"k" * 32, os.urandom(32), os.urandom(12))
    with pytest.raises(seal.SealError, match="another offer"):
        seal.unseal(cookie, priv, oid)


def test_cookie_with_a_forged_offer_id_does_not_open():
    priv, oid, _off = offer()
    _p2, _o2, other = offer()
    raw = bytearray(base64.b64decode(seal.seal(other, b"k" * 32, os.urandom(32), os.urandom(12))))
    raw[4:20] = oid
    with pytest.raises(seal.SealError, match="does not open"):
        seal.unseal(base64.b64encode(bytes(raw)).decode(), priv, oid)


@pytest.mark.parametrize("bad", ["", "!!", base64.b64encode(b"KAO1" + bytes(10)).decode(),
                                 base64.b64encode(b"XXXX" + bytes(48)).decode(), 5])
def test_bad_offers_are_one_line_errors(bad):
    with pytest.raises(seal.SealError) as err:
        seal.seal(bad, b"k", os.urandom(32), os.urandom(12))
    assert "\n" not in str(err.value)
