"""The owner's state in SQLite and PostgreSQL, in process: restart, races, sealing, schema, key."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat

import pytest

from agent.common.errors import UsageError
from agent.owner.config import load_owner_config
from agent.owner.service import OwnerService
from agent.owner.store import MIGRATIONS, DbUrl, open_store, parse_db_url

from .conftest import PASSPHRASE, TEK, TIK
from .ownerstate import call, opened, secret_request, session_keys, session_request, write_state_owner_dir

STATE_KEY = bytes(range(32))


@pytest.fixture
def owner(tmp_path):
    return write_state_owner_dir(tmp_path, STATE_KEY)


def service(owner, db: str) -> OwnerService:
    config = load_owner_config(owner.toml)
    return OwnerService(config, store=open_store(parse_db_url(db), config.state_key))


async def test_a_released_blob_gets_the_same_bytes_after_a_restart(owner, db):
    first = service(owner, db)
    request = secret_request("vm1", TIK, b"r" * 16)
    status, raw = await call(first, "/v1/secret", request)
    assert status == 200 and opened(request, raw, TIK, TEK)[0][1] == PASSPHRASE
    await first.store.close()

    again = service(owner, db)
    assert await call(again, "/v1/secret", request) == (200, raw)
    rows = await again.store.audit_rows("vm1")
    assert [r.decision for r in rows] == ["released", "resent"]
    await again.store.close()


async def test_a_session_made_before_a_restart_still_verifies_its_launch(owner, db):
    first = service(owner, db)
    status, raw = await call(first, "/v1/session", session_request())
    assert status == 200
    tik, tek = session_keys(json.loads(raw))
    await first.store.close()

    again = service(owner, db)
    request = secret_request("vm2", tik, b"s" * 16)
    status, raw = await call(again, "/v1/secret", request)
    assert status == 200 and opened(request, raw, tik, tek)[0][1] == PASSPHRASE
    # used up: another launch with that session's keys has nothing to verify against
    other = await call(again, "/v1/secret", secret_request("vm2", tik, b"t" * 16))
    assert other[0] == 409 and b"POST /v1/session first" in other[1]
    # and the same launch again is its same answer
    assert await call(again, "/v1/secret", request) == (200, raw)
    await again.store.close()


async def test_two_stores_racing_on_one_blob_release_it_once(owner, db):
    replicas = [service(owner, db), service(owner, db)]
    request = secret_request("vm1", TIK, b"x" * 16)
    answers = await asyncio.gather(*(call(replicas[i % 2], "/v1/secret", request) for i in range(50)))
    assert {a[0] for a in answers} == {200} and len({a[1] for a in answers}) == 1
    rows = await replicas[0].store.audit_rows("vm1")
    assert sorted(r.decision for r in rows) == ["released"] + ["resent"] * 49
    for r in replicas:
        await r.store.close()


async def test_one_session_releases_one_launch_even_when_two_race(owner, db):
    replicas = [service(owner, db), service(owner, db)]
    status, raw = await call(replicas[0], "/v1/session", session_request())
    tik, _ = session_keys(json.loads(raw))
    # two launches (two MNONCEs) made with the same session files: one of them gets the secret
    launches = [secret_request("vm2", tik, bytes([i]) * 16) for i in range(6)]
    answers = await asyncio.gather(*(call(replicas[i % 2], "/v1/secret", b) for i, b in enumerate(launches)))
    assert sorted(a[0] for a in answers) == [200] + [409] * 5
    for r in replicas:
        await r.store.close()


def _forms(raw: bytes) -> list[bytes]:
    import base64

    return [raw, raw.hex().encode(), base64.b64encode(raw)]


async def test_the_database_holds_no_key_or_secret_in_clear(owner, db, pg_dump_or_file):
    owner_service = service(owner, db)
    status, raw = await call(owner_service, "/v1/session", session_request())
    tik, tek = session_keys(json.loads(raw))
    request = secret_request("vm1", TIK, b"c" * 16)
    status, answer = await call(owner_service, "/v1/secret", request)
    assert status == 200
    await owner_service.store.close()
    import base64

    wrapped = base64.b64decode(json.loads(answer)["secret"])
    dump = pg_dump_or_file(db)
    for secret in (tik, tek, TIK, TEK, PASSPHRASE, wrapped, STATE_KEY):
        for form in _forms(secret):
            assert form not in dump


@pytest.fixture
def pg_dump_or_file(tmp_path):
    """Every byte the database holds: the SQLite files, or every row of every owner table."""

    def dump(db: str) -> bytes:
        url = parse_db_url(db)
        if url.kind == "sqlite":
            return b"".join(p.read_bytes() for p in tmp_path.glob("owner.db*") if not p.name.endswith(".key"))
        import psycopg

        out = b""
        with psycopg.connect(url.dsn) as conn:
            for table in ("owner_meta", "owner_releases", "owner_sessions", "owner_audit"):
                for row in conn.execute(f"SELECT * FROM {table}").fetchall():
                    out += b"|".join(bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode() for v in row)
        return out

    return dump


async def test_a_sealed_secret_moved_to_another_row_does_not_open(owner, tmp_path):
    db = f"sqlite:///{tmp_path / 'owner.db'}"
    owner_service = service(owner, db)
    a, b = secret_request("vm1", TIK, b"a" * 16), secret_request("vm1", TIK, b"b" * 16)
    assert (await call(owner_service, "/v1/secret", a))[0] == 200
    assert (await call(owner_service, "/v1/secret", b))[0] == 200
    await owner_service.store.close()
    with sqlite3.connect(tmp_path / "owner.db") as conn:
        sealed = [r[0] for r in conn.execute("SELECT secret_sealed FROM owner_releases ORDER BY mnonce")]
        conn.execute("UPDATE owner_releases SET secret_sealed = ? WHERE mnonce = ?", (sealed[1], b"a" * 16))
    again = service(owner, db)
    status, raw = await call(again, "/v1/secret", a)
    assert status == 503 and b"owner state unavailable" in raw
    await again.store.close()


async def test_a_store_that_does_not_answer_gets_503_and_releases_nothing(owner, tmp_path):
    db = f"sqlite:///{tmp_path / 'owner.db'}"
    config = load_owner_config(owner.toml)
    store = open_store(parse_db_url(db), config.state_key, timeout=0.5)
    owner_service = OwnerService(config, store=store)
    blocker = sqlite3.connect(tmp_path / "owner.db", isolation_level=None, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        status, raw = await call(owner_service, "/v1/secret", secret_request("vm1", TIK, b"d" * 16))
        assert status == 503 and b"packet_header" not in raw
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await asyncio.sleep(0.1)
    await store.close()
    with sqlite3.connect(tmp_path / "owner.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM owner_releases").fetchone()[0] == 0


# -- schema and state key ----------------------------------------------------------------------


def test_the_schema_is_recorded_and_a_newer_one_is_refused(owner, tmp_path):
    db = f"sqlite:///{tmp_path / 'owner.db'}"
    config = load_owner_config(owner.toml)
    open_store(parse_db_url(db), config.state_key)
    open_store(parse_db_url(db), config.state_key)  # a second start changes nothing
    with sqlite3.connect(tmp_path / "owner.db") as conn:
        versions = conn.execute("SELECT version, name FROM keyagent_schema ORDER BY version").fetchall()
        assert versions == [(i + 1, m.name) for i, m in enumerate(MIGRATIONS)]
        conn.execute("INSERT INTO keyagent_schema VALUES (?, 'from the future', 0)", (len(MIGRATIONS) + 1,))
    with pytest.raises(UsageError, match="newer than this keyagent knows"):
        open_store(parse_db_url(db), config.state_key)


def test_without_a_state_key_sqlite_makes_one_beside_the_database(tmp_path):
    write_state_owner_dir(tmp_path)  # no [owner] state_key
    db = tmp_path / "owner.db"
    open_store(DbUrl("sqlite", path=str(db)), None)
    key = tmp_path / "owner.db.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    before = key.read_bytes()
    open_store(DbUrl("sqlite", path=str(db)), None)  # read, not made again
    assert key.read_bytes() == before
    key.unlink()
    with pytest.raises(UsageError, match="owner.db.key, which is missing"):
        open_store(DbUrl("sqlite", path=str(db)), None)
    assert not key.exists()


@pytest.mark.parametrize("db_kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_another_state_key_does_not_open_the_database(tmp_path, db_kind, request):
    db = f"sqlite:///{tmp_path / 'owner.db'}" if db_kind == "sqlite" else request.getfixturevalue("pg_url")
    (tmp_path / "a.key").write_bytes(bytes(32))
    (tmp_path / "b.key").write_bytes(bytes([1]) * 32)
    open_store(parse_db_url(db), f"file:{tmp_path / 'a.key'}")
    with pytest.raises(UsageError, match="does not open this database"):
        open_store(parse_db_url(db), f"file:{tmp_path / 'b.key'}")


@pytest.mark.parametrize(
    "text, words",
    [
        ("mysql://x", "must be sqlite:///PATH or postgresql://"),
        ("sqlite:///", "needs a file name"),
        ("owner.db", "must be sqlite:///PATH"),
    ],
)
def test_bad_db_urls_are_one_line_usage_errors(text, words):
    with pytest.raises(UsageError, match=words):
        parse_db_url(text)


def test_a_postgresql_url_is_shown_without_its_password():
    url = parse_db_url("postgresql://owner:hunter2@db.example:5432/keys?sslmode=require")
    assert url.shown() == "postgresql://owner@db.example:5432/keys" and "hunter2" not in repr(url)


def test_postgresql_without_a_state_key_is_refused_before_connecting(tmp_path):
    with pytest.raises(UsageError, match=r"needs \[owner\] state_key"):
        open_store(parse_db_url("postgresql://nobody@/nowhere?host=/nonexistent"), None)


def test_a_state_key_of_the_wrong_length_is_refused(tmp_path):
    (tmp_path / "short.key").write_bytes(bytes(16))
    with pytest.raises(UsageError, match="must hold 32 raw bytes, it holds 16"):
        open_store(DbUrl("sqlite", path=str(tmp_path / "owner.db")), f"file:{tmp_path / 'short.key'}")


def test_a_state_key_from_the_kernel_keyring_opens_the_database(tmp_path):
    from agent.io import keyring

    problem = keyring.usable()
    if problem is not None:
        pytest.skip(problem)
    desc = f"keyagent-owner-state-{os.getpid()}"
    serial = keyring.add_key(desc, STATE_KEY)
    try:
        db = DbUrl("sqlite", path=str(tmp_path / "owner.db"))
        open_store(db, f"keyring:{desc}")
        (tmp_path / "same.key").write_bytes(STATE_KEY)
        open_store(db, f"file:{tmp_path / 'same.key'}")  # the same 32 bytes, from a file: opens
        assert not (tmp_path / "owner.db.key").exists()  # given a key, the owner makes none
    finally:
        keyring.revoke(serial)
        keyring.unlink(serial)


@pytest.mark.postgres
async def test_connections_cut_by_the_server_are_made_again_without_a_503(owner, pg_url):
    import psycopg

    owner_service = service(owner, pg_url)
    request = secret_request("vm1", TIK, b"p" * 16)
    status, raw = await call(owner_service, "/v1/secret", request)
    assert status == 200
    from urllib.parse import urlsplit

    name = urlsplit(pg_url).path.lstrip("/")
    with psycopg.connect(pg_url, autocommit=True) as admin:  # as a server restart would
        cut = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    assert cut  # the owner's connections were there, and are gone
    assert await call(owner_service, "/v1/secret", request) == (200, raw)
    other = secret_request("vm1", TIK, b"o" * 16)
    assert (await call(owner_service, "/v1/secret", other))[0] == 200
    await owner_service.store.close()


def test_public_random_hands_out_each_urandom_byte_once(monkeypatch):
    from agent.owner import store

    drawn: list[bytes] = []

    def fake_urandom(n: int) -> bytes:
        drawn.append(bytes([len(drawn) + 1]) * n)
        return drawn[-1]

    monkeypatch.setattr(store.os, "urandom", fake_urandom)
    pool = store.PublicRandom()
    parts = [pool(12) for _ in range(store.PublicRandom.CHUNK // 12 + 1)] + [pool(store.PublicRandom.CHUNK + 1)]
    assert all(len(p) == 12 for p in parts[:-1]) and len(parts[-1]) == store.PublicRandom.CHUNK + 1
    # three draws: the first chunk used up (its 4 leftover bytes dropped, never handed out twice), a second, one larger
    assert [len(d) for d in drawn] == [store.PublicRandom.CHUNK, store.PublicRandom.CHUNK, store.PublicRandom.CHUNK + 1]
    assert b"".join(parts[:-2]) == drawn[0][: 12 * (len(parts) - 2)]
    assert parts[-2] == drawn[1][:12]


def test_a_sealed_value_carries_a_fresh_nonce_each_time():
    from agent.common.secret import Secret
    from agent.owner.store import StateKey

    key = StateKey(Secret(bytearray(os.urandom(32))))
    sealed = {key.seal(b"same", b"ctx")[1:13] for _ in range(1000)}
    assert len(sealed) == 1000
