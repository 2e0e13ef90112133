"""The kernel keyring through syscalls, and secret references."""

import os

import pytest

from agent.common.errors import UsageError
from agent.common.secret import Secret
from agent.io import keyring
from agent.io.secretref import NOT_ALLOWED, UNRESTRICTED, RefAccess, resolve

KEYRING_PROBLEM = keyring.usable()
needs_keyring = pytest.mark.skipif(KEYRING_PROBLEM is not None, reason=KEYRING_PROBLEM or "")


@needs_keyring
def test_add_search_read_revoke_roundtrip():
    desc = f"keyagent-test-{os.getpid()}"
    serial = keyring.add_key(desc, b"\x00binary key\xff")
    try:
        assert keyring.search(desc) == serial
        assert bytes(keyring.read(serial)) == b"\x00binary key\xff"
        assert resolve(f"keyring:{desc}").reveal() == b"\x00binary key\xff"
    finally:
        keyring.revoke(serial)
        keyring.unlink(serial)
    with pytest.raises(OSError):
        keyring.search(desc)


@needs_keyring
def test_a_sweep_from_one_listing_removes_its_prefixs_keys_only(monkeypatch):
    base = f"keyagent-test-{os.getpid()}"
    mine = [keyring.add_key(f"{base}:vm1:{i}", b"k") for i in range(2)]
    other = keyring.add_key(f"{base}:vm10:0", b"k")
    try:
        listing = keyring.find(f"{base}:")
        calls = []
        monkeypatch.setattr(keyring, "describe", lambda serial: calls.append(serial))
        assert sorted(keyring.sweep(f"{base}:vm1:", listing=listing)) == [f"{base}:vm1:0", f"{base}:vm1:1"]
        assert calls == []  # the listing is not described again
        monkeypatch.undo()
        assert [d for _, d in keyring.find(f"{base}:")] == [f"{base}:vm10:0"]
    finally:
        for serial in [*mine, other]:
            for step in (keyring.revoke, keyring.unlink):
                try:
                    step(serial)
                except OSError:
                    pass


@needs_keyring
def test_unknown_keyring_reference_is_one_line():
    with pytest.raises(UsageError, match="keyring:keyagent-no-such-key"):
        resolve("keyring:keyagent-no-such-key")


def test_file_reference_reads_raw_bytes(tmp_path):
    p = tmp_path / "k"
    p.write_bytes(b"key\n")
    assert resolve(f"file:{p}").reveal() == b"key\n"


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda p: None, "No such file"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: p.write_bytes(b"x" * 70000), "larger than"),
    ],
)
def test_bad_key_files_are_refused(tmp_path, setup, words):
    p = tmp_path / "k"
    setup(p)
    with pytest.raises(UsageError, match=words):
        resolve(f"file:{p}")


def test_symlinked_key_file_is_refused(tmp_path):
    (tmp_path / "real").write_bytes(b"k")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UsageError):
        resolve(f"file:{tmp_path / 'link'}")


@pytest.mark.parametrize(
    "ref, words",
    [
        ("nothing", "must be file:PATH"),
        ("s3:bucket", "unknown secret reference scheme"),
        ("libvirt:not-a-uuid", "is not a UUID"),
    ],
)
def test_bad_references(ref, words):
    with pytest.raises(UsageError, match=words):
        resolve(ref)


# -- what a restricted peer (one let in by [control] gid) may name ------------

PEER_UID = 65534


@pytest.fixture
def refs(tmp_path):
    """A ref_dir holding one key file the operator put there."""
    d = tmp_path / "refs"
    d.mkdir()
    (d / "k").write_bytes(b"peer key")
    return d


def peer(refs, uid: int = PEER_UID, groups=frozenset({PEER_UID})) -> RefAccess:
    return RefAccess(unrestricted=False, uid=uid, groups=frozenset(groups), ref_dirs=(os.path.realpath(refs),))


def test_fifo_reference_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="not a regular file"):
        resolve(f"file:{tmp_path / 'fifo'}")  # without O_NONBLOCK this open never returns


async def test_slow_reference_does_not_block_the_loop_and_has_a_deadline(tmp_path, monkeypatch):
    import asyncio
    import threading

    from agent.io import secretref

    release = threading.Event()

    def stuck(ref, what, access):
        release.wait(10)
        return Secret(b"late")

    monkeypatch.setattr(secretref, "resolve", stuck)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    try:
        with pytest.raises(UsageError, match="no answer within 0.3 s"):
            await secretref.resolve_async("file:/x", "secret", UNRESTRICTED, timeout=0.3)
        assert ticks >= 10  # the loop ran meanwhile
    finally:
        release.set()
        task.cancel()


def test_restricted_peer_reads_a_key_below_a_ref_dir(refs):
    assert resolve(f"file:{refs / 'k'}", "secret", peer(refs)).reveal() == b"peer key"


