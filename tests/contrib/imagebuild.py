"""Build contrib/container/Containerfile for real, and run its entrypoint.

No container registry is needed: the base image ``debian:bookworm-slim`` is
made with ``debootstrap --variant=minbase`` and ``podman import``ed under that
name; keyagent and its dependencies come in as a wheelhouse built by the
tests' own pip (the Containerfile's ``wheels`` build context), so pip inside
the build never reaches PyPI.  Everything podman keeps (images, layers, its
database, its run state) lives under one temporary directory through
``--root``/``--runroot``/``--tmpdir``, and is removed with it.

Running: ``podman run`` needs to set rlimits and cgroups, which a machine
that is itself a container may refuse (``setrlimit RLIMIT_NPROC: Operation
not permitted``, ``cgroups in hybrid mode not supported``).  So the
entrypoint runs the way a runtime would start it, by hand: the image mounted
read-only (``podman image mount``), new mount and PID namespaces
(``unshare``), ``/proc`` mounted fresh, ``/dev`` bound, a tmpfs on ``/tmp``,
the test's directories bound where the pod manifests put volumes, then
``chroot`` to the image, its working directory, its user (uid and gid from
the image's own /etc/passwd and /etc/group), its environment only, and its
ENTRYPOINT with the test's CMD.  The agent is PID 1 of its namespace, as in
a container.  ``exec_in`` enters those namespaces like ``podman exec`` (or a
Kubernetes exec probe) with ``nsenter``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.contrib.support import CONTAINERFILE, REPO

BASE = "debian:bookworm-slim"
TAG = "localhost/keyagent:test"
MIRROR = os.environ.get("KEYAGENT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP_TIMEOUT = 600
BUILD_TIMEOUT = 900
# Where the pods mount their volumes (contrib/kubernetes/keyagent-pods.yaml).
RUN_MOUNT = "/run/keyagent"
CONFIG_MOUNT = "/etc/keyagent"
VM_MOUNT = "/mnt"  # the test's disk image
BLOB_INFO_CACHE = "/var/lib/containers/cache"
# What podman 4.3 makes in /run as root whatever --runroot and --tmpdir say
# (netavark's and crun's state): removed at the end if this test made them.
RUNTIME_DIRS = ("/run/containers", "/run/crun", "/run/libpod")


class SetupError(Exception):
    """A step of the build failed: the message is one line naming the step."""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def missing_prerequisite() -> str | None:
    """Why this machine cannot build the image at all (a skip reason), or None."""
    if os.geteuid() != 0:
        return "building the image needs root (debootstrap, podman's storage, mounts)"
    for tool in ("podman", "debootstrap", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./dev.sh setup installs it)"
    if sys.version_info[:2] != (3, 11):
        return (
            "the wheelhouse is built by the tests' Python, which must be the image's "
            f"(3.11, Debian 12), not {sys.version_info[0]}.{sys.version_info[1]}"
        )
    return None


def run_step(what: str, argv: list[str], timeout: float, log: Path, **kw) -> None:
    """Run one build step, its output into ``log``; a failure is one line."""
    with open(log, "wb") as out:
        try:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            raise SetupError(f"{what}: no result after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise SetupError(f"{what} failed (exit {proc.returncode}): {_last_line(log.read_text(errors='replace'))}")


@dataclass
class Podman:
    """podman with every byte of its state under ``state`` and ``runroot``.

    ``runroot`` is a directory of its own because podman refuses one whose path
    is longer than 50 characters, as pytest's temporary directories are.
    """

    state: Path
    runroot: Path
    driver: str = "overlay"
    made: list[str] = field(default_factory=list)  # directories made outside ``state``

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.state / "root"),
            "--runroot",
            str(self.runroot),
            "--tmpdir",
            str(self.state / "libpod"),
            "--storage-driver",
            self.driver,
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
            *args,
        ]

    def sealed_argv(self, *args: str) -> list[str]:
        """``argv`` for the commands that write image blobs (import, build).

        For root, containers/image keeps a blob-info cache in BLOB_INFO_CACHE
        whatever ``--root`` says (no option or variable moves it): these
        commands run in a mount namespace of their own where a directory of
        ``state`` is bound over it.
        """
        cache = self.state / "blob-info-cache"
        cache.mkdir(exist_ok=True)
        missing = []
        path = Path(BLOB_INFO_CACHE)
        while not path.exists():
            missing.append(str(path))
            path = path.parent
        for d in reversed(missing):
            os.mkdir(d, 0o700)
            self.made.append(d)
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$1" "$2" && shift 2 && exec "$@"',
            "sealed",
            str(cache),
            BLOB_INFO_CACHE,
            *self.argv(*args),
        ]

    def env(self) -> dict:
        tmp = self.state / "tmp"
        tmp.mkdir(exist_ok=True)
        return {**os.environ, "TMPDIR": str(tmp)}

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env(), **kw)
        if check and proc.returncode != 0:
            raise SetupError(f"podman {args[0]} failed (exit {proc.returncode}): {_last_line(proc.stderr)}")
        return proc

    def choose_driver(self) -> None:
        """overlay where the kernel allows it (not over an overlayfs root), else vfs.

        The first podman command: it notes which of podman's fixed run-time
        directories exist, so that those podman makes are removed at the end.
        """
        self.made += [d for d in RUNTIME_DIRS if not os.path.exists(d)]
        probe = self.run("info", "--format", "{{.Store.GraphDriverName}}", check=False)
        if probe.returncode != 0:
            shutil.rmtree(self.state / "root", ignore_errors=True)
            self.driver = "vfs"

    def remove_everything(self) -> None:
        """Unmount the images and remove them, then podman's state."""
        for args in (("image", "unmount", "--all", "--force"), ("rmi", "--all", "--force")):
            try:
                self.run(*args, check=False, timeout=120)
            except subprocess.TimeoutExpired:
                pass
        for top in (self.state, self.runroot):
            for mount in mounts_under(top):
                subprocess.run(["umount", "--lazy", mount], capture_output=True, timeout=30)
            shutil.rmtree(top, ignore_errors=True)
        for top in reversed(self.made):
            # Empty directories only, bottom up: nothing of anyone else's.
            for d, _, _ in os.walk(top, topdown=False) if os.path.isdir(top) else ():
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix[:-1] or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


