"""A throwaway PostgreSQL cluster: the owner's database tests and ``keyagent bench``.

``initdb`` into a fresh temp dir, ``pg_ctl start`` listening on a unix
socket in that dir only (no TCP), trust authentication for one role; torn
down with ``pg_ctl stop -m immediate`` and the dir removed.  PostgreSQL
refuses to run as root, and the tests run as root here and in CI: as root,
the cluster runs as ``nobody`` (``setpriv``), in a dir under the system's
temp dir (pytest's own tmp dirs are 0700 root) owned by that user.

The binaries are found with ``pg_config --bindir`` or under
``/usr/lib/postgresql/*/bin`` (Debian's layout, any version).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from itertools import count

ROLE = "keyagent"


def find_bindir() -> str | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for d in candidates:
        if d and all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


@dataclass
class PgCluster:
    bindir: str
    root: str
    _names: count = field(default_factory=lambda: count(1))

    @property
    def socket_dir(self) -> str:
        return self.root

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"owner_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_server_user() -> tuple[list[str], int, int]:
    """The command prefix that runs a program as the cluster's owner, and its uid/gid."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    user = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
    return prefix, user.pw_uid, user.pw_gid


def start_cluster(bindir: str, *, fsync: bool = False) -> PgCluster:
    """initdb + pg_ctl start (``fsync``: off for tests, on for the bench's figures)."""
    prefix, uid, gid = _as_server_user()
    root = tempfile.mkdtemp(prefix="keyagent-pg-")
    os.chown(root, uid, gid)
    data = os.path.join(root, "data")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": root}
    try:
        subprocess.run(
            [*prefix, os.path.join(bindir, "initdb"), "-D", data, "-U", ROLE, "--auth=trust", "-E", "UTF8"]
            + ["--no-sync"],
            check=True,
            capture_output=True,
            env=env,
            timeout=120,
            cwd=root,
        )
        options = f"-k {root} -c listen_addresses='' -c fsync={'on' if fsync else 'off'} -c max_connections=200"
        subprocess.run(
            [*prefix, os.path.join(bindir, "pg_ctl"), "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60"]
            + ["-o", options, "start"],
            check=True,
            capture_output=True,
            env=env,
            timeout=120,
            cwd=root,
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return PgCluster(bindir, root)


def stop_cluster(cluster: PgCluster) -> None:
    prefix, _, _ = _as_server_user()
    try:
        subprocess.run(
            [*prefix, os.path.join(cluster.bindir, "pg_ctl"), "-D", os.path.join(cluster.root, "data"), "-m"]
            + ["immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
            cwd=cluster.root,
        )
    finally:
        shutil.rmtree(cluster.root, ignore_errors=True)