def test_restricted_peer_cannot_read_outside_and_cannot_tell_what_exists(tmp_path, refs):
    outside = tmp_path / "outside.key"
    outside.write_bytes(b"not yours")
    answers = set()
    for path in (
        "/etc/shadow",
        "/proc/self/environ",
        str(outside),
        str(tmp_path / "missing"),
        f"{refs}/../outside.key",
        f"{refs}/../missing",
        "relative/k",
        str(refs),
    ):
        with pytest.raises(UsageError) as info:
            resolve(f"file:{path}", "secret", peer(refs))
        answers.add(str(info.value))
    assert answers == {NOT_ALLOWED}


def test_restricted_peer_gets_no_keyring_or_libvirt_references(refs):
    for ref in ("keyring:keyagent:vm1:master", "libvirt:0b5e6f5e-1c3a-4d2b-9a8f-1234567890ab"):
        with pytest.raises(UsageError, match=NOT_ALLOWED):
            resolve(ref, "secret", peer(refs))


def test_no_ref_dirs_means_no_file_for_a_restricted_peer(refs):
    with pytest.raises(UsageError, match=NOT_ALLOWED):
        resolve(f"file:{refs / 'k'}", "secret", RefAccess(unrestricted=False, uid=PEER_UID))


def test_restricted_peer_cannot_escape_through_a_symlink(tmp_path, refs):
    (tmp_path / "secret").write_bytes(b"not yours")
    (refs / "link").symlink_to(tmp_path / "secret")
    (refs / "dirlink").symlink_to(tmp_path)
    (refs / "dangling").symlink_to(tmp_path / "missing")
    (refs / "sub").mkdir()
    (refs / "sub" / "k").write_bytes(b"sub key")
    for name in ("link", "dirlink/secret", "dirlink/missing", "dangling"):
        with pytest.raises(UsageError, match=NOT_ALLOWED):
            resolve(f"file:{refs / name}", "secret", peer(refs))
    assert resolve(f"file:{refs / 'sub' / 'k'}", "secret", peer(refs)).reveal() == b"sub key"


def test_restricted_peer_cannot_use_a_hard_link_into_a_ref_dir(tmp_path, refs):
    (tmp_path / "secret").write_bytes(b"not yours")
    os.link(tmp_path / "secret", refs / "hard")
    with pytest.raises(UsageError, match=NOT_ALLOWED):
        resolve(f"file:{refs / 'hard'}", "secret", peer(refs))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_restricted_peer_cannot_use_another_users_private_key_in_a_ref_dir(refs):
    theirs = refs / "theirs"
    theirs.write_bytes(b"someone else's")
    os.chown(theirs, 4321, 4321)
    os.chmod(theirs, 0o600)
    with pytest.raises(UsageError, match=NOT_ALLOWED):
        resolve(f"file:{theirs}", "secret", peer(refs))
    os.chmod(theirs, 0o640)  # readable by group 4321: a member may name it
    assert resolve(f"file:{theirs}", "secret", peer(refs, groups={PEER_UID, 4321})).reveal() == b"someone else's"
    mine = refs / "mine"
    mine.write_bytes(b"the peer's own")
    os.chown(mine, PEER_UID, PEER_UID)
    os.chmod(mine, 0o600)
    assert resolve(f"file:{mine}", "secret", peer(refs)).reveal() == b"the peer's own"


def test_errors_inside_a_ref_dir_are_still_useful(refs):
    (refs / "empty").write_bytes(b"")
    with pytest.raises(UsageError, match="is empty"):
        resolve(f"file:{refs / 'empty'}", "secret", peer(refs))
    with pytest.raises(UsageError, match="No such file"):
        resolve(f"file:{refs / 'missing'}", "secret", peer(refs))


def test_reference_errors_are_one_line_and_never_echo_the_reference():
    with pytest.raises(UsageError) as info:
        resolve("00112233deadbeef")  # a key pasted where a reference belongs
    assert "00112233deadbeef" not in str(info.value)
    with pytest.raises(UsageError) as info:
        resolve("file:/no\nsuch")
    assert "\n" not in str(info.value)


async def test_stuck_reference_reads_are_bounded_and_a_late_secret_is_wiped(monkeypatch):
    import asyncio
    import threading

    from agent.io import secretref

    release = threading.Event()
    made: list[Secret] = []

    def stuck(ref, what, access):
        release.wait(10)
        made.append(Secret(b"late"))
        return made[-1]

    monkeypatch.setattr(secretref, "resolve", stuck)
    waits = [
        secretref.resolve_async("file:/x", "secret", UNRESTRICTED, timeout=0.2)
        for _ in range(secretref.MAX_PENDING_READS)
    ]
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert all("no answer within" in str(r) for r in results)
    with pytest.raises(UsageError, match="too many references still being read"):
        await secretref.resolve_async("file:/x", "secret", UNRESTRICTED, timeout=0.2)
    release.set()
    for _ in range(200):
        if secretref._pending == 0 and len(made) == secretref.MAX_PENDING_READS:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the loop runs the wipes
    assert secretref._pending == 0
    assert all(len(s) == 0 for s in made)  # wiped: nobody waited for them
