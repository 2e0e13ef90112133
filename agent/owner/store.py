"""The guest owner's state: releases, pending launch sessions, the audit.

:class:`OwnerService` decides with pure functions and keeps what those
decisions change in a :class:`Store`.  Three stores, one contract:

* :class:`MemoryStore`: in the process (tests, the demo, ``simulate``);
  a restarted owner forgets everything.
* :class:`agent.owner.store_sql.SqlStore` on SQLite (``sqlite:///PATH``,
  one owner) or PostgreSQL (``postgresql://...``, several replicas behind
  one address): everything survives a restart, and the database decides
  races between replicas.

What is kept, and why (docs/owner-state.md has the schema):

* every release (VM, SHA-256 of the measurement blob, MNONCE, the request's
  api/build/policy, the packet as sent, time), under a unique key on the
  blob and one on (VM, MNONCE): a blob is released once, and the same blob
  asked again, at any replica, after any restart, gets the same bytes;
* pending launch sessions (``POST /v1/session`` made them, no
  ``/v1/secret`` used them yet): a restarted owner still verifies a launch
  whose session it made before;
* every decision, as an audit row (``keyagent owner audit``).

Not kept: SEV-SNP challenge nonces (:mod:`agent.owner.snp_attest`).  A
challenge lives for seconds; an owner that forgets one refuses the
attestation that answers it (403, "unknown nonce") and the guest asks
again, so forgetting never lets anything through that would not have been
let through.  With replicas, a guest's challenge and attestation must reach
the same replica (or be retried until they do).

Secrets in a database are sealed (:class:`StateKey`): AES-256-GCM under the
owner's 32-byte state key, a fresh 96-bit nonce per value, the row's
identity as associated data, so a sealed value moved to another row does not
open.  The TIK/TEK of pending sessions and the ``secret`` of stored packets
are sealed; the packet header (IV and MAC), GODH, session blob, digests and
audit rows are not secret and are stored as they are.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.common.errors import OwnerError, UsageError
from agent.common.secret import Secret

if TYPE_CHECKING:
    from agent.owner.service import LaunchSession, Release

__all__ = [
    "AuditRow",
    "DbUrl",
    "MemoryStore",
    "MIGRATIONS",
    "Migration",
    "SecretView",
    "StateKey",
    "Store",
    "StoreUnavailable",
    "STATE_KEY_LEN",
    "parse_db_url",
]

STATE_KEY_LEN = 32  # AES-256-GCM
#: A pending session older than this is dropped (a launch that never asked for its secret).
PENDING_SESSION_TTL_S = 3600.0


class StoreUnavailable(OwnerError):
    """The database did not answer in time, or failed: the request gets 503 (one line)."""


# -- the schema -------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One step of the schema.  ``{bytes}`` and ``{serial}`` are the dialect's types.

    Steps are applied in order, each in its own transaction, and recorded in
    ``keyagent_schema``; a new table is one more entry at the end of
    :data:`MIGRATIONS` (never edit an entry that has shipped).
    """

    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "releases, pending launch sessions, audit",
        (
            "CREATE TABLE owner_meta (name TEXT PRIMARY KEY, value {bytes} NOT NULL)",
            """CREATE TABLE owner_releases (
                blob_sha256 {bytes} PRIMARY KEY,
                vm TEXT NOT NULL,
                mnonce {bytes} NOT NULL,
                api_major INTEGER NOT NULL,
                api_minor INTEGER NOT NULL,
                build_id INTEGER NOT NULL,
                policy BIGINT NOT NULL,
                packet_header {bytes} NOT NULL,
                secret_sealed {bytes} NOT NULL,
                gpa TEXT,
                session_id TEXT,
                released_at DOUBLE PRECISION NOT NULL,
                replica TEXT NOT NULL,
                UNIQUE (vm, mnonce)
            )""",
            """CREATE TABLE owner_sessions (
                id TEXT PRIMARY KEY,
                vm TEXT NOT NULL,
                platform TEXT NOT NULL,
                trust TEXT NOT NULL,
                chain_verified INTEGER NOT NULL,
                policy BIGINT NOT NULL,
                godh {bytes} NOT NULL,
                session {bytes} NOT NULL,
                keys_sealed {bytes} NOT NULL,
                made_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX owner_sessions_vm ON owner_sessions (vm, made_at)",
            """CREATE TABLE owner_audit (
                id {serial},
                time DOUBLE PRECISION NOT NULL,
                vm TEXT,
                decision TEXT NOT NULL,
                status INTEGER NOT NULL,
                reason TEXT NOT NULL,
                measurement_sha256 TEXT,
                replica TEXT NOT NULL,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX owner_audit_time ON owner_audit (time)",
            "CREATE INDEX owner_audit_vm ON owner_audit (vm, time)",
        ),
    ),
    # SEV fast migration (agent.owner.mh, docs/mh.md): one row per VM, public keys only
    Migration(
        "mh keys",
        ("CREATE TABLE owner_mh (vm TEXT PRIMARY KEY, record TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",),
    ),
)


