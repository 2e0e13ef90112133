"""contrib/kubernetes: the sidecar and entrypoint pods, parsed and cross-checked.

Probes must run real ``keyagent ctl`` verbs on the control socket of the
run_dir the pod's own configuration names; every path the agent reads or
writes must be a volume mount of the right kind; no secret in env or args.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import pytest

from agent.app.config import load_config
from tests.contrib.support import (
    CONTAINERFILE,
    CONTRIB,
    assert_real_ctl_verb,
    control_path,
    control_route,
    control_server_status,
    exec_form,
    only,
    parse_containerfile,
)

yaml = pytest.importorskip("yaml")

MANIFEST = CONTRIB / "kubernetes" / "keyagent-pods.yaml"
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
PROBE_VERB = {"startupProbe": "health", "livenessProbe": "health", "readinessProbe": "ready"}


@pytest.fixture(scope="module")
def docs():
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


@pytest.fixture(scope="module")
def pods(docs):
    found = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    assert set(found) == {"vm1-sidecar", "vm1-entrypoint"}
    return found


def config_maps(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}


def agent_container(pod) -> dict:
    (c,) = [c for c in pod["spec"]["containers"] if (c.get("command") or [""])[0] == "keyagent"]
    return c


def argv(container) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mount_for(pod, container, path: str) -> tuple[dict, dict]:
    """The volumeMount (and its volume) that holds ``path``: the deepest one."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    assert best is not None, f"{container['name']}: nothing mounted at {path}"
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == best["name"]]
    return best, volume


def agent_config(docs, pod, tmp_path: Path):
    """The agent's TOML from the ConfigMap behind its --config, loaded by the real loader."""
    container = agent_container(pod)
    path = flag(argv(container), "--config")
    mount, volume = mount_for(pod, container, path)
    assert "configMap" in volume and mount.get("readOnly") is True
    data = config_maps(docs)[volume["configMap"]["name"]]["data"]
    key = posixpath.relpath(path, mount["mountPath"])
    assert key in data, f"{path}: ConfigMap has no key {key}"
    local = tmp_path / f"{pod['metadata']['name']}.toml"
    local.write_text(data[key])
    return load_config(str(local))


def test_two_variants_sidecar_and_entrypoint(pods):
    sidecar = pods["vm1-sidecar"]["spec"]["containers"]
    assert [c["name"] for c in sidecar] == ["qemu", "keyagent"]
    assert argv(sidecar[1])[:2] == ["keyagent", "run"]
    (vm,) = pods["vm1-entrypoint"]["spec"]["containers"]
    entrypoint = exec_form(only(parse_containerfile(CONTAINERFILE.read_text()), "ENTRYPOINT"))
    assert vm["command"] == entrypoint
    assert vm["args"][0] == "qemu-system-x86_64"


@pytest.mark.parametrize("pod_name", ["vm1-sidecar", "vm1-entrypoint"])
def test_probes_are_exec_probes_running_real_ctl_verbs_on_the_control_socket(docs, pods, pod_name, tmp_path):
    pod = pods[pod_name]
    cfg = agent_config(docs, pod, tmp_path)
    container = agent_container(pod)
    for kind in PROBES:
        probe = container[kind]
        assert set(probe) & {"httpGet", "tcpSocket", "grpc"} == set(), (
            f"{kind}: the control socket is a UNIX socket, only exec probes reach it"
        )
        command = probe["exec"]["command"]
        assert command[-1] == PROBE_VERB[kind]
        assert_real_ctl_verb(command)
        assert control_path(command) == cfg.vm_run_dir + "/control.sock"
        timeout = float(command[command.index("--timeout") + 1])
        assert timeout < probe["timeoutSeconds"]


def test_probe_routes_are_answered_by_the_control_server(pods):
    routes = {(kind, tuple(agent_container(p)[kind]["exec"]["command"])) for p in pods.values() for kind in PROBES}
    for kind, command in routes:
        method, route = control_route(command)
        assert (method, route) == ("GET", {"health": "/healthz", "ready": "/readyz"}[command[-1]])
        assert control_server_status(method, route) == 200
        if kind == "readinessProbe":
            assert control_server_status(method, route, qmp="disconnected") == 503
        else:
            # Liveness must not fail just because QEMU's monitor went away.
            assert control_server_status(method, route, qmp="disconnected") == 200


