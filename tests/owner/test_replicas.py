"""`keyagent owner serve --db`: replicas on one database, SIGKILL, restart; `owner audit`.

Each test runs on SQLite (one file shared by two processes) and on a real
PostgreSQL (the throwaway cluster of tests/owner/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import defaultdict
from datetime import UTC, datetime

import pytest

from tests.executable import KEYAGENT

from .conftest import PASSPHRASE, TEK, TIK
from .ownerstate import (
    audit_lines,
    flood,
    opened,
    secret_request,
    session_keys,
    session_request,
    start_replica,
    write_state_owner_dir,
)
from .rawhttp import post_raw

STATE_KEY = bytes(range(32, 64))


@pytest.fixture
def owner(tmp_path):
    return write_state_owner_dir(tmp_path, STATE_KEY)


@pytest.fixture
def replicas(tmp_path):
    """Starts owners; afterwards the leak scan: every owner's log, argv and the SQLite files.

    Registered: the offline TIK/TEK, the passphrase, the state key; a test
    adds what it learns (a session's keys) with ``replicas.scan.secret``.
    """
    from tests.leakscan import ArgvWatcher, LeakScan

    started = []
    scan = LeakScan()
    for name, value in (("TIK", TIK), ("TEK", TEK), ("passphrase", PASSPHRASE), ("state key", STATE_KEY)):
        scan.secret(name, value)

    def start(toml, db):
        r = start_replica(KEYAGENT, toml, db)
        started.append(r)
        return r

    start.scan = scan
    with ArgvWatcher() as argv:
        scan.argv = argv
        try:
            yield start
        finally:
            for r in started:
                r.kill()
    for r in started:
        scan.file(str(r.log))
    for path in tmp_path.glob("owner.db*"):
        if not path.name.endswith(".key"):
            scan.file(str(path))
    scan.check()


def test_two_replicas_answer_50_identical_requests_with_one_release(owner, db, replicas):
    a, b = replicas(owner.toml, db), replicas(owner.toml, db)
    request = secret_request("vm1", TIK, b"i" * 16)
    answers = asyncio.run(flood([a.url, b.url], "/v1/secret", [request] * 50))
    assert [status for status, _ in answers] == [200] * 50
    assert len({raw for _, raw in answers}) == 1  # every 200 carries the same bytes
    assert opened(request, answers[0][1], TIK, TEK)[0][1] == PASSPHRASE
    rows = audit_lines(KEYAGENT, db, "--vm", "vm1")
    assert sorted(r["decision"] for r in rows) == ["released"] + ["resent"] * 49
    assert len({r["replica"] for r in rows}) == 2  # both replicas answered
    assert {r["measurement_sha256"] for r in rows} == {rows[0]["measurement_sha256"]}


def test_a_replica_killed_mid_flood_releases_nothing_twice_and_loses_nothing(owner, db, replicas):
    a, b = replicas(owner.toml, db), replicas(owner.toml, db)
    launches = [secret_request("vm1", TIK, i.to_bytes(16, "big")) for i in range(150)]
    answered: dict[int, set[bytes]] = defaultdict(set)
    from_a = 0

    async def one(i: int, body: dict, url: str) -> tuple[str, int]:
        nonlocal from_a
        try:
            status, raw = await post_raw(url + "/v1/secret", body, timeout=60)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            return url, 0
        if status == 200:
            answered[i].add(raw)
        if url == a.url:
            from_a += 1
            if from_a == 30:
                a.kill()  # SIGKILL, with requests to it still in flight
        return url, status

    async def run() -> list[tuple[str, int]]:
        # every launch asked at both replicas at once
        jobs = [one(i, body, url) for i, body in enumerate(launches) for url in (a.url, b.url)]
        return list(await asyncio.gather(*jobs))

    results = asyncio.run(run())
    assert a.proc.poll() is not None
    assert any(url == a.url and status == 0 for url, status in results), "the kill came after the flood"
    # nothing released twice: each launch that got a 200 got one set of bytes, wherever it asked
    assert all(len(raws) == 1 for raws in answered.values())
    # nothing lost: every answer given is in the database; the survivor gives the same bytes again
    again = asyncio.run(flood([b.url], "/v1/secret", launches))
    assert [status for status, _ in again] == [200] * len(launches)
    for i, (_, raw) in enumerate(again):
        if i in answered:
            assert answered[i] == {raw}
    released = [r for r in audit_lines(KEYAGENT, db, "--vm", "vm1") if r["decision"] == "released"]
    assert len(released) == len(launches) == len({r["measurement_sha256"] for r in released})


def test_a_restarted_owner_keeps_its_word(owner, db, replicas):
    first = replicas(owner.toml, db)

    async def before() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        released = await post_raw(first.url + "/v1/secret", secret_request("vm1", TIK, b"k" * 16))
        session = await post_raw(first.url + "/v1/session", session_request())
        return released, session

    (status, raw), (s_status, s_raw) = asyncio.run(before())
    assert (status, s_status) == (200, 200)
    tik, tek = session_keys(json.loads(s_raw))
    replicas.scan.secret("session TIK", tik)
    replicas.scan.secret("session TEK", tek)
    first.kill()

    second = replicas(owner.toml, db)
    launch = secret_request("vm2", tik, b"l" * 16)

    async def after() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        same = await post_raw(second.url + "/v1/secret", secret_request("vm1", TIK, b"k" * 16))
        return same, await post_raw(second.url + "/v1/secret", launch)

    same, pending = asyncio.run(after())
    assert same == (200, raw)  # a released blob: the same answer, byte for byte
    assert pending[0] == 200 and opened(launch, pending[1], tik, tek)[0][1] == PASSPHRASE
    decisions = [r["decision"] for r in audit_lines(KEYAGENT, db)]
    assert decisions == ["released", "session", "resent", "released"]


# -- owner audit -----------------------------------------------------------------------------


def test_owner_audit_prints_json_lines_filtered_by_vm_and_since(owner, db, replicas):
    r = replicas(owner.toml, db)

    async def talk() -> None:
        await post_raw(r.url + "/v1/secret", secret_request("vm1", TIK, b"q" * 16))
        await post_raw(r.url + "/v1/secret", secret_request("vm1", TIK, b"q" * 16))
        await post_raw(r.url + "/v1/secret", dict(secret_request("vm1", TIK, b"w" * 16), policy=7))
        await post_raw(r.url + "/v1/secret", secret_request("nope", TIK, b"w" * 16))

    asyncio.run(talk())
    rows = audit_lines(KEYAGENT, db)
    assert [(x["vm"], x["decision"]) for x in rows] == [
        ("vm1", "released"),
        ("vm1", "resent"),
        ("vm1", "refused"),
        ("nope", "refused"),
    ]
    for x in rows:
        assert {"time", "vm", "decision", "reason", "measurement_sha256"} <= set(x)
        datetime.fromisoformat(x["time"])
    assert rows[2]["reason"].startswith("policy mismatch") and rows[2]["status"] == 403
    assert rows[0]["measurement_sha256"] == rows[1]["measurement_sha256"] != rows[2]["measurement_sha256"]
    assert [x["vm"] for x in audit_lines(KEYAGENT, db, "--vm", "nope")] == ["nope"]
    future = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1).isoformat()
    assert audit_lines(KEYAGENT, db, "--since", future) == []
    assert len(audit_lines(KEYAGENT, db, "--since", rows[1]["time"])) == 3
    text = json.dumps(rows)
    for secret in (TIK, TEK, PASSPHRASE):
        assert secret.hex() not in text and secret.decode(errors="replace") not in text


@pytest.mark.parametrize(
    "args, words",
    [
        (["--db", "mysql://x"], "must be sqlite:///PATH or postgresql://"),
        (["--db", "sqlite:///nowhere/owner.db"], "no owner database at nowhere/owner.db"),
        (["--db", "sqlite:///owner.db", "--since", "yesterday"], "--since must be an ISO 8601 time"),
    ],
)
def test_owner_audit_bad_input_is_one_line_exit_2(tmp_path, args, words):
    out = subprocess.run([*KEYAGENT, "owner", "audit", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_serve_on_postgresql_without_a_state_key_exits_2_and_creates_nothing(tmp_path):
    write_state_owner_dir(tmp_path)  # no [owner] state_key
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run(
        [*KEYAGENT, "owner", "serve", "--config", str(tmp_path / "owner.toml"), "--listen", "127.0.0.1:0"]
        + ["--db", "postgresql://owner@/owner?host=/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "needs [owner] state_key" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