# -- database URLs ----------------------------------------------------------------------


@dataclass(frozen=True)
class DbUrl:
    kind: str  # "sqlite" | "postgresql"
    path: str = ""  # sqlite: the file
    dsn: str = field(default="", repr=False)  # postgresql: the URL as given (may hold a password)

    def shown(self) -> str:
        """For logs and errors: the file, or the PostgreSQL URL without its password."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.dsn)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.split(':', 1)[0]}@{host}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_db_url(text: str, where: str = "--db") -> DbUrl:
    """``sqlite:///PATH`` (relative to the working directory; ``sqlite:////abs`` or
    ``sqlite:///`` + an absolute path) or ``postgresql://...`` / ``postgres://...``."""
    if text.startswith("sqlite:///"):
        path = text[len("sqlite:///") :]
        if not path or path.endswith("/"):
            raise UsageError(f"{where}: sqlite:///PATH needs a file name")
        return DbUrl("sqlite", path=path)
    if text.startswith(("postgresql://", "postgres://")):
        return DbUrl("postgresql", dsn=text)
    shown = text.split("://", 1)[0] if "://" in text else text[:32]
    raise UsageError(f"{where} must be sqlite:///PATH or postgresql://..., got {shown!r}...")


# -- the state key ----------------------------------------------------------------------

_AAD_PREFIX = b"keyagent-owner-state-v1\0"
_SEAL_VERSION = b"\x01"
_NONCE_LEN = 12


# commit_release's answer when its ``also`` write found the MH record changed.
MH_CHANGED = object()


class PublicRandom:
    """Random bytes for values that travel or are stored in clear: packet IVs, AES-GCM nonces.

    Drawn from ``os.urandom`` :data:`CHUNK` bytes at a time and handed out
    in order, each byte once.  ``os.urandom`` releases the GIL: two calls
    per release handed the event loop's thread to the database threads
    twice (a tenth of the owner's time under load).  Never for keys: those
    stay one ``os.urandom`` call each, so no future key sits in memory.
    """

    CHUNK = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0

    def __call__(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = os.urandom(max(self.CHUNK, n)), 0
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out


public_random = PublicRandom()


class StateKey:
    """The owner's 32-byte state key: seals what the database must not hold in clear."""

    def __init__(self, key: Secret) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != STATE_KEY_LEN:
            raise UsageError(f"the owner state key must be {STATE_KEY_LEN} bytes, it is {len(key)}")
        self._aead = AESGCM(key.reveal())
        key.wipe()

    def seal(self, plaintext: bytes | bytearray, context: bytes) -> bytes:
        """version || nonce || AES-GCM(plaintext), bound to ``context`` (the row)."""
        nonce = public_random(_NONCE_LEN)  # 96 random bits per value, each drawn once
        return _SEAL_VERSION + nonce + self._aead.encrypt(nonce, bytes(plaintext), _AAD_PREFIX + context)

    def open(self, sealed: bytes, context: bytes) -> bytearray:
        """The plaintext, or StoreUnavailable if it is not ours or not this row's."""
        from cryptography.exceptions import InvalidTag

        sealed = bytes(sealed)
        if len(sealed) < 1 + _NONCE_LEN + 16 or sealed[:1] != _SEAL_VERSION:
            raise StoreUnavailable("a sealed value in the owner database is malformed")
        try:
            return bytearray(
                self._aead.decrypt(sealed[1 : 1 + _NONCE_LEN], sealed[1 + _NONCE_LEN :], _AAD_PREFIX + context)
            )
        except InvalidTag:
            raise StoreUnavailable("a sealed value in the owner database does not open under the state key") from None

    def __repr__(self) -> str:
        return "StateKey(<32 bytes>)"


def read_state_key(ref: str) -> StateKey:
    """``file:PATH`` (32 raw bytes) or ``keyring:DESC``; UsageError (one line) otherwise."""
    from agent.io.secretref import resolve

    if not ref.startswith(("file:", "keyring:")):
        raise UsageError("[owner] state_key must be file:PATH or keyring:DESC")
    secret = resolve(ref, "[owner] state_key")
    if len(secret) != STATE_KEY_LEN:
        n = len(secret)
        secret.wipe()
        raise UsageError(f"[owner] state_key must hold {STATE_KEY_LEN} raw bytes, it holds {n}")
    return StateKey(secret)


def make_key_file(path: str) -> StateKey:
    """A new random key in a new file: 0600, O_EXCL|O_NOFOLLOW (never over one that exists)."""
    raw = bytearray(os.urandom(STATE_KEY_LEN))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"state key file {path} appeared while the owner was starting") from None
    except OSError as exc:
        raise UsageError(f"cannot create the state key file {path}: {exc.strerror}") from None
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    return StateKey(Secret(raw))


