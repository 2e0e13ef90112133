"""The GUID-ed secret table injected with LAUNCH_SECRET.

OVMF reserves a page for it; Linux's ``efi_secret`` driver (and GRUB, COCONUT
SVSM) walks it. Layout, all integers little-endian, GUIDs in ``bytes_le`` form
(see :mod:`agent.sev.guids`):

    header:  guid[16] = SECRET_TABLE_HEADER_GUID, len u32 = 20 + sum(entry lens)
    entry:   guid[16], len u32 = 20 + len(data), data[len - 20]
    then zero padding to a multiple of 16 bytes (AES-CTR blocks; SEV-ES needs it)

This is what sevctl's ``secret build`` writes (``src/secret.rs`` +
``build_entry``/``build_table`` in ``src/measurement.rs``): the header length
counts the entries but not the padding, and entries are not padded one by one.
Secret data is used as-is: no NUL terminator is added (some older scripts add
one; if a consumer wants it, put it in the data). libvirt's
``virt-qemu-sev-validate`` writes the same table except that it adds a whole
16-byte block of padding when the table is already aligned; the parser below
accepts both, and also a header length that includes the padding.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

from agent.sev.guids import SECRET_TABLE_HEADER_GUID, guid_bytes, guid_from_bytes

#: guid[16] || len u32le -- used for the table header and for every entry
_GUID_LEN = struct.Struct("<16sI")
HEADER_LEN = _GUID_LEN.size  # 20
ALIGN = 16

#: The secret area OVMF reserves (one 4 KiB page on most builds, larger on
#: some); sevctl's tests check the 16 KiB ceiling. The table builder refuses
#: anything larger, the caller may check a tighter limit.
MAX_TABLE_LEN = 16384


def _pad_len(n: int) -> int:
    return (-n) % ALIGN


def build_secret_table(entries: Sequence[tuple[uuid.UUID, bytes]]) -> bytes:
    """The plaintext table for ``entries`` (GUID, data), zero-padded to 16 bytes."""
    if not entries:
        raise ValueError("a secret table needs at least one entry")
    seen: set[uuid.UUID] = set()
    body = bytearray()
    for guid, data in entries:
        if not isinstance(guid, uuid.UUID):
            raise ValueError("secret table entry GUID must be a uuid.UUID")
        if guid in seen:
            raise ValueError(f"duplicate secret GUID {guid}")
        if guid == SECRET_TABLE_HEADER_GUID:
            raise ValueError("the secret table header GUID cannot name an entry")
        seen.add(guid)
        body += _GUID_LEN.pack(guid_bytes(guid), HEADER_LEN + len(data))
        body += data
    total = HEADER_LEN + len(body)
    table = _GUID_LEN.pack(guid_bytes(SECRET_TABLE_HEADER_GUID), total) + bytes(body)
    table += bytes(_pad_len(len(table)))
    if len(table) > MAX_TABLE_LEN:
        raise ValueError(f"secret table is {len(table)} bytes, more than {MAX_TABLE_LEN}")
    return table


def parse_secret_table(data: bytes) -> list[tuple[uuid.UUID, bytes]]:
    """The ``(GUID, data)`` entries of a plaintext table; ValueError if malformed.

    Strict about structure (the simulator uses it to stand in for the guest):
    the header GUID must match, every entry length must fit inside the header
    length, and everything after the last entry must be zero padding.
    """
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise ValueError(f"secret table is {len(data)} bytes, shorter than its {HEADER_LEN}-byte header")
    raw_guid, total = _GUID_LEN.unpack_from(data, 0)
    if guid_from_bytes(raw_guid) != SECRET_TABLE_HEADER_GUID:
        raise ValueError("secret table does not start with the secret table header GUID")
    if total < HEADER_LEN or total > len(data):
        raise ValueError(f"secret table header length {total} does not fit the {len(data)}-byte table")
    entries: list[tuple[uuid.UUID, bytes]] = []
    seen: set[uuid.UUID] = set()
    off = HEADER_LEN
    while total - off >= HEADER_LEN:
        raw_guid, length = _GUID_LEN.unpack_from(data, off)
        if raw_guid == bytes(16) and length == 0:
            break  # the rest is padding counted in the header length
        if length < HEADER_LEN or off + length > total:
            raise ValueError(f"secret table entry at offset {off} has bad length {length}")
        guid = guid_from_bytes(raw_guid)
        if guid in seen:
            raise ValueError(f"secret table repeats GUID {guid}")
        seen.add(guid)
        entries.append((guid, data[off + HEADER_LEN : off + length]))
        off += length
    if any(data[off:]):
        raise ValueError(f"secret table has non-zero bytes after its last entry (offset {off})")
    if not entries:
        raise ValueError("secret table has no entries")
    return entries
