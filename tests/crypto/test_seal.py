"""The authenticated hand-over's construction: what each blob binds, and what a carrier can do."""

import base64
import json
import os
import subprocess
import sys

import pytest

from agent.crypto import seal
from tests.hostkeys import make_host, make_pair

VM = "vm1"


@pytest.fixture
def hosts(tmp_path):
    src, dst = make_pair(tmp_path)
    carrier = make_host(tmp_path, "carrier")
    return src, dst, carrier


def offer(host, vm=VM):
    priv, oid = os.urandom(32), os.urandom(16)
    return priv, seal.make_offer(host.private(), vm, oid, priv)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def flip(blob: str, position: int) -> str:
    raw = bytearray(base64.b64decode(blob))
    raw[position] ^= 0x01
    return b64(bytes(raw))


def handover(src, dst, psk=b"k" * 32):
    priv, off = offer(dst)
    verified, _ = seal.verify_offer(off, VM, src.trusted_map())
    cookie = seal.seal(verified, VM, psk, src.private())
    return priv, off, cookie


def test_two_trusting_hosts_hand_over_the_psk(hosts):
    src, dst, _ = hosts
    psk = os.urandom(32)
    priv, off, cookie = handover(src, dst, psk)
    parsed, name = seal.verify_cookie(cookie, VM, dst.trusted_map())
    assert name == "src-host"
    assert seal.open_cookie(parsed, seal.parse_offer(off), priv) == psk


def test_the_carrier_cannot_read_the_psk(hosts):
    src, dst, _ = hosts
    psk = os.urandom(32)
    _priv, off, cookie = handover(src, dst, psk)
    for blob in (off, cookie):
        raw = base64.b64decode(blob)
        assert psk not in raw and psk.hex().encode() not in raw


def test_an_offer_from_an_untrusted_host_is_refused(hosts):
    """Offer swapped: the carrier's own offer, signed with its own key."""
    src, _dst, carrier = hosts
    _priv, off = offer(carrier)
    with pytest.raises(seal.Refused, match="does not trust.*unknown destination"):
        seal.verify_offer(off, VM, src.trusted_map())


@pytest.mark.parametrize("position", [4, 20, 52, 84, 86, -1])
def test_any_changed_byte_of_an_offer_is_refused(hosts, position):
    src, dst, _ = hosts
    _priv, off = offer(dst)
    with pytest.raises(seal.SealError):
        seal.verify_offer(flip(off, position), VM, src.trusted_map())


def test_an_offer_with_the_carriers_hpke_key_is_refused(hosts):
    src, dst, _ = hosts
    _priv, off = offer(dst)
    _cpriv, coff = offer(dst)  # any other X25519 key: the signature covers the key
    raw = bytearray(base64.b64decode(off))
    raw[20:52] = base64.b64decode(coff)[20:52]
    with pytest.raises(seal.Refused, match="signature does not verify"):
        seal.verify_offer(b64(bytes(raw)), VM, src.trusted_map())


def test_an_offer_for_another_vm_is_refused(hosts):
    src, dst, _ = hosts
    _priv, off = offer(dst, vm="vm2")
    with pytest.raises(seal.Refused, match="for VM 'vm2', this agent runs 'vm1'"):
        seal.verify_offer(off, VM, src.trusted_map())


def test_a_cookie_forged_with_the_carriers_key_is_refused(hosts):
    """The carrier seals a PSK of its own to the real offer and signs it itself."""
    _src, dst, carrier = hosts
    _priv, off = offer(dst)
    forged = seal.seal(seal.parse_offer(off), VM, b"c" * 32, carrier.private())
    with pytest.raises(seal.Refused, match="unknown source"):
        seal.verify_cookie(forged, VM, dst.trusted_map())


def test_a_cookie_resigned_under_a_trusted_key_it_does_not_hold_fails(hosts):
    """Claiming a trusted source's key without its private key: the signature fails."""
    src, dst, carrier = hosts
    _priv, off = offer(dst)
    forged = bytearray(base64.b64decode(seal.seal(seal.parse_offer(off), VM, b"c" * 32, carrier.private())))
    forged[36:68] = base64.b64decode(src.public.split()[1])
    with pytest.raises(seal.Refused, match="signature does not verify"):
        seal.verify_cookie(b64(bytes(forged)), VM, dst.trusted_map())


@pytest.mark.parametrize("position", [4, 36, 68, 70, 110, -65, -1])
def test_any_changed_byte_of_a_cookie_is_refused(hosts, position):
    src, dst, _ = hosts
    _priv, _off, cookie = handover(src, dst)
    with pytest.raises(seal.SealError):
        seal.verify_cookie(flip(cookie, position), VM, dst.trusted_map())


def test_a_cookie_for_another_vm_is_refused(hosts):
    src, dst, _ = hosts
    _priv, off = offer(dst, vm="vm2")
    verified, _ = seal.verify_offer(off, "vm2", src.trusted_map())
    cookie = seal.seal(verified, "vm2", b"k" * 32, src.private())
    with pytest.raises(seal.Refused, match="for VM 'vm2', this agent runs 'vm1'"):
        seal.verify_cookie(cookie, VM, dst.trusted_map())


