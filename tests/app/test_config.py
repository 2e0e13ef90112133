"""Configuration: TOML plus one flag per key, every mistake one line, exit 2."""

import pytest

from agent.app.config import load_config, unix_path
from agent.common.errors import UsageError
from tests.fifo import call_with_fifo_deadline


def write(tmp_path, text):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return str(p)


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.vm_name == "vm" and cfg.sev_timeout_s == 30.0 and cfg.sev_on_refusal == "quit"
    assert cfg.sev_enabled is False


def test_file_values_and_relative_paths(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            '[vm]\nname = "vm1"\nrun_dir = "run"\n'
            '[sev]\nowner_url = "http://127.0.0.1:8443"\ntimeout_s = 5\n'
            '[vtpm]\nkey = "file:tpm.key"\n',
        )
    )
    assert cfg.vm_run_dir == str(tmp_path / "run")
    assert cfg.sev_timeout_s == 5.0 and cfg.sev_enabled
    assert cfg.vtpm_key == f"file:{tmp_path / 'tpm.key'}"


def test_flags_override_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "[sev]\ntimeout_s = 5\n"), {"sev_timeout_s": "7", "sev_on_refusal": "pause"})
    assert cfg.sev_timeout_s == 7.0 and cfg.sev_on_refusal == "pause"


@pytest.mark.parametrize(
    "text, words",
    [
        ("[nope]\n", "unknown section [nope]"),
        ("[sev]\nbogus = 1\n", "unknown key [sev] bogus"),
        ('[sev]\ntimeout_s = "x"\n', "[sev] timeout_s must be a number"),
        ("[sev]\ntimeout_s = -1\n", "at least"),
        ('[sev]\non_refusal = "resume"\n', "must be one of quit, pause"),
        ('[sev]\nowner_url = "ftp://x"\n', "http:// URL"),
        ('[vm]\nname = "a b"\n', "[vm] name"),
        ('[vtpm]\nkey = "/etc/key"\n', "file:PATH"),
        ("[migration]\npsk_length = 4\n", "at least 16"),
        ("[control]\ngid = 99999999999\n", "[control] gid must be at most 4294967294"),
        ('[sev]\nowner_url = "https://owner:8443"\n', "scheme 'https' is not supported"),
        ('[sev]\nowner_url = "http://owner:99999"\n', "invalid port (must be 1..65535)"),
        ('[sev]\nowner_url = "http://owner:0"\n', "invalid port"),
        ('[sev]\nowner_url = "http://user:pw@owner"\n', "must not hold a user name"),
        ("[vm\n", "invalid TOML"),
        ("vm = 3\n", "[vm] must be a table"),
    ],
)
def test_bad_config_is_a_one_line_usage_error(tmp_path, text, words):
    with pytest.raises(UsageError) as err:
        load_config(write(tmp_path, text))
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read config"):
        load_config(str(tmp_path / "none.toml"))


def test_bad_flag_value_names_the_flag():
    with pytest.raises(UsageError, match="--sev-timeout-s must be a number"):
        load_config(None, {"sev_timeout_s": "soon"})


@pytest.mark.parametrize("spec", ["/tmp/x", "unix:", "tcp:1.2.3.4:5"])
def test_socket_spec_must_be_unix_path(spec):
    with pytest.raises(UsageError, match="--qmp must be unix:PATH"):
        unix_path(spec, "--qmp")


def test_control_ref_dirs_from_the_file_are_real_paths_relative_to_it(tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    cfg = load_config(write(tmp_path, '[control]\ngid = 4242\nref_dirs = ["refs", "alias"]\n'))
    assert cfg.control_ref_dirs == (str(tmp_path / "refs"), str(tmp_path / "real"))
    assert load_config(None).control_ref_dirs == ()  # none by default


def test_control_ref_dir_flag_repeats_and_overrides_the_file(tmp_path):
    from argparse import ArgumentParser

    from agent.app.config import add_config_flags, config_from_args

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    p = ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(
        [
            "--config",
            write(tmp_path, '[control]\nref_dirs = ["a"]\n'),
            "--control-ref-dir",
            str(tmp_path / "b"),
            "--control-ref-dirs",
            str(tmp_path / "a"),
        ]
    )
    assert config_from_args(args).control_ref_dirs == (str(tmp_path / "b"), str(tmp_path / "a"))


@pytest.mark.parametrize(
    "value, words",
    [
        ('"refs"', "must be a list of non-empty strings"),
        ('[""]', "must be a list of non-empty strings"),
        ("[1]", "must be a list of non-empty strings"),
        ('["missing"]', "is not a directory"),
        ('["/"]', "must not include /"),
    ],
)
def test_bad_control_ref_dirs_are_one_line(tmp_path, value, words):
    with pytest.raises(UsageError) as err:
        load_config(write(tmp_path, f"[control]\nref_dirs = {value}\n"))
    assert words in str(err.value) and "[control] ref_dirs" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8443", "http://owner", "http://[::1]:1/base", "HTTP://owner.example:65535/x?y=1"]
)
def test_owner_urls_the_client_can_use_are_accepted(url):
    assert load_config(None, {"sev_owner_url": url}).sev_owner_url == (url,)


