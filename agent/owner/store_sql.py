"""The owner's state in SQLite (the standard library's sqlite3) or PostgreSQL (psycopg 3).

One body of SQL for both: the DB-API calls run in worker threads
(:class:`_Lane` for SQLite, ``loop.run_in_executor`` for PostgreSQL), never on the event loop, each call under a
deadline (:func:`agent.owner.store.with_deadline`), each thread with its own
connection.  SQLite gets one thread (its writes are serial anyway; WAL lets
readers of other processes go on); PostgreSQL :data:`PG_WORKERS`.

Races are the database's to decide:

* a release is ``INSERT ... ON CONFLICT DO NOTHING`` under the unique keys
  on the blob's SHA-256 and on (VM, MNONCE): of two replicas releasing the
  same blob, one row is written, and the other reads it back and answers its
  bytes; PostgreSQL makes the second INSERT wait for the first transaction,
  SQLite takes the write lock at ``BEGIN IMMEDIATE``;
* in the same transaction the pending session that verified the launch is
  deleted, and a release whose session is already gone is rolled back
  (a session verifies one launch, however many replicas saw it);
* the release's audit row is written in that transaction too: no release
  without its row.

The schema is created and upgraded at start (:data:`agent.owner.store.MIGRATIONS`,
recorded in ``keyagent_schema``) in one transaction, under
``pg_advisory_xact_lock`` on PostgreSQL so that replicas starting together
do not race on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.common.errors import UsageError
from agent.common.secret import Secret
from agent.owner.store import (
    MH_CHANGED,
    MIGRATIONS,
    PENDING_SESSION_TTL_S,
    AuditRow,
    DbUrl,
    SecretView,
    StateKey,
    Store,
    StoreUnavailable,
    make_key_file,
    read_state_key,
    with_deadline,
)

__all__ = ["SqlStore", "open_sql_store", "read_audit_rows", "PG_WORKERS"]

PG_WORKERS = 8  # connections (and threads) per PostgreSQL replica
BUSY_TIMEOUT_MS = 5000  # SQLite: how long a writer waits for another process's lock
CONNECT_TIMEOUT_S = 10
_LOCK_ID = 0x6B657961  # pg_advisory_xact_lock: "keya"
_KEY_CHECK = b"keyagent owner state key check"
_KEY_CHECK_CONTEXT = b"meta\0state_key_check"

_TYPES = {
    "sqlite": {"bytes": "BLOB", "serial": "INTEGER PRIMARY KEY"},
    "postgresql": {"bytes": "BYTEA", "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"},
}

_RELEASE_COLUMNS = "vm, api_major, api_minor, build_id, policy, packet_header, secret_sealed, gpa"
_SESSION_COLUMNS = "id, vm, platform, trust, chain_verified, policy, godh, session, keys_sealed"


class _Lost(Exception):
    """Inside a write transaction: roll it back, the release does not happen."""

    def __init__(self, result: Any = None) -> None:
        super().__init__()
        self.result = LOST if result is None else result


LOST = object()  # a write job that raised _Lost: rolled back, nothing written


def session_key(godh: bytes, session: bytes) -> str:
    """A pending session's row key: SHA-256 of its public GODH and session blob."""
    return hashlib.sha256(godh + session).hexdigest()


def _release_context(blob_sha256: bytes, vm: str) -> bytes:
    return b"release\0" + bytes(blob_sha256) + b"\0" + vm.encode()


def _session_context(sid: str, vm: str, platform: str) -> bytes:
    return f"session\0{sid}\0{vm}\0{platform}".encode()


# A queued job: what to run, the caller's future (on its event loop), its deadline (monotonic).
_Job = tuple[Any, "asyncio.Future[Any]", float]
# A job's outcome: its future, its result, or the exception to raise in the caller.
_Done = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


