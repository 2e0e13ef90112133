"""Configuration: a TOML file (stdlib ``tomllib``) plus command-line flags.

One schema lists every key, its type, default and check.  The same schema
makes a command-line flag for each key (``[sev] timeout_s`` is
``--sev-timeout-s``), so both ways of configuring stay in step.  Every
mistake is a :class:`UsageError` naming the key: exit status 2, one line.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from agent.common.errors import UsageError
from agent.core.modes import MasterKeyMode, OnRefusal

SECRET_REF = re.compile(r"(file|keyring|libvirt):.+")
# A config file is a few hundred bytes; this only stops /dev/zero-like inputs.
MAX_CONFIG_FILE = 1 << 20
MAX_GID = 2**32 - 2


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    type: type
    default: Any = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    path: bool = False  # relative to the config file's directory
    check: Callable[[Any], str | None] | None = None
    help: str = ""
    one_or_list: bool = False  # a list key that also takes one string (``owner_url = "http://..."``)

    @property
    def flag(self) -> str:
        return f"--{self.section}-{self.name}".replace("_", "-")

    @property
    def dest(self) -> str:
        return f"{self.section}_{self.name}"


def _secret_ref(value: str) -> str | None:
    return None if SECRET_REF.fullmatch(value) else "must be file:PATH, keyring:DESCRIPTION or libvirt:UUID"


def _vm_name(value: str) -> str | None:
    return (
        None
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value)
        else "must be 1-64 characters of letters, digits, '_', '.', '-'"
    )


def _url(value: str) -> str | None:
    """The owner client speaks plain HTTP (agent.io.http): anything else would
    only fail at the launch, after QEMU was started and the VM quit for it."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]+([/?#]\S*)?", value):
        return "must be an http:// URL"
    parts = urlsplit(value)
    if parts.scheme.lower() != "http":
        return f"must be an http:// URL (scheme {parts.scheme!r} is not supported)"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password"
    try:
        port = parts.port
    except ValueError:
        return "has an invalid port (must be 1..65535)"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has an invalid port (must be 1..65535)"
    return None


def _urls(value: tuple[str, ...]) -> str | None:
    """``[sev] owner_url``: one URL or a list, each one the client can use.

    A bad item is named by its place, not quoted: a URL with a password in
    it must not reach an error line."""
    if not value:
        return "must name at least one http:// URL"
    for i, url in enumerate(value):
        problem = _url(url)
        if problem:
            return problem if len(value) == 1 else f"item {i + 1} {problem}"
    return None


def _ref_dirs(value: tuple[str, ...]) -> str | None:
    for d in value:
        if d == os.sep:
            return "must not include / (that would be every file)"
        if not os.path.isdir(d):
            return f"{d!r} is not a directory"
    return None


def _snp_policy(value: int) -> str | None:
    from agent.sev.snp_idblock import policy_problem

    problem = policy_problem(value)
    return None if problem is None else f"is not a valid SNP policy: {problem}"