# -- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One decision.  ``detail`` is the rest of the decision's audit fields (no secrets)."""

    time: float
    vm: str | None
    decision: str
    status: int
    reason: str
    measurement_sha256: str | None
    replica: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The line ``keyagent owner audit`` prints."""
        return {
            "time": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds"),
            "vm": self.vm,
            "decision": self.decision,
            "status": self.status,
            "reason": self.reason,
            "measurement_sha256": self.measurement_sha256,
            "replica": self.replica,
            **{k: v for k, v in self.detail.items() if k not in _AUDIT_COLUMNS},
        }

    def detail_text(self) -> str:
        return json.dumps(self.detail, sort_keys=True, default=str)


_AUDIT_COLUMNS = {"time", "vm", "decision", "status", "reason", "measurement_sha256", "replica"}


@dataclass
class SecretView:
    """What one ``/v1/secret`` decision is given: the store's state for that request."""

    released: dict[bytes, Release] = field(default_factory=dict)
    attested: set[tuple[str, bytes]] = field(default_factory=set)
    sessions: dict[str, list[LaunchSession]] = field(default_factory=dict)
    owned: bool = False  # the sessions are copies: wipe them when done

    def done(self) -> None:
        if self.owned:
            for pending in self.sessions.values():
                for s in pending:
                    s.wipe()


def replica_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