class _Lane:
    """One SQLite thread and its queue.

    The jobs queued while the thread works run in its next batch, and a
    batch's outcomes reach the event loop in one callback: one wake-up of
    the loop (and one hand-back of the GIL) per batch instead of one per job
    (``run_in_executor`` and ``wrap_future`` cost a concurrent Future, an
    asyncio future and a ``call_soon_threadsafe`` each).  A job whose caller
    gave up (its future cancelled at the deadline) or whose deadline passed
    before its turn is not run.
    """

    def __init__(self, executor: ThreadPoolExecutor, run_batch: Callable[[list[_Job]], list[_Done]]) -> None:
        self._executor = executor
        self._run_batch = run_batch
        self._lock = threading.Lock()
        self._queue: list[tuple[_Job, asyncio.AbstractEventLoop]] = []
        self._busy = False

    async def submit(self, job: Any, timeout: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._queue.append(((job, future, time.monotonic() + timeout), loop))
            start = not self._busy
            self._busy = True
        if start:
            try:
                self._executor.submit(self._drain)
            except BaseException:  # shut down: nothing will run it
                with self._lock:
                    self._busy = False
                raise
        return await with_deadline(future, timeout, what)

    def _drain(self) -> None:
        while True:
            with self._lock:
                queued, self._queue = self._queue, []
                if not queued:
                    self._busy = False
                    return
            by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
            for job, loop in queued:
                by_loop.setdefault(loop, []).append(job)
            for loop, jobs in by_loop.items():
                done = self._run_batch(jobs)
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, done)


def _settle(done: list[_Done]) -> None:
    for future, result, error in done:
        if future.done():  # its caller gave up meanwhile
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


