"""The guest owner's side of SEV fast migration: MH key pairs per VM (docs/mh.md).

What the owner keeps per VM (:class:`MhRecord`, public keys only: every
private key leaves in exactly one launch packet and is never stored):

* ``live``: the public key of the MH identity of the VM as it runs now;
* ``target``: during a migration, the target's public key, the tag the
  source MH checks it by, and which live key it migrates from;
* ``retired``: key ids (:func:`agent.sev.mh.key_id`) that are never
  released again.

The decisions are pure functions (the fresh private key comes in as bytes,
as the packet IV does for ``decide_secret``); the state sits behind
:class:`MhStore` (:class:`MemoryMhStore` today; the owner database can back
it by one table).  Transitions:

===========================  ===================================================
ordinary boot (mh = true)    new live key; the old live key and a pending
                             target are retired (the VM was started anew)
``migrating_from`` = vm      needs a live key that is not retired and no
                             migration in flight (409); makes the target pair,
                             releases [target private, source public]
``/v1/mh/target``            the pending target's public key and tag (409 if none)
``/v1/mh/complete``          completed: the source key is retired, the target's
                             becomes live; failed / cancelled: the target's is
                             retired, the source stays live (409 if no migration)
===========================  ===================================================
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent.protocol.owner import (
    MhCompleteAnswer,
    MhCompleteRequest,
    MhTargetAnswer,
    MhTargetRequest,
    ProtocolError,
)
from agent.sev import mh as mhkeys
from agent.sev.guids import MH_PRIVATE_KEY_GUID, MH_SOURCE_PUBLIC_KEY_GUID

__all__ = [
    "MhTarget",
    "MhRecord",
    "MhStore",
    "MemoryMhStore",
    "SqlMhStore",
    "mh_store_for",
    "record_text",
    "record_from_text",
    "MhRelease",
    "MhRefusal",
    "MhAnswer",
    "MH_ENTRY_LENGTHS",
    "mh_for_boot",
    "mh_for_migration",
    "decide_mh_target",
    "decide_mh_complete",
]

#: the data lengths of the two table entries the owner adds (secret_area.table_length)
MH_ENTRY_LENGTHS = (mhkeys.KEY_LEN, mhkeys.KEY_LEN)


@dataclass(frozen=True)
class MhTarget:
    """A migration in flight: the target's public key, its tag, the source it came from."""

    public: bytes
    tag: bytes
    source: bytes


@dataclass(frozen=True)
class MhRecord:
    live: bytes | None = None
    target: MhTarget | None = None
    retired: frozenset[str] = frozenset()

    def retire(self, *publics: bytes | None) -> frozenset[str]:
        return self.retired | {mhkeys.key_id(p) for p in publics if p is not None}


class MhStore(Protocol):
    """Where the owner keeps each VM's MH record (memory, or a table of the owner database).

    ``swap`` is compare-and-set: it keeps ``new`` only if the VM's record is
    still ``old`` (another replica may have changed it meanwhile) and says
    whether it did.
    """

    async def get(self, vm: str) -> MhRecord: ...

    async def swap(self, vm: str, old: MhRecord, new: MhRecord) -> bool: ...


class MemoryMhStore:
    """The records in a dict: lost when the owner restarts (docs/mh.md)."""

    def __init__(self) -> None:
        self._records: dict[str, MhRecord] = {}

    async def get(self, vm: str) -> MhRecord:
        return self._records.get(vm, MhRecord())

    async def swap(self, vm: str, old: MhRecord, new: MhRecord) -> bool:
        if self._records.get(vm, MhRecord()) != old:
            return False
        self._records[vm] = new
        return True