def _b64_of(size: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        import base64
        import binascii

        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return "must be base64"
        return None if len(raw) == size else f"must be {size} bytes in base64, got {len(raw)}"

    return check


def _hex32(value: str) -> str | None:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return "must be hex"
    return None if len(raw) == 32 else f"must be 32 bytes (64 hex digits), got {len(raw)}"


#: the vTPM's choices (agent.app.vtpm, agent.io.swtpm); the flows' modes are in agent.core.modes
VtpmVersion = Literal["2.0", "1.2"]
VtpmKeyKind = Literal["raw", "passphrase"]
VtpmDevice = Literal["tpm-crb", "tpm-tis"]

SCHEMA: tuple[Key, ...] = (
    Key("vm", "name", str, "vm", check=_vm_name, help="VM name, in logs and owner requests"),
    Key("vm", "run_dir", str, None, path=True, help="the agent's 0700 directory for this VM"),
    Key("launch", "shutdown_grace_s", float, 30.0, minimum=0),
    Key(
        "sev",
        "owner_url",
        list,
        None,
        check=_urls,
        one_or_list=True,
        help="(repeat) guest owner URL; several are tried in turn, with retries, until [sev] timeout_s",
    ),
    Key("sev", "timeout_s", float, 30.0, minimum=0.001),
    Key("sev", "on_refusal", str, "quit", choices=get_args(OnRefusal)),
    Key(
        "sev",
        "mh",
        bool,
        False,
        help="SEV fast migration (docs/mh.md): an incoming VM asks with migrating_from; the source reports its end",
    ),
    Key(
        "sev",
        "pdh",
        str,
        None,
        path=True,
        help="(launch) the platform's PDH certificate, to get a launch session from the owner",
    ),
    Key("sev", "cert_chain", str, None, path=True, help="(launch) the platform's PEK/OCA/CEK chain, sent with the PDH"),
    Key(
        "sev",
        "cek",
        str,
        None,
        path=True,
        help="(launch) the CEK as AMD's key server signs it (sevctl export --full): sent in place of the chain's CEK",
    ),
    # SEV-SNP (keyagent launch, QEMU >= 9.1): agent.app.snp_launch, docs/snp.md
    Key(
        "snp",
        "policy",
        int,
        0x30000,
        minimum=0,
        maximum=2**64 - 1,
        check=_snp_policy,
        help="(launch) the 64-bit SNP guest policy of the sev-snp-guest object",
    ),
    Key("snp", "id_block", str, None, check=_b64_of(0x60), help="(launch) the ID block, base64 (owner idblock)"),
    Key("snp", "id_auth", str, None, check=_b64_of(0x1000), help="(launch) the ID auth information, base64"),
    Key("snp", "id_block_file", str, None, path=True, help="(launch) a file holding the ID block in base64"),
    Key("snp", "id_auth_file", str, None, path=True, help="(launch) a file holding the ID auth in base64"),
    Key("snp", "host_data", str, None, check=_hex32, help="(launch) 32 bytes the report carries, hex"),
    Key("snp", "author_key_enabled", bool, False, help="(launch) the ID auth carries an author key"),
    Key("snp", "cbitpos", int, None, minimum=0, maximum=63, help="(launch) the C-bit position QEMU checks"),
    # QEMU's -object is QAPI: reduced-phys-bits is a required member of SevCommonProperties
    Key(
        "snp",
        "reduced_phys_bits",
        int,
        1,
        minimum=0,
        maximum=63,
        help="(launch) physical address bits lost to the C-bit (QEMU requires it; 1 on Milan/Genoa)",
    ),
    Key(
        "snp", "timeout_s", float, 30.0, minimum=0.001, help="(launch) how long the QMP check of the SNP guest may take"
    ),
    # GnuTLS's psktool makes keys of at most 512 bytes.
    Key("migration", "psk_length", int, 32, minimum=16, maximum=512),
    Key("migration", "dest_deadline_s", float, 60.0, minimum=0.001),
    Key(
        "migration",
        "host_key",
        str,
        None,
        path=True,
        help="this host's Ed25519 identity key (keyagent hostkey init), for the sealed hand-over",
    ),
    Key(
        "migration",
        "trusted_hosts",
        str,
        None,
        path=True,
        help="a directory of the host public keys this agent may migrate with, one per file",
    ),
    Key(
        "migration",
        "offer_lifetime_s",
        float,
        600.0,
        minimum=0.001,
        help="a destination forgets an offer no cookie has answered after this",
    ),
    Key("secrets", "master_key", str, "keyring", choices=get_args(MasterKeyMode)),
    Key("vtpm", "state_dir", str, None, path=True),
    Key("vtpm", "key", str, None, check=_secret_ref),
    Key("vtpm", "version", str, "2.0", choices=get_args(VtpmVersion)),
    Key("vtpm", "key_kind", str, "raw", choices=get_args(VtpmKeyKind)),
    Key("vtpm", "device", str, "tpm-crb", choices=get_args(VtpmDevice)),
    # gid_t is 32 bits and (gid_t)-1 means "leave the group as it is".
    Key(
        "control",
        "gid",
        int,
        None,
        minimum=0,
        maximum=MAX_GID,
        help="a group (besides our uid and root) allowed on the control socket",
    ),
    Key(
        "control",
        "ref_dirs",
        list,
        (),
        path=True,
        check=_ref_dirs,
        help="(repeat) a directory under which peers of [control] gid may name key files; none by default",
    ),
)
KEYS = {(k.section, k.name): k for k in SCHEMA}
SECTIONS = {k.section for k in SCHEMA}


@dataclass(frozen=True)
class Config:
    """Resolved settings, one typed field per schema key: ``[sev] timeout_s``
    is ``cfg.sev_timeout_s``.  Built only by :func:`load_config`, which
    checked every value against its :class:`Key` (so the ``Literal`` fields
    hold one of their choices); a test keeps the fields and SCHEMA in step.
    """

    vm_name: str
    vm_run_dir: str | None
    launch_shutdown_grace_s: float
    sev_owner_url: tuple[str, ...] | None  # one or more; agent.io.owner_client tries them in turn
    sev_timeout_s: float
    sev_on_refusal: OnRefusal
    sev_mh: bool
    sev_pdh: str | None
    sev_cert_chain: str | None
    sev_cek: str | None
    snp_policy: int
    snp_id_block: str | None
    snp_id_auth: str | None
    snp_id_block_file: str | None
    snp_id_auth_file: str | None
    snp_host_data: str | None
    snp_author_key_enabled: bool
    snp_cbitpos: int | None
    snp_reduced_phys_bits: int
    snp_timeout_s: float
    migration_psk_length: int
    migration_dest_deadline_s: float
    migration_host_key: str | None
    migration_trusted_hosts: str | None
    migration_offer_lifetime_s: float
    secrets_master_key: MasterKeyMode
    vtpm_state_dir: str | None
    vtpm_key: str | None
    vtpm_version: VtpmVersion
    vtpm_key_kind: VtpmKeyKind
    vtpm_device: VtpmDevice
    control_gid: int | None
    control_ref_dirs: tuple[str, ...]
    #: the sections the file or a flag named (``[vtpm]`` alone turns the vTPM on)
    sections_present: frozenset[str] = frozenset()
    #: the config file read, if any
    source: str | None = None

    @classmethod
    def from_values(
        cls, values: dict[tuple[str, str], Any], present: set[str] | frozenset[str], source: str | None
    ) -> Config:
        """The checked ``{(section, name): value}`` of :func:`load_config`."""
        fields = {f"{section}_{name}": value for (section, name), value in values.items()}
        return cls(**fields, sections_present=frozenset(present), source=source)

    def get(self, section: str, name: str) -> Any:
        """The value of ``[section] name`` when the key is computed (``KeyError`` if unknown)."""
        if (section, name) not in KEYS:
            raise KeyError((section, name))
        return getattr(self, f"{section}_{name}")

    @property
    def sev_enabled(self) -> bool:
        return "sev" in self.sections_present or self.sev_owner_url is not None

    @property
    def snp_enabled(self) -> bool:
        return "snp" in self.sections_present


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _coerce(key: Key, value: Any, where: str) -> Any:
    label = f"{where}[{key.section}] {key.name}"
    if key.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{label} must be a number")
        try:
            value = float(value)
        except OverflowError:  # a TOML integer too large for a float
            raise UsageError(f"{label} must be a finite number") from None
        if not math.isfinite(value):  # nan would make every comparison false
            raise UsageError(f"{label} must be a finite number")
    elif key.type is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{label} must be true or false")
    elif key.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{label} must be an integer")
    elif key.type is str:
        if not isinstance(value, str) or not value:
            raise UsageError(f"{label} must be a non-empty string")
    elif key.type is list:
        if key.one_or_list and isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v and v.isprintable() for v in value):
            what = "a non-empty string or a list of them" if key.one_or_list else "a list of non-empty strings"
            raise UsageError(f"{label} must be {what}")
        value = tuple(value)
    if key.minimum is not None and value < key.minimum:
        raise UsageError(f"{label} must be at least {_num(key.minimum)}")
    if key.maximum is not None and value > key.maximum:
        raise UsageError(f"{label} must be at most {_num(key.maximum)}")
    if key.choices is not None and value not in key.choices:
        raise UsageError(f"{label} must be one of {', '.join(map(str, key.choices))}")
    if key.check is not None and not (key.path and key.type is list):
        problem = key.check(value)
        if problem:
            raise UsageError(f"{label} {problem}")
    return value


