"""Control-verb inputs are matched as a whole string.

Python's ``$`` also matches just before a trailing newline, so a pattern
``^...$`` used with ``re.match`` let "tcp:a:1\\n" through to QEMU.  Every
check here must refuse a value with anything after the valid part.
"""

from __future__ import annotations

import os

import pytest

from agent.app.config import _secret_ref
from agent.app.launch_session import sev_policy
from agent.app.verbs.migrate import ControlError, _uri
from agent.app.verbs.secrets import SecretsControl
from agent.common.errors import UsageError
from agent.io.libvirt_monitor import _UUID
from agent.io.secretref import resolve

UUID = "0b5e6f5e-1c3a-4d2b-9a8f-1234567890ab"


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:4444", "tcp:[::1]:4444", "unix:/run/m.sock"])
def test_migration_uri_accepts_the_documented_forms(uri):
    assert _uri({"uri": uri}) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "tcp:a:1\n",
        "tcp:[::1]:1\n",
        "unix:/x\n",
        "tcp:a:1\r\n",
        "tcp:a:1\n,x",
        "tcp:a:\u0661",  # an Arabic-Indic digit is a \d, not a port
    ],
)
def test_migration_uri_with_a_trailing_newline_or_junk_is_refused(uri):
    with pytest.raises(ControlError) as info:
        _uri({"uri": uri})
    assert info.value.status == 400


@pytest.mark.parametrize("sid", ["s0\n", "s0\r\n", "a" * 128 + "\n"])
def test_secret_id_with_a_trailing_newline_is_refused(sid):
    with pytest.raises(ControlError, match="invalid secret id"):
        SecretsControl._id({"id": sid})


def test_secret_id_of_the_documented_form_is_accepted():
    assert SecretsControl._id({"id": "luks-0.a_b"}) == "luks-0.a_b"


def test_config_secret_reference_with_a_trailing_newline_is_refused():
    assert _secret_ref("file:/k") is None
    assert _secret_ref("file:/k\n") is not None


def test_libvirt_uuid_with_a_trailing_newline_is_refused():
    with pytest.raises(UsageError, match="is not a UUID"):
        resolve(f"libvirt:{UUID}\n")
    assert _UUID.fullmatch(UUID) and not _UUID.fullmatch(UUID + "\n")


def test_sev_policy_followed_by_a_newline_is_not_read_as_a_policy():
    assert sev_policy("sev-guest,id=s,policy=0x5") == 5
    assert sev_policy("sev-guest,id=s,policy=0x5\n") == 1  # QEMU would refuse it: default


def test_ctl_sends_the_real_directory_but_not_a_resolved_file_symlink(tmp_path):
    from agent.cli.ctl import _file_ref

    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "link").symlink_to("/etc/passwd")
    real = os.path.realpath(tmp_path / "real")
    assert _file_ref(str(tmp_path / "alias" / "k")) == f"file:{real}/k"
    assert _file_ref(str(tmp_path / "alias" / "link")) == f"file:{real}/link"  # agent refuses it
