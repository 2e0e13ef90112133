"""contrib/kubernetes: every manifest against the Kubernetes API's own schemas, offline.

``kubernetes-validate`` ships the OpenAPI-derived JSON schemas of each
Kubernetes release; its *strict* variants also reject fields the API does not
know (a typo such as ``readOnlyRootFileSystem`` that a lenient client would
drop without a word).  The versions are the ones README.md names.
"""

from __future__ import annotations

import copy

import pytest

from tests.contrib.support import CONTRIB

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")
from kubernetes_validate.utils import all_versions  # noqa: E402  (after the skip)

# README.md, "libvirt, systemd, Kubernetes": the versions the manifests are checked against.
VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37"]
MANIFESTS = sorted((CONTRIB / "kubernetes").glob("*.yaml"))


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


DOCS = documents()


def test_every_version_named_is_shipped_by_kubernetes_validate():
    # validate() silently falls back to the newest older schema it has: a
    # version it does not ship would be checked against another one.
    shipped = {".".join(v.split(".")[:2]) for v in all_versions()}
    assert set(VERSIONS) <= shipped, sorted(set(VERSIONS) - shipped)


def test_the_manifests_hold_the_two_pods_and_their_config_maps():
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == ["ConfigMap", "ConfigMap", "Pod", "Pod"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,doc", DOCS, ids=[name for name, _ in DOCS])
def test_manifest_is_valid_for_kubernetes(name, doc, version):
    try:
        checked = kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"{name} is invalid for Kubernetes {version} at {path}: {exc.message}", pytrace=False)
    assert checked == version


@pytest.mark.parametrize(
    "break_it, why",
    [
        (
            lambda pod: pod["spec"]["containers"][0]["securityContext"].update(readOnlyRootFileSystem=True),
            "an unknown field (strict)",
        ),
        (
            lambda pod: pod["spec"]["containers"][-1]["startupProbe"].update(periodSeconds="2"),
            "a string for an integer",
        ),
        (lambda pod: pod["spec"]["containers"][0].pop("name"), "a required field missing"),
        (lambda pod: pod["spec"]["volumes"][0].update(emptyDir=[]), "a list for an object"),
    ],
    ids=["unknown-field", "string-for-integer", "required-field-missing", "list-for-object"],
)
def test_validator_rejects_a_broken_pod(break_it, why):
    """The check above can fail: the same pod, broken one way, is refused."""
    pod = copy.deepcopy(next(doc for _, doc in DOCS if doc["kind"] == "Pod"))
    kv.validate(pod, VERSIONS[-1], strict=True)
    break_it(pod)
    with pytest.raises(kv.ValidationError):
        kv.validate(pod, VERSIONS[-1], strict=True)