class _Db:
    """One connection, DB-API style, with the dialect's placeholders and transactions."""

    def __init__(self, kind: str, conn: Any) -> None:
        self.kind = kind
        self.conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        if self.kind == "postgresql":
            sql = sql.replace("?", "%s")
        return self.conn.execute(sql, params)

    @contextlib.contextmanager
    def tx(self, write: bool = True) -> Iterator[None]:
        """A write transaction (SQLite takes the write lock at once: no upgrade deadlock)."""
        if self.kind == "postgresql":
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def _connect(url: DbUrl, timeout: float) -> _Db:
    if url.kind == "sqlite":
        import sqlite3

        lite = sqlite3.connect(url.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        lite.execute("PRAGMA journal_mode=WAL")
        lite.execute("PRAGMA synchronous=FULL")  # a release answered is a release kept
        lite.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return _Db("sqlite", lite)
    import psycopg

    pg = psycopg.connect(url.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    pg.execute(f"SET statement_timeout = {int(timeout * 1000)}")
    return _Db("postgresql", pg)


def _db_errors(kind: str) -> tuple[type[BaseException], ...]:
    if kind == "sqlite":
        import sqlite3

        return (sqlite3.Error,)
    import psycopg

    return (psycopg.Error,)


# -- opening: schema and state key --------------------------------------------------------


def migrate(db: _Db) -> int:
    """Create or upgrade the schema; the version now.  UsageError for a newer database."""
    types = _TYPES[db.kind]
    with db.tx(write=True):
        if db.kind == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK_ID,))
        db.execute(
            "CREATE TABLE IF NOT EXISTS keyagent_schema ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        have = int(db.execute("SELECT COALESCE(MAX(version), 0) FROM keyagent_schema").fetchone()[0])
        if have > len(MIGRATIONS):
            raise UsageError(
                f"owner database schema version {have} is newer than this keyagent knows ({len(MIGRATIONS)})"
            )
        for version, step in enumerate(MIGRATIONS[have:], start=have + 1):
            for statement in step.statements:
                db.execute(statement.format(**types))
            db.execute("INSERT INTO keyagent_schema VALUES (?, ?, ?)", (version, step.name, time.time()))
    return len(MIGRATIONS)


def _key_check(db: _Db) -> bytes | None:
    row = db.execute("SELECT value FROM owner_meta WHERE name = ?", ("state_key_check",)).fetchone()
    return bytes(row[0]) if row is not None else None


def check_state_key(db: _Db, key: StateKey) -> None:
    """The first owner seals a known value under its key; every later one must open it."""
    sealed = _key_check(db)
    if sealed is None:
        with db.tx(write=True):
            db.execute(
                "INSERT INTO owner_meta (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                ("state_key_check", key.seal(_KEY_CHECK, _KEY_CHECK_CONTEXT)),
            )
        sealed = _key_check(db)
    try:
        ok = sealed is not None and bytes(key.open(sealed, _KEY_CHECK_CONTEXT)) == _KEY_CHECK
    except StoreUnavailable:
        ok = False
    if not ok:
        raise UsageError("the owner state key does not open this database (it was made under another key)")


def _prepare_sqlite_file(path: str) -> None:
    """A new database file is made 0600 (SQLite gives its -wal and -shm the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise UsageError(f"cannot create the owner database {path}: {exc.strerror}") from None
    os.close(fd)


def open_sql_store(
    url: DbUrl, key: StateKey | None, *, replica: str, timeout: float = 10.0, log: Any = None
) -> SqlStore:
    """Connect, migrate, check (or, on SQLite without [owner] state_key, make) the state key."""
    if url.kind == "sqlite":
        _prepare_sqlite_file(url.path)
    try:
        db = _connect(url, timeout)
    except Exception as exc:
        raise UsageError(f"cannot open the owner database {url.shown()}: {_one_line(exc)}") from None
    try:
        try:
            migrate(db)
            if key is None:  # SQLite only (open_store refuses PostgreSQL without a key)
                key = _sqlite_key(db, url.path + ".key")
            check_state_key(db, key)
        except _db_errors(url.kind) as exc:
            raise UsageError(f"owner database {url.shown()}: {_one_line(exc)}") from None
    finally:
        db.close()
    return SqlStore(url, key, replica=replica, timeout=timeout, log=log)


def _sqlite_key(db: _Db, path: str) -> StateKey:
    """The key beside the SQLite file: read it, or make it for a database that has none yet."""
    if os.path.lexists(path):
        return read_state_key(f"file:{path}")
    if _key_check(db) is not None:
        raise UsageError(f"the owner database was sealed with the state key {path}, which is missing")
    return make_key_file(path)


# -- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ReleaseRow:
    vm: str
    fields: tuple[int, int, int, int]
    header: bytes
    sealed: bytes
    gpa: int | None


class SqlStore(Store):
    """Reads and writes off the event loop, each under the store's deadline.

    SQLite: one reader thread and one writer thread, each with its own
    connection (WAL: readers do not wait for the writer).  The writer
    commits in groups: the writes queued while it was committing go into
    the next transaction together, each in a SAVEPOINT of its own (one that
    loses a race rolls back alone), so one fsync serves many releases.
    PostgreSQL: :data:`PG_WORKERS` threads, one transaction per write (the
    server groups commits itself).
    """

    def __init__(self, url: DbUrl, key: StateKey, *, replica: str, timeout: float = 10.0, log: Any = None) -> None:
        self.kind = url.kind
        self.url = url
        self.replica = replica
        self._key = key
        self._timeout = timeout
        self._log = log
        self._errors = _db_errors(url.kind)
        self._local = threading.local()
        self._all: list[_Db] = []
        self._lock = threading.Lock()
        if url.kind == "sqlite":
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="owner-db-read")
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="owner-db-write")
        else:
            self._reader = self._writer = ThreadPoolExecutor(PG_WORKERS, thread_name_prefix="owner-db")
        self._reads = _Lane(self._reader, self._read_batch)
        self._writes = _Lane(self._writer, self._write_batch)

    # -- running SQL off the loop

    def _db(self) -> _Db:
        db: _Db | None = getattr(self._local, "db", None)
        if db is None:
            db = _connect(self.url, self._timeout)
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """``fn`` on this thread's connection; once more on a new one if the old one broke.

        A PostgreSQL server restarted (or a connection cut) breaks every
        worker's connection at once; trying again on a fresh one keeps that
        from turning into one 503 per worker.  Safe for every call here: the
        reads change nothing, and a release tried again either writes its
        row or finds the row its first try committed (and answers its bytes).
        """
        for attempt in (1, 2):
            db = self._db()
            try:
                return fn(db, *args)
            except self._errors as exc:
                broken = bool(getattr(db.conn, "broken", False) or getattr(db.conn, "closed", False))
                self._drop_connection()
                if attempt == 1 and broken:
                    continue
                raise StoreUnavailable(f"owner database: {_one_line(exc)}") from None
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            with self._lock:
                if db in self._all:
                    self._all.remove(db)
            db.close()

    async def _run(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A read (or, on PostgreSQL, anything) in a worker thread, under the deadline."""
        if self.kind == "sqlite":
            return await self._reads.submit((fn, args), self._timeout, what)
        loop = asyncio.get_running_loop()
        return await with_deadline(loop.run_in_executor(self._reader, self._call, fn, args), self._timeout, what)

    def _read_batch(self, jobs: list[_Job]) -> list[_Done]:
        """The SQLite reader: the reads queued while it read last, one after another."""
        done: list[_Done] = []
        for (fn, args), future, deadline in jobs:
            if future.cancelled() or time.monotonic() > deadline:
                done.append((future, None, StoreUnavailable("owner database: too late to read")))
                continue
            try:
                done.append((future, self._call(fn, args), None))
            except BaseException as exc:  # noqa: BLE001 - the caller hears of it
                done.append((future, None, exc))
        return done

    async def _write(self, what: str, job: Callable[[_Db], Any], *, single: bool = False) -> Any:
        """Run ``job`` in a write transaction: its result, or :data:`LOST` if it raised _Lost.

        A job whose deadline passed before its turn is not run (its caller
        has answered 503).  Once run, it may commit after the caller
        stopped waiting: a release written so is answered to the retry as
        its resend, never made twice.
        """
        if self.kind == "postgresql":

            def one(db: _Db) -> Any:
                if single:  # one statement: autocommit is its transaction (two round trips fewer)
                    return job(db)
                try:
                    with db.tx(write=True):
                        return job(db)
                except _Lost as lost:
                    return lost.result

            return await self._run(what, one)
        return await self._writes.submit(job, self._timeout, what)

    def _write_batch(self, jobs: list[_Job]) -> list[_Done]:
        """The SQLite writer: everything queued, in one transaction (each job in a SAVEPOINT)."""
        done: list[_Done] = []
        try:
            db = self._db()
            with db.tx(write=True):
                for n, (job, future, deadline) in enumerate(jobs):
                    if future.cancelled() or time.monotonic() > deadline:
                        done.append((future, None, StoreUnavailable("owner database: too late to write")))
                        continue
                    db.execute(f"SAVEPOINT w{n}")
                    try:
                        result = job(db)
                    except _Lost as lost:
                        db.execute(f"ROLLBACK TO w{n}")
                        result = lost.result
                    db.execute(f"RELEASE w{n}")
                    done.append((future, result, None))
        except self._errors as exc:
            self._drop_connection()
            failed = StoreUnavailable(f"owner database: {_one_line(exc)}")
            done = [(future, None, failed) for _, future, _ in jobs]
        except BaseException as exc:  # a bug in a job: every caller hears of it, the writer goes on
            done = [(future, None, exc) for _, future, _ in jobs]
        return done

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._writer.shutdown, True)
        await loop.run_in_executor(None, self._reader.shutdown, True)
        with self._lock:
            dbs, self._all = self._all, []
        for db in dbs:
            db.close()

    # -- rows <-> objects

    def _release(self, blob_sha256: bytes, row: _ReleaseRow) -> Any:
        from agent.owner.service import Release
        from agent.protocol.owner import SecretAnswer

        secret = self._key.open(row.sealed, _release_context(blob_sha256, row.vm))
        answer = SecretAnswer(packet_header=row.header, secret=Secret(secret), gpa=row.gpa)
        secret[:] = bytes(len(secret))
        return Release(row.vm, blob_sha256, row.fields, answer)

    def _session(self, row: tuple[Any, ...]) -> Any:
        from agent.owner.service import LaunchSession

        sid, vm, platform, trust, verified, policy, godh, session, sealed = row
        keys = self._key.open(bytes(sealed), _session_context(sid, vm, platform))
        try:
            return LaunchSession(
                godh=bytes(godh),
                session=bytes(session),
                tik=Secret(keys[:16]),
                tek=Secret(keys[16:32]),
                policy=int(policy),
                chain_verified=bool(verified),
                platform=platform,
                trust=trust,
            )
        finally:
            keys[:] = bytes(len(keys))

    @staticmethod
    def _release_row(row: tuple[Any, ...]) -> _ReleaseRow:
        vm, a, b, c, d, header, sealed, gpa = row
        return _ReleaseRow(
            vm, (int(a), int(b), int(c), int(d)), bytes(header), bytes(sealed), int(gpa) if gpa else None
        )

    # -- /v1/secret

    async def secret_view(self, vm: str, blob_sha256: bytes, mnonce: bytes, now: float) -> SecretView:
        """Sessions first, then releases, each one statement (no transaction needed).

        A release and the deletion of the session it used commit together,
        so in this order a reader that missed the session sees the release:
        it may see the session and the release (the release wins, 3a), never
        neither for a launch that was released.
        """

        def read(db: _Db) -> tuple[list[Any], list[Any]]:
            sessions = db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM owner_sessions WHERE vm = ? AND made_at >= ? ORDER BY made_at",
                (vm, now - PENDING_SESSION_TTL_S),
            ).fetchall()
            releases = db.execute(
                f"SELECT blob_sha256, mnonce, {_RELEASE_COLUMNS} FROM owner_releases "
                "WHERE blob_sha256 = ? OR (vm = ? AND mnonce = ?)",
                (blob_sha256, vm, mnonce),
            ).fetchall()
            return sessions, releases

        sessions, releases = await self._run("a secret request", read)
        view = SecretView(owned=True)
        for row in releases:
            digest, row_mnonce, rest = bytes(row[0]), bytes(row[1]), tuple(row[2:])
            if digest == blob_sha256:
                view.released[blob_sha256] = self._release(blob_sha256, self._release_row(rest))
            if rest[0] == vm and row_mnonce == mnonce:
                view.attested.add((vm, mnonce))
        if sessions:
            view.sessions[vm] = [self._session(tuple(r)) for r in sessions]
        return view

    async def commit_release(
        self, release: Any, mnonce: bytes, session: Any, now: float, audit: AuditRow, also: Any = None
    ) -> Any:
        answer = release.answer
        sealed = self._key.seal(answer.secret.reveal(), _release_context(release.blob_sha256, release.vm))
        sid = session_key(session.godh, session.session) if session is not None else None
        values = (
            release.blob_sha256,
            release.vm,
            mnonce,
            *release.fields,
            answer.packet_header,
            sealed,
            str(answer.gpa) if answer.gpa is not None else None,
            sid,
            now,
            self.replica,
        )

        def write(db: _Db) -> bool:
            cur = db.execute(
                "INSERT INTO owner_releases (blob_sha256, vm, mnonce, api_major, api_minor, build_id, policy, "
                "packet_header, secret_sealed, gpa, session_id, released_at, replica) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                values,
            )
            if cur.rowcount != 1:
                raise _Lost()  # this blob, or this (vm, mnonce), is released already
            if sid is not None and db.execute("DELETE FROM owner_sessions WHERE id = ?", (sid,)).rowcount != 1:
                raise _Lost()  # another launch used this session first
            self._insert_audit(db, audit)
            if also is not None and not also(db):
                raise _Lost(MH_CHANGED)  # the MH record changed since it was read: nothing is written
            return True

        result = await self._write("a release", write)
        if result is MH_CHANGED:
            return MH_CHANGED
        if result is not LOST:
            return release

        def read(db: _Db) -> Any:
            return db.execute(
                f"SELECT {_RELEASE_COLUMNS} FROM owner_releases WHERE blob_sha256 = ?", (release.blob_sha256,)
            ).fetchone()

        row = await self._run("a release", read)
        if row is None:
            return None
        before = self._release_row(row)
        if (before.vm, before.fields) != (release.vm, release.fields):
            return None
        return self._release(release.blob_sha256, before)

    # -- /v1/session

    async def pending_sessions(self, vm: str, now: float) -> dict[str, list[Any]]:
        def read(db: _Db) -> list[Any]:
            return db.execute(
                f"SELECT {_SESSION_COLUMNS} FROM owner_sessions WHERE vm = ? AND made_at >= ? ORDER BY made_at",
                (vm, now - PENDING_SESSION_TTL_S),
            ).fetchall()

        rows = await self._run("a session request", read)
        return {vm: [self._session(tuple(r)) for r in rows]} if rows else {}

    async def add_session(self, vm: str, session: Any, now: float) -> None:
        sid = session_key(session.godh, session.session)
        keys = bytearray(session.tik.reveal() + session.tek.reveal())
        try:
            sealed = self._key.seal(keys, _session_context(sid, vm, session.platform))
        finally:
            keys[:] = bytes(len(keys))
        values = (
            sid,
            vm,
            session.platform,
            session.trust,
            int(session.chain_verified),
            session.policy,
            session.godh,
            session.session,
            sealed,
            now,
        )

        def write(db: _Db) -> list[Any]:
            gone = db.execute(
                "DELETE FROM owner_sessions WHERE made_at < ? RETURNING vm, id", (now - PENDING_SESSION_TTL_S,)
            ).fetchall()
            db.execute(
                f"INSERT INTO owner_sessions ({_SESSION_COLUMNS}, made_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            return gone

        for old_vm, old_id in await self._write("a new session", write):
            if self._log is not None:
                self._log.info("owner session expired", vm=str(old_vm)[:64], session=str(old_id)[:16])

    # -- audit

    @staticmethod
    def _insert_audit(db: _Db, row: AuditRow) -> None:
        db.execute(
            "INSERT INTO owner_audit (time, vm, decision, status, reason, measurement_sha256, replica, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.time,
                row.vm,
                row.decision,
                row.status,
                row.reason,
                row.measurement_sha256,
                row.replica,
                row.detail_text(),
            ),
        )

    async def audit(self, row: AuditRow) -> None:
        await self._write("an audit row", lambda db: self._insert_audit(db, row), single=True)

    async def audit_rows(self, vm: str | None = None, since: float | None = None) -> list[AuditRow]:
        return list(await self._run("the audit", _select_audit, vm, since))


