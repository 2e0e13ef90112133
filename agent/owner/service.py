"""The reference guest owner: decides whether a launch gets its secret.

The decision is a pure function, :func:`decide_secret`: the configuration,
the request body, the set of launches already attested and a fresh IV go
in, a :class:`Decision` (HTTP status, response body, audit fields) comes
out.  No sockets, no clock, no randomness inside, so every refusal reason is
a unit test.  :class:`OwnerService` is the thin HTTP shell around it: it
draws the IV, remembers attested launches and writes one audit line per
decision.

Order of checks, and why:

1. request shape (400) and the VM name (404): nothing is known yet;
2. policy, API version, build id (403 "policy mismatch"): cheap, and a
   launch with the wrong policy must not get a secret even if its
   measurement verifies;
3. the measurement against the TIK and every accepted digest, in constant
   time (403 "measurement does not match");
4. single use (409): the PSP draws a fresh MNONCE for every launch, so a
   verified blob seen a second time is a replay.  Checked only after the
   MAC verified, so a forged request learns nothing about which nonces
   were used.  The record is in memory: a restarted owner forgets it.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from agent.io.http import Request, Response
from agent.logs import get_logger
from agent.owner.config import OwnerConfig, VmPolicy

__all__ = ["Decision", "decide_secret", "OwnerService", "SECRET_FIELDS"]

BLOB_LEN = 48        # MEASURE[32] || MNONCE[16]
MEASURE_LEN = 32
IV_LEN = 16

#: the integer fields of a /v1/secret request and their ranges
SECRET_FIELDS: dict[str, tuple[int, int]] = {
    "api_major": (0, 0xFF),
    "api_minor": (0, 0xFF),
    "build_id": (0, 0xFF),
    "policy": (0, 0xFFFFFFFF),
}


@dataclass(frozen=True)
class Decision:
    status: int
    body: dict[str, Any]
    decision: str                 # "released" | "refused" | "invalid"
    reason: str
    audit: dict[str, Any] = field(default_factory=dict)
    # (vm, mnonce) to remember as attested; set only on a release.
    attested: tuple[str, bytes] | None = None

    def __repr__(self) -> str:  # the body of a release carries the packet
        return f"Decision({self.status}, {self.decision}, {self.reason!r})"


def _shown(value: str, limit: int = 64) -> str:
    """A client-supplied name, safe for a one-line message."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return text.encode("unicode_escape").decode("ascii")


def _invalid(reason: str, audit: dict[str, Any], status: int = 400) -> Decision:
    return Decision(status, {"error": reason}, "invalid", reason, audit)


def _refused(status: int, reason: str, audit: dict[str, Any]) -> Decision:
    return Decision(status, {"error": reason}, "refused", reason, audit)