def _check_paths(key: Key, value: Any, where: str) -> Any:
    """A list of paths, once resolved: real paths (symlinks resolved, so that
    containment checks compare like with like), then the key's check."""
    value = tuple(os.path.realpath(v) for v in value)
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise UsageError(f"{where}[{key.section}] {key.name} {problem}")
    return value


def _parse_flag(key: Key, text: str) -> Any:
    if key.type is float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{key.flag} must be a number") from None
    if key.type is int:
        try:
            return int(text, 0)
        except ValueError:
            raise UsageError(f"{key.flag} must be an integer") from None
    if key.type is list:
        return [text] if isinstance(text, str) else list(text)  # the flag was given once per item
    if key.type is bool:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.lower() not in words:
            raise UsageError(f"{key.flag} must be true or false")
        return words[text.lower()]
    return text


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per schema key."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    group = parser.add_argument_group("configuration keys (override the file)")
    for key in SCHEMA:
        if key.type is list:  # one item per flag; the singular also works
            names = [key.flag] + ([key.flag[:-1]] if key.flag.endswith("s") else [])
            group.add_argument(
                *names,
                dest=key.dest,
                metavar=key.name.upper()[:-1],
                action="append",
                default=None,
                help=key.help or None,
            )
            continue
        group.add_argument(key.flag, dest=key.dest, metavar=key.name.upper(), default=None, help=key.help or None)


