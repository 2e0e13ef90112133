"""GUIDs that name SEV launch-secret tables and their entries.

The guest firmware (OVMF's SEV secret area, read by Linux's ``efi_secret``
driver, GRUB's ``efisecret`` module and the COCONUT SVSM) finds the injected
secrets by GUID. The GUIDs travel in the table in the UEFI/Microsoft mixed-endian
form: the first three fields little-endian, the last eight bytes as written.
That is Python's ``uuid.UUID.bytes_le``; sevctl uses ``Uuid::to_bytes_le`` and
libvirt's ``virt-qemu-sev-validate`` uses ``UUID(...).bytes_le`` for the same
bytes (e.g. the table header GUID 1e74f542-... goes on the wire as
``42 f5 74 1e dd 71 66 4d 96 3e ef 42 87 ff 17 3b``).
"""

from __future__ import annotations

import uuid

#: Marks the start of the secret table OVMF publishes to the guest
#: (sevctl ``src/secret.rs``, libvirt ``SecretsTable.TABLE_GUID``).
SECRET_TABLE_HEADER_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")

#: The disk passphrase entry: Linux exposes it as
#: ``/sys/kernel/security/secrets/coco/736869e5-84f0-4973-92ec-06879ce3da0b``;
#: GRUB calls it ``GRUB_EFI_DISKPASSWD_GUID``, COCONUT SVSM ``LUKS_KEY_GUID``.
LUKS_KEY_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")

#: SEV fast migration (issue 18, docs/mh.md): the migration handler's (MH)
#: identity, the private half of its X25519 key pair, 32 raw bytes (RFC 7748).
#: Generated once for keyagent (uuid4); no public standard names these yet.
MH_PRIVATE_KEY_GUID = uuid.UUID("e1d17176-1244-40d6-a793-71c9344c786e")

#: ... and the source MH's X25519 public key, 32 raw bytes, in a migration
#: target's table; present but empty (0 data bytes) at an ordinary boot.
MH_SOURCE_PUBLIC_KEY_GUID = uuid.UUID("6109108f-0824-4106-b59e-46a19b275b0d")

#: Names a guest owner may write instead of a GUID. Only aliases with a public,
#: agreed meaning: libvirt's ``virt-qemu-sev-validate`` knows exactly this one
#: (``--inject-secret ALIAS-OR-GUID:PATH``, e.g. ``luks-key:PATH``). Any other
#: entry is named by its GUID.
GUID_ALIASES: dict[str, uuid.UUID] = {
    "luks-key": LUKS_KEY_GUID,
}


def resolve_guid(text: str) -> uuid.UUID:
    """Turn an alias (``luks-key``) or canonical GUID text into a UUID.

    Only the canonical 8-4-4-4-12 form (optionally in braces) is accepted, so
    that a typo cannot turn into some other 128-bit value silently.
    """
    name = text.strip()
    if name in GUID_ALIASES:
        return GUID_ALIASES[name]
    bare = name[1:-1] if name.startswith("{") and name.endswith("}") else name
    parts = bare.split("-")
    if [len(p) for p in parts] == [8, 4, 4, 4, 12]:
        try:
            return uuid.UUID(bare)
        except ValueError:
            pass
    shown = name if len(name) <= 64 and name.isprintable() else name[:64].encode("unicode_escape").decode()
    raise ValueError(f"unknown GUID alias {shown!r}")


def guid_bytes(g: uuid.UUID) -> bytes:
    """The 16 bytes of ``g`` as the firmware reads them (mixed-endian, ``bytes_le``)."""
    return g.bytes_le


def guid_from_bytes(raw: bytes) -> uuid.UUID:
    """Inverse of :func:`guid_bytes`."""
    if len(raw) != 16:
        raise ValueError(f"a GUID is 16 bytes, got {len(raw)}")
    return uuid.UUID(bytes_le=bytes(raw))
