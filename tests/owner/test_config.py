"""owner.toml loading: everything checked once, every fault one UsageError line."""

from __future__ import annotations

import pytest

from agent.common.errors import UsageError
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
    d.toml.write_text(d.toml.read_text().replace(f'["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]', f'"{DIGEST.hex()}"'))
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
    owner_dir.toml.write_text(
        owner_dir.toml.read_text()
        + """
[[vm.vm1.secret]]
guid = "736869e5-84f0-4973-92ec-06879ce3da0b"
file = "vm1-disk.pass"
"""
    )
    assert "appears twice" in one_line_error(owner_dir.toml)


@pytest.mark.parametrize(
    "digest, words",
    [
        ('"zz"', "not valid hex"),
        ('"abcd"', "32 bytes"),
        ("[]", "empty list"),
        ("7", "hex string"),
    ],
)
def test_bad_digest(owner_dir, digest, words):
    text = owner_dir.toml.read_text()
    text = text.replace(f'["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]', digest)
    owner_dir.toml.write_text(text)
    assert words in one_line_error(owner_dir.toml)


@pytest.mark.parametrize(
    "line, words",
    [
        ('min_api = "1"', "min_api"),
        ("min_api = 1.49", "min_api"),
        ("build_ids = 21", "build_ids"),
        ("build_ids = [300]", "0..255"),
        ("gpa = -1", "gpa"),
        ('policy = "1"', "policy must be an integer"),
        ('firmware = "OVMF.fd"', "not both"),
        ('colour = "blue"', "unknown key 'colour'"),
    ],
)
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
    d.toml.write_text(text.replace("gpa = 8192\n", ""))  # a firmware gives its own secret area
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


def session_toml(tmp_path, lines: str) -> object:
    (tmp_path / "pass").write_bytes(PASSPHRASE)
    (tmp_path / "t").write_bytes(TIK)
    path = tmp_path / "owner.toml"
    path.write_text(
        f'[vm.s]\npolicy = 1\ndigest = "{DIGEST.hex()}"\n{lines}\n[[vm.s.secret]]\nguid = "luks-key"\nfile = "pass"\n'
    )
    return path


def test_session_vm_may_omit_tik_and_tek(tmp_path):
    vm = load_owner_config(session_toml(tmp_path, "session = true")).vms["s"]
    assert vm.session is True and vm.tik is None and vm.tek is None


def test_session_vm_may_keep_offline_keys(tmp_path):
    vm = load_owner_config(session_toml(tmp_path, 'session = true\ntik = "t"\ntek = "t"')).vms["s"]
    assert vm.session is True and vm.tik.reveal() == TIK


def test_vm_without_session_still_needs_tik(tmp_path):
    assert "missing 'tik'" in one_line_error(session_toml(tmp_path, "session = false"))


@pytest.mark.parametrize(
    "lines, words",
    [
        ('session = "yes"', "session must be true or false"),
        ('session = true\ntik = "t"', "tik and tek go together"),
    ],
)
def test_bad_session_keys(tmp_path, lines, words):
    assert words in one_line_error(session_toml(tmp_path, lines))


# -- platform trust --------------------------------------------------------------


def test_platform_defaults_to_amd_with_the_builtin_roots(tmp_path):
    config = load_owner_config(session_toml(tmp_path, "session = true"))
    assert config.vms["s"].platform == "amd" and config.amd_roots_source == "built-in"
    assert [r.product for r in config.amd_roots] == ["naples", "rome", "milan", "genoa", "turin"]


def test_amd_roots_dir_replaces_the_builtin_roots_relative_to_the_toml(tmp_path):
    from agent.tools.sim.amd import SimAmd

    SimAmd(bits=2048, product="lab").write_roots(str(tmp_path / "r"))
    path = session_toml(tmp_path, "session = true")
    path.write_text('[platform]\namd_roots = "r"\n' + path.read_text())
    config = load_owner_config(path)
    assert [r.product for r in config.amd_roots] == ["lab"] and config.amd_roots_source == str(tmp_path / "r")


