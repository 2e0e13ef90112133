"""owner.toml: what the guest owner accepts for each VM, and what it hands out.

Everything is read and checked once, at start: a key of the wrong length, an
unknown GUID alias or a missing secret file is a configuration error (exit 2)
before the service listens, not a 500 on the first launch.  Paths are
relative to the toml's directory.  Keys and secret payloads are held as
:class:`Secret` from the moment they are read.

    [vm.vm1]
    tik = "vm1_tik.bin"          # 16 raw bytes
    tek = "vm1_tek.bin"          # 16 raw bytes
    policy = 1                   # the only policy accepted for this VM
    digest = "hex"               # or a list of hex strings, or instead:
    # firmware = "OVMF.fd"       # compute the SEV digest from trusted images
    # kernel = "vmlinuz"         #   (optional; with initrd, append)
    # sev_es = true              # SEV-ES: the policy must have bit 0x4 (and the
    # vcpus = 4                  #   other way round); with firmware also vcpus,
    # vcpu_sig = 0xa00f11        #   vcpu_sig, vmsa_fpu_init as for owner measure
    min_api = "1.49"             # optional
    build_ids = [21]             # optional
    # secret_gpa = 0x80c000      # optional, a VM given by digest: its firmware's
    # secret_size = 0xc00        #   secret area (a VM given by firmware: read
    #                            #   from the image; see agent.owner.secret_area)
    [[vm.vm1.secret]]
    guid = "736869e5-84f0-4973-92ec-06879ce3da0b"   # or an alias: "luks-key"
    file = "vm1-disk.pass"

Launch sessions made by the service.  A VM with ``session = true`` takes
``POST /v1/session``: the owner then draws TEK and TIK for that launch
itself, keeps them in memory only, and uses them for the next
``POST /v1/secret`` of that VM (once: a verified launch uses its session
up).  Such a VM may omit ``tik`` and ``tek``; when it gives them too, they
serve launches that were started with session files made offline
(``keyagent owner session``)::

    [vm.vm2]
    session = true               # tik/tek optional
    policy = 1
    digest = "hex"
    [[vm.vm2.secret]]
    guid = "luks-key"
    file = "vm2-disk.pass"

Which platforms get a launch session (``POST /v1/session``): per VM
``platform`` says how the PDH is trusted::

    platform = "amd"             # the default: PDH <- PEK <- (OCA, CEK) <- ASK <- ARK
                                 # must verify to AMD's roots (built in), or to
                                 # [platform] amd_roots when that is set
    # platform = "pinned"        # only these PDH certificates (SHA-256 as sent)
    # pdh_sha256 = ["hex", ...]
    # platform = "any"           # no check at all: demos only (warned about)

    [platform]                   # owner-wide
    amd_roots = "roots/"         # <product>-ark.cert, <product>-ask.cert (AMD's
                                 # binary format) instead of the built-in roots

The owner's own state (``owner serve --db``, :mod:`agent.owner.store`)::

    [owner]
    state_key = "file:state.key" # 32 raw bytes (relative to this file), or
    # state_key = "keyring:DESC" # a user key in the kernel keyring; without it
                                 # a SQLite owner makes owner.db.key beside its
                                 # database, a PostgreSQL one refuses to start
"""

from __future__ import annotations

import os
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import UsageError
from agent.common.secret import Secret
from agent.owner.secret_area import SecretArea, area_from_config, area_from_firmware

__all__ = [
    "OwnerConfig",
    "VmPolicy",
    "SecretEntry",
    "load_owner_config",
    "read_key_file",
    "read_secret_file",
    "parse_digest",
    "parse_api_version",
]

KEY_LEN = 16  # TIK and TEK: AES-128 / HMAC keys of the SEV API
DIGEST_LEN = 32  # SHA-256 of the launch data
MAX_SECRET_FILE = 16384  # the whole secret table must fit the OVMF secret area
MAX_CONFIG_FILE = 4 << 20  # owner.toml: far above any real one, far below /dev/zero

