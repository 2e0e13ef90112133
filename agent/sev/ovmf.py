"""OVMF's GUIDed table: where the firmware tells the hypervisor about SEV areas.

The guest owner needs three facts from the firmware image it expects the VM to
run, and OVMF publishes all three in a table at the very top of the image
(edk2 OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm):

- the SEV hashes-table area, where QEMU installs the kernel/initrd/cmdline
  hashes for a measured direct kernel boot;
- the SEV secret area, where QEMU injects the launch secret by default;
- the SEV-ES reset block, the address SEV-ES application processors start at.

Layout, read backwards from the end of the image (the flash ends at 4 GiB)::

    ... entry N ... entry 1 | footer: length(u16) GUID(16) | 32 bytes (AP entry
                                                              point, VTF sig,
                                                              reset vector)

    entry = data || length(u16, from start of data to end of GUID) || GUID

The footer's length covers the whole table including the footer itself.  GUIDs
are stored in the little-endian ("mixed endian") EFI_GUID form.

The walk mirrors QEMU 7.2 hw/i386/pc_sysfw_ovmf.c (pc_system_parse_ovmf_flash,
pc_system_ovmf_table_find) so that the owner finds exactly the entries QEMU
finds: an image smaller than one page has no table, and a lookup stops at the
first entry whose length is impossible.  The legacy SEV-ES reset block (before
the table existed) is read as target/i386/sev.c sev_es_find_reset_vector does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

from agent.common.errors import SevFormatError

# Footer of the table: 48 bytes from the end sits its GUID, just below it its
# length; the last 32 bytes of the image are code (AP entry, VTF0, reset).
TABLE_FOOTER_GUID = UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
# SEV Hash Table Block: DD base, DD size (guest RAM, not flash).
SEV_HASH_TABLE_RV_GUID = UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
# SEV Secret block: DD base, DD size.
SEV_SECRET_BLOCK_GUID = UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
# SEV-ES reset block (QEMU calls it SEV_INFO_BLOCK_GUID): DD reset address,
# bits 31:16 the CS base, bits 15:0 the IP.
SEV_ES_RESET_BLOCK_GUID = UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
# SEV(-SNP) metadata offset: DD offset of the "ASEV" metadata from the end.
SEV_METADATA_OFFSET_GUID = UUID("dc886566-984a-4798-a75e-5585a7bf67cc")

# Bytes after the footer GUID: applicationProcessorEntryPoint, VTF signature,
# resetVector (ResetVectorVtf0.asm), i.e. the top 0x20 bytes below 4 GiB.
TAIL_SIZE = 0x20
# Entry trailer, and the footer: length of the entry (u16 LE), EFI_GUID.
ENTRY_TRAILER = struct.Struct("<H16s")  # length, guid
# QEMU ignores a flash smaller than TARGET_PAGE_SIZE.
MIN_IMAGE_SIZE = 4096

# SEV Hash Table Block / SEV Secret block data (QEMU SevHashTableDescriptor,
# struct sev_secret_area).
AREA = struct.Struct("<II")  # base, size
# SEV-ES reset block data (QEMU SevInfoBlock).
RESET_BLOCK = struct.Struct("<I")  # reset_addr


class FirmwareError(SevFormatError):
    """The firmware image cannot give what the launch needs (the command
    line: exit 2)."""


@dataclass(frozen=True)
class Area:
    """A guest-physical area OVMF reserves (base, size in bytes)."""

    base: int
    size: int


class OvmfImage:
    """A firmware image and the GUIDed table at its top, read as QEMU reads it."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self._table, self.table_problem = _table_bytes(self.data)

    @property
    def has_table(self) -> bool:
        """True when the image carries the table footer (an SEV-aware OVMF)."""
        return self._table is not None

    def find(self, guid: UUID) -> bytes | None:
        """The data of the entry named ``guid``, or None (pc_system_ovmf_table_find)."""
        table = self._table
        if not table:
            return None
        foot = len(table)
        while foot >= ENTRY_TRAILER.size:
            length, raw_guid = ENTRY_TRAILER.unpack_from(table, foot - ENTRY_TRAILER.size)
            if length < ENTRY_TRAILER.size or length > foot:
                return None  # corrupt: QEMU stops looking here too
            start = foot - length
            if raw_guid == guid.bytes_le:
                return table[start : foot - ENTRY_TRAILER.size]
            foot = start
        return None

    def entries(self) -> list[tuple[UUID, bytes]]:
        """Every well-formed entry, foot first (for display and tests)."""
        out: list[tuple[UUID, bytes]] = []
        table = self._table or b""
        foot = len(table)
        while foot >= ENTRY_TRAILER.size:
            length, raw_guid = ENTRY_TRAILER.unpack_from(table, foot - ENTRY_TRAILER.size)
            if length < ENTRY_TRAILER.size or length > foot:
                break
            out.append((UUID(bytes_le=raw_guid), table[foot - length : foot - ENTRY_TRAILER.size]))
            foot -= length
        return out

    def _area(self, guid: UUID, what: str) -> Area | None:
        data = self.find(guid)
        if data is None:
            return None
        if len(data) < AREA.size:
            raise FirmwareError(f"firmware {what} entry is {len(data)} bytes, expected {AREA.size}")
        return Area(*AREA.unpack_from(data))

    def hashes_table_area(self) -> Area | None:
        """Where QEMU installs the kernel hashes table, or None if OVMF has no such area."""
        return self._area(SEV_HASH_TABLE_RV_GUID, "SEV hashes-table")

    def secret_area(self) -> Area | None:
        """Where QEMU injects the launch secret when no gpa is given."""
        return self._area(SEV_SECRET_BLOCK_GUID, "SEV secret")

    def sev_es_reset_address(self) -> int | None:
        """The SEV-ES AP reset address (CS base | IP), or None if the image has none.

        The table entry is looked up first; without it QEMU reads the original
        SEV info block, whose GUID sits right below the top 0x20 bytes.
        """
        data = self.find(SEV_ES_RESET_BLOCK_GUID)
        if data is None:
            data = self._legacy_reset_block()
        if data is None:
            return None
        if len(data) < RESET_BLOCK.size:
            raise FirmwareError(f"firmware SEV-ES reset block is {len(data)} bytes, expected {RESET_BLOCK.size}")
        addr: int = RESET_BLOCK.unpack_from(data)[0]
        if addr == 0:
            # QEMU refuses to start such a guest ("SEV-ES reset address is zero").
            raise FirmwareError("firmware SEV-ES reset address is zero")
        return addr

    def _legacy_reset_block(self) -> bytes | None:
        data = self.data
        end = len(data) - TAIL_SIZE
        if end - ENTRY_TRAILER.size < 0:
            return None
        length, raw_guid = ENTRY_TRAILER.unpack_from(data, end - ENTRY_TRAILER.size)
        if raw_guid != SEV_ES_RESET_BLOCK_GUID.bytes_le:
            return None
        if length < ENTRY_TRAILER.size or length > end:
            raise FirmwareError("firmware legacy SEV-ES reset block has an invalid length")
        return data[end - length : end - ENTRY_TRAILER.size]


