"""A restarted ``keyagent run`` over a live VM: what its predecessor left running.

Crash-only: the agent keeps nothing on disk about what it was doing, so a
new agent (SIGKILL, then the same command again) learns it from QEMU and
the run_dir alone, before it sweeps stale keys or serves a request
(``docs/crash-only-adopt.md``):

* ``qom-list /objects``: our ``keyagent-tls-*`` creds objects, the master
  key (``keyagent-master``) and the secret objects already in QEMU; with
  none of our creds objects that is all (a fresh VM: one command);
* ``query-migrate-parameters``: which creds object ``tls-creds`` names;
* ``query-migrate``: the migration's status (a destination still waiting
  for its source has none, only a ``socket-address``: QEMU 7.2);
* ``qom-get`` of that object's ``endpoint`` and, for a server (the
  destination: GnuTLS reads ``keys.psk`` again at every handshake until the
  final status), its ``dir``: the one key directory the sweep keeps, if it
  is a ``key-tls-*`` directory of our run_dir.

Each creds object becomes a :class:`MigrationFlow` started with
``Adopted`` (what QEMU said) instead of ``Start``: it follows the migration
to its final status and cleans up as if the agent had never died, or at
once when it has already ended.  Nothing here decides how: the flow does,
and the event log records it, so ``keyagent replay --check`` holds.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from agent.common.errors import FlowFailed
from agent.core.events import Adopted
from agent.io import qmp as qmpio
from agent.io.monitor import Monitor
from agent.io.rundir import key_dir_name

CREDS_PREFIX = "keyagent-tls-"  # agent.app.verbs.migrate names its creds objects so
MASTER_ID = "keyagent-master"  # agent.core.secret_objects.SecretsParams.master_id
SECRET_TYPES = ("child<secret>", "child<secret_keyring>")
FLOW_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
INSPECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class FoundMigration:
    """One of our creds objects, and what QEMU says of its migration."""

    flow_id: str
    creds_id: str
    role: str  # "source" (endpoint client) or "destination" (server)
    event: Adopted

    @property
    def live(self) -> bool:
        from agent.core.migration import FINAL

        return self.event.status not in FINAL and (self.event.status != "none" or self.event.listening)


@dataclass
class Found:
    """What a restarted agent found in QEMU (empty for a fresh one)."""

    migrations: list[FoundMigration] = field(default_factory=list)
    secret_ids: list[str] = field(default_factory=list)  # secret objects already in QEMU
    keep: list[str] = field(default_factory=list)  # key dirs (run_dir entries) the sweep keeps

    @property
    def master(self) -> bool:
        return MASTER_ID in self.secret_ids

    def record(self) -> dict[str, Any]:
        """For the event log's ``adopt`` record and the log line (no secret in any)."""
        return {
            "migrations": [
                {"flow": m.flow_id, "role": m.role, "status": m.event.status, "listening": m.event.listening}
                for m in self.migrations
            ],
            "secret_objects": len(self.secret_ids),
            "master_in_qemu": self.master,
            "kept": self.keep,
        }


async def _ask(monitor: Monitor, command: str, args: dict[str, Any] | None = None) -> Any:
    """QEMU's answer, or None if QEMU refused (an object that went away)."""
    try:
        return await monitor.execute(command, args)
    except qmpio.QmpCommandError:
        return None


def _flow_id(creds_id: str, taken: set[str]) -> str:
    rest = creds_id[len(CREDS_PREFIX) :]
    base = rest if FLOW_ID.fullmatch(rest) else "adopted-migration"
    flow_id, n = base, 1
    while flow_id in taken:
        n += 1
        flow_id = f"{base}-{n}"
    return flow_id


async def inspect(monitor: Monitor, run_dir: str, timeout: float = INSPECT_TIMEOUT_S) -> Found:
    """Ask QEMU what is already there; ``MonitorGone`` if it went away meanwhile."""
    try:
        return await asyncio.wait_for(_inspect(monitor, run_dir), timeout)
    except TimeoutError:
        raise FlowFailed(f"QEMU did not answer the start-up inspection within {timeout:g} s") from None