def _select_audit(db: _Db, vm: str | None, since: float | None) -> list[AuditRow]:
    import json

    sql = "SELECT time, vm, decision, status, reason, measurement_sha256, replica, detail FROM owner_audit"
    where: list[str] = []
    params: list[Any] = []
    if vm is not None:
        where.append("vm = ?")
        params.append(vm)
    if since is not None:
        where.append("time >= ?")
        params.append(since)
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = db.execute(sql + " ORDER BY time, id", tuple(params)).fetchall()
    out = []
    for t, row_vm, decision, status, reason, digest, replica, detail in rows:
        try:
            extra = json.loads(detail)
        except ValueError:
            extra = {}
        out.append(
            AuditRow(
                float(t),
                row_vm,
                decision,
                int(status),
                reason,
                digest,
                replica,
                extra if isinstance(extra, dict) else {},
            )
        )
    return out


def read_audit_rows(url: DbUrl, vm: str | None, since: float | None) -> list[AuditRow]:
    """``keyagent owner audit``: read only, no state key, no schema change; UsageError (exit 2)."""
    if url.kind == "sqlite":
        import sqlite3
        from urllib.parse import quote

        if not os.path.isfile(url.path):
            raise UsageError(f"no owner database at {url.path}")
        try:
            conn = sqlite3.connect(f"file:{quote(os.path.abspath(url.path))}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open the owner database {url.shown()}: {_one_line(exc)}") from None
        db = _Db("sqlite", conn)
    else:
        try:
            db = _connect(url, 30.0)
        except Exception as exc:
            raise UsageError(f"cannot open the owner database {url.shown()}: {_one_line(exc)}") from None
    try:
        return _select_audit(db, vm, since)
    except _db_errors(url.kind) as exc:
        raise UsageError(f"{url.shown()} is not an owner database: {_one_line(exc)}") from None
    finally:
        db.close()
