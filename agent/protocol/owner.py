"""The guest owner's HTTP protocol (JSON over ``POST``), defined once for both sides.

::

    POST /v1/secret   {"vm": str, "measurement": b64(MEASURE[32] || MNONCE[16]),
                       "api_major": u8, "api_minor": u8, "build_id": u8, "policy": u32}
      200             {"packet_header": b64(52 bytes), "secret": b64(1..64 KiB), "gpa"?: u64}
                      (+ "migrating_from"?: str, the VM migrating in: docs/mh.md)
    POST /v1/session  {"vm": str, "pdh": b64, "policy": u32, "cert_chain"?: b64}
      200             {"godh": b64, "session": b64}
    POST /v1/mh/target   {"vm": str}
      200             {"vm": str, "public_key": b64(32), "tag": b64(32)}
    POST /v1/mh/complete {"vm": str, "status": "completed" | "failed" | "cancelled"}
      200             {"vm": str, "status": str, "retired": "source" | "target"}
    any refusal       4xx/5xx {"error": str}

The agent builds :class:`SecretRequest` and :class:`SessionRequest`
(``encode``) and parses the answers (``parse``); the owner parses the
requests and builds the answers.  A parse that fails raises
:class:`ProtocolError` with the reason the other side is told (400 on the
owner, "malformed owner answer" on the agent); the checks run in a fixed
order, so the first fault found is always the one named.  Pure: no I/O and
no ``cryptography``, so the core may build and read these messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.common.secret import Secret
from agent.protocol.base import ProtocolError, b64decode, b64encode, is_uint, one_line
from agent.sev.sizes import MEASUREMENT_LEN, PACKET_HEADER_LEN

__all__ = [
    "SECRET_PATH",
    "SESSION_PATH",
    "SECRET_FIELDS",
    "MAX_SECRET_LEN",
    "SecretRequest",
    "SecretAnswer",
    "SessionRequest",
    "SessionAnswer",
    "MH_TARGET_PATH",
    "MH_COMPLETE_PATH",
    "MH_STATUSES",
    "MhTargetRequest",
    "MhTargetAnswer",
    "MhCompleteRequest",
    "MhCompleteAnswer",
    "ProtocolError",
    "error_body",
    "refusal_reason",
    "one_line",
]

SECRET_PATH = "/v1/secret"
SESSION_PATH = "/v1/session"
MH_TARGET_PATH = "/v1/mh/target"
MH_COMPLETE_PATH = "/v1/mh/complete"

#: the integer fields of a /v1/secret request and their ranges, in the order checked
SECRET_FIELDS: dict[str, tuple[int, int]] = {
    "api_major": (0, 0xFF),
    "api_minor": (0, 0xFF),
    "build_id": (0, 0xFF),
    "policy": (0, 0xFFFFFFFF),
}
POLICY_MAX = 0xFFFFFFFF
GPA_LIMIT = 1 << 64
MAX_SECRET_LEN = 64 * 1024  # far above OVMF's 4 KiB secret area; refuses absurd answers


def _require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    return body


def _vm(body: dict[str, Any]) -> str:
    vm = body.get("vm")
    if not isinstance(vm, str) or not vm:
        raise ProtocolError("field 'vm' must be a non-empty string")
    return vm


def _b64_field(body: dict[str, Any], name: str, partial: dict[str, Any]) -> bytes:
    text = body.get(name)
    if not isinstance(text, str) or not text:
        raise ProtocolError(f"field {name!r} must be a non-empty base64 string", partial)
    raw = b64decode(text)
    if raw is None:
        raise ProtocolError(f"field {name!r} is not valid base64", partial)
    return raw


# -- /v1/secret ------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretRequest:
    """The agent's plea for a launch secret: the PSP's measurement and what it ran under."""

    vm: str
    measurement: bytes = field(repr=False)  # MEASURE[32] || MNONCE[16]
    api_major: int
    api_minor: int
    build_id: int
    policy: int
    #: the VM this launch is a migration target of (SEV fast migration, docs/mh.md);
    #: None for an ordinary boot.  The owner takes only the request's own vm here.
    migrating_from: str | None = None

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "vm": self.vm,
            "measurement": b64encode(self.measurement),
            "api_major": self.api_major,
            "api_minor": self.api_minor,
            "build_id": self.build_id,
            "policy": self.policy,
        }
        if self.migrating_from is not None:
            out["migrating_from"] = self.migrating_from
        return out

    @classmethod
    def parse(cls, body: object) -> SecretRequest:
        """Checks in order: object, vm, the integers (SECRET_FIELDS), the measurement, migrating_from."""
        obj = _require_object(body)
        partial: dict[str, Any] = {"vm": _vm(obj)}
        numbers: dict[str, int] = {}
        for name, (lo, hi) in SECRET_FIELDS.items():
            value = obj.get(name)
            if value is None:
                raise ProtocolError(f"field {name!r} is missing", partial)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProtocolError(f"field {name!r} must be an integer", partial)
            if not lo <= value <= hi:
                raise ProtocolError(f"field {name!r} must be in {lo}..{hi}", partial)
            numbers[name] = value
        partial.update(numbers)
        text = obj.get("measurement")
        if not isinstance(text, str):
            raise ProtocolError("field 'measurement' must be a base64 string", partial)
        blob = b64decode(text)
        if blob is None:
            raise ProtocolError("field 'measurement' is not valid base64", partial)
        if len(blob) != MEASUREMENT_LEN:
            raise ProtocolError(f"measurement must be {MEASUREMENT_LEN} bytes, got {len(blob)}", partial)
        source = obj.get("migrating_from")
        if source is not None and (not isinstance(source, str) or not source):
            raise ProtocolError("field 'migrating_from' must be a non-empty string", partial)
        return cls(vm=partial["vm"], measurement=blob, **numbers, migrating_from=source)


@dataclass(frozen=True)
class SecretAnswer:
    """The owner's release: the packet header, the wrapped secret table, where it goes."""

    packet_header: bytes = field(repr=False)  # PACKET_HEADER: flags, IV, MAC
    secret: Secret = field(repr=False)  # the encrypted secret table
    gpa: int | None = None  # None: QEMU finds the area in OVMF

    def packet_header_b64(self) -> str:
        return b64encode(self.packet_header)

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"packet_header": self.packet_header_b64(), "secret": self.secret.b64()}
        if self.gpa is not None:
            out["gpa"] = self.gpa
        return out

    @classmethod
    def parse(cls, body: object) -> SecretAnswer:
        """Checks in order: object, packet_header (base64, 52 bytes), secret, gpa."""
        if not isinstance(body, dict):
            raise ProtocolError("body is not a JSON object")
        header = b64decode(body.get("packet_header"))
        if header is None:
            raise ProtocolError("packet_header is not base64")
        if len(header) != PACKET_HEADER_LEN:
            raise ProtocolError(f"packet_header is {len(header)} bytes, expected {PACKET_HEADER_LEN}")
        secret = b64decode(body.get("secret"))
        if secret is None:
            raise ProtocolError("secret is not base64")
        if not secret:
            raise ProtocolError("secret is empty")
        if len(secret) > MAX_SECRET_LEN:
            raise ProtocolError(f"secret is {len(secret)} bytes, more than {MAX_SECRET_LEN}")
        gpa = body.get("gpa")
        if gpa is not None and (not is_uint(gpa) or gpa >= GPA_LIMIT):
            raise ProtocolError("gpa is not an unsigned 64-bit integer")
        return cls(packet_header=header, secret=Secret(secret), gpa=gpa)