async def _inspect(monitor: Monitor, run_dir: str) -> Found:
    # Only our creds objects become migration flows: without one there is
    # nothing of a migration to take over, whatever QEMU's migration state
    # (someone else's migration is not ours to follow), so a fresh VM costs
    # one command here, not three (``keyagent host`` starts 100 at once).
    objects = await _ask(monitor, "qom-list", {"path": "/objects"})
    found = Found()
    ours: list[str] = []
    for obj in objects if isinstance(objects, list) else []:
        name, kind = (obj.get("name"), obj.get("type")) if isinstance(obj, dict) else (None, None)
        if not isinstance(name, str):
            continue
        if kind == "child<tls-creds-psk>" and name.startswith(CREDS_PREFIX):
            ours.append(name)
        elif kind in SECRET_TYPES:
            found.secret_ids.append(name)
    if not ours:
        return found
    params, info = await asyncio.gather(_ask(monitor, "query-migrate-parameters"), _ask(monitor, "query-migrate"))
    tls_creds = params.get("tls-creds") if isinstance(params, dict) else None
    info = info if isinstance(info, dict) else {}
    raw_status = info.get("status")
    status = raw_status if isinstance(raw_status, str) else "none"
    listening = bool(info.get("socket-address")) and status == "none"
    # The object tls-creds names is the migration's; any other of ours is a
    # leftover of a setup or cleanup the old agent did not finish.
    ours.sort(key=lambda name: name == tls_creds)
    taken: set[str] = set()
    for creds_id in ours:
        current = creds_id == tls_creds
        endpoint = await _ask(monitor, "qom-get", {"path": f"/objects/{creds_id}", "property": "endpoint"})
        role = "destination" if endpoint == "server" else "source"
        event = Adopted(status if current else "none", listening=current and listening, creds=True, tls_set=current)
        flow_id = _flow_id(creds_id, taken)
        taken.add(flow_id)
        migration = FoundMigration(flow_id, creds_id, role, event)
        if role == "destination" and migration.live:
            # Only the server side reads keys.psk after object-add; keep its
            # directory if QEMU names one of ours, and nothing else.
            path = await _ask(monitor, "qom-get", {"path": f"/objects/{creds_id}", "property": "dir"})
            name = key_dir_name(run_dir, path) if isinstance(path, str) else None
            if name is not None:
                found.keep.append(name)
                migration = FoundMigration(flow_id, creds_id, role, _with_dir(event, path))
        found.migrations.append(migration)
    return found


def _with_dir(event: Adopted, path: str) -> Adopted:
    return Adopted(event.status, event.listening, path.rstrip("/"), event.creds, event.tls_set)


def start_migrations(host: Any, found: Found) -> None:
    """One adopted :class:`MigrationFlow` per creds object found, its kept
    key directory handed to the runtime's key store as the flow's own (so
    every ending removes it, as for a flow this agent started)."""
    if not found.migrations:
        return  # (a fresh agent: agent.core.migration stays unloaded until a migration starts)
    from agent.core.migration import KEY_DIR, MigrationFlow, MigrationParams

    rt = host.runtime
    cfg = host.cfg
    for m in found.migrations:
        flow = MigrationFlow(
            MigrationParams(
                role="destination" if m.role == "destination" else "source",
                uri="",
                reply_to="",
                creds_id=m.creds_id,
                dest_deadline_s=cfg.migration_dest_deadline_s,
                adopted=True,
                # an adopted source of an MH VM reports its end to the owner, as its predecessor would have
                mh_vm=cfg.vm_name if (m.role != "destination" and cfg.sev_mh and cfg.sev_enabled) else None,
            )
        )
        if m.event.key_dir:
            rt.keys.adopt_dir(m.flow_id, KEY_DIR, m.event.key_dir)
        rt.start_flow(m.flow_id, flow, first=m.event)


async def take_over(host: Any, monitor: Monitor, event_log: Any) -> Found:
    """Inspect QEMU, then sweep every key directory no live migration reads.

    The sweep at claim kept the ``key-tls-*`` directories (one may be a
    live destination's); this is the rest of it, when it kept any
    (``host.deferred_key_dirs``; nothing of ours is made in between).  A
    monitor lost meanwhile leaves nothing live: everything goes.
    """
    from agent.io.rundir import sweep_stale_keys

    run_dir = host.run_dir
    try:
        found = await inspect(monitor, run_dir)
    except qmpio.MonitorGone:
        found = Found()
    deferred = getattr(host, "deferred_key_dirs", None)
    removed = sweep_stale_keys(run_dir, keep=found.keep) if deferred is None or deferred else []
    if removed:
        host.log.warning("swept stale key material left by a previous agent", run_dir=run_dir, removed=removed)
    if found.migrations or found.secret_ids or found.keep:
        record = found.record()
        event_log.write("adopt", **record)
        host.log.info("taking over what a previous agent left in QEMU", **record)
    return found
