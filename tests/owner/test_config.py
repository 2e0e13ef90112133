"""owner.toml loading: everything checked once, every fault one UsageError line."""

from __future__ import annotations

import pytest

from agent.errors import UsageError
from agent.owner.config import load_owner_config
from agent.sev.guids import LUKS_KEY_GUID
from tests.fifo import call_with_fifo_deadline

from .conftest import DIGEST, OTHER_DIGEST, PASSPHRASE, TEK, TIK, write_owner_dir


def test_loads_paths_relative_to_the_toml(owner_dir, monkeypatch, tmp_path):
    monkeypatch.chdir("/")
    config = load_owner_config(owner_dir.toml)
    vm = config.vms["vm1"]
    assert vm.tik.reveal() == TIK and vm.tek.reveal() == TEK
    assert vm.policy == 1
    assert vm.digests == (DIGEST, OTHER_DIGEST)
    assert vm.min_api == (1, 49)
    assert vm.build_ids == frozenset({21, 22})
    assert vm.gpa == 8192
    assert [(s.guid, s.name, s.value.reveal()) for s in vm.secrets] == [(LUKS_KEY_GUID, "luks-key", PASSPHRASE)]


def test_keys_do_not_show_in_repr(owner_dir):
    text = repr(load_owner_config(owner_dir.toml))
    assert TIK.hex() not in text and PASSPHRASE.decode() not in text


def test_single_digest_string_is_accepted(tmp_path):
    d = write_owner_dir(tmp_path)
    d.toml.write_text(d.toml.read_text().replace(
        f'["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]', f'"{DIGEST.hex()}"'))
    assert load_owner_config(d.toml).vms["vm1"].digests == (DIGEST,)