class Store:
    """What OwnerService needs from its state; every method is a coroutine with a deadline."""

    kind = "memory"

    async def secret_view(self, vm: str, blob_sha256: bytes, mnonce: bytes, now: float) -> SecretView:
        raise NotImplementedError

    async def commit_release(
        self,
        release: Release,
        mnonce: bytes,
        session: LaunchSession | None,
        now: float,
        audit: AuditRow,
        also: Any = None,
    ) -> Any:
        """Record a first release and its audit row, atomically.

        Returns ``release`` (this request won), the release already recorded
        for the same blob (another request won: answer its bytes), or None
        (the launch cannot be released: its session was used, or its
        (VM, MNONCE) was released with another blob).  Nothing is written
        unless ``release`` won.  ``also`` (database stores only): a function
        of the connection, run in the same transaction after the release's
        rows; if it returns False nothing is written and the answer is
        :data:`MH_CHANGED` (the SEV fast migration record, agent.owner.mh).
        """
        raise NotImplementedError

    async def pending_sessions(self, vm: str, now: float) -> dict[str, list[LaunchSession]]:
        raise NotImplementedError

    async def add_session(self, vm: str, session: LaunchSession, now: float) -> None:
        raise NotImplementedError

    async def audit(self, row: AuditRow) -> None:
        raise NotImplementedError

    async def audit_rows(self, vm: str | None = None, since: float | None = None) -> list[AuditRow]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class MemoryStore(Store):
    """In the process: a restarted owner forgets.  No await inside a method: each is atomic."""

    kind = "memory"

    def __init__(self, replica: str = "memory", log: Any = None) -> None:
        self.released: dict[bytes, Release] = {}
        self.attested: set[tuple[str, bytes]] = set()
        self.sessions: dict[str, list[LaunchSession]] = {}
        self._made_at: dict[LaunchSession, float] = {}
        self.rows: list[AuditRow] = []
        self.replica = replica
        self._log = log

    def _expire(self, now: float) -> None:
        for vm, pending in self.sessions.items():
            keep = []
            for s in pending:
                if now - self._made_at.get(s, now) > PENDING_SESSION_TTL_S:
                    self._made_at.pop(s, None)
                    s.wipe()
                    if self._log is not None:
                        self._log.info("owner session expired", vm=_shown(vm), session=s.id)
                else:
                    keep.append(s)
            pending[:] = keep

    async def secret_view(self, vm: str, blob_sha256: bytes, mnonce: bytes, now: float) -> SecretView:
        self._expire(now)
        view = SecretView(attested=self.attested, sessions=self.sessions)
        release = self.released.get(blob_sha256)
        if release is not None:
            view.released[blob_sha256] = release
        return view

    async def commit_release(
        self,
        release: Release,
        mnonce: bytes,
        session: LaunchSession | None,
        now: float,
        audit: AuditRow,
        also: Any = None,
    ) -> Any:
        if also is not None:
            raise TypeError("the memory store has no transaction to run another write in")
        before = self.released.get(release.blob_sha256)
        if before is not None:
            return before if (before.vm, before.fields) == (release.vm, release.fields) else None
        if (release.vm, mnonce) in self.attested:
            return None
        if session is not None:
            pending = self.sessions.get(release.vm, [])
            if not any(s is session for s in pending):
                return None
            pending[:] = [s for s in pending if s is not session]
            self._made_at.pop(session, None)
            session.wipe()  # single use: the launch is verified, its session keys go
        self.released[release.blob_sha256] = release
        self.attested.add((release.vm, mnonce))
        self.rows.append(audit)
        return release

    async def pending_sessions(self, vm: str, now: float) -> dict[str, list[LaunchSession]]:
        self._expire(now)
        return self.sessions

    async def add_session(self, vm: str, session: LaunchSession, now: float) -> None:
        self.sessions.setdefault(vm, []).append(session)
        self._made_at[session] = now

    async def audit(self, row: AuditRow) -> None:
        self.rows.append(row)

    async def audit_rows(self, vm: str | None = None, since: float | None = None) -> list[AuditRow]:
        return [r for r in self.rows if (vm is None or r.vm == vm) and (since is None or r.time >= since)]


def _shown(value: str, limit: int = 64) -> str:
    text = value if len(value) <= limit else value[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii")


# -- opening a store ----------------------------------------------------------------------


def default_db_url(config_path: str) -> DbUrl:
    """``owner.db`` next to owner.toml."""
    return DbUrl("sqlite", path=str(Path(config_path).resolve().parent / "owner.db"))


def open_store(
    url: DbUrl, state_key_ref: str | None, *, replica: str | None = None, timeout: float = 10.0, log: Any = None
) -> Store:
    """Open (create, upgrade) the database and check the state key; UsageError (exit 2) on any fault.

    Blocking: call it before the event loop runs (``owner serve`` does, at start).
    """
    from agent.owner.store_sql import open_sql_store

    if url.kind == "postgresql" and state_key_ref is None:
        raise UsageError(
            'a postgresql owner database needs [owner] state_key = "file:PATH" or "keyring:DESC" in owner.toml'
        )
    key = read_state_key(state_key_ref) if state_key_ref is not None else None
    return open_sql_store(url, key, replica=replica or replica_name(), timeout=timeout, log=log)


async def with_deadline(awaitable: Any, timeout: float, what: str) -> Any:
    """Await ``awaitable`` for at most ``timeout`` seconds; StoreUnavailable after.

    ``asyncio.timeout``, not ``wait_for``: one timer handle per call instead of
    a timer, a waiter future and their callbacks (two calls per release).
    """
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise StoreUnavailable(f"owner database did not answer {what} within {timeout:g} s") from None


def now() -> float:
    return time.time()


def sessions_by_vm(rows: Sequence[tuple[str, LaunchSession]]) -> dict[str, list[LaunchSession]]:
    out: dict[str, list[LaunchSession]] = {}
    for vm, s in rows:
        out.setdefault(vm, []).append(s)
    return out
