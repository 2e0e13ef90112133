"""Where a launch secret lands in the guest, as far as the guest owner knows.

QEMU 7.2 ``sev-inject-launch-secret`` without ``gpa`` looks up the SEV
secret-block entry of the firmware's GUIDed table (SEV_SECRET_GUID
4c2eb361-7d9b-4cc3-8081-127c90d3d294, ``struct sev_secret_area { u32 base;
u32 size; }``) and injects at ``base``.  It never reads ``size``, and it only
fails when the entry is missing.  Debian's stock ``OVMF.fd`` (2022.11) carries
the entry with base 0 and size 0 (read from the package's image; the area is
reserved only by OVMF's AmdSev build): QEMU then writes the packet at guest
address 0, which is ordinary RAM, reports success, and the guest's firmware
never publishes a secret table.  The agent would resume a VM that never got
its secret.

The host decides which firmware QEMU loads and may lie about it, but it
cannot change the measured firmware without the measurement failing.  So
the owner, who knows the firmware (``firmware =`` in owner.toml), reads the
area from that image and:

- answers the area's base as ``gpa``, so the injection goes where the
  measured firmware will look, whatever QEMU finds in the table;
- refuses (403) when the firmware has no usable area (no entry, size 0,
  or base 0) or when the secret table does not fit in it.

A VM configured by ``digest`` may name the area itself (``secret_gpa``,
``secret_size``); with ``secret_gpa`` alone the gpa is answered and the fit
is not checked; with neither, the owner cannot check anything and says so
once at start (QEMU then takes the area from the firmware it loaded).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.sev.ovmf import FirmwareError, OvmfImage

__all__ = ["SecretArea", "area_from_firmware", "area_from_config", "area_refusal", "table_length"]

#: the secret table's header and each entry's header: guid[16] || len u32le
_GUID_LEN_SIZE = 20
_ALIGN = 16


@dataclass(frozen=True)
class SecretArea:
    """What the owner knows of one VM's secret area.

    ``source`` is ``"firmware"`` (read from the image named in owner.toml),
    ``"config"`` (``secret_gpa``/``secret_size``) or ``"unknown"`` (a VM
    given by ``digest`` alone).  ``gpa``/``size`` are None where unknown;
    ``problem`` says why a firmware's area cannot be used.
    """

    source: str = "unknown"
    gpa: int | None = None
    size: int | None = None
    problem: str | None = None

    @property
    def checked(self) -> bool:
        """True when the owner can tell whether the secret table fits."""
        return self.gpa is not None and self.size is not None

    def describe(self) -> str:
        """One line for ``owner measure`` and the start-up log."""
        if self.problem is not None:
            return f"no usable SEV secret area: {self.problem}"
        if self.gpa is None:
            return "SEV secret area unknown"
        size = f"size 0x{self.size:x}" if self.size is not None else "size unknown"
        return f"SEV secret area gpa 0x{self.gpa:x} {size}"


def area_from_firmware(firmware: bytes) -> SecretArea:
    """The secret area of an OVMF image, read as QEMU 7.2 reads it.

    Never raises for a firmware without an area: a plain SEV digest does not
    need one, and the refusal belongs to the launch that would need it.
    """
    image = OvmfImage(firmware)
    try:
        area = image.secret_area()
    except FirmwareError as exc:
        return SecretArea("firmware", problem=str(exc))
    if area is None:
        why = image.table_problem or "its GUID table has no SEV secret-block entry"
        return SecretArea("firmware", problem=f"firmware has no SEV secret area ({why})")
    if area.size == 0 or area.base == 0:
        # QEMU would inject at gpa `base` (0) and report success.
        return SecretArea(
            "firmware",
            gpa=area.base,
            size=area.size,
            problem=f"the firmware's SEV secret-block entry is base 0x{area.base:x} "
            f"size 0x{area.size:x}; QEMU would inject where the guest never looks",
        )
    return SecretArea("firmware", gpa=area.base, size=area.size)


def area_from_config(gpa: int | None, size: int | None) -> SecretArea:
    """``secret_gpa`` / ``secret_size`` of a VM given by digest (checked by the caller)."""
    if gpa is None:
        return SecretArea()
    return SecretArea("config", gpa=gpa, size=size)


def table_length(data_lengths: list[int]) -> int:
    """Bytes of the secret table (and of the packet's ciphertext) for these entries.

    Header and entries as :mod:`agent.sev.secret_table` builds them, padded
    to 16: the same number :func:`build_secret_table` returns the length of.
    """
    raw = _GUID_LEN_SIZE + sum(_GUID_LEN_SIZE + n for n in data_lengths)
    return raw + (-raw) % _ALIGN


def area_refusal(area: SecretArea, table_len: int) -> str | None:
    """Why a launch must not get its secret into ``area``, or None.

    An unknown area is not a refusal: the VM was configured by digest alone
    and QEMU takes the area from its firmware (logged once at start).
    """
    if area.problem is not None:
        return f"no usable secret area: {area.problem}"
    if area.size is not None and table_len > area.size:
        return f"secret table does not fit: {table_len} bytes, the secret area at 0x{area.gpa:x} holds {area.size}"
    return None