def record_text(record: MhRecord) -> str:
    """The record as one canonical JSON text (a table row; equal records, equal texts)."""
    import json

    target = record.target
    doc = {
        "live": record.live.hex() if record.live is not None else None,
        "target": (
            {"public": target.public.hex(), "tag": target.tag.hex(), "source": target.source.hex()} if target else None
        ),
        "retired": sorted(record.retired),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def record_from_text(text: str) -> MhRecord:
    import json

    doc = json.loads(text)
    target = doc.get("target")
    return MhRecord(
        live=bytes.fromhex(doc["live"]) if doc.get("live") else None,
        target=(
            MhTarget(bytes.fromhex(target["public"]), bytes.fromhex(target["tag"]), bytes.fromhex(target["source"]))
            if target
            else None
        ),
        retired=frozenset(doc.get("retired", ())),
    )


class SqlMhStore:
    """The records in the owner database's ``owner_mh`` table (SQLite or PostgreSQL).

    Public keys and tags only: nothing to seal under the state key.  ``swap``
    is one conditional write (``INSERT ... ON CONFLICT DO NOTHING`` for a VM
    without a row, ``UPDATE ... WHERE record = old`` otherwise), so of two
    replicas changing the same record one wins and the other is told.
    """

    def __init__(self, store: Any) -> None:  # agent.owner.store_sql.SqlStore
        self._store = store

    async def get(self, vm: str) -> MhRecord:
        def read(db: Any) -> str | None:
            row = db.execute("SELECT record FROM owner_mh WHERE vm = ?", (vm,)).fetchone()
            return str(row[0]) if row is not None else None

        text = await self._store._run("an MH record", read)
        return record_from_text(text) if text is not None else MhRecord()

    async def swap(self, vm: str, old: MhRecord, new: MhRecord) -> bool:
        statement = self.swap_statement(vm, old, new)

        def write(db: Any) -> bool:
            with db.tx(write=True):
                return statement(db)

        return bool(await self._store._run("an MH record", write))

    def swap_statement(self, vm: str, old: MhRecord, new: MhRecord) -> Callable[[Any], bool]:
        """``swap``'s SQL as a function of a connection already in a transaction.

        A release hands it to ``commit_release``: the MH record and the
        release commit together or not at all (one transaction, one fsync).
        """
        import time

        old_text, new_text, now = record_text(old), record_text(new), time.time()

        def statement(db: Any) -> bool:
            if old == MhRecord():
                cur = db.execute(
                    "INSERT INTO owner_mh (vm, record, updated_at) VALUES (?, ?, ?) ON CONFLICT (vm) DO NOTHING",
                    (vm, new_text, now),
                )
                if cur.rowcount == 1:
                    return True
            cur = db.execute(
                "UPDATE owner_mh SET record = ?, updated_at = ? WHERE vm = ? AND record = ?",
                (new_text, now, vm, old_text),
            )
            return bool(cur.rowcount == 1)

        return statement


def mh_store_for(store: Any) -> MhStore:
    """The MH store that goes with the owner's state store: its database, or memory."""
    from agent.owner.store_sql import SqlStore

    return SqlMhStore(store) if isinstance(store, SqlStore) else MemoryMhStore()


@dataclass(frozen=True)
class MhRelease:
    """What a release adds to the secret table, and the record to keep once it is sent."""

    entries: tuple[tuple[uuid.UUID, bytes], ...] = field(repr=False)
    record: MhRecord
    audit: dict[str, Any]


@dataclass(frozen=True)
class MhRefusal:
    status: int
    reason: str


@dataclass(frozen=True)
class MhAnswer:
    """The outcome of a /v1/mh/* request: status, body, audit, and the record to keep (None: unchanged)."""

    status: int
    body: dict[str, Any]
    reason: str
    audit: dict[str, Any]
    record: MhRecord | None = None


def mh_for_boot(record: MhRecord, private: bytes) -> MhRelease:
    """An ordinary boot: [identity private key, empty source key]; the new key is live."""
    public = mhkeys.public_key(private)
    retired = record.retire(record.live, record.target.public if record.target else None)
    audit = {"mh": "boot", "mh_key": mhkeys.key_id(public)}
    if record.live is not None:
        audit["mh_retired"] = mhkeys.key_id(record.live)
    entries = ((MH_PRIVATE_KEY_GUID, bytes(private)), (MH_SOURCE_PUBLIC_KEY_GUID, b""))
    return MhRelease(entries, MhRecord(live=public, target=None, retired=retired), audit)


def mh_for_migration(vm: str, migrating_from: str, record: MhRecord, private: bytes) -> MhRelease | MhRefusal:
    """A migration target: [target private key, source public key], or why not.

    The source is the VM's live key: it must exist, not be retired, and no
    other migration may be in flight (the source reports its end first).
    """
    if migrating_from != vm:
        return MhRefusal(403, "migrating_from must name this vm (one owner.toml entry per vm, on every host)")
    source = record.live
    if source is None:
        return MhRefusal(409, "migrating_from: this vm has no live MH key (it never booted with mh = true)")
    if mhkeys.key_id(source) in record.retired:
        return MhRefusal(409, "migrating_from: this vm's MH key is retired")
    if record.target is not None:
        return MhRefusal(
            409, "migrating_from: a migration of this vm is already in flight (the source reports its end first)"
        )
    public = mhkeys.public_key(private)
    keys = mhkeys.derive(private, source, vm, source, public)
    try:
        tag = mhkeys.confirm_tag(keys.confirm, public)
    finally:
        keys.wipe()  # the owner needs no transport key: only the tag
    target = MhTarget(public=public, tag=tag, source=source)
    audit = {"mh": "migration target", "mh_key": mhkeys.key_id(public), "mh_source": mhkeys.key_id(source)}
    entries = ((MH_PRIVATE_KEY_GUID, bytes(private)), (MH_SOURCE_PUBLIC_KEY_GUID, source))
    return MhRelease(entries, replace(record, target=target), audit)


def _invalid(exc: ProtocolError, request: str) -> MhAnswer:
    audit: dict[str, Any] = {"request": request}
    if "vm" in exc.partial:
        audit["vm"] = exc.partial["vm"]
    return MhAnswer(400, {"error": exc.reason}, exc.reason, audit)


def _refused(status: int, reason: str, audit: dict[str, Any]) -> MhAnswer:
    return MhAnswer(status, {"error": reason}, reason, audit)


def _pending_target(
    audit: dict[str, Any], *, known: bool, mh: bool, record: MhRecord, none: str
) -> MhTarget | MhAnswer:
    """What both calls about a migration in flight check first, in this
    order: the VM is in owner.toml (404), has ``mh = true`` (403) and has a
    pending target (409, ``none`` the reason).  The target, or the refusal."""
    if not known:
        return _refused(404, "unknown vm", audit)
    if not mh:
        return _refused(403, "this vm has no MH keys (no mh = true)", audit)
    if record.target is None:
        return _refused(409, none, audit)
    return record.target


def decide_mh_target(body: Any, *, known: bool, mh: bool, record: MhRecord) -> MhAnswer:
    """``POST /v1/mh/target {"vm"}``: the pending target's public key and tag.

    ``known``/``mh``: the VM is in owner.toml / has ``mh = true``.
    """
    try:
        request = MhTargetRequest.parse(body)
    except ProtocolError as exc:
        return _invalid(exc, "mh target")
    audit: dict[str, Any] = {"request": "mh target", "vm": request.vm}
    target = _pending_target(
        audit,
        known=known,
        mh=mh,
        record=record,
        none="no migration of this vm is in flight (no target attested with migrating_from)",
    )
    if isinstance(target, MhAnswer):
        return target
    audit["mh_key"] = mhkeys.key_id(target.public)
    answer = MhTargetAnswer(vm=request.vm, public_key=target.public, tag=target.tag)
    return MhAnswer(200, answer.encode(), "target public key", audit)


def decide_mh_complete(body: Any, *, known: bool, mh: bool, record: MhRecord) -> MhAnswer:
    """``POST /v1/mh/complete {"vm", "status"}``: retire the key the migration's end leaves behind."""
    try:
        request = MhCompleteRequest.parse(body)
    except ProtocolError as exc:
        return _invalid(exc, "mh complete")
    audit: dict[str, Any] = {"request": "mh complete", "vm": request.vm, "migration": request.status}
    target = _pending_target(audit, known=known, mh=mh, record=record, none="no migration of this vm is in flight")
    if isinstance(target, MhAnswer):
        return target
    if request.status == "completed":
        new = MhRecord(live=target.public, target=None, retired=record.retire(target.source))
        audit.update(mh_retired=mhkeys.key_id(target.source), mh_key=mhkeys.key_id(target.public))
        retired = "source"
    else:
        new = MhRecord(live=record.live, target=None, retired=record.retire(target.public))
        audit["mh_retired"] = mhkeys.key_id(target.public)
        retired = "target"
    answer = MhCompleteAnswer(vm=request.vm, status=request.status, retired=retired)
    return MhAnswer(200, answer.encode(), f"migration {request.status}: {retired} key retired", audit, new)
