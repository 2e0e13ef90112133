"""contrib/container: the entrypoint image, built from the checkout and run.

One session-scoped build (debootstrap'd base, wheelhouse, ``podman build``;
see tests/contrib/imagebuild.py), then ``keyagent launch`` from the image
booting the tests' marker guest under TCG: the VM runs, the image's
HEALTHCHECK and the entrypoint pod's exec probes answer inside the
container, SIGTERM powers the VM down, the exit status is QEMU's, and the
run_dir is left empty with no secret in anything the container left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from tests.contrib.imagebuild import (
    CONFIG_MOUNT,
    RUN_MOUNT,
    VM_MOUNT,
    Podman,
    SetupError,
    build,
    build_image,
    build_wheels,
    children_of,
    missing_prerequisite,
    podman_run,
    qmp,
    start,
    status_ids,
)
from tests.contrib.support import CONTAINERFILE, CONTRIB, exec_form, only, parse_containerfile
from tests.e2e.harness import wait_for
from tests.e2e.qemu import BOOT_ADDR, MARKER_OFFSET, boot_image
from tests.leakscan import ArgvWatcher, LeakScan

pytestmark = pytest.mark.container

UID = GID = 10001  # contrib/README.md: "In containers: uid 10001 for both."
# The image's size: about 510 MB here (a debootstrapped minbase of ~120 MB plus
# QEMU, swtpm, OVMF, Python and the venv).  A budget with room, not a target.
MAX_IMAGE_BYTES = 650_000_000
MAX_ADDED_BYTES = 450_000_000
GRACE_S = 3  # [launch] shutdown_grace_s for the tests: the marker guest ignores ACPI
TEST_QMP = "test.sock"  # a second monitor for the test, next to the run_dir


@pytest.fixture(scope="session")
def image(tmp_path_factory):
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("image")
    podman = Podman(tmp / "podman", Path(tempfile.mkdtemp(prefix="keyagent-podman-")))
    try:
        failure = None
        try:
            built = build_image(tmp, podman)
        except SetupError as exc:
            failure = str(exc)
        if failure:
            pytest.fail(failure, pytrace=False)
        yield built
    finally:
        podman.remove_everything()


@pytest.fixture
def short_tmp():
    """A directory whose socket paths fit sun_path (pytest's tmp_path can be too long)."""
    path = Path(tempfile.mkdtemp(prefix="ka-ct-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def volumes(image, short_tmp):
    """The host side of the container's mounts: run (rw), config and vm (read-only)."""
    tmp_path = short_tmp
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, UID, GID)
    config = tmp_path / "config"
    config.mkdir()
    text = (CONTRIB / "container" / "vm.toml").read_text()
    text, n = re.subn(r"(?m)^shutdown_grace_s = \d+$", f"shutdown_grace_s = {GRACE_S}", text)
    assert n == 1, "contrib/container/vm.toml: no [launch] shutdown_grace_s"
    (config / "vm.toml").write_text(text)
    vm = tmp_path / "vm"
    vm.mkdir()
    marker = b"keyagent-container-" + os.urandom(6).hex().encode()
    boot_image(vm / "disk.img", marker)
    return {"run": run, "config": config, "vm": vm, "marker": marker, "tmp": tmp_path}


def qemu_cmd() -> list[str]:
    """The CMD a user gives after the image name: the marker guest, a test monitor."""
    return [
        "qemu-system-x86_64",
        "-machine",
        "q35,accel=tcg",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "none",
        "-drive",
        f"file={VM_MOUNT}/disk.img,format=raw,if=ide,snapshot=on",
        "-qmp",
        f"unix:{RUN_MOUNT}/{TEST_QMP},server=on,wait=off",
    ]


@pytest.fixture
def container(image, volumes):
    box = start(
        image,
        volumes["tmp"],
        qemu_cmd(),
        [(volumes["run"], RUN_MOUNT, "rw"), (volumes["config"], CONFIG_MOUNT, "ro"), (volumes["vm"], VM_MOUNT, "ro")],
    )
    try:
        yield box
    finally:
        box.kill()


def run_dir(volumes) -> Path:
    """[vm] run_dir of contrib/container/vm.toml, seen from the host."""
    return volumes["run"] / "vm"


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob("*")) if path.exists() else []


def manifest(kind: str, name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    docs = yaml.safe_load_all((CONTRIB / "kubernetes" / "keyagent-pods.yaml").read_text())
    (doc,) = [d for d in docs if d and d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def entrypoint_pod_probes() -> dict[str, list[str]]:
    (c,) = manifest("Pod", "vm1-entrypoint")["spec"]["containers"]
    return {kind: c[kind]["exec"]["command"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def wait_until_ready(box, volumes) -> int:
    """The entrypoint's pid once the image's HEALTHCHECK answers inside the container.

    ``volumes["run"]`` is the host side of /run/keyagent, which holds the run_dir.
    """
    health = box.image.info["Healthcheck"]["Test"]
    assert health[0] == "CMD", health

    def healthy() -> bool:
        if box.popen.poll() is not None:
            return True
        if box.pid is None or not (run_dir(volumes) / "control.sock").exists():
            return False
        return box.exec_in(health[1:]).returncode == 0

    wait_for(healthy, timeout=60, what="the image's HEALTHCHECK to pass")
    assert box.popen.poll() is None, f"the entrypoint exited: {box.stderr[-2000:]}"
    return box.pid


def child_named(agent_pid: int, comm: str) -> int:
    """The agent's one live child called ``comm`` (orphans it reaps may be zombies)."""
    found = []
    for pid in children_of(agent_pid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if name == comm and state != "Z":
            found.append(pid)
    assert len(found) == 1, f"{comm}: {found}"
    return found[0]


def qemu_of(agent_pid: int) -> int:
    return child_named(agent_pid, "qemu-system-x86")  # comm: 15 characters


def test_image_builds_from_the_checkout_within_its_size_budget(image):
    assert image.size < MAX_IMAGE_BYTES, f"image is {image.size / 1e6:.0f} MB"
    added = image.size - image.base_size
    assert added < MAX_ADDED_BYTES, f"{added / 1e6:.0f} MB over the base image"
    instructions = parse_containerfile(CONTAINERFILE.read_text())
    assert image.config["Entrypoint"] == exec_form(only(instructions, "ENTRYPOINT"))
    assert image.config["Cmd"] == exec_form(only(instructions, "CMD"))
    assert image.config["StopSignal"] == "SIGTERM"
    # Nothing of the build context but the installed package.
    assert not (image.root / "src").exists()
    assert not (image.root / "tmp" / "wheels").exists()
    assert (image.root / "opt" / "keyagent" / "bin" / "keyagent").exists()
    for tool in ("qemu-system-x86_64", "qemu-img", "swtpm", "swtpm_setup", "keyctl"):
        assert (image.root / "usr" / "bin" / tool).exists(), tool
    assert (image.root / "usr" / "share" / "ovmf" / "OVMF.fd").exists()


def site_packages(root: Path) -> Path:
    (found,) = (root / "opt" / "keyagent" / "lib").glob("python3.*/site-packages")
    return found


def test_rebuild_with_new_wheels_installs_them_not_a_cached_layer(image, tmp_path):
    """A changed package gives a changed image (buildah would reuse a cached
    ``RUN --mount=from=wheels`` layer; the Containerfile COPYs the wheels)."""
    before = [p.name for p in site_packages(image.root).glob("keyagent-*.dist-info")]
    assert before == ["keyagent-0.1.0.dist-info"] or len(before) == 1, before
    failure = None
    try:
        wheels = build_wheels(tmp_path / "src", tmp_path / "wheels", tmp_path / "wheel.log", version="0.1.0.post99")
        build(image.podman, wheels, "localhost/keyagent:rebuilt", tmp_path / "build.log")
    except SetupError as exc:
        failure = str(exc)
    if failure:
        pytest.fail(failure, pytrace=False)
    root = Path(image.podman.run("image", "mount", "localhost/keyagent:rebuilt").stdout.strip())
    try:
        after = [p.name for p in site_packages(root).glob("keyagent-*.dist-info")]
    finally:
        image.podman.run("image", "unmount", "localhost/keyagent:rebuilt", check=False)
        image.podman.run("rmi", "localhost/keyagent:rebuilt", check=False)
    assert after == ["keyagent-0.1.0.post99.dist-info"], after


def test_image_runs_as_the_documented_user(image):
    assert image.config["User"] == "keyagent:keyagent"
    assert image.user_ids() == (UID, GID)
    for d in ("run/keyagent", "var/lib/keyagent"):
        st = (image.root / d).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (UID, GID, 0o700), d
    assert image.config["WorkingDir"] == "/var/lib/keyagent"
    # The pods run as the image's user: no runAsUser that the image does not know.
    yaml = pytest.importorskip("yaml")
    docs = yaml.safe_load_all((CONTRIB / "kubernetes" / "keyagent-pods.yaml").read_text())
    for pod in (d for d in docs if d and d["kind"] == "Pod"):
        sc = pod["spec"]["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"]) == (UID, GID)


def test_podman_run_gives_the_documented_user_where_podman_can_run(image):
    error, out = podman_run(image, "id", "-u")
    if error is not None:
        pytest.skip(
            f"podman run does not work on this machine ({error}); the entrypoint "
            "tests run the image by mount + unshare + chroot instead"
        )
    assert out.strip() == str(UID)


def test_entrypoint_launches_the_marker_guest_and_sigterm_powers_it_down(image, volumes, container):
    scan = LeakScan()
    with ArgvWatcher() as argv:
        scan.argv = argv
        agent = wait_until_ready(container, volumes)
        # PID 1 of its own namespace, as the image's user; so is QEMU, its child.
        uid, gid, nspid = status_ids(agent)
        assert (uid, gid) == (UID, GID) and nspid[-1] == 1, (uid, gid, nspid)
        qemu = qemu_of(agent)
        assert status_ids(qemu)[:2] == (UID, GID)

        # The VM runs (the agent resumed the -S it added) and booted our disk.
        test_qmp = volumes["run"] / TEST_QMP
        wait_for(lambda: qmp(test_qmp, "query-status")["status"] == "running", timeout=30, what="the VM running")
        names = [o["name"] for o in qmp(test_qmp, "qom-list", {"path": "/objects"})]
        assert "keyagent-master" in names
        marker = volumes["marker"]

        def marker_in_ram() -> bool:
            out = f"{RUN_MOUNT}/mem.bin"  # QEMU writes it, as the image's user
            qmp(test_qmp, "pmemsave", {"val": BOOT_ADDR + MARKER_OFFSET, "size": len(marker), "filename": out})
            host = volumes["run"] / "mem.bin"
            data = host.read_bytes()
            host.unlink()
            return data == marker

        wait_for(marker_in_ram, timeout=30, what="the marker guest's boot sector in RAM")

        # The master key's file is gone once QEMU has read it.
        assert files(run_dir(volumes)) == ["control.sock", "qmp.sock"]
        assert (run_dir(volumes).stat().st_mode & 0o7777) == 0o700

        # The entrypoint pod's exec probes, run in the container.
        for kind, command in entrypoint_pod_probes().items():
            answer = container.exec_in(command)
            assert answer.returncode == 0, (kind, answer.stderr)

        # A secret through the control socket: to be searched for afterwards.
        secret = scan.secret("secret", ("container-secret-" + os.urandom(8).hex()).encode())
        pw = volumes["vm"] / "pw"
        pw.write_bytes(secret)
        health = container.image.info["Healthcheck"]["Test"][1:]
        ctl = health[: health.index("--timeout")]  # keyagent ctl --control unix:...
        added = container.exec_in([*ctl, "secret", "add", "--id", "s0", "--file", f"{VM_MOUNT}/pw"])
        assert added.returncode == 0, added.stderr
        pw.unlink()
        assert "s0" in [o["name"] for o in qmp(test_qmp, "qom-list", {"path": "/objects"})]

        # SIGTERM to PID 1, as `podman stop` / the kubelet sends it.
        started = time.monotonic()
        os.kill(agent, signal.SIGTERM)
        code = container.wait(timeout=GRACE_S + 30)
        took = time.monotonic() - started
    stderr = container.stderr
    assert code == 0, stderr[-2000:]
    assert "signal received: powering the VM down" in stderr
    assert "grace period over: quitting QEMU" in stderr  # the marker guest ignores ACPI
    assert took < GRACE_S + 15
    exited = [json.loads(line) for line in stderr.splitlines() if line.startswith("{") and '"QEMU exited"' in line]
    assert [e["status"] for e in exited] == [0]
    assert files(run_dir(volumes)) == []
    scan.text("container stderr", stderr)
    scan.text("container stdout", container.stdout)
    scan.dirs.append(str(volumes["run"]))
    scan.check()


def test_entrypoint_exits_with_qemus_status_when_qemu_dies(image, volumes, container):
    agent = wait_until_ready(container, volumes)
    os.kill(qemu_of(agent), signal.SIGKILL)
    assert container.wait(timeout=30) == 128 + signal.SIGKILL, container.stderr[-2000:]
    assert files(run_dir(volumes)) == []


def test_entrypoint_pod_as_written_runs_its_vm_with_the_vtpm(image, short_tmp):
    """vm1-entrypoint of contrib/kubernetes: its ConfigMap, command, args and volumes.

    The volumes as the kubelet makes them: the emptyDir 0777 and root's, the
    PersistentVolume's root the image user's (no fsGroup), each Secret key a
    single root-owned 0444 file (subPath, defaultMode 0444), read-only.
    """
    pod = manifest("Pod", "vm1-entrypoint")
    (c,) = pod["spec"]["containers"]
    assert c["command"] == image.config["Entrypoint"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_map = manifest("ConfigMap", volumes["config"]["configMap"]["name"])
    host = {}
    run = short_tmp / "run"
    run.mkdir()
    run.chmod(0o777)
    host["run"] = run
    config = short_tmp / "config"
    config.mkdir()
    for key, value in config_map["data"].items():
        (config / key).write_text(value)
    host["config"] = config
    state = short_tmp / "tpm-state"
    state.mkdir(mode=0o700)
    os.chown(state, UID, GID)
    host["tpm-state"] = state
    scan = LeakScan()
    keys = short_tmp / "keys"
    keys.mkdir()
    for key in ("vtpm.key", "migration.psk"):
        (keys / key).write_bytes(scan.secret(key, os.urandom(32)))
        (keys / key).chmod(volumes["keys"]["secret"]["defaultMode"])
    mounts = []
    for m in c["volumeMounts"]:
        volume = volumes[m["name"]]
        assert {"emptyDir", "configMap", "persistentVolumeClaim", "secret"} & set(volume)
        src = keys / m["subPath"] if "subPath" in m else host[m["name"]]
        mounts.append((src, m["mountPath"], "ro" if m.get("readOnly") else "rw"))
    test_qmp = run / TEST_QMP
    args = [*c["args"], "-qmp", f"unix:{RUN_MOUNT}/{TEST_QMP},server=on,wait=off"]
    box = start(image, short_tmp, args, mounts)
    try:
        with ArgvWatcher() as argv:
            scan.argv = argv
            agent = wait_until_ready(box, {"run": run})
            swtpm = child_named(agent, "swtpm")
            assert status_ids(swtpm)[:2] == (UID, GID)
            for kind, command in entrypoint_pod_probes().items():
                answer = box.exec_in(command)
                assert answer.returncode == 0, (kind, answer.stderr)
            wait_for(lambda: qmp(test_qmp, "query-status")["status"] == "running", timeout=30, what="the VM running")
            assert qmp(test_qmp, "query-tpm")[0]["model"] == "tpm-crb"
            # The vTPM state on the persistent volume, encrypted with the mounted key.
            assert list((state / "tpm").glob("tpm2-00.permall"))
            # kubectl delete pod: SIGTERM; then (sooner than the grace period) a
            # second signal quits QEMU at once.
            os.kill(agent, signal.SIGTERM)
            wait_for(lambda: "powering the VM down" in box.stderr, what="the first signal")
            os.kill(agent, signal.SIGTERM)
            code = box.wait(timeout=30)
        assert code == 0, box.stderr[-2000:]
        assert "second signal: quitting QEMU now" in box.stderr
        assert files(run / "vm") == []
        scan.text("container stderr", box.stderr)
        scan.text("container stdout", box.stdout)
        scan.dirs += [str(run), str(state)]
        scan.check()
    finally:
        box.kill()