# -- /v1/session -----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRequest:
    """A launch session for the platform whose PDH this is (``keyagent launch``)."""

    vm: str
    pdh: bytes = field(repr=False)  # 2084-byte PDH certificate
    policy: int
    cert_chain: bytes | None = field(default=None, repr=False)  # PEK || OCA || CEK

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vm": self.vm, "pdh": b64encode(self.pdh), "policy": self.policy}
        if self.cert_chain is not None:
            out["cert_chain"] = b64encode(self.cert_chain)
        return out

    @classmethod
    def parse(cls, body: object) -> SessionRequest:
        """Checks in order: object, vm, policy, pdh, cert_chain (absent or "" is none)."""
        obj = _require_object(body)
        partial: dict[str, Any] = {"vm": _vm(obj)}
        policy = obj.get("policy")
        if isinstance(policy, bool) or not isinstance(policy, int):
            raise ProtocolError("field 'policy' must be an integer", partial)
        if not 0 <= policy <= POLICY_MAX:
            raise ProtocolError(f"field 'policy' must be in 0..{POLICY_MAX}", partial)
        partial["policy"] = policy
        pdh = _b64_field(obj, "pdh", partial)
        chain = None
        if obj.get("cert_chain") not in (None, ""):
            chain = _b64_field(obj, "cert_chain", partial)
        return cls(vm=partial["vm"], pdh=pdh, policy=policy, cert_chain=chain)


