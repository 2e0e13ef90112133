"""The run_dir: ours alone, 0700, and swept of stale keys at start."""

import os
import subprocess
import sys

import pytest

from agent.common.errors import UsageError
from agent.io.rundir import (
    lock_run_dir,
    make_key_dir,
    prepare_run_dir,
    set_run_dir_group,
    sweep_stale_keys,
    write_key_file,
)


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


def test_0710_left_for_the_control_group_is_accepted(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o710)
    prepare_run_dir(str(d))


def test_second_lock_on_a_run_dir_is_refused_with_one_line(tmp_path):
    run = prepare_run_dir(str(tmp_path / "run"))
    first = lock_run_dir(run)
    try:
        with pytest.raises(UsageError, match="in use by another agent") as info:
            lock_run_dir(run)
        assert "\n" not in str(info.value)
    finally:
        first.release()
    lock_run_dir(run).release()  # free again once the first let go
    assert os.listdir(run) == []  # a lock on the directory: no lock file left behind


def test_run_dir_lock_is_held_against_another_process_and_not_inherited(tmp_path):
    run = prepare_run_dir(str(tmp_path / "run"))
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n    print('locked')\nelse:\n    print('free')\n"
    )
    lock = lock_run_dir(run)
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe, run], capture_output=True, text=True, timeout=30, close_fds=False
        )
        assert out.stdout.strip() == "locked"
        assert os.get_inheritable(lock.fd) is False  # QEMU and swtpm do not keep it
    finally:
        lock.release()


def test_group_access_is_enter_only_and_key_dirs_stay_private(tmp_path):
    run = prepare_run_dir(str(tmp_path / "run"))
    lock = lock_run_dir(run)
    try:
        gid = os.getgid() if os.geteuid() != 0 else 4242
        set_run_dir_group(lock, gid)
        st = os.stat(run)
        assert (oct(st.st_mode & 0o777), st.st_gid) == ("0o710", gid)
        d = make_key_dir(run, "tls")
        assert oct(os.stat(d).st_mode & 0o777) == "0o700"
        prepare_run_dir(run)  # a restart finds it as it left it
        set_run_dir_group(lock, None)  # configured without a group again: private again
        assert oct(os.stat(run).st_mode & 0o777) == "0o700"
    finally:
        lock.release()


def test_remove_key_dir_removes_its_files_and_a_nested_dir_without_following_links(tmp_path):
    from agent.io.rundir import make_key_dir, remove_key_dir

    outside = tmp_path / "outside"
    outside.write_text("stays")
    flat = make_key_dir(str(tmp_path), "flat")
    (tmp_path / flat / "keys.psk").write_bytes(b"x")
    (tmp_path / flat / "link").symlink_to(outside)
    nested = make_key_dir(str(tmp_path), "nested")
    os.mkdir(os.path.join(nested, "sub"))
    (tmp_path / nested / "sub" / "f").write_bytes(b"y")
    remove_key_dir(flat)
    remove_key_dir(nested)
    remove_key_dir(str(tmp_path / "gone"))  # quietly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]
    assert outside.read_text() == "stays"