def test_pinned_platform_reads_its_pins(tmp_path):
    vm = load_owner_config(
        session_toml(tmp_path, f'session = true\nplatform = "pinned"\npdh_sha256 = ["{"ab" * 32}"]')
    ).vms["s"]
    assert vm.platform == "pinned" and vm.pdh_pins == frozenset({bytes.fromhex("ab" * 32)})


@pytest.mark.parametrize(
    "lines, words",
    [
        ('platform = "amd-ish"', "vm.s.platform must be one of amd, pinned, any"),
        ('platform = "pinned"', 'platform = "pinned" needs pdh_sha256'),
        ('platform = "pinned"\npdh_sha256 = []', 'platform = "pinned" needs pdh_sha256'),
        ('platform = "pinned"\npdh_sha256 = ["abc"]', "vm.s.pdh_sha256[0] is not valid hex"),
        ('platform = "pinned"\npdh_sha256 = ["abcd"]', "vm.s.pdh_sha256[0] must be 32 bytes"),
        ('platform = "pinned"\npdh_sha256 = [1]', "vm.s.pdh_sha256[0] must be a hex string"),
        (f'pdh_sha256 = ["{"ab" * 32}"]', 'pdh_sha256 applies only with platform = "pinned"'),
    ],
)
def test_bad_platform_keys(tmp_path, lines, words):
    assert words in one_line_error(session_toml(tmp_path, "session = true\n" + lines))


@pytest.mark.parametrize(
    "head, words",
    [
        ('[platform]\namd_roots = "nope"', "platform.amd_roots: cannot read AMD roots directory"),
        ("[platform]\namd_roots = 3", "platform.amd_roots must be a directory path"),
        ('[platform]\nroots = "x"', "platform: unknown key 'roots'"),
        ("platform = 1", "[platform] must be a table"),
    ],
)
def test_bad_platform_table(tmp_path, head, words):
    path = session_toml(tmp_path, "session = true")
    path.write_text(head + "\n" + path.read_text())
    assert words in one_line_error(path)


def test_amd_roots_with_a_damaged_ask_is_a_config_error(tmp_path):
    from agent.tools.sim.amd import SimAmd

    SimAmd(bits=2048, product="lab").write_roots(str(tmp_path / "r"))
    raw = bytearray((tmp_path / "r" / "lab-ask.cert").read_bytes())
    raw[100] ^= 1
    (tmp_path / "r" / "lab-ask.cert").write_bytes(bytes(raw))
    path = session_toml(tmp_path, "session = true")
    path.write_text('[platform]\namd_roots = "r"\n' + path.read_text())
    assert "platform.amd_roots: lab ASK is not signed by its ARK" in one_line_error(path)


# -- SEV-ES digest vs the policy's ES bit ----------------------------------------


def sevctl_firmware_dir(tmp_path, lines: str):
    from tests.sev.vectors import SEVCTL_DATA, SEVCTL_OVMF_NAME

    d = write_owner_dir(tmp_path)
    (tmp_path / "fw.fd").write_bytes((SEVCTL_DATA / SEVCTL_OVMF_NAME).read_bytes())
    text = d.toml.read_text().replace(f'digest = ["{DIGEST.hex()}", "{OTHER_DIGEST.hex()}"]', lines)
    d.toml.write_text(text.replace("gpa = 8192\n", ""))
    return d


def test_sev_es_firmware_vm_computes_sevctls_sev_es_digest(tmp_path):
    from tests.sev.vectors import SEVCTL_DIGEST_ES

    d = sevctl_firmware_dir(tmp_path, 'firmware = "fw.fd"\nsev_es = true\nvcpus = 4\nvcpu_sig = 0xa00f11')
    d.toml.write_text(d.toml.read_text().replace("policy = 1", "policy = 5"))
    assert load_owner_config(d.toml).vms["vm1"].digests == (SEVCTL_DIGEST_ES,)


