"""The run_dir: ours alone, 0700, and swept of stale keys at start."""

import os

import pytest

from agent.errors import UsageError
from agent.io.rundir import make_key_dir, prepare_run_dir, sweep_stale_keys, write_key_file


def test_created_0700(tmp_path):
    path = prepare_run_dir(str(tmp_path / "run"))
    assert oct(os.stat(path).st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o777])
def test_refused_when_others_can_enter(tmp_path, mode):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UsageError, match="expected 0700"):
        prepare_run_dir(str(d))


def test_setgid_bit_alone_is_accepted(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o2700)
    prepare_run_dir(str(d))


def test_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(tmp_path / "real")
    with pytest.raises(UsageError, match="symlink"):
        prepare_run_dir(str(tmp_path / "run"))


def test_key_files_are_0600_in_0700_dirs_and_never_reused(tmp_path):
    run = prepare_run_dir(str(tmp_path / "run"))
    d = make_key_dir(run, "tls")
    path = write_key_file(d, "keys.psk", b"qemu:00")
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        write_key_file(d, "keys.psk", b"again")


def test_sweep_removes_key_dirs_and_any_keys_psk_but_nothing_else(tmp_path):
    run = prepare_run_dir(str(tmp_path / "run"))
    make_key_dir(run, "tls")
    os.makedirs(os.path.join(run, "other", "deep"))
    open(os.path.join(run, "keys.psk"), "w").close()
    open(os.path.join(run, "other", "deep", "keys.psk"), "w").close()
    open(os.path.join(run, "other", "keep.txt"), "w").close()
    removed = sweep_stale_keys(run)
    assert len(removed) == 3
    assert sorted(os.listdir(run)) == ["other"]
    assert sorted(os.listdir(os.path.join(run, "other"))) == ["deep", "keep.txt"]