_LAUNCH_KEYS = {"firmware", "kernel", "initrd", "append"}
_AREA_KEYS = {"secret_gpa", "secret_size", "gpa"}  # gpa: the older name of secret_gpa
_ES_KEYS = {"vcpus", "vcpu_sig", "vmsa_fpu_init"}  # an SEV-ES digest computed from firmware
_VM_KEYS = (
    {"tik", "tek", "session", "policy", "digest", "min_api", "build_ids", "secret", "sev_es", "platform", "pdh_sha256"}
    | _LAUNCH_KEYS
    | _AREA_KEYS
    | _ES_KEYS
)
_PLATFORM_KEYS = {"amd_roots"}
# an SNP vm ([vm.NAME] snp = true): agent.owner.snp_attest, docs/snp.md
_SNP_VM_KEYS = {
    "snp",
    "policy",
    "snp_digest",
    "vcpus",
    "vcpu_type",
    "guest_features",
    "host_data",
    "id_key_digest",
    "author_key_digest",
    "secret",
} | _LAUNCH_KEYS
PLATFORM_MODES = ("amd", "pinned", "any")
MAX_IMAGE_FILE = 256 << 20  # firmware, kernel, initrd: far above any real one
_SECRET_KEYS = {"guid", "file"}


@dataclass(frozen=True)
class SecretEntry:
    guid: uuid.UUID
    name: str  # as written in owner.toml (a GUID or an alias), for logs
    value: Secret


@dataclass(frozen=True)
class VmPolicy:
    name: str
    tik: Secret | None  # None only for a session VM without offline keys
    tek: Secret | None
    policy: int
    digests: tuple[bytes, ...]
    secrets: tuple[SecretEntry, ...]
    min_api: tuple[int, int] | None = None
    build_ids: frozenset[int] | None = None
    gpa: int | None = None  # answered to the agent: the secret area's base
    session: bool = False  # takes POST /v1/session
    platform: str = "amd"  # amd | pinned | any: whose PDH gets a session
    pdh_pins: frozenset[bytes] = frozenset()  # platform = "pinned": SHA-256 of each PDH
    secret_area: SecretArea = SecretArea()
    # SEV-SNP (snp = true): the guest attests itself (POST /v1/snp/attest); policy is the
    # 64-bit SNP policy and every report must carry snp_digest as its MEASUREMENT
    snp: bool = False
    snp_digest: bytes | None = None
    snp_host_data: bytes | None = None
    snp_id_key_digest: bytes | None = None
    snp_author_key_digest: bytes | None = None


@dataclass(frozen=True)
class OwnerConfig:
    path: str
    vms: dict[str, VmPolicy]
    # AMD roots a platform = "amd" chain must end at: the built-in ones, or [platform] amd_roots
    amd_roots: tuple[Any, ...] = ()  # tuple[agent.sev.ca.AmdRoots, ...]
    amd_roots_source: str = "built-in"
    # SNP roots (agent.sev.snp_ca.SnpRoots): built in, or the <product>-ark/ask.pem of amd_roots
    snp_roots: tuple[Any, ...] = ()
    snp_roots_source: str = "built-in"
    # [owner] state_key: "file:/abs/path" or "keyring:DESC" (read at serve time), None: not set
    state_key: str | None = None


# -- small readers shared with the command line ----------------------------


def read_key_file(path: str | os.PathLike, what: str) -> Secret:
    """A raw 16-byte TIK or TEK file, as a Secret."""
    raw = _read_file(path, what, limit=4096)
    if len(raw) != KEY_LEN:
        raise UsageError(f"{what} file {os.fspath(path)} must hold {KEY_LEN} raw bytes, it holds {len(raw)}")
    return Secret(raw)


def read_secret_file(path: str | os.PathLike, what: str) -> Secret:
    """A secret payload, used byte for byte (a trailing newline is kept)."""
    raw = _read_file(path, what, limit=MAX_SECRET_FILE)
    if not raw:
        raise UsageError(f"{what} file {os.fspath(path)} is empty")
    return Secret(raw)


