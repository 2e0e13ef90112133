"""[snp] in the agent's configuration and the QEMU arguments it makes (agent.app.snp_launch)."""

from __future__ import annotations

import base64
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.app.config import load_config
from agent.app.snp_launch import SNP_OBJECT_ID, refuse_own_sev_objects, snp_launch_from_config, snp_qemu_args
from agent.common.errors import UsageError
from agent.sev.snp_idblock import IdBlock, sign_id_block
from tests.executable import KEYAGENT

DIGEST = b"\x11" * 48


def block(policy=0x30000, digest=DIGEST):
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(2)]
    return sign_id_block(IdBlock(digest, policy), *keys)


def config(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(str(path))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_snp_object_carries_every_property_in_qemu_91_syntax(tmp_path):
    signed = block()
    cfg = config(
        tmp_path,
        f'[snp]\npolicy = 0x30000\nid_block = "{b64(signed.id_block)}"\n'
        f'id_auth = "{b64(signed.id_auth)}"\nhost_data = "{"ab" * 32}"\n'
        "author_key_enabled = true\ncbitpos = 51\nreduced_phys_bits = 1\n",
    )
    assert cfg.snp_enabled and not cfg.sev_enabled
    args = snp_qemu_args(snp_launch_from_config(cfg))
    assert args[0] == "-object" and args[2:] == ["-machine", f"confidential-guest-support={SNP_OBJECT_ID}"]
    props = args[1].split(",")
    assert props[:3] == ["sev-snp-guest", f"id={SNP_OBJECT_ID}", "policy=0x30000"]
    assert {
        "cbitpos=51",
        "reduced-phys-bits=1",
        f"id-block={b64(signed.id_block)}",
        f"id-auth={b64(signed.id_auth)}",
        "author-key-enabled=on",
        f"host-data={b64(bytes.fromhex('ab' * 32))}",
    } <= set(props)


def test_id_block_and_auth_from_files(tmp_path):
    signed = block()
    (tmp_path / "idb.b64").write_text(b64(signed.id_block) + "\n")
    (tmp_path / "ida.b64").write_text(b64(signed.id_auth) + "\n")
    cfg = config(tmp_path, '[snp]\nid_block_file = "idb.b64"\nid_auth_file = "ida.b64"\n')
    launch = snp_launch_from_config(cfg)
    assert launch.id_block == signed.id_block and launch.id_auth == signed.id_auth


def test_plain_snp_section_uses_qemus_default_policy(tmp_path):
    args = snp_qemu_args(snp_launch_from_config(config(tmp_path, "[snp]\n")))
    assert args[1] == f"sev-snp-guest,id={SNP_OBJECT_ID},policy=0x30000,reduced-phys-bits=1"


@pytest.mark.parametrize(
    "text, words",
    [
        ("[snp]\npolicy = 0x10000\n", "lacks bit 17"),
        ('[snp]\nid_block = "AAAA"\n', "must be 96 bytes"),
        ('[snp]\nhost_data = "abcd"\n', "must be 32 bytes"),
        ('[snp]\nauthor_key_enabled = "yes"\n', "must be true or false"),
        ('[snp]\n[sev]\nowner_url = "http://127.0.0.1:1"\n', "different launches"),
    ],
)
def test_bad_snp_config_is_a_usage_error(tmp_path, text, words):
    with pytest.raises(UsageError, match=words):
        config(tmp_path, text)


def test_id_block_needs_its_auth_and_its_policy(tmp_path):
    signed = block(policy=0x30000)
    with pytest.raises(UsageError, match="go together"):
        snp_launch_from_config(config(tmp_path, f'[snp]\nid_block = "{b64(signed.id_block)}"\n'))
    with pytest.raises(UsageError, match="pins policy 0x30000"):
        snp_launch_from_config(
            config(
                tmp_path,
                f'[snp]\npolicy = 0x70000\nid_block = "{b64(signed.id_block)}"\nid_auth = "{b64(signed.id_auth)}"\n',
            )
        )
    with pytest.raises(UsageError, match="author_key_enabled needs"):
        snp_launch_from_config(config(tmp_path, "[snp]\nauthor_key_enabled = true\n"))


def test_id_auth_of_another_block_is_a_usage_error(tmp_path):
    signed, other = block(), block(digest=b"\x22" * 48)
    with pytest.raises(UsageError, match="does not verify"):
        snp_launch_from_config(
            config(tmp_path, f'[snp]\nid_block = "{b64(signed.id_block)}"\nid_auth = "{b64(other.id_auth)}"\n')
        )


def test_a_sev_object_already_on_the_command_line_is_refused():
    with pytest.raises(UsageError, match="sev-snp-guest"):
        refuse_own_sev_objects(["qemu", "-object", "sev-snp-guest,id=x"])
    with pytest.raises(UsageError, match="confidential-guest-support"):
        refuse_own_sev_objects(["qemu", "-machine", "q35,confidential-guest-support=x"])
    refuse_own_sev_objects(["qemu", "-machine", "q35"])


def test_snp_flags_on_the_command_line_exit_2_before_anything(tmp_path):
    proc = subprocess.run(
        [*KEYAGENT, "launch", "--vm-run-dir", str(tmp_path / "run"), "--snp-policy", "0x1", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "lacks bit 17" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = subprocess.run(
        [*KEYAGENT, "launch", "--vm-run-dir", str(tmp_path / "run"), "--snp-author-key-enabled", "maybe", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "must be true or false" in proc.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--snp", "--tik", "x"], "--tik does not apply to --snp"),
        (["--sev", "--id-block", "AAAA"], "--id-block only applies with --snp"),
        (["--snp", "--snp-digest", "00"], "48 bytes"),
        (["--snp", "--policy", "0x1"], "lacks bit 17"),
    ],
)
def test_simulate_snp_bad_usage_exits_2(tmp_path, args, words):
    proc = subprocess.run(
        [*KEYAGENT, "simulate", "--qmp", f"unix:{tmp_path}/q.sock", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