@dataclass
class Image:
    podman: Podman
    ref: str
    info: dict  # podman image inspect
    base_size: int
    root: Path  # the image's file system, mounted read-only
    build_seconds: float

    @property
    def config(self) -> dict:
        return self.info["Config"]

    @property
    def size(self) -> int:
        return int(self.info["Size"])

    def user_ids(self) -> tuple[int, int]:
        """The image's USER as numbers, from its own /etc/passwd and /etc/group."""
        user, _, group = self.config["User"].partition(":")
        uid = gid = None
        for line in (self.root / "etc" / "passwd").read_text().splitlines():
            f = line.split(":")
            if user in (f[0], f[2]):
                uid, gid = int(f[2]), int(f[3])
        assert uid is not None, f"USER {user}: not in the image's /etc/passwd"
        if group:
            for line in (self.root / "etc" / "group").read_text().splitlines():
                f = line.split(":")
                if group in (f[0], f[2]):
                    gid = int(f[2])
        return uid, gid


def build_image(tmp: Path, podman: Podman) -> Image:
    """debootstrap + import + wheelhouse + podman build + mount.  ``tmp`` holds it all."""
    logs = tmp / "logs"
    logs.mkdir()
    podman.state.mkdir(exist_ok=True)
    podman.choose_driver()
    started = time.monotonic()

    rootfs = tmp / "rootfs"
    run_step(
        f"debootstrap --variant=minbase bookworm from {MIRROR}",
        ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR],
        DEBOOTSTRAP_TIMEOUT,
        logs / "debootstrap.log",
    )
    # What the official slim image leaves out too: downloaded packages, apt lists.
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / leftover).glob("*"):
            if entry.is_file():
                entry.unlink()
    with open(logs / "import.log", "wb") as log:
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE, stderr=log
        )
        imp = subprocess.run(
            podman.sealed_argv("import", "-", BASE),
            stdin=tar.stdout,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=podman.env(),
            timeout=300,
        )
        tar.stdout.close()
        tar.wait(timeout=60)
    if tar.returncode != 0 or imp.returncode != 0:
        raise SetupError(
            f"podman import of the debootstrapped base failed: "
            f"{_last_line((logs / 'import.log').read_text(errors='replace'))}"
        )
    shutil.rmtree(rootfs)
    base_size = int(json.loads(podman.run("image", "inspect", BASE).stdout)[0]["Size"])

    wheels = build_wheels(tmp / "src", tmp / "wheels", logs / "wheel.log")
    build(podman, wheels, TAG, logs / "build.log")
    built = time.monotonic() - started
    info = json.loads(podman.run("image", "inspect", TAG).stdout)[0]
    root = Path(podman.run("image", "mount", TAG).stdout.strip())
    return Image(podman, TAG, info, base_size, root, built)