def _read_file(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """A regular file of at most ``limit`` bytes (never a FIFO or a device)."""
    from agent.io.files import read_regular_file

    try:
        raw = read_regular_file(path, f"{what} file", limit)
    except FileNotFoundError:
        raise UsageError(f"{what} file {os.fspath(path)} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} file {os.fspath(path)} is a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {os.fspath(path)}: {exc.strerror}") from None
    return raw


def parse_digest(text: Any, where: str) -> bytes:
    """A 32-byte launch digest from hex text."""
    return _hex_bytes(text, f"{where}: digest", DIGEST_LEN)


def parse_api_version(text: Any, where: str) -> tuple[int, int]:
    """``"1.49"`` -> (1, 49).  Minor is a number, not a decimal fraction."""
    if not isinstance(text, str):
        raise UsageError(f'{where}: min_api must be a string like "1.49"')
    major, dot, minor = text.strip().partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise UsageError(f'{where}: min_api must look like "1.49"')
    a, b = int(major), int(minor)
    if a > 255 or b > 255:
        raise UsageError(f"{where}: min_api parts must be 0..255")
    return a, b


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{where} must be an integer")
    if not lo <= value <= hi:
        raise UsageError(f"{where} must be in {lo}..{hi}, got {value}")
    return value


# -- owner.toml ---------------------------------------------------------------


def load_owner_config(path: str | os.PathLike) -> OwnerConfig:
    """Read and check owner.toml; :class:`UsageError` with one line on any fault."""
    from agent.io.files import read_regular_file

    path = Path(path)
    try:
        doc = tomllib.loads(read_regular_file(path, "owner config", MAX_CONFIG_FILE).decode())
    except FileNotFoundError:
        raise UsageError(f"owner config {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read owner config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"owner config {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise UsageError(f"owner config {path} is not valid TOML: nested too deeply") from None

    base = path.parent
    vms_doc = doc.get("vm")
    if not isinstance(vms_doc, dict) or not vms_doc:
        raise UsageError(f"owner config {path} has no [vm.NAME] tables")
    vms = {name: _load_vm(name, table, base) for name, table in vms_doc.items()}
    refuse_shared_keys(vms)
    roots, source, snp_roots, snp_source = _load_platform(doc.get("platform", {}), base)
    return OwnerConfig(
        path=str(path),
        vms=vms,
        amd_roots=roots,
        amd_roots_source=source,
        snp_roots=snp_roots,
        snp_roots_source=snp_source,
        state_key=_load_owner_table(doc.get("owner", {}), base),
    )


_OWNER_KEYS = {"state_key"}


def _load_owner_table(table: Any, base: Path) -> str | None:
    """[owner] state_key: the reference, checked for form now and read by ``owner serve``."""
    if not isinstance(table, dict):
        raise UsageError("[owner] must be a table")
    unknown = sorted(set(table) - _OWNER_KEYS)
    if unknown:
        raise UsageError(f"[owner]: unknown key {unknown[0]!r}")
    ref = table.get("state_key")
    if ref is None:
        return None
    if not isinstance(ref, str):
        raise UsageError('[owner] state_key must be "file:PATH" or "keyring:DESC"')
    scheme, _, rest = ref.partition(":")
    if scheme not in ("file", "keyring") or not rest:
        raise UsageError('[owner] state_key must be "file:PATH" or "keyring:DESC"')
    if scheme == "file":
        return f"file:{base / rest}"
    return ref


def _load_platform(table: Any, base: Path) -> tuple[tuple[Any, ...], str, tuple[Any, ...], str]:
    """[platform]: the AMD roots, read and checked now (ARK self-signed, ASK by the ARK).

    ``amd_roots = DIR`` replaces the built-in roots: SEV's ``<product>-ark.cert`` /
    ``-ask.cert`` (AMD's format) and SNP's ``<product>-ark.pem`` / ``-ask.pem``.  A
    directory with only one kind leaves the other kind with no root at all: an owner
    that points at a test root trusts nothing else.
    """
    from agent.sev.ca import builtin_roots, load_roots_dir
    from agent.sev.snp_ca import builtin_snp_roots, load_snp_roots_dir

    if not isinstance(table, dict):
        raise UsageError("[platform] must be a table")
    unknown = sorted(set(table) - _PLATFORM_KEYS)
    if unknown:
        raise UsageError(f"platform: unknown key {unknown[0]!r}")
    if "amd_roots" not in table:
        return builtin_roots(), "built-in", builtin_snp_roots(), "built-in"
    value = table["amd_roots"]
    if not isinstance(value, str) or not value:
        raise UsageError("platform.amd_roots must be a directory path")
    directory = base / value
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise UsageError(f"platform.amd_roots: cannot read AMD roots directory {directory}: {exc.strerror}") from None
    has_sev = any(n.endswith("-ark.cert") for n in names)
    has_snp = any(n.endswith("-ark.pem") for n in names)
    if not (has_sev or has_snp):
        raise UsageError(
            f"platform.amd_roots: {directory} holds no <product>-ark.cert (SEV) and no <product>-ark.pem (SNP)"
        )
    try:
        sev = load_roots_dir(directory) if has_sev else ()
        snp = load_snp_roots_dir(directory) if has_snp else ()
    except ValueError as exc:
        raise UsageError(f"platform.amd_roots: {exc}") from None
    return sev, str(directory), snp, str(directory)


def refuse_shared_keys(vms: dict[str, VmPolicy]) -> None:
    """Every offline TIK and TEK must be one VM's alone.

    Two VMs with the same TIK: a measurement made for one verifies as the
    other's (the request names the VM), and the other's secret is released
    to it.  A shared TEK lets one launch decrypt the other's packet.  The
    keys are compared by a keyed BLAKE2b of each (a fresh key per load), so
    no key byte is compared or kept outside its Secret.
    """
    import hashlib

    salt = os.urandom(32)
    seen: dict[bytes, tuple[str, str]] = {}
    for name, vm in vms.items():
        for role, key in (("TIK", vm.tik), ("TEK", vm.tek)):
            if key is None:
                continue
            tag = hashlib.blake2b(key.reveal(), key=salt, digest_size=32).digest()
            first = seen.setdefault(tag, (name, role))
            if first[0] != name:
                raise UsageError(
                    f"vm.{name} {role} is the same key as vm.{first[0]} {first[1]}: "
                    "every VM needs a TIK and a TEK of its own"
                )


def _load_vm(name: str, table: Any, base: Path) -> VmPolicy:
    where = f"vm.{name}"
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table")
    snp = table.get("snp", False)
    if not isinstance(snp, bool):
        raise UsageError(f"{where}.snp must be true or false")
    if snp:
        return _load_snp_vm(name, table, base)
    unknown = sorted(set(table) - _VM_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}")
    session = table.get("session", False)
    if not isinstance(session, bool):
        raise UsageError(f"{where}.session must be true or false")
    required = ("policy",) if session else ("tik", "tek", "policy")
    for key in required:
        if key not in table:
            raise UsageError(f"{where}: missing {key!r}")
    if ("tik" in table) != ("tek" in table):
        raise UsageError(f"{where}: tik and tek go together")
    if "digest" in table and _LAUNCH_KEYS & set(table):
        raise UsageError(f"{where}: give digest or firmware/kernel/initrd/append, not both")
    if "digest" not in table and "firmware" not in table:
        raise UsageError(f"{where}: missing 'digest' (or 'firmware')")

    def rel(key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise UsageError(f"{where}.{key} must be a file path")
        return base / value

    tik = read_key_file(rel("tik", table["tik"]), f"{where} TIK") if "tik" in table else None
    tek = read_key_file(rel("tek", table["tek"]), f"{where} TEK") if "tek" in table else None
    policy = _int(table["policy"], f"{where}.policy", 0, 0xFFFFFFFF)

    digest_doc = table.get("digest")
    sev_es = table.get("sev_es", False)
    if not isinstance(sev_es, bool):
        raise UsageError(f"{where}.sev_es must be true or false")
    if _ES_KEYS & set(table) and not (sev_es and digest_doc is None):
        key = sorted(_ES_KEYS & set(table))[0]
        raise UsageError(f"{where}.{key} only applies with firmware and sev_es = true")
    if digest_doc is None or "sev_es" in table:
        # the owner knows which kind of digest this is: it must fit the policy
        from agent.sev.policy import es_mismatch

        mismatch = es_mismatch(sev_es, policy)
        if mismatch is not None:
            raise UsageError(f"{where}: {mismatch}")
    if digest_doc is None:
        firmware, digest = _launch_digest(table, where, rel, sev_es)
        digests: tuple[bytes, ...] = (digest,)
        if _AREA_KEYS & set(table):
            raise UsageError(
                f"{where}: the firmware gives the secret area; secret_gpa/secret_size are for a vm given by digest"
            )
        area = area_from_firmware(firmware)
    else:
        if isinstance(digest_doc, list):
            if not digest_doc:
                raise UsageError(f"{where}.digest must not be an empty list")
            digests = tuple(parse_digest(d, f"{where}.digest[{i}]") for i, d in enumerate(digest_doc))
        else:
            digests = (parse_digest(digest_doc, f"{where}.digest"),)
        area = _configured_area(table, where)

    min_api = parse_api_version(table["min_api"], where) if "min_api" in table else None

    build_ids = None
    if "build_ids" in table:
        ids = table["build_ids"]
        if not isinstance(ids, list) or not ids:
            raise UsageError(f"{where}.build_ids must be a non-empty list of integers")
        build_ids = frozenset(_int(b, f"{where}.build_ids[{i}]", 0, 255) for i, b in enumerate(ids))

    secrets_doc = table.get("secret")
    if not isinstance(secrets_doc, list) or not secrets_doc:
        raise UsageError(f"{where}: needs at least one [[{where}.secret]] entry")
    secrets = tuple(_load_secret(f"{where}.secret[{i}]", s, base) for i, s in enumerate(secrets_doc))
    seen: set[uuid.UUID] = set()
    for s in secrets:
        if s.guid in seen:
            raise UsageError(f"{where}: secret GUID {s.guid} appears twice")
        seen.add(s.guid)
    total = 20 + sum(20 + len(s.value) for s in secrets)
    if total > MAX_SECRET_FILE:
        raise UsageError(f"{where}: the secrets make a {total}-byte table, more than {MAX_SECRET_FILE}")

    platform = table.get("platform", "amd")
    if platform not in PLATFORM_MODES:
        raise UsageError(f"{where}.platform must be one of {', '.join(PLATFORM_MODES)}")
    pins: frozenset[bytes] = frozenset()
    if platform == "pinned":
        pin_doc = table.get("pdh_sha256")
        if not isinstance(pin_doc, list) or not pin_doc:
            raise UsageError(f'{where}: platform = "pinned" needs pdh_sha256 = ["<hex>", ...]')
        pins = frozenset(_pin(p, f"{where}.pdh_sha256[{i}]") for i, p in enumerate(pin_doc))
    elif "pdh_sha256" in table:
        raise UsageError(f'{where}: pdh_sha256 applies only with platform = "pinned"')

    return VmPolicy(
        name=name,
        tik=tik,
        tek=tek,
        policy=policy,
        digests=digests,
        secrets=secrets,
        min_api=min_api,
        build_ids=build_ids,
        gpa=None if area.problem else area.gpa,
        session=session,
        secret_area=area,
        platform=platform,
        pdh_pins=pins,
    )


def _hex_bytes(text: Any, where: str, size: int) -> bytes:
    """``size`` bytes from hex text; one-line UsageErrors that start with ``where``."""
    if not isinstance(text, str):
        raise UsageError(f"{where} must be a hex string")
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise UsageError(f"{where} is not valid hex") from None
    if len(raw) != size:
        raise UsageError(f"{where} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


def _load_snp_vm(name: str, table: dict, base: Path) -> VmPolicy:
    """``snp = true``: policy (the 64-bit SNP policy), snp_digest or the images, the secrets.

    The guest asks for its secrets itself (``POST /v1/snp/attest``): no TIK/TEK, no
    launch session, no secret area.  ``host_data`` / ``id_key_digest`` /
    ``author_key_digest`` (hex), when given, must be in every report.
    """
    from agent.sev.snp_idblock import policy_problem

    where = f"vm.{name}"
    unknown = sorted(set(table) - _SNP_VM_KEYS)
    if unknown:
        raise UsageError(f"{where}: {unknown[0]!r} does not apply to an SNP vm (snp = true)")
    if "policy" not in table:
        raise UsageError(f"{where}: missing 'policy' (the SNP guest policy)")
    policy_doc = table["policy"]
    if isinstance(policy_doc, str):
        try:
            policy_doc = int(policy_doc, 16)
        except ValueError:
            raise UsageError(f"{where}.policy must be an integer or a hex string") from None
    policy = _int(policy_doc, f"{where}.policy", 0, (1 << 64) - 1)
    problem = policy_problem(policy)
    if problem:
        raise UsageError(f"{where}.policy: {problem}")
    if "snp_digest" in table and _LAUNCH_KEYS & set(table):
        raise UsageError(f"{where}: give snp_digest or firmware/kernel/initrd/append, not both")
    if "snp_digest" in table:
        if {"vcpus", "vcpu_type", "guest_features"} & set(table):
            raise UsageError(f"{where}: vcpus/vcpu_type/guest_features only apply with firmware")
        digest = _hex_bytes(table["snp_digest"], f"{where}.snp_digest", 48)
    elif "firmware" in table:
        digest = _snp_launch_digest(table, where, base)
    else:
        raise UsageError(f"{where}: missing 'snp_digest' (or 'firmware' with vcpus and vcpu_type)")
    optional = {
        key: _hex_bytes(table[key], f"{where}.{key}", size) if key in table else None
        for key, size in (("host_data", 32), ("id_key_digest", 48), ("author_key_digest", 48))
    }
    secrets_doc = table.get("secret")
    if not isinstance(secrets_doc, list) or not secrets_doc:
        raise UsageError(f"{where}: needs at least one [[{where}.secret]] entry")
    secrets = tuple(_load_secret(f"{where}.secret[{i}]", s, base) for i, s in enumerate(secrets_doc))
    if len({s.guid for s in secrets}) != len(secrets):
        raise UsageError(f"{where}: a secret GUID appears twice")
    return VmPolicy(
        name=name,
        tik=None,
        tek=None,
        policy=policy,
        digests=(),
        secrets=secrets,
        platform="amd",
        snp=True,
        snp_digest=digest,
        snp_host_data=optional["host_data"],
        snp_id_key_digest=optional["id_key_digest"],
        snp_author_key_digest=optional["author_key_digest"],
    )


def _snp_launch_digest(table: dict, where: str, base: Path) -> bytes:
    """The SNP launch digest of the images in ``table``, as ``owner measure --snp``."""
    from agent.sev.snp_measure import DEFAULT_GUEST_FEATURES, snp_launch_digest, vcpu_signature

    for key in ("vcpus", "vcpu_type"):
        if key not in table:
            raise UsageError(f"{where}: firmware for an SNP vm needs {key!r}")
    vcpus = _int(table["vcpus"], f"{where}.vcpus", 1, 4096)
    if not isinstance(table["vcpu_type"], str):
        raise UsageError(f"{where}.vcpu_type must be a string (a QEMU CPU model name)")
    try:
        sig = vcpu_signature(table["vcpu_type"])
    except (ValueError, UsageError) as exc:
        raise UsageError(f"{where}.vcpu_type: {exc}") from None
    features = table.get("guest_features", DEFAULT_GUEST_FEATURES)
    if isinstance(features, str):
        try:
            features = int(features, 16)
        except ValueError:
            raise UsageError(f"{where}.guest_features must be an integer or a hex string") from None
    features = _int(features, f"{where}.guest_features", 0, (1 << 64) - 1)
    if "kernel" not in table and ("initrd" in table or "append" in table):
        raise UsageError(f"{where}: initrd/append need kernel")
    images = {}
    for key in ("firmware", "kernel", "initrd"):
        if key in table:
            if not isinstance(table[key], str) or not table[key]:
                raise UsageError(f"{where}.{key} must be a file path")
            images[key] = _read_file(base / table[key], f"{where}.{key}", MAX_IMAGE_FILE)
    append = table.get("append")
    if append is not None and not isinstance(append, str):
        raise UsageError(f"{where}.append must be a string")
    try:
        return snp_launch_digest(
            images["firmware"],
            vcpus=vcpus,
            vcpu_sig=sig,
            kernel=images.get("kernel"),
            initrd=images.get("initrd"),
            append=append,
            guest_features=features,
        )
    except (ValueError, UsageError) as exc:
        raise UsageError(f"{where}: cannot compute the SNP launch digest: {exc}") from None


def _pin(text: Any, where: str) -> bytes:
    """One pinned PDH: 64 hex digits, the SHA-256 of the PDH certificate as the platform sends it."""
    return _hex_bytes(text, where, 32)


def _configured_area(table: dict, where: str) -> SecretArea:
    """``secret_gpa`` (or its older name ``gpa``) and ``secret_size`` of a vm given by digest."""
    if "gpa" in table and "secret_gpa" in table:
        raise UsageError(f"{where}: gpa is the older name of secret_gpa; give one")
    key = "secret_gpa" if "secret_gpa" in table else "gpa"
    gpa = _int(table[key], f"{where}.{key}", 0, (1 << 64) - 1) if key in table else None
    size = _int(table["secret_size"], f"{where}.secret_size", 1, 0xFFFFFFFF) if "secret_size" in table else None
    if size is not None and gpa is None:
        raise UsageError(f"{where}: secret_size needs secret_gpa")
    if gpa == 0:
        raise UsageError(f"{where}.{key} is 0: guest address 0 is no firmware's secret area")
    return area_from_config(gpa, size)


def _launch_digest(table: dict, where: str, rel: Any, sev_es: bool) -> tuple[bytes, bytes]:
    """The firmware image and the launch digest of the images in ``table``.

    SEV-ES (``sev_es = true``) also measures one VMSA per vCPU: ``vcpus``,
    ``vcpu_sig`` (CPUID(1).EAX) and ``vmsa_fpu_init`` as for ``owner measure``.
    """
    from agent.sev.digest import launch_digest
    from agent.sev.vmsa import VmsaOptions

    es: dict[str, Any] = {}
    if sev_es:
        for key in ("vcpus", "vcpu_sig"):
            if key not in table:
                raise UsageError(f"{where}: sev_es = true with firmware needs {key!r}")
        fpu = table.get("vmsa_fpu_init", False)
        if not isinstance(fpu, bool):
            raise UsageError(f"{where}.vmsa_fpu_init must be true or false")
        es = {
            "sev_es": True,
            "vcpus": _int(table["vcpus"], f"{where}.vcpus", 1, 4096),
            "vcpu_sig": _int(table["vcpu_sig"], f"{where}.vcpu_sig", 0, 0xFFFFFFFF),
            "vmsa_options": VmsaOptions(fpu_init=fpu),
        }

    if "kernel" not in table and ("initrd" in table or "append" in table):
        raise UsageError(f"{where}: initrd/append need kernel")
    images = {
        key: _read_file(rel(key, table[key]), f"{where}.{key}", MAX_IMAGE_FILE)
        for key in ("firmware", "kernel", "initrd")
        if key in table
    }
    append = table.get("append")
    if append is not None and not isinstance(append, str):
        raise UsageError(f"{where}.append must be a string")
    if not images["firmware"]:
        raise UsageError(f"{where}.firmware is empty")
    try:
        return images["firmware"], launch_digest(
            images["firmware"], kernel=images.get("kernel"), initrd=images.get("initrd"), append=append, **es
        )
    except (ValueError, UsageError) as exc:
        raise UsageError(f"{where}: cannot compute the launch digest: {exc}") from None


def _load_secret(where: str, entry: Any, base: Path) -> SecretEntry:
    if not isinstance(entry, dict):
        raise UsageError(f"{where} must be a table")
    unknown = sorted(set(entry) - _SECRET_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}")
    name = entry.get("guid")
    file = entry.get("file")
    if not isinstance(name, str) or not name:
        raise UsageError(f'{where}.guid must be a GUID or an alias like "luks-key"')
    if not isinstance(file, str) or not file:
        raise UsageError(f"{where}.file must be a file path")
    return SecretEntry(
        guid=resolve_guid_or_usage(name, where), name=name, value=read_secret_file(base / file, f"{where}")
    )


def resolve_guid_or_usage(name: str, where: str) -> uuid.UUID:
    from agent.sev.guids import resolve_guid

    try:
        return resolve_guid(name)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
