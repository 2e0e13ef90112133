"""``[snp]``: how ``keyagent launch`` starts an SEV-SNP guest (QEMU >= 9.1).

With SNP the host injects nothing: what it can do is start the guest the owner
expects, pinned by an ID block, and not let anything else run.  The launcher

* checks ``[snp]`` before anything is created (policy, ID block and auth, host
  data; the ID block's own policy must be the guest policy, or the PSP refuses
  SNP_LAUNCH_FINISH and QEMU exits);
* adds ``-object sev-snp-guest,id=keyagent-snp0,policy=...,id-block=...,
  id-auth=...,author-key-enabled=on,host-data=...`` and ``-machine
  confidential-guest-support=keyagent-snp0`` (QEMU merges ``-machine`` options)
  to QEMU's argv; the values are public (base64 or numbers, no commas);
* before ``cont`` asks QEMU what it started (:class:`agent.core.snp_launch.SnpLaunchFlow`):
  ``query-sev`` must say ``sev-type`` ``"sev-snp"`` with this ``snp-policy``.

The property names are QEMU 9.1's (qapi/qom.json ``SevSnpGuestProperties``):
``policy`` (uint64), ``id-block`` / ``id-auth`` (base64 of the 96-byte block and
the 4096-byte auth info), ``author-key-enabled`` (bool), ``host-data`` (base64 of
32 bytes), and the common ``cbitpos`` / ``reduced-phys-bits``.  The memory
backend SNP needs (``memory-backend-memfd``) is the user's part of the argv.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.common.errors import UsageError

if TYPE_CHECKING:
    from agent.app.config import Config

__all__ = ["SNP_OBJECT_ID", "SnpLaunch", "snp_launch_from_config", "snp_qemu_args", "refuse_own_sev_objects"]

SNP_OBJECT_ID = "keyagent-snp0"
ID_BLOCK_LEN = 0x60
ID_AUTH_LEN = 0x1000


@dataclass(frozen=True)
class SnpLaunch:
    policy: int
    id_block: bytes | None = None
    id_auth: bytes | None = None
    host_data: bytes | None = None
    author_key_enabled: bool = False
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None


def _b64_file(path: str, what: str, size: int) -> bytes:
    from agent.io.files import read_regular_file

    try:
        text = read_regular_file(path, what, 16384)
    except OSError as exc:
        raise UsageError(f"[snp] {what}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        raw = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"[snp] {what}: {path} is not base64") from None
    if len(raw) != size:
        raise UsageError(f"[snp] {what}: {path} holds {len(raw)} bytes, not {size}")
    return raw


def snp_launch_from_config(cfg: Config) -> SnpLaunch:
    """The checked ``[snp]`` settings; UsageError (exit 2) with one line on any fault."""
    from agent.sev.snp_idblock import IdBlock, SnpFormatError, check_id_auth

    blobs: dict[str, bytes | None] = {}
    for name, size in (("id_block", ID_BLOCK_LEN), ("id_auth", ID_AUTH_LEN)):
        inline, path = cfg.get("snp", name), cfg.get("snp", f"{name}_file")
        if inline:
            blobs[name] = base64.b64decode(inline)  # checked by the schema
        elif path:
            blobs[name] = _b64_file(path, f"{name}_file", size)
        else:
            blobs[name] = None
    if (blobs["id_block"] is None) != (blobs["id_auth"] is None):
        raise UsageError("[snp] id_block and id_auth go together")
    author = bool(cfg.get("snp", "author_key_enabled"))
    if author and blobs["id_auth"] is None:
        raise UsageError("[snp] author_key_enabled needs id_block and id_auth")
    policy = cfg.get("snp", "policy")
    if blobs["id_block"] is not None:
        block = IdBlock.from_bytes(blobs["id_block"])
        if block.policy != policy:
            raise UsageError(
                f"[snp] the ID block pins policy {block.policy:#x}, [snp] policy is {policy:#x}: "
                "the PSP would refuse the launch"
            )
        id_auth = blobs["id_auth"]
        assert id_auth is not None  # they go together (checked above)
        try:
            auth = check_id_auth(blobs["id_block"], id_auth)
        except SnpFormatError as exc:
            raise UsageError(f"[snp] id_auth: {exc}") from None
        if not auth.block_signature:
            raise UsageError("[snp] id_auth: the ID key's signature of the ID block does not verify")
        if author and not auth.id_key_signature:
            raise UsageError("[snp] id_auth: the author key's signature of the ID key does not verify")
    host = cfg.get("snp", "host_data")
    return SnpLaunch(
        policy=policy,
        id_block=blobs["id_block"],
        id_auth=blobs["id_auth"],
        host_data=bytes.fromhex(host) if host else None,
        author_key_enabled=author,
        cbitpos=cfg.get("snp", "cbitpos"),
        reduced_phys_bits=cfg.get("snp", "reduced_phys_bits"),
    )


def refuse_own_sev_objects(argv: list[str]) -> None:
    """``[snp]`` makes the guest object itself: one already on the command line is a usage error."""
    for arg in argv[1:]:
        for word in ("sev-snp-guest", "sev-guest", "confidential-guest-support"):
            if word in arg:
                raise UsageError(
                    f"[snp] adds the sev-snp-guest object and confidential-guest-support itself: "
                    f"remove '{word}' from the QEMU command line"
                )


def snp_qemu_args(s: SnpLaunch) -> list[str]:
    """``-object sev-snp-guest,...`` and ``-machine confidential-guest-support=...`` for QEMU >= 9.1."""
    props = ["sev-snp-guest", f"id={SNP_OBJECT_ID}", f"policy={s.policy:#x}"]
    if s.cbitpos is not None:
        props.append(f"cbitpos={s.cbitpos}")
    if s.reduced_phys_bits is not None:
        props.append(f"reduced-phys-bits={s.reduced_phys_bits}")
    if s.id_block is not None and s.id_auth is not None:
        props += [
            f"id-block={base64.b64encode(s.id_block).decode()}",
            f"id-auth={base64.b64encode(s.id_auth).decode()}",
        ]
        if s.author_key_enabled:
            props.append("author-key-enabled=on")
    if s.host_data is not None:
        props.append(f"host-data={base64.b64encode(s.host_data).decode()}")
    return ["-object", ",".join(props), "-machine", f"confidential-guest-support={SNP_OBJECT_ID}"]