def one_line_error(path) -> str:
    with pytest.raises(UsageError) as err:
        load_owner_config(path)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_config_file(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope.toml")


def test_bad_toml(tmp_path):
    path = tmp_path / "owner.toml"
    path.write_text("[vm.vm1\ntik = ")
    assert "not valid TOML" in one_line_error(path)


def test_no_vms(tmp_path):
    path = tmp_path / "owner.toml"
    path.write_text("x = 1\n")
    assert "no [vm.NAME]" in one_line_error(path)


def test_wrong_tik_length(owner_dir):
    owner_dir.tik.write_bytes(b"short")
    text = one_line_error(owner_dir.toml)
    assert "TIK" in text and "16 raw bytes" in text and "holds 5" in text


def test_wrong_tek_length(owner_dir):
    owner_dir.tek.write_bytes(bytes(32))
    assert "TEK" in one_line_error(owner_dir.toml)


def test_missing_secret_file(owner_dir):
    owner_dir.secret.unlink()
    assert "vm1-disk.pass does not exist" in one_line_error(owner_dir.toml)


def test_empty_secret_file(owner_dir):
    owner_dir.secret.write_bytes(b"")
    assert "is empty" in one_line_error(owner_dir.toml)


def test_unknown_guid_alias(owner_dir):
    owner_dir.toml.write_text(owner_dir.toml.read_text().replace('"luks-key"', '"luks-kee"'))
    assert "unknown GUID alias 'luks-kee'" in one_line_error(owner_dir.toml)


def test_duplicate_guid(owner_dir):
    owner_dir.toml.write_text(owner_dir.toml.read_text() + """
[[vm.vm1.secret]]
guid = "736869e5-84f0-4973-92ec-06879ce3da0b"
file = "vm1-disk.pass"
""")
    assert "appears twice" in one_line_error(owner_dir.toml)


@pytest.mark.parametrize("digest, words", [
    ('"zz"', "not valid hex"),
    ('"abcd"', "32 bytes"),
    ("[]", "empty list"),
    ("7", "hex string"),
])
def test_bad_digest(owner_dir, digest, words):
    text = owner_dir.toml.read_text()
    text = text.replace(f'["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]', digest)
    owner_dir.toml.write_text(text)
    assert words in one_line_error(owner_dir.toml)


@pytest.mark.parametrize("line, words", [
    ('min_api = "1"', "min_api"),
    ('min_api = 1.49', "min_api"),
    ('build_ids = 21', "build_ids"),
    ('build_ids = [300]', "0..255"),
    ('gpa = -1', "gpa"),
    ('policy = "1"', "policy must be an integer"),
    ('firmware = "OVMF.fd"', "not both"),
    ('colour = "blue"', "unknown key 'colour'"),
])
def test_bad_vm_keys(owner_dir, line, words):
    key = line.split(" ", 1)[0]
    lines = [ln for ln in owner_dir.toml.read_text().splitlines() if not ln.startswith(key + " ")]
    lines.insert(lines.index("[vm.vm1]") + 1, line)
    owner_dir.toml.write_text("\n".join(lines) + "\n")
    assert words in one_line_error(owner_dir.toml)


def test_missing_required_key(owner_dir):
    text = "\n".join(ln for ln in owner_dir.toml.read_text().splitlines() if not ln.startswith("tek "))
    owner_dir.toml.write_text(text)
    assert "missing 'tek'" in one_line_error(owner_dir.toml)


def test_vm_without_secrets(tmp_path):
    path = tmp_path / "owner.toml"
    (tmp_path / "t").write_bytes(bytes(16))
    path.write_text(f'[vm.a]\ntik = "t"\ntek = "t"\npolicy = 0\ndigest = "{DIGEST.hex()}"\n')
    assert "at least one" in one_line_error(path)


def firmware_owner_dir(tmp_path, launch: str):
    d = write_owner_dir(tmp_path)
    (tmp_path / "OVMF.fd").write_bytes(b"\x90" * 4096)
    text = d.toml.read_text().replace(f'digest = ["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]', launch)
    d.toml.write_text(text)
    return d


def test_firmware_instead_of_digest(tmp_path):
    from agent.sev.digest import launch_digest

    d = firmware_owner_dir(tmp_path, 'firmware = "OVMF.fd"')
    assert load_owner_config(d.toml).vms["vm1"].digests == (launch_digest(b"\x90" * 4096),)


def test_kernel_with_firmware_that_cannot_measure_it(tmp_path):
    d = firmware_owner_dir(tmp_path, 'firmware = "OVMF.fd"\nkernel = "OVMF.fd"')
    assert "cannot compute the launch digest" in one_line_error(d.toml)


def test_append_without_kernel(tmp_path):
    d = firmware_owner_dir(tmp_path, 'firmware = "OVMF.fd"\nappend = "quiet"')
    assert "need kernel" in one_line_error(d.toml)


def test_missing_firmware_file(tmp_path):
    d = firmware_owner_dir(tmp_path, 'firmware = "absent.fd"')
    assert "absent.fd does not exist" in one_line_error(d.toml)


def test_neither_digest_nor_firmware(tmp_path):
    d = firmware_owner_dir(tmp_path, "")
    assert "missing 'digest'" in one_line_error(d.toml)


# -- session VMs ---------------------------------------------------------------

def session_toml(tmp_path, lines: str) -> "object":
    (tmp_path / "pass").write_bytes(PASSPHRASE)
    (tmp_path / "t").write_bytes(TIK)
    path = tmp_path / "owner.toml"
    path.write_text(f'[vm.s]\npolicy = 1\ndigest = "{DIGEST.hex()}"\n{lines}\n'
                    '[[vm.s.secret]]\nguid = "luks-key"\nfile = "pass"\n')
    return path


def test_session_vm_may_omit_tik_and_tek(tmp_path):
    vm = load_owner_config(session_toml(tmp_path, "session = true")).vms["s"]
    assert vm.session is True and vm.tik is None and vm.tek is None


def test_session_vm_may_keep_offline_keys(tmp_path):
    vm = load_owner_config(session_toml(tmp_path, 'session = true\ntik = "t"\ntek = "t"')).vms["s"]
    assert vm.session is True and vm.tik.reveal() == TIK


def test_vm_without_session_still_needs_tik(tmp_path):
    assert "missing 'tik'" in one_line_error(session_toml(tmp_path, "session = false"))


@pytest.mark.parametrize("lines, words", [
    ('session = "yes"', "session must be true or false"),
    ('session = true\ntik = "t"', "tik and tek go together"),
])
def test_bad_session_keys(tmp_path, lines, words):
    assert words in one_line_error(session_toml(tmp_path, lines))


def two_vms(owner_dir, tik2: bytes, tek2: bytes):
    """owner.toml with vm2 next to vm1, vm2's keys as given."""
    (owner_dir.root / "vm2_tik.bin").write_bytes(tik2)
    (owner_dir.root / "vm2_tek.bin").write_bytes(tek2)
    text = owner_dir.toml.read_text()
    second = (text.replace("[vm.vm1]", "[vm.vm2]").replace("vm.vm1.secret", "vm.vm2.secret")
              .replace("keys/vm1_tik.bin", "vm2_tik.bin").replace("keys/vm1_tek.bin", "vm2_tek.bin"))
    owner_dir.toml.write_text(text + second)
    return owner_dir.toml


@pytest.mark.parametrize("tik2, tek2, words", [
    (TIK, bytes(range(200, 216)), "vm.vm2 TIK is the same key as vm.vm1 TIK"),
    (bytes(range(200, 216)), TEK, "vm.vm2 TEK is the same key as vm.vm1 TEK"),
    (TEK, bytes(range(200, 216)), "vm.vm2 TIK is the same key as vm.vm1 TEK"),
], ids=["tik", "tek", "tik-is-the-other-tek"])
def test_a_key_shared_by_two_vms_is_refused(owner_dir, tik2, tek2, words):
    text = one_line_error(two_vms(owner_dir, tik2, tek2))
    assert words in text
    for raw in (TIK, TEK):
        assert raw.hex() not in text


def test_vms_with_keys_of_their_own_load(owner_dir):
    config = load_owner_config(two_vms(owner_dir, bytes(range(200, 216)), bytes(range(216, 232))))
    assert sorted(config.vms) == ["vm1", "vm2"]


def test_a_fifo_as_an_owner_file_is_refused_at_once(owner_dir):
    # /dev/zero is tested in a subprocess with a memory limit (test_cli.py).
    import os

    owner_dir.secret.unlink()
    os.mkfifo(owner_dir.secret)  # open() alone would wait for a writer
    err = call_with_fifo_deadline(owner_dir.secret, lambda: load_owner_config(owner_dir.toml))
    assert isinstance(err, UsageError), err
    assert "vm1-disk.pass is not a regular file" in str(err)