@pytest.mark.parametrize(
    "policy, lines, words",
    [
        (5, 'firmware = "fw.fd"', "policy 0x5 has the SEV-ES bit 0x4, but the digest is an SEV digest"),
        (1, 'firmware = "fw.fd"\nsev_es = true\nvcpus = 4\nvcpu_sig = 0xa00f11', "policy 0x1 has none"),
        (1, f'digest = "{DIGEST.hex()}"\nsev_es = true', "policy 0x1 has none"),
        (5, f'digest = "{DIGEST.hex()}"\nsev_es = false', "policy 0x5 has the SEV-ES bit"),
        (5, 'firmware = "fw.fd"\nsev_es = true\nvcpus = 4', "needs 'vcpu_sig'"),
        (5, f'digest = "{DIGEST.hex()}"\nsev_es = true\nvcpus = 4', "vcpus only applies with firmware"),
        (1, 'firmware = "fw.fd"\nsev_es = "yes"', "sev_es must be true or false"),
    ],
)
def test_sev_es_digest_and_policy_must_agree(tmp_path, policy, lines, words):
    d = sevctl_firmware_dir(tmp_path, lines)
    d.toml.write_text(d.toml.read_text().replace("policy = 1", f"policy = {policy}"))
    assert words in one_line_error(d.toml)


def test_digest_vm_without_sev_es_declared_is_not_checked(tmp_path):
    d = write_owner_dir(tmp_path)
    d.toml.write_text(d.toml.read_text().replace("policy = 1", "policy = 5"))
    assert load_owner_config(d.toml).vms["vm1"].policy == 5


def two_vms(owner_dir, tik2: bytes, tek2: bytes):
    """owner.toml with vm2 next to vm1, vm2's keys as given."""
    (owner_dir.root / "vm2_tik.bin").write_bytes(tik2)
    (owner_dir.root / "vm2_tek.bin").write_bytes(tek2)
    text = owner_dir.toml.read_text()
    second = (
        text.replace("[vm.vm1]", "[vm.vm2]")
        .replace("vm.vm1.secret", "vm.vm2.secret")
        .replace("keys/vm1_tik.bin", "vm2_tik.bin")
        .replace("keys/vm1_tek.bin", "vm2_tek.bin")
    )
    owner_dir.toml.write_text(text + second)
    return owner_dir.toml


@pytest.mark.parametrize(
    "tik2, tek2, words",
    [
        (TIK, bytes(range(200, 216)), "vm.vm2 TIK is the same key as vm.vm1 TIK"),
        (bytes(range(200, 216)), TEK, "vm.vm2 TEK is the same key as vm.vm1 TEK"),
        (TEK, bytes(range(200, 216)), "vm.vm2 TIK is the same key as vm.vm1 TEK"),
    ],
    ids=["tik", "tek", "tik-is-the-other-tek"],
)
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


# -- [owner] state_key (the owner's database, agent.owner.store) ------------------------------


def test_state_key_file_is_relative_to_the_toml(owner_dir):
    owner_dir.toml.write_text('[owner]\nstate_key = "file:keys/state.key"\n' + owner_dir.toml.read_text())
    assert load_owner_config(owner_dir.toml).state_key == f"file:{owner_dir.root / 'keys' / 'state.key'}"


def test_state_key_keyring_and_absent(owner_dir):
    assert load_owner_config(owner_dir.toml).state_key is None
    owner_dir.toml.write_text('[owner]\nstate_key = "keyring:owner-state"\n' + owner_dir.toml.read_text())
    assert load_owner_config(owner_dir.toml).state_key == "keyring:owner-state"


@pytest.mark.parametrize(
    "table, words",
    [
        ("state_key = 3", 'must be "file:PATH" or "keyring:DESC"'),
        ('state_key = "libvirt:x"', 'must be "file:PATH" or "keyring:DESC"'),
        ('state_key = "file:"', 'must be "file:PATH" or "keyring:DESC"'),
        ('db = "x"', "[owner]: unknown key 'db'"),
    ],
)
def test_bad_owner_table_is_one_line(owner_dir, table, words):
    owner_dir.toml.write_text(f"[owner]\n{table}\n" + owner_dir.toml.read_text())
    with pytest.raises(UsageError) as err:
        load_owner_config(owner_dir.toml)
    assert words in str(err.value)