def build_wheels(src: Path, wheels: Path, log: Path, version: str | None = None) -> Path:
    """The wheelhouse, from a copy of the package's sources (pip wheel builds in
    the source tree: the checkout stays untouched); ``version`` replaces the
    package's version."""
    src.mkdir()
    text = (REPO / "pyproject.toml").read_text()
    if version is not None:
        text, n = re.subn(r'(?m)^version = "[^"]*"$', f'version = "{version}"', text)
        assert n == 1, "pyproject.toml: no version line"
    (src / "pyproject.toml").write_text(text)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "agent", src / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    run_step(
        "pip wheel (the wheelhouse)",
        [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--wheel-dir", str(wheels), str(src)],
        600,
        log,
    )
    return wheels


def build(podman: Podman, wheels: Path, tag: str, log: Path) -> None:
    """podman build of the checkout, with ``wheels`` as the "wheels" build context."""
    run_step(
        "podman build of contrib/container/Containerfile",
        podman.sealed_argv(
            "build",
            "--isolation",
            "chroot",
            "--pull=never",
            "--format",
            "docker",
            "--build-context",
            f"wheels={wheels}",
            "-f",
            str(CONTAINERFILE),
            "-t",
            tag,
            str(REPO),
        ),
        BUILD_TIMEOUT,
        log,
        env=podman.env(),
    )


# -- running the entrypoint ---------------------------------------------------------

# In the new namespaces, as root: the mounts a runtime makes for a read-only
# root file system (proc, /dev, tmpfs on /tmp, /var/tmp and /run), then the
# volumes (mount points made as the runtime makes them: in /run's tmpfs, or an
# empty file for a single-file mount), then the image's root, working
# directory and user, and nothing of this process's environment.
_ENTER = r"""
set -eu
root=$1 wd=$2 uid=$3 gid=$4 n=$5
shift 5
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/var/tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
while [ "$n" -gt 0 ]; do
    src=$1 dst=$root$2 opt=$3
    shift 3
    n=$((n - 1))
    if [ -d "$src" ]; then
        [ -d "$dst" ] || mkdir -p "$dst"
    else
        [ -d "${dst%/*}" ] || mkdir -p "${dst%/*}"
        [ -e "$dst" ] || : > "$dst"
    fi
    mount -o "bind,$opt" "$src" "$dst"
done
exec unshare --root="$root" --wd="$wd" --setuid "$uid" --setgid "$gid" -- env -i "$@"
"""


@dataclass
class Container:
    """One run of the image's entrypoint; ``pid`` is its PID 1, seen from here."""

    image: Image
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    env: list[str] = field(default_factory=list)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def pid(self) -> int | None:
        """The entrypoint's process: unshare's only child."""
        pids = children_of(self.popen.pid)
        return pids[0] if pids else None

    def exec_in(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """``argv`` in the container's namespaces, root and user: an exec probe."""
        uid, gid = self.image.user_ids()
        pid = self.pid
        assert pid is not None, "the container is not running"
        return subprocess.run(
            [
                "nsenter",
                "--target",
                str(pid),
                "--mount",
                "--pid",
                "--root",
                "--wd",
                "--setuid",
                str(uid),
                "--setgid",
                str(gid),
                "--",
                "env",
                "-i",
                *self.env,
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to PID 1 ends the whole PID namespace (QEMU too), then unshare."""
        if self.popen.poll() is None:
            pid = self.pid
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)


def start(image: Image, tmp: Path, cmd: list[str], mounts: list[tuple[Path, str, str]]) -> Container:
    """The image's ENTRYPOINT with ``cmd`` as its CMD (``podman run IMAGE CMD...``).

    ``mounts``: (host path, path in the container, "rw" or "ro"), in order.
    """
    cfg = image.config
    argv = list(cfg.get("Entrypoint") or []) + list(cmd)
    uid, gid = image.user_ids()
    env = list(cfg.get("Env") or [])
    volumes = [str(v) for src, dst, opt in mounts for v in (src, dst, opt)]
    assert all(opt in ("rw", "ro") for _, _, opt in mounts)
    out, err = tmp / "container.stdout", tmp / "container.stderr"
    popen = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "sh",
            "-c",
            _ENTER,
            "enter",
            str(image.root),
            cfg.get("WorkingDir") or "/",
            str(uid),
            str(gid),
            str(len(mounts)),
            *volumes,
            *env,
            *argv,
        ],
        stdin=subprocess.DEVNULL,
        stdout=open(out, "wb"),
        stderr=open(err, "wb"),
    )
    return Container(image, popen, out, err, env)


def podman_run(image: Image, *argv: str) -> tuple[str | None, str]:
    """``podman run --rm IMAGE`` with ``argv`` replacing the entrypoint: (error, stdout).

    The error is None when podman could run it, else podman's one-line reason.
    The rlimits are this process's own: podman's defaults (RLIMIT_NOFILE and
    RLIMIT_NPROC raised) fail where CAP_SYS_RESOURCE is missing.
    """
    import resource

    ulimits = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = (-1 if v == resource.RLIM_INFINITY else v for v in resource.getrlimit(which))
        ulimits += ["--ulimit", f"{name}={soft}:{hard}"]
    proc = image.podman.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        *ulimits,
        "--entrypoint",
        argv[0],
        image.ref,
        *argv[1:],
        check=False,
        timeout=120,
    )
    if proc.returncode in (125, 126, 127):  # podman's own, or the OCI runtime's, failure
        return _last_line(proc.stderr), proc.stdout
    return None, proc.stdout


def qmp(path: Path, command: str, args: dict | None = None):
    """One QMP command on a QEMU monitor socket."""
    import asyncio

    from qemu.qmp import QMPClient

    async def go():
        client = QMPClient("contrib-test")
        await asyncio.wait_for(client.connect(str(path)), 10)
        try:
            return await asyncio.wait_for(client.execute(command, args or {}), 10)
        finally:
            try:
                await client.disconnect()
            except Exception:  # after quit, QEMU closes first
                pass

    return asyncio.run(go())


def status_ids(pid: int) -> tuple[int, int, list[int]]:
    """(real uid, real gid, NSpid) of a process, from /proc."""
    uid = gid = -1
    nspid: list[int] = []
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uid = int(value.split()[0])
        elif key == "Gid":
            gid = int(value.split()[0])
        elif key == "NSpid":
            nspid = [int(v) for v in value.split()]
    return uid, gid, nspid


def children_of(pid: int) -> list[int]:
    """The children of ``pid``, from /proc/*/stat (kernels without .../children too)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)
