"""The control socket's protocol: routes, request bodies, answers.

HTTP/1.1 over the agent's unix socket (:mod:`agent.app.control` serves it,
``keyagent ctl`` (:mod:`agent.cli.ctl`) speaks it).  Every request body
and every answer is a JSON object; a failure is ``{"error": str}`` (one
line, never a secret) with status 400 when the request itself was bad
(``ctl`` exits 2), another 4xx/5xx otherwise (``ctl`` exits 1).  Secrets
never travel here: a verb names a reference (``"ref": "file:/abs/path"``)
that the agent resolves within the peer's rights.

Routes (method, path) and what their bodies hold:

* ``GET /v1/status``: the agent and its flows; ``GET /healthz``:
  ``{"status": "ok"}``; ``GET /readyz``: ``{"ready": bool}`` (503 when not);
  ``GET /metrics``: Prometheus text;
* ``POST /v1/migrate/{prepare,begin,accept,start,wait,cancel,mh-target}``
  (:mod:`agent.app.verbs.migrate`);
* ``POST /v1/secret/{add,remove}`` (:mod:`agent.app.verbs.secrets`);
* ``GET /v1/vms`` (``keyagent host``'s own socket, :mod:`agent.app.host`):
  ``{"vms": [VmEntry, ...]}``, one per configuration file, by file name.
"""

from __future__ import annotations

from typing import Any, Final, Literal, TypedDict, get_args

Method = Literal["GET", "POST"]
Route = tuple[Method, str]

STATUS: Final[Route] = ("GET", "/v1/status")
HEALTHZ: Final[Route] = ("GET", "/healthz")
READYZ: Final[Route] = ("GET", "/readyz")
METRICS: Final[Route] = ("GET", "/metrics")

MIGRATE_PREPARE: Final[Route] = ("POST", "/v1/migrate/prepare")
MIGRATE_BEGIN: Final[Route] = ("POST", "/v1/migrate/begin")
MIGRATE_ACCEPT: Final[Route] = ("POST", "/v1/migrate/accept")
MIGRATE_START: Final[Route] = ("POST", "/v1/migrate/start")
MIGRATE_WAIT: Final[Route] = ("POST", "/v1/migrate/wait")
MIGRATE_CANCEL: Final[Route] = ("POST", "/v1/migrate/cancel")
#: SEV fast migration (source): hand the target MH's public key to the source VM (docs/mh.md)
MIGRATE_MH_TARGET: Final[Route] = ("POST", "/v1/migrate/mh-target")

SECRET_ADD: Final[Route] = ("POST", "/v1/secret/add")
SECRET_REMOVE: Final[Route] = ("POST", "/v1/secret/remove")

VMS: Final[Route] = ("GET", "/v1/vms")

#: a host VM's states: its flows are being set up, run, ended well (a launch
#: with no control socket), ended by a failure (its flow refused or failed,
#: its QEMU went away, its code raised, its file is bad), or were stopped by
#: the host (file removed or changed, SIGTERM) without touching QEMU
VmState = Literal["starting", "running", "done", "failed", "stopped"]


def vm_states() -> tuple[VmState, ...]:
    return get_args(VmState)


class VmResult(TypedDict):
    """The last result: of the VM's last finished flow while it runs, of the
    VM itself once it has ended (``flow`` is then None)."""

    flow: str | None
    code: int
    reason: str


class VmEntry(TypedDict):
    name: str  # [vm] name, or the file's name without .toml
    config: str  # the file's name in the config directory
    state: VmState
    flows: list[str]  # the flows running now
    result: VmResult | None


def vms_body(vms: list[VmEntry]) -> dict[str, Any]:
    return {"vms": vms}


#: the status of a request that was itself wrong: ``keyagent ctl`` exits 2
BAD_REQUEST: Final = 400


def error_body(reason: str) -> dict[str, Any]:
    """Every failure's answer."""
    return {"error": reason}


def health_body() -> dict[str, Any]:
    return {"status": "ok"}


def ready_answer(ready: bool) -> tuple[int, dict[str, Any]]:
    """``/readyz``: 200 when QMP is connected, 503 when not."""
    return (200 if ready else 503), {"ready": ready}


def error_reason(status: int, body: object) -> str:
    """What a failed answer says; ``HTTP <status>`` if it says nothing."""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) and error else f"HTTP {status}"


def not_found(method: str, path: str) -> dict[str, Any]:
    return error_body(f"no such endpoint: {method} {path}")