@pytest.mark.parametrize("pod_name", ["vm1-sidecar", "vm1-entrypoint"])
def test_paths_the_agent_uses_are_mounted_with_the_right_volumes(docs, pods, pod_name, tmp_path):
    pod = pods[pod_name]
    cfg = agent_config(docs, pod, tmp_path)
    container = agent_container(pod)
    mount, volume = mount_for(pod, container, cfg.vm_run_dir)
    assert "emptyDir" in volume and not mount.get("readOnly")
    # RuntimeDefault seccomp refuses the keyring syscalls.
    assert cfg.secrets_master_key == "file"
    if cfg.vtpm_state_dir:
        mount, volume = mount_for(pod, container, cfg.vtpm_state_dir)
        assert "persistentVolumeClaim" in volume and not mount.get("readOnly")
    refs = [v for v in (cfg.vtpm_key,) if v]
    for ref in refs:
        assert ref.startswith("file:"), ref
    for path in [r[5:] for r in refs] + [p for p in argv(container) if p.startswith("/run/secrets/")]:
        mount, volume = mount_for(pod, container, path)
        assert "secret" in volume and mount["readOnly"] is True, path
        # The agent opens key files with O_NOFOLLOW; a whole Secret volume
        # shows symlinks, a subPath mount the file itself.
        assert mount["mountPath"] == path and mount.get("subPath"), path
    # The PSK files for `ctl migrate ... --psk-file` too.
    assert any(m.get("subPath") == "migration.psk" for m in container["volumeMounts"])


def test_no_secret_reaches_env_or_args(docs, pods):
    secret_volumes = {v["name"] for p in pods.values() for v in p["spec"]["volumes"] if "secret" in v}
    for pod in pods.values():
        for c in pod["spec"]["containers"]:
            for env in c.get("env", []):
                assert "secretKeyRef" not in json.dumps(env.get("valueFrom", {})), env
            for src in c.get("envFrom", []):
                assert "secretRef" not in src, src
            for m in c.get("volumeMounts", []):
                if m["name"] in secret_volumes:
                    assert m["readOnly"] is True
    assert not [d for d in docs if d["kind"] == "Secret"], (
        "the key material is created out of band, never committed in a manifest"
    )


def test_security_context_is_locked_down(pods):
    uid = int(
        next(
            args for word, args in parse_containerfile(CONTAINERFILE.read_text()) if word == "RUN" and "useradd" in args
        )
        .split("--uid ")[1]
        .split()[0]
    )
    for pod in pods.values():
        spec = pod["spec"]
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        # fsGroup would make the emptyDir setgid; the run_dir made in it
        # would be 2700, and the agent refuses anything but 0700.
        assert "fsGroup" not in sc
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["readOnlyRootFilesystem"] is True
            assert csc["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in csc and "runAsUser" not in csc


def test_sidecar_qmp_socket_is_shared_and_outside_the_run_dir(docs, pods, tmp_path):
    pod = pods["vm1-sidecar"]
    qemu, agent = pod["spec"]["containers"]
    qmp_option = flag(argv(qemu), "-qmp")
    qemu_socket = qmp_option.split(",")[0]
    assert "server=on" in qmp_option and "wait=off" in qmp_option
    assert flag(argv(agent), "--qmp") == qemu_socket
    path = qemu_socket[5:]
    assert mount_for(pod, qemu, path)[1] is mount_for(pod, agent, path)[1]
    cfg = agent_config(docs, pod, tmp_path)
    assert not path.startswith(cfg.vm_run_dir + "/")
    assert "-S" not in argv(qemu), "without [sev] nothing resumes a -S QEMU"


@pytest.mark.parametrize("pod_name", ["vm1-sidecar", "vm1-entrypoint"])
def test_grace_period_outlasts_the_shutdown_grace(docs, pods, pod_name, tmp_path):
    pod = pods[pod_name]
    cfg = agent_config(docs, pod, tmp_path)
    assert pod["spec"]["terminationGracePeriodSeconds"] > cfg.launch_shutdown_grace_s