@dataclass(frozen=True)
class SessionAnswer:
    """The GODH certificate and session blob QEMU passes to LAUNCH_START."""

    godh: bytes = field(repr=False)
    session: bytes = field(repr=False)

    def encode(self) -> dict[str, Any]:
        return {"godh": b64encode(self.godh), "session": b64encode(self.session)}

    @classmethod
    def parse(cls, body: object) -> SessionAnswer:
        if not isinstance(body, dict):
            raise ProtocolError("body is not a JSON object")
        out: list[bytes] = []
        for name in ("godh", "session"):
            raw = b64decode(body.get(name))
            if not raw:
                raise ProtocolError(f"{name} is not base64")
            out.append(raw)
        return cls(godh=out[0], session=out[1])


# -- /v1/mh/* (SEV fast migration, docs/mh.md) -----------------------------------------

#: the final statuses a source agent reports (agent.core.migration.FINAL)
MH_STATUSES = ("completed", "failed", "cancelled")
MH_KEY_LEN = 32  # X25519, raw (agent.sev.mh)


def _fixed_b64(body: dict[str, Any], name: str, size: int) -> bytes:
    raw = b64decode(body.get(name))
    if raw is None:
        raise ProtocolError(f"{name} is not base64")
    if len(raw) != size:
        raise ProtocolError(f"{name} is {len(raw)} bytes, expected {size}")
    return raw


@dataclass(frozen=True)
class MhTargetRequest:
    """The source agent asks for the public key of its VM's migration target."""

    vm: str

    def encode(self) -> dict[str, Any]:
        return {"vm": self.vm}

    @classmethod
    def parse(cls, body: object) -> MhTargetRequest:
        return cls(vm=_vm(_require_object(body)))


@dataclass(frozen=True)
class MhTargetAnswer:
    """The target MH's public key and the owner's tag over it (public, the host may carry both)."""

    vm: str
    public_key: bytes
    tag: bytes

    def encode(self) -> dict[str, Any]:
        return {"vm": self.vm, "public_key": b64encode(self.public_key), "tag": b64encode(self.tag)}

    @classmethod
    def parse(cls, body: object) -> MhTargetAnswer:
        if not isinstance(body, dict):
            raise ProtocolError("body is not a JSON object")
        vm = body.get("vm")
        if not isinstance(vm, str) or not vm:
            raise ProtocolError("vm is not a non-empty string")
        return cls(vm=vm, public_key=_fixed_b64(body, "public_key", MH_KEY_LEN), tag=_fixed_b64(body, "tag", 32))


@dataclass(frozen=True)
class MhCompleteRequest:
    """The source agent reports how its VM's migration ended."""

    vm: str
    status: str  # one of MH_STATUSES

    def encode(self) -> dict[str, Any]:
        return {"vm": self.vm, "status": self.status}

    @classmethod
    def parse(cls, body: object) -> MhCompleteRequest:
        obj = _require_object(body)
        vm = _vm(obj)
        status = obj.get("status")
        if status not in MH_STATUSES:
            raise ProtocolError(f"field 'status' must be one of {', '.join(MH_STATUSES)}", {"vm": vm})
        return cls(vm=vm, status=status)


@dataclass(frozen=True)
class MhCompleteAnswer:
    """Which of the two MH keys the owner retired."""

    vm: str
    status: str
    retired: str  # "source" | "target"

    def encode(self) -> dict[str, Any]:
        return {"vm": self.vm, "status": self.status, "retired": self.retired}

    @classmethod
    def parse(cls, body: object) -> MhCompleteAnswer:
        if not isinstance(body, dict):
            raise ProtocolError("body is not a JSON object")
        vm, status, retired = body.get("vm"), body.get("status"), body.get("retired")
        if not isinstance(vm, str) or status not in MH_STATUSES or retired not in ("source", "target"):
            raise ProtocolError("not an MH completion answer")
        return cls(vm=vm, status=status, retired=retired)


# -- refusals --------------------------------------------------------------------------


def error_body(reason: str) -> dict[str, Any]:
    """Every refusal's body, on every path (the reason is one line, no secret)."""
    return {"error": reason}


def refusal_reason(status: int, body: object) -> str:
    """The owner's reason for a 4xx/5xx, made one line; ``HTTP <status>`` if it gave none."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, str) or not error.strip():
        error = f"HTTP {status}"
    return one_line(error)
