"""The launcher's side of POST /v1/session: what it sends."""

from __future__ import annotations

import base64

import pytest

from agent.app.config import load_config
from agent.app.launch_session import CERT_LEN, chain_with_cek
from agent.common.errors import UsageError


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_sev_cek_takes_the_place_of_the_chains_cek():
    pek, oca, cek = b"P" * CERT_LEN, b"O" * CERT_LEN, b"C" * CERT_LEN
    signed = b"S" * CERT_LEN
    assert base64.b64decode(chain_with_cek(b64(pek + oca + cek), b64(signed))) == pek + oca + signed


@pytest.mark.parametrize(
    "chain, cek, words",
    [
        (bytes(100), bytes(CERT_LEN), "[sev] cert_chain must hold 6252 bytes"),
        (bytes(3 * CERT_LEN), bytes(CERT_LEN - 1), "[sev] cek must hold one 2084-byte certificate"),
    ],
)
def test_sev_cek_of_the_wrong_size_is_a_usage_error(chain, cek, words):
    with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("]", r"\]")):
        chain_with_cek(b64(chain), b64(cek))


def test_sev_cek_without_a_cert_chain_is_a_config_error(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_text('[sev]\nowner_url = "http://127.0.0.1:1"\npdh = "pdh.b64"\ncek = "cek.b64"\n')
    with pytest.raises(UsageError, match=r"\[sev\] cek replaces the CEK of \[sev\] cert_chain"):
        load_config(str(path))
    path.write_text(path.read_text() + 'cert_chain = "chain.b64"\n')
    assert load_config(str(path)).sev_cek == str(tmp_path / "cek.b64")


async def test_the_launch_session_is_asked_across_the_owner_list_with_retries(tmp_path):
    from agent.app.launch_session import fetch_session
    from tests.scripted_owner import ScriptedOwner, refusing_url

    godh, session = base64.b64encode(bytes(CERT_LEN)).decode(), base64.b64encode(bytes(64)).decode()
    script = [(503, {"error": "starting"}, {}), (200, {"godh": godh, "session": session}, {})]
    owner = await ScriptedOwner(script).start()
    (tmp_path / "pdh.b64").write_text(base64.b64encode(bytes(CERT_LEN)).decode())
    try:
        got = await fetch_session((refusing_url(), owner.url), "vm1", str(tmp_path / "pdh.b64"), None, 1, 10.0)
    finally:
        await owner.close()
    assert got == (godh.encode() + b"\n", session.encode() + b"\n")
    assert [s.path for s in owner.seen] == ["/v1/session", "/v1/session"]