def _resolve_path(base: str, value: str) -> str:
    if value.startswith(("file:",)):
        inner = value[5:]
        return "file:" + (inner if os.path.isabs(inner) else os.path.join(base, inner))
    return value if os.path.isabs(value) else os.path.join(base, value)


def load_config(
    path: str | None,
    flags: dict[str, Any] | None = None,
    extras: dict[tuple[str, str], Any] | None = None,
    *,
    data: bytes | None = None,
) -> Config:
    """The file's settings, overridden by ``flags``.

    ``extras`` (``keyagent host``): ``{(section, name): None}`` of keys the
    caller reads itself; each one the file gives is stored there (a key
    outside the schema must then be a non-empty string, and is not refused).
    ``data``: the file's bytes, already read by the caller (``keyagent host``
    digests the same bytes); ``path`` still names it and places its
    relative paths.
    """
    values = {(k.section, k.name): k.default for k in SCHEMA}
    present: set[str] = set()
    if path:
        import tomllib  # only with a file: a sidecar run on flags alone does not pay for its parser

        from agent.io.files import read_regular_file

        try:
            raw = data if data is not None else read_regular_file(path, "config", MAX_CONFIG_FILE)
            parsed = tomllib.loads(raw.decode())
        except OSError as exc:
            raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"invalid TOML in {path}: {exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"invalid TOML in {path}: not UTF-8 text") from None
        except RecursionError:
            raise UsageError(f"invalid TOML in {path}: nested too deeply") from None
        base = os.path.dirname(os.path.abspath(path))
        where = f"{path}: "
        for section, table in parsed.items():
            if section not in SECTIONS:
                raise UsageError(f"{where}unknown section [{section}]")
            if not isinstance(table, dict):
                raise UsageError(f"{where}[{section}] must be a table")
            present.add(section)
            for name, value in table.items():
                key = KEYS.get((section, name))
                if extras is not None and (section, name) in extras:
                    extras[(section, name)] = value
                    if key is None:
                        if not isinstance(value, str) or not value:
                            raise UsageError(f"{where}[{section}] {name} must be a non-empty string")
                        continue
                if key is None:
                    raise UsageError(f"{where}unknown key [{section}] {name}")
                value = _coerce(key, value, where)
                if key.path and key.type is list:
                    value = _check_paths(key, [_resolve_path(base, v) for v in value], where)
                elif key.path or (key.check is _secret_ref and value.startswith("file:")):
                    value = _resolve_path(base, value)
                values[(section, name)] = value
    for dest, text in (flags or {}).items():
        if text is None:
            continue
        key = next((k for k in SCHEMA if k.dest == dest), None)
        if key is None:
            continue
        values[(key.section, key.name)] = _coerce(key, _parse_flag(key, text), "")
        if key.path and key.type is list:
            values[(key.section, key.name)] = _check_paths(key, [os.path.abspath(v) for v in text], "")
        elif key.path:
            values[(key.section, key.name)] = os.path.abspath(text)
        present.add(key.section)
    if "snp" in present and ("sev" in present or values.get(("sev", "owner_url"))):
        raise UsageError("[snp] and [sev] are different launches: an SNP guest asks the owner itself, give one of them")
    if "snp" in present:
        for name in ("id_block", "id_auth"):
            if values.get(("snp", name)) and values.get(("snp", f"{name}_file")):
                raise UsageError(f"[snp] {name} and {name}_file: give one")
    if values.get(("sev", "cek")) and not values.get(("sev", "cert_chain")):
        raise UsageError("[sev] cek replaces the CEK of [sev] cert_chain: give cert_chain too")
    return Config.from_values(values, present, path)


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {k.dest: getattr(args, k.dest, None) for k in SCHEMA}
    if getattr(args, "owner_url", None):
        flags["sev_owner_url"] = args.owner_url
    return load_config(getattr(args, "config", None), flags)


def unix_path(spec: str, flag: str) -> str:
    """``unix:PATH`` -> PATH, or a UsageError naming the flag."""
    if not isinstance(spec, str) or not spec.startswith("unix:") or len(spec) <= 5:
        raise UsageError(f"{flag} must be unix:PATH, got {spec!r}")
    return spec[5:]
