"""The SEV kernel hashes table: what makes a direct kernel boot measured.

With ``-kernel`` and ``sev-guest,kernel-hashes=on`` QEMU hashes the kernel,
initrd and command line, writes this table into the guest RAM area OVMF names
in its GUIDed table (see ``agent.sev.ovmf``), and passes the padded table to
LAUNCH_UPDATE_DATA right after the firmware.  OVMF later refuses to boot
fw_cfg blobs whose hashes differ, so the launch digest covers the kernel.

Layout (QEMU 7.2 target/i386/sev.c, all little-endian, packed)::

    SevHashTable       guid[16] len(u16)            len = 168 (whole table)
      cmdline  SevHashTableEntry guid[16] len(u16) hash[32]   len = 50
      initrd   SevHashTableEntry ...
      kernel   SevHashTableEntry ...
    padding to a multiple of 16 (8 zero bytes)  -> PaddedSevHashTable, 176

What is hashed (sev_add_kernel_loader_hashes, x86_load_linux):

- cmdline: the command line with its terminating NUL; no ``-append`` is the
  single byte ``\\0``;
- initrd: the initrd file; no ``-initrd`` hashes the empty string;
- kernel: the kernel file as given (setup part + rest: QEMU leaves the header
  unmodified for SEV guests so that this equals the file's hash).

The same bytes come out of libvirt's virt-qemu-sev-validate (KernelTable),
sevctl's ``measurement build`` and sev-snp-measure's sev_hashes.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from uuid import UUID

from cryptography.hazmat.primitives import hashes

from agent.common.errors import SevFormatError

TABLE_GUID = UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
CMDLINE_ENTRY_GUID = UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
INITRD_ENTRY_GUID = UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
KERNEL_ENTRY_GUID = UUID("4de79437-abd2-427f-b835-d5b172d2045b")

HASH_SIZE = 32
# SevHashTable header: guid, len
TABLE_HEADER = struct.Struct("<16sH")
# SevHashTableEntry: guid, len, hash[HASH_SIZE]
ENTRY = struct.Struct(f"<16sH{HASH_SIZE}s")
# sizeof(SevHashTable): the header and the cmdline, initrd, kernel entries
TABLE_SIZE = TABLE_HEADER.size + 3 * ENTRY.size  # 168
# sizeof(PaddedSevHashTable): LAUNCH_UPDATE_DATA lengths are multiples of 16
PADDED_SIZE = (TABLE_SIZE + 15) & ~15  # 176


def sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def cmdline_bytes(append: str | bytes | None) -> bytes:
    """The command line as QEMU hashes it: UTF-8, then one NUL."""
    if append is None:
        raw = b""
    elif isinstance(append, str):
        raw = append.encode("utf-8")
    else:
        raw = bytes(append)
    if b"\x00" in raw:
        # QEMU keeps the command line as a C string: a NUL would cut it short.
        raise SevFormatError("the kernel command line must not contain a NUL byte")
    return raw + b"\x00"


@dataclass(frozen=True)
class KernelHashes:
    """The three SHA-256 digests QEMU puts in the table."""

    cmdline: bytes
    initrd: bytes
    kernel: bytes

    @classmethod
    def of(cls, kernel: bytes, initrd: bytes | None = None, append: str | bytes | None = None) -> KernelHashes:
        return cls(
            cmdline=sha256(cmdline_bytes(append)),
            initrd=sha256(initrd if initrd is not None else b""),
            kernel=sha256(kernel),
        )


def build_hashes_table(hashes_: KernelHashes) -> bytes:
    """The PaddedSevHashTable bytes QEMU measures (176 bytes)."""
    table = TABLE_HEADER.pack(TABLE_GUID.bytes_le, TABLE_SIZE) + b"".join(
        ENTRY.pack(guid.bytes_le, ENTRY.size, digest)
        for guid, digest in (
            (CMDLINE_ENTRY_GUID, hashes_.cmdline),
            (INITRD_ENTRY_GUID, hashes_.initrd),
            (KERNEL_ENTRY_GUID, hashes_.kernel),
        )
    )
    return table + bytes(PADDED_SIZE - len(table))


def kernel_hashes_table(kernel: bytes, initrd: bytes | None = None, append: str | bytes | None = None) -> bytes:
    """Shortcut: hash the three inputs and build the padded table."""
    return build_hashes_table(KernelHashes.of(kernel, initrd, append))