def test_a_cookie_for_another_offer_does_not_open(hosts):
    src, dst, _ = hosts
    priv, off = offer(dst)
    _p2, _off2, cookie = handover(src, dst)
    parsed, _ = seal.verify_cookie(cookie, VM, dst.trusted_map())
    with pytest.raises(seal.Refused, match="another offer"):
        seal.open_cookie(parsed, seal.parse_offer(off), priv)


def test_a_cookie_opens_only_with_its_offers_key(hosts):
    src, dst, _ = hosts
    _priv, off, cookie = handover(src, dst)
    parsed, _ = seal.verify_cookie(cookie, VM, dst.trusted_map())
    with pytest.raises(seal.Refused, match="does not open"):
        seal.open_cookie(parsed, seal.parse_offer(off), os.urandom(32))


def test_an_offer_cannot_be_reflected_as_a_cookie(hosts):
    """Different magic, different signing context: an offer is never a cookie."""
    src, dst, _ = hosts
    _priv, off = offer(src)
    raw = bytearray(base64.b64decode(off))
    raw[:4] = seal.COOKIE_MAGIC
    with pytest.raises(seal.SealError):
        seal.verify_cookie(b64(bytes(raw)), VM, dst.trusted_map())
    assert seal.OFFER_CONTEXT != seal.COOKIE_CONTEXT
    assert b"source->destination" in seal.OFFER_CONTEXT and b"source->destination" in seal.PSK_INFO


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "!!",
        b64(b"KAO2" + bytes(10)),
        b64(b"XXXX" + bytes(200)),
        5,
        None,
        b64(seal.OFFER_HEAD.pack(b"KAO2", bytes(16), bytes(32), bytes(32), 9) + bytes(64)),
    ],
)
def test_bad_offers_are_one_line_malformed_errors(hosts, bad):
    src, _dst, _ = hosts
    with pytest.raises(seal.Malformed) as err:
        seal.verify_offer(bad, VM, src.trusted_map())
    assert "\n" not in str(err.value) and err.value.status == 400


@pytest.mark.parametrize("bad", ["", "!!", b64(b"KAC2" + bytes(10)), b64(b"XXXX" + bytes(300)), 5])
def test_bad_cookies_are_one_line_malformed_errors(hosts, bad):
    _src, dst, _ = hosts
    with pytest.raises(seal.Malformed) as err:
        seal.verify_cookie(bad, VM, dst.trusted_map())
    assert "\n" not in str(err.value)


def test_refusals_are_403_and_name_no_key_bytes(hosts):
    src, _dst, carrier = hosts
    _priv, off = offer(carrier)
    with pytest.raises(seal.Refused) as err:
        seal.verify_offer(off, VM, src.trusted_map())
    assert err.value.status == 403
    assert carrier.public.split()[1] not in str(err.value)


WARM_PROBE = """
import json, os, sys
from agent.crypto import hostkey, seal
seal.warm()
before = set(sys.modules)
src, dst, trusted = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
trusted = {bytes.fromhex(k): v for k, v in trusted.items()}
priv = os.urandom(32)
offer_b64 = seal.make_offer(hostkey.load_private(dst), "vm1", os.urandom(16), priv)
offer, _ = seal.verify_offer(offer_b64, "vm1", trusted)
cookie, _ = seal.verify_cookie(seal.seal(offer, "vm1", b"k" * 32, hostkey.load_private(src)), "vm1", trusted)
assert seal.open_cookie(cookie, seal.parse_offer(offer_b64), priv) == b"k" * 32
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_after_warm_a_whole_handover_imports_nothing_and_never_the_serialization_package(tmp_path):
    """What the idle sidecar preloads (agent.app.sidecar.preload_idle) is all a hand-over loads."""
    src, dst = make_pair(tmp_path)
    trusted = {k.hex(): v for k, v in {**src.trusted_map(), **dst.trusted_map()}.items()}
    out = subprocess.run(
        [sys.executable, "-c", WARM_PROBE, str(src.key), str(dst.key), json.dumps(trusted)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    probe = (
        "import sys; from agent.crypto import seal; seal.warm(); "
        "print('cryptography.hazmat.primitives.serialization' in sys.modules)"
    )
    check = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "False", check.stderr


def test_warm_uses_no_key_of_this_host_and_a_handover_after_it_still_works(hosts, monkeypatch):
    src, dst, _ = hosts
    monkeypatch.setattr(os, "urandom", lambda n: pytest.fail("warm() must not draw key material"))
    seal.warm()
    monkeypatch.undo()
    psk = os.urandom(32)
    priv, off, cookie = handover(src, dst, psk)
    parsed, _ = seal.verify_cookie(cookie, VM, dst.trusted_map())
    assert seal.open_cookie(parsed, seal.parse_offer(off), priv) == psk