def decide_secret(config: OwnerConfig, body: Any, *,
                  attested: Collection[tuple[str, bytes]], iv: bytes) -> Decision:
    """Decide one ``POST /v1/secret`` request.  Pure: no I/O.

    ``attested`` holds the (vm, mnonce) pairs already released; ``iv`` is
    the packet's fresh 16-byte IV (the caller draws it from os.urandom).
    """
    from agent.sev.measurement import split_blob, verify_measurement
    from agent.sev.packet import build_packet
    from agent.sev.secret_table import build_secret_table

    audit: dict[str, Any] = {}
    if not isinstance(body, dict):
        return _invalid("request body must be a JSON object", audit)

    vm = body.get("vm")
    if not isinstance(vm, str) or not vm:
        return _invalid("field 'vm' must be a non-empty string", audit)
    audit["vm"] = _shown(vm)

    numbers: dict[str, int] = {}
    for name, (lo, hi) in SECRET_FIELDS.items():
        value = body.get(name)
        if value is None:
            return _invalid(f"field {name!r} is missing", audit)
        if isinstance(value, bool) or not isinstance(value, int):
            return _invalid(f"field {name!r} must be an integer", audit)
        if not lo <= value <= hi:
            return _invalid(f"field {name!r} must be in {lo}..{hi}", audit)
        numbers[name] = value
    audit.update(policy=numbers["policy"], api=f"{numbers['api_major']}.{numbers['api_minor']}",
                 build=numbers["build_id"])

    text = body.get("measurement")
    if not isinstance(text, str):
        return _invalid("field 'measurement' must be a base64 string", audit)
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return _invalid("field 'measurement' is not valid base64", audit)
    if len(blob) != BLOB_LEN:
        return _invalid(f"measurement must be {BLOB_LEN} bytes, got {len(blob)}", audit)
    measure, mnonce = split_blob(blob)
    audit["mnonce"] = mnonce.hex()

    vm_policy: VmPolicy | None = config.vms.get(vm)
    if vm_policy is None:
        return _refused(404, f"unknown vm '{_shown(vm)}'", audit)

    # -- 2. what the platform reported must be what the owner accepts
    if numbers["policy"] != vm_policy.policy:
        return _refused(403, f"policy mismatch: policy 0x{numbers['policy']:x} is not accepted "
                             f"for this vm", audit)
    if vm_policy.min_api is not None and (numbers["api_major"], numbers["api_minor"]) < vm_policy.min_api:
        need = "%d.%d" % vm_policy.min_api
        return _refused(403, f"policy mismatch: api {audit['api']} is older than {need}", audit)
    if vm_policy.build_ids is not None and numbers["build_id"] not in vm_policy.build_ids:
        return _refused(403, f"policy mismatch: build id {numbers['build_id']} is not accepted", audit)

    # -- 3. the measurement, against every accepted digest (no early exit)
    tik = vm_policy.tik.reveal()
    matched = False
    for digest in vm_policy.digests:
        matched |= verify_measurement(blob, tik, numbers["api_major"], numbers["api_minor"],
                                      numbers["build_id"], numbers["policy"], digest)
    if not matched:
        return _refused(403, "measurement does not match", audit)

    # -- 4. single use
    key = (vm, mnonce)
    if key in attested:
        return _refused(409, "launch already attested", audit)

    if len(iv) != IV_LEN:
        raise ValueError(f"packet IV must be {IV_LEN} bytes")
    table = bytearray(build_secret_table([(s.guid, s.value.reveal()) for s in vm_policy.secrets]))
    try:
        header, ciphertext = build_packet(tik, vm_policy.tek.reveal(), measure, bytes(table), iv)
    finally:
        table[:] = bytes(len(table))
    out: dict[str, Any] = {
        "packet_header": base64.b64encode(header).decode(),
        "secret": base64.b64encode(ciphertext).decode(),
    }
    if vm_policy.gpa is not None:
        out["gpa"] = vm_policy.gpa
    audit["secrets"] = [s.name for s in vm_policy.secrets]
    return Decision(200, out, "released", "measurement verified", audit, attested=key)


class OwnerService:
    """The HTTP face of the guest owner.

    ``POST /v1/secret`` -> :func:`decide_secret`; ``POST /v1/session`` is not
    implemented yet (501); ``GET /healthz`` -> 200.
    """

    def __init__(self, config: OwnerConfig, *, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.config = config
        self.attested: set[tuple[str, bytes]] = set()
        self._random = random_bytes
        self._log = get_logger("keyagent.owner")

    async def handle(self, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        routes = {
            "/v1/secret": ("POST", self._secret),
            "/v1/session": ("POST", self._session),
            "/healthz": ("GET", self._healthz),
        }
        route = routes.get(path)
        if route is None:
            return Response.json(404, {"error": f"no such path {_shown(path)}"})
        method, func = route
        if request.method != method:
            return Response.json(405, {"error": f"{path} takes {method}"})
        return func(request)

    def _healthz(self, _request: Request) -> Response:
        return Response.json(200, {"status": "ok", "vms": len(self.config.vms)})

    def _session(self, _request: Request) -> Response:
        return Response.json(501, {"error": "session not implemented yet"})

    def _secret(self, request: Request) -> Response:
        try:
            body = request.json()
        except ValueError:
            decision = _invalid("request body is not valid JSON", {})
        else:
            decision = decide_secret(self.config, body, attested=self.attested,
                                     iv=self._random(IV_LEN))
        if decision.attested is not None:
            self.attested.add(decision.attested)
        self.audit(decision, request.peer)
        return Response.json(decision.status, decision.body)

    def audit(self, decision: Decision, peer: object = None) -> None:
        """One line per decision; never the keys, the table or the packet."""
        fields = {"decision": decision.decision, "status": decision.status,
                  "reason": decision.reason, **decision.audit}
        if isinstance(peer, tuple) and len(peer) == 2:
            fields["peer"] = f"{peer[0]}:{peer[1]}"
        log = self._log.info if decision.status == 200 else self._log.warning
        log("owner decision", **fields)