def _table_bytes(data: bytes) -> tuple[bytes | None, str | None]:
    """The table without its footer (pc_system_parse_ovmf_flash) and why not.

    Like QEMU, a missing or impossible footer means "no table" rather than an
    error: a plain SEV launch does not need the table at all.  The reason is
    kept so that a caller that does need an entry can say what was wrong.
    """
    size = len(data)
    if size < MIN_IMAGE_SIZE:
        return None, f"image is {size} bytes, smaller than one page"
    foot = size - TAIL_SIZE - ENTRY_TRAILER.size  # start of the footer trailer
    length, raw_guid = ENTRY_TRAILER.unpack_from(data, foot)
    if raw_guid != TABLE_FOOTER_GUID.bytes_le:
        return None, f"no OVMF GUID table footer ({TABLE_FOOTER_GUID}) 48 bytes before the end"
    table_len = length - ENTRY_TRAILER.size
    if table_len < 0 or table_len > foot:
        return None, f"OVMF GUID table has an invalid size {table_len}"
    return data[foot - table_len : foot], None


# -- writing (synthetic images for tests and the simulator) ------------------


def build_entry(guid: UUID, payload: bytes) -> bytes:
    """One table entry: payload || length(u16) || GUID."""
    return payload + ENTRY_TRAILER.pack(len(payload) + ENTRY_TRAILER.size, guid.bytes_le)


def build_table(entries: Iterable[tuple[UUID, bytes]]) -> bytes:
    """Entries (first = farthest from the footer) followed by the footer."""
    body = b"".join(build_entry(guid, payload) for guid, payload in entries)
    return body + ENTRY_TRAILER.pack(len(body) + ENTRY_TRAILER.size, TABLE_FOOTER_GUID.bytes_le)


def synthetic_image(
    *,
    size: int = 0x10000,
    hashes_area: Area | None = None,
    secret_area: Area | None = None,
    reset_address: int | None = None,
    footer: bool = True,
    filler: bytes = b"\xff",
    tail: bytes = b"\x90" * TAIL_SIZE,
) -> bytes:
    """A firmware-shaped blob with an OVMF table at its top.

    Not a bootable firmware: only the bytes QEMU and the owner read.  Entry
    order follows ResetVectorVtf0.asm (hash block, secret block, reset block).
    """
    if len(tail) != TAIL_SIZE:
        raise ValueError("tail must be 32 bytes")
    entries: list[tuple[UUID, bytes]] = []
    if hashes_area is not None:
        entries.append((SEV_HASH_TABLE_RV_GUID, AREA.pack(hashes_area.base, hashes_area.size)))
    if secret_area is not None:
        entries.append((SEV_SECRET_BLOCK_GUID, AREA.pack(secret_area.base, secret_area.size)))
    if reset_address is not None:
        entries.append((SEV_ES_RESET_BLOCK_GUID, RESET_BLOCK.pack(reset_address)))
    top = (build_table(entries) if footer else b"") + tail
    if len(top) > size:
        raise ValueError("image too small for its table")
    body = (filler * (size // max(len(filler), 1) + 1))[: size - len(top)]
    return body + top
