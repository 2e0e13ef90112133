"""SEV fast migration, the owner's side: MH key pairs per VM (agent.owner.mh, docs/mh.md)."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common.errors import UsageError
from agent.owner.config import load_owner_config
from agent.owner.mh import (
    MemoryMhStore,
    MhRecord,
    MhRefusal,
    decide_mh_complete,
    decide_mh_target,
    mh_for_boot,
    mh_for_migration,
)
from agent.owner.service import decide_secret
from agent.sev import mh as mhkeys
from agent.sev.guids import LUKS_KEY_GUID, MH_PRIVATE_KEY_GUID, MH_SOURCE_PUBLIC_KEY_GUID
from agent.sev.measurement import split_blob
from agent.sev.packet import open_packet
from agent.sev.secret_table import parse_secret_table

from .conftest import PASSPHRASE, TEK, TIK, write_owner_dir

IV = bytes(range(100, 116))
SRC_PRIV = bytes(range(1, 33))
DST_PRIV = bytes(range(33, 65))


@pytest.fixture
def mh_dir(tmp_path):
    return write_owner_dir(tmp_path, "mh = true")


@pytest.fixture
def mh_config(mh_dir):
    return load_owner_config(mh_dir.toml)


def table(decision, blob):
    header = base64.b64decode(decision.body["packet_header"])
    ciphertext = base64.b64decode(decision.body["secret"])
    return dict(parse_secret_table(open_packet(TIK, TEK, split_blob(blob)[0], header, ciphertext)))


def launch(config, owner_dir, record, private, mnonce, **over):
    return decide_secret(
        config,
        owner_dir.request(mnonce, **over),
        attested=set(),
        iv=IV,
        mh_record=record,
        mh_private=private,
    )


# -- boot and migration through decide_secret ----------------------------------------------


def test_an_ordinary_boot_gets_the_identity_key_and_an_empty_source_key(mh_config, mh_dir):
    d = launch(mh_config, mh_dir, MhRecord(), SRC_PRIV, b"a" * 16)
    assert d.status == 200
    entries = table(d, mh_dir.blob(b"a" * 16))
    assert entries == {LUKS_KEY_GUID: PASSPHRASE, MH_PRIVATE_KEY_GUID: SRC_PRIV, MH_SOURCE_PUBLIC_KEY_GUID: b""}
    assert d.mh.live == mhkeys.public_key(SRC_PRIV) and d.mh.target is None
    assert SRC_PRIV.hex() not in repr(d.audit) and d.audit["mh"] == "boot"


def test_a_migration_target_gets_its_own_key_and_the_sources_public_key(mh_config, mh_dir):
    booted = launch(mh_config, mh_dir, MhRecord(), SRC_PRIV, b"a" * 16).mh
    d = launch(mh_config, mh_dir, booted, DST_PRIV, b"b" * 16, migrating_from="vm1")
    assert d.status == 200, d.body
    entries = table(d, mh_dir.blob(b"b" * 16))
    assert entries[MH_PRIVATE_KEY_GUID] == DST_PRIV
    assert entries[MH_SOURCE_PUBLIC_KEY_GUID] == mhkeys.public_key(SRC_PRIV)
    assert d.mh.live == booted.live and d.mh.target.public == mhkeys.public_key(DST_PRIV)


def test_migrating_from_without_a_live_key_is_refused(mh_config, mh_dir):
    d = launch(mh_config, mh_dir, MhRecord(), DST_PRIV, b"b" * 16, migrating_from="vm1")
    assert d.status == 409 and "no live MH key" in d.body["error"] and d.mh is None


def test_migrating_from_another_vm_is_refused(mh_config, mh_dir):
    booted = launch(mh_config, mh_dir, MhRecord(), SRC_PRIV, b"a" * 16).mh
    d = launch(mh_config, mh_dir, booted, DST_PRIV, b"b" * 16, migrating_from="vm2")
    assert d.status == 403 and "must name this vm" in d.body["error"]


def test_a_second_target_while_one_is_in_flight_is_refused(mh_config, mh_dir):
    booted = launch(mh_config, mh_dir, MhRecord(), SRC_PRIV, b"a" * 16).mh
    flying = launch(mh_config, mh_dir, booted, DST_PRIV, b"b" * 16, migrating_from="vm1").mh
    d = launch(mh_config, mh_dir, flying, os.urandom(32), b"c" * 16, migrating_from="vm1")
    assert d.status == 409 and "already in flight" in d.body["error"]


def test_migrating_from_is_ignored_for_a_vm_without_mh(owner_dir):
    config = load_owner_config(owner_dir.toml)
    d = decide_secret(config, owner_dir.request(migrating_from="vm1"), attested=set(), iv=IV)
    assert d.status == 200 and d.mh is None and "ignored" in d.audit["migrating_from"]


def test_an_unverified_launch_changes_no_mh_state(mh_config, mh_dir):
    body = mh_dir.request(b"a" * 16)
    body["policy"] = 5
    d = decide_secret(mh_config, body, attested=set(), iv=IV, mh_record=MhRecord(), mh_private=SRC_PRIV)
    assert d.status == 403 and d.mh is None


def test_migrating_from_must_be_a_non_empty_string(mh_config, mh_dir):
    d = launch(mh_config, mh_dir, MhRecord(), SRC_PRIV, b"a" * 16, migrating_from=7)
    assert d.status == 400 and "migrating_from" in d.body["error"]


# -- /v1/mh/target and /v1/mh/complete ---------------------------------------------------------


def flying_record() -> MhRecord:
    booted = mh_for_boot(MhRecord(), SRC_PRIV).record
    out = mh_for_migration("vm1", "vm1", booted, DST_PRIV)
    assert not isinstance(out, MhRefusal)
    return out.record


def test_the_target_public_key_comes_with_a_tag_the_source_mh_can_check():
    record = flying_record()
    a = decide_mh_target({"vm": "vm1"}, known=True, mh=True, record=record)
    assert a.status == 200
    public, tag = (base64.b64decode(a.body[k]) for k in ("public_key", "tag"))
    assert public == mhkeys.public_key(DST_PRIV)
    src_pub = mhkeys.public_key(SRC_PRIV)
    # the source MH derives the confirm key from its own private key and the peer's public key
    keys = mhkeys.derive(SRC_PRIV, public, "vm1", src_pub, public)
    assert mhkeys.tag_matches(keys.confirm, public, tag)
    # ... and both MHs derive the same transport key
    theirs = mhkeys.derive(DST_PRIV, src_pub, "vm1", src_pub, public)
    assert keys.transport.reveal() == theirs.transport.reveal()
    # a key the hypervisor substitutes does not carry a valid tag
    forged = mhkeys.public_key(os.urandom(32))
    mine = mhkeys.derive(SRC_PRIV, forged, "vm1", src_pub, forged)
    assert not mhkeys.tag_matches(mine.confirm, forged, tag)


@pytest.mark.parametrize(
    ("known", "mh", "record", "status"),
    [(False, False, MhRecord(), 404), (True, False, MhRecord(), 403), (True, True, MhRecord(), 409)],
)
def test_no_target_key_without_a_migration_in_flight(known, mh, record, status):
    assert decide_mh_target({"vm": "vm1"}, known=known, mh=mh, record=record).status == status
    assert decide_mh_target({"vm": ""}, known=known, mh=mh, record=record).status == 400


def test_completed_retires_the_source_key_for_good(mh_config, mh_dir):
    record = flying_record()
    a = decide_mh_complete({"vm": "vm1", "status": "completed"}, known=True, mh=True, record=record)
    assert a.status == 200 and a.body["retired"] == "source"
    new = a.record
    assert new.live == mhkeys.public_key(DST_PRIV) and new.target is None
    assert mhkeys.key_id(mhkeys.public_key(SRC_PRIV)) in new.retired
    # a second report for the same migration is refused, and so is a target key request
    assert decide_mh_complete({"vm": "vm1", "status": "completed"}, known=True, mh=True, record=new).status == 409
    assert decide_mh_target({"vm": "vm1"}, known=True, mh=True, record=new).status == 409
    # a new target migrates from the VM's new live key: the retired source key is never released again
    d = launch(mh_config, mh_dir, new, os.urandom(32), b"z" * 16, migrating_from="vm1")
    assert table(d, mh_dir.blob(b"z" * 16))[MH_SOURCE_PUBLIC_KEY_GUID] == mhkeys.public_key(DST_PRIV)


def test_a_retired_live_key_is_never_a_source():
    src = mhkeys.public_key(SRC_PRIV)
    record = MhRecord(live=src, retired=frozenset({mhkeys.key_id(src)}))
    out = mh_for_migration("vm1", "vm1", record, DST_PRIV)
    assert isinstance(out, MhRefusal) and out.status == 409 and "retired" in out.reason


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_failed_or_cancelled_migration_retires_the_targets_key(status):
    a = decide_mh_complete({"vm": "vm1", "status": status}, known=True, mh=True, record=flying_record())
    assert a.status == 200 and a.body["retired"] == "target"
    assert a.record.live == mhkeys.public_key(SRC_PRIV) and a.record.target is None
    assert mhkeys.key_id(mhkeys.public_key(DST_PRIV)) in a.record.retired


def test_a_bad_completion_status_is_400():
    a = decide_mh_complete({"vm": "vm1", "status": "done"}, known=True, mh=True, record=flying_record())
    assert a.status == 400 and a.record is None


def test_a_reboot_retires_the_old_identity_and_a_pending_target():
    out = mh_for_boot(flying_record(), os.urandom(32))
    assert {mhkeys.key_id(mhkeys.public_key(p)) for p in (SRC_PRIV, DST_PRIV)} <= out.record.retired


async def test_the_memory_store_keeps_records_per_vm_and_swaps_only_from_what_it_holds():
    store = MemoryMhStore()
    assert await store.get("vm1") == MhRecord()
    assert await store.swap("vm1", MhRecord(), flying_record())
    assert (await store.get("vm1")).target is not None and await store.get("vm2") == MhRecord()
    assert not await store.swap("vm1", MhRecord(), MhRecord())  # another replica changed it meanwhile
    assert (await store.get("vm1")).target is not None


# -- owner.toml ------------------------------------------------------------------------------


def test_mh_is_refused_for_an_snp_vm(tmp_path):
    (tmp_path / "owner.toml").write_text("[vm.s]\nsnp = true\nmh = true\n")
    with pytest.raises(UsageError, match="does not apply to an SNP vm"):
        load_owner_config(tmp_path / "owner.toml")


def test_mh_is_refused_without_room_for_the_keys(tmp_path):
    d = write_owner_dir(tmp_path, "mh = true\nsecret_size = 64")
    with pytest.raises(UsageError, match=r"mh = true: secret table does not fit"):
        load_owner_config(d.toml)


def test_mh_must_be_a_boolean(tmp_path):
    d = write_owner_dir(tmp_path, 'mh = "yes"')
    with pytest.raises(UsageError, match="mh must be true or false"):
        load_owner_config(d.toml)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    body=st.one_of(
        _json,
        st.fixed_dictionaries(
            {"vm": st.sampled_from(["vm1", "", "vm9"])},
            optional={"status": st.sampled_from(["completed", "failed", "cancelled", "done"]) | _json},
        ),
    ),
    flying=st.booleans(),
)
def test_any_mh_body_is_an_answer_never_an_exception(body, flying):
    record = flying_record() if flying else MhRecord()
    for decide in (decide_mh_target, decide_mh_complete):
        a = decide(body, known=True, mh=True, record=record)
        assert 200 <= a.status < 500
        if a.status != 200:
            assert a.record is None and set(a.body) == {"error"}


# -- the owner database's owner_mh table --------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sql_store(request, tmp_path):
    from agent.owner.store import open_store, parse_db_url

    key = tmp_path / "state.key"
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    url = f"sqlite:///{tmp_path / 'owner.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    return open_store(parse_db_url(url), f"file:{key}")


async def test_the_database_keeps_mh_records_and_one_of_two_writers_wins(sql_store):
    from agent.owner.mh import SqlMhStore, mh_store_for, record_from_text, record_text

    store = mh_store_for(sql_store)
    assert isinstance(store, SqlMhStore)
    try:
        assert await store.get("vm1") == MhRecord()
        record = flying_record()
        assert record_from_text(record_text(record)) == record
        assert await store.swap("vm1", MhRecord(), record)
        assert not await store.swap("vm1", MhRecord(), mh_for_boot(MhRecord(), DST_PRIV).record)  # lost the race
        assert await store.get("vm1") == record
        done = decide_mh_complete({"vm": "vm1", "status": "completed"}, known=True, mh=True, record=record).record
        assert await store.swap("vm1", record, done)
        assert not await store.swap("vm1", record, MhRecord())  # a second report from the same old record
        # another replica (a second store over the same database) sees it
        assert await SqlMhStore(sql_store).get("vm1") == done
    finally:
        await sql_store.close()


def test_the_mh_table_is_one_schema_migration():
    from agent.owner.store import MIGRATIONS

    assert MIGRATIONS[-1].name == "mh keys" and "owner_mh" in MIGRATIONS[-1].statements[0]


# -- the service ---------------------------------------------------------------------------------


class _Racing(MemoryMhStore):
    """Another replica changes every record just before this one writes."""

    async def swap(self, vm, old, new):
        return False


async def test_a_release_whose_mh_record_changed_meanwhile_is_503_and_releases_nothing(mh_config, mh_dir):
    import json

    from agent.owner.service import OwnerService

    from .ownerstate import call

    service = OwnerService(mh_config, mh_store=_Racing())
    status, raw = await call(service, "/v1/secret", mh_dir.request(b"a" * 16))
    assert status == 503 and "try again" in json.loads(raw)["error"]
    service.mh_store = MemoryMhStore()  # the retry, with the state settled: a first release, not a resend
    status, raw = await call(service, "/v1/secret", mh_dir.request(b"a" * 16))
    assert status == 200 and (await service.mh_store.get("vm1")).live is not None


async def test_the_service_walks_boot_target_and_completion(mh_config, mh_dir):
    import json

    from agent.owner.service import OwnerService

    from .ownerstate import call

    service = OwnerService(mh_config)
    assert (await call(service, "/v1/secret", mh_dir.request(b"a" * 16)))[0] == 200
    assert (await call(service, "/v1/mh/target", {"vm": "vm1"}))[0] == 409
    assert (await call(service, "/v1/secret", mh_dir.request(b"b" * 16, migrating_from="vm1")))[0] == 200
    status, raw = await call(service, "/v1/mh/target", {"vm": "vm1"})
    assert status == 200 and len(base64.b64decode(json.loads(raw)["public_key"])) == 32
    status, raw = await call(service, "/v1/mh/complete", {"vm": "vm1", "status": "completed"})
    assert status == 200 and json.loads(raw)["retired"] == "source"
    assert (await call(service, "/v1/mh/complete", {"vm": "vm1", "status": "completed"}))[0] == 409
    assert (await call(service, "/v1/mh/complete", {"vm": "nope", "status": "failed"}))[0] == 404


async def test_a_database_release_and_its_mh_record_commit_together_or_not_at_all(mh_config, mh_dir, sql_store):
    import json

    from agent.owner.mh import SqlMhStore
    from agent.owner.service import OwnerService

    from .ownerstate import call

    class Stale(SqlMhStore):
        """Read before another replica wrote the VM's record."""

        async def get(self, vm):
            return MhRecord()

        async def swap(self, vm, old, new):
            raise AssertionError("a release writes its MH record in its own transaction, not apart")

    other = SqlMhStore(sql_store)
    try:
        assert await other.swap("vm1", MhRecord(), flying_record())
        service = OwnerService(mh_config, store=sql_store, mh_store=Stale(sql_store))
        status, raw = await call(service, "/v1/secret", mh_dir.request(b"a" * 16))
        assert status == 503 and "try again" in json.loads(raw)["error"]
        assert await other.get("vm1") == flying_record()  # the other replica's record stands
        assert "released" not in [row.decision for row in await sql_store.audit_rows("vm1")]  # rolled back with it
        # the retry reads the record as it is: release and record, one commit
        service.mh_store = type("Fresh", (SqlMhStore,), {"swap": Stale.swap})(sql_store)
        status, raw = await call(service, "/v1/secret", mh_dir.request(b"a" * 16))
        assert status == 200
        assert (await other.get("vm1")).live not in (None, flying_record().live)
        assert [row.decision for row in await sql_store.audit_rows("vm1")].count("released") == 1
    finally:
        await sql_store.close()