def test_owner_url_takes_one_url_or_a_list(tmp_path):
    one = load_config(write(tmp_path, '[sev]\nowner_url = "http://a:1"\n'))
    assert one.sev_owner_url == ("http://a:1",) and one.sev_enabled
    many = load_config(write(tmp_path, '[sev]\nowner_url = ["http://a:1", "http://b:2/base"]\n'))
    assert many.sev_owner_url == ("http://a:1", "http://b:2/base")


def test_owner_url_flag_repeats_and_overrides_the_file(tmp_path):
    cfg = load_config(
        write(tmp_path, '[sev]\nowner_url = "http://a:1"\n'), {"sev_owner_url": ["http://b:2", "http://c:3"]}
    )
    assert cfg.sev_owner_url == ("http://b:2", "http://c:3")


@pytest.mark.parametrize(
    "value, words",
    [
        ("[]", "[sev] owner_url must name at least one http:// URL"),
        ('["http://a:1", "ftp://b"]', "[sev] owner_url item 2 must be an http:// URL"),
        ('["http://a:1", 3]', "[sev] owner_url must be a non-empty string or a list of them"),
        ('""', "[sev] owner_url must be a non-empty string or a list of them"),
    ],
)
def test_bad_owner_url_lists_are_one_line(tmp_path, value, words):
    with pytest.raises(UsageError) as err:
        load_config(write(tmp_path, f"[sev]\nowner_url = {value}\n"))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_password_in_an_owner_url_list_is_not_echoed(tmp_path):
    with pytest.raises(UsageError) as err:
        load_config(write(tmp_path, '[sev]\nowner_url = ["http://a:1", "http://u:hunter2@b"]\n'))
    assert "item 2 must not hold a user name or password" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_gid_flag_out_of_range_is_one_line():
    with pytest.raises(UsageError, match="gid must be at most 4294967294"):
        load_config(None, {"control_gid": "99999999999"})


# /dev/zero is tested in a subprocess with a memory limit (tests/cli/test_run.py):
# a regression here would fill this machine's memory.
@pytest.mark.parametrize("kind", ["fifo", "directory", "huge"])
def test_config_must_be_a_small_regular_file(tmp_path, kind):
    import os

    path = tmp_path / "agent.toml"
    if kind == "fifo":
        os.mkfifo(path)  # open() alone would wait for a writer
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"#" * (2 << 20))
    err = call_with_fifo_deadline(path, lambda: load_config(str(path)))
    assert isinstance(err, UsageError), err
    words = {"fifo": "is not a regular file", "directory": "is a directory", "huge": "is larger than 1048576 bytes"}[
        kind
    ]
    assert words in str(err) and "\n" not in str(err)


def test_config_has_one_typed_field_per_schema_key():
    import dataclasses

    from agent.app.config import KEYS, Config

    names = {f.name for f in dataclasses.fields(Config)} - {"sections_present", "source"}
    assert names == {f"{section}_{name}" for section, name in KEYS}


def test_config_is_frozen_and_get_reads_the_same_value():
    import dataclasses

    cfg = load_config(None, {"sev_timeout_s": "5"})
    assert cfg.get("sev", "timeout_s") == cfg.sev_timeout_s == 5.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sev_timeout_s = 1.0  # type: ignore[misc]
    with pytest.raises(KeyError):
        cfg.get("sev", "nonexistent")


def test_mode_choices_are_the_literal_types_of_the_flows():
    from typing import get_args

    from agent.app.config import KEYS
    from agent.core.modes import MasterKeyMode, OnRefusal

    assert KEYS[("sev", "on_refusal")].choices == get_args(OnRefusal)
    assert KEYS[("secrets", "master_key")].choices == get_args(MasterKeyMode)
